"""The multi-host testbed: one real agent process per network namespace, and its faults.

How it works. ``Testbed(hosts=5).up()`` picks a fresh id and a work dir
``<root>/<id>/`` (root: ``$EDGEAGENT_TESTBED_DIR`` or ``/tmp/edgeagent-testbed``), builds the
network (:mod:`testbed.netns`), creates one cluster (a mesh CA held in memory and a keyring),
provisions every host's state dir as a member of it (keyring, node certificate, cluster name:
what ``edgeagent join`` would save, via :func:`edgeagent.onboarding.provision_member`) and
writes a generated TOML config
(``<workdir>/hN/agent.toml``), and starts ``ip netns exec ea-ID-hN python -m edgeagent run -c
agent.toml`` for each, logging to ``<workdir>/hN/agent.log`` with its state dir in
``<workdir>/hN/state``. Each agent is an :class:`edgeagent.agent_process.AgentProcess`, the
same harness the loopback testbed and ``edgeagent demo`` use.

Everything created is recorded in ``<workdir>/state.json`` *as it is created* (namespaces,
PIDs with their kernel start times), so ``down`` removes exactly that - the processes (by PID,
checked against the start time so a reused PID is never touched, plus anything left inside our
own namespaces), the namespaces (and with them the bridge, veths and nftables rules) and the
work dir - and nothing else, even after a crash halfway through ``up``. ``down`` is idempotent.

The command line (``python -m testbed``) and pytest fixtures drive the same class; the CLI
finds a running testbed again with :meth:`Testbed.load`.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from edgeagent.agent_process import (
    READY_TIMEOUT,
    STOP_TIMEOUT,
    AgentProcess,
    AgentProcessError,
    process_start_time,
)
from edgeagent.errors import AgentUnavailable
from edgeagent.onboarding import ClusterCA, new_ca, provision_member

from . import netns
from .netns import HostNet, NetnsError, Network

DEFAULT_ROOT = Path("/tmp/edgeagent-testbed")
ROOT_ENV = "EDGEAGENT_TESTBED_DIR"
STATE_FILE = "state.json"
GOSSIP_PORT = 7946  # edgeagent's default; each host has its own address, so all share it

T = TypeVar("T")


class TestbedError(Exception):
    """A testbed operation failed; the message is one line for a person."""

    __test__ = False  # not a pytest test class despite the name


def default_root() -> Path:
    """Where testbeds keep their work dirs."""
    return Path(os.environ.get(ROOT_ENV) or DEFAULT_ROOT)


class Testbed:
    """Agents on a network-namespace testbed (root only). A context manager: up, then down.

    ``hosts``: number of hosts (h1..hN). ``preset``: gossip preset (lan, wan, local).
    ``mdns``: agents find each other by mDNS; with ``seeds`` as well (or only, if mdns is off)
    each agent joins h1 (h1 joins h2). ``extra_args``: more ``edgeagent run`` flags for all.
    ``root``: parent of the work dir. ``start_agents``: False builds only the network.
    """

    __test__ = False

    def __init__(
        self,
        hosts: int = 5,
        *,
        preset: str = "lan",
        mdns: bool = True,
        seeds: bool = False,
        extra_args: Sequence[str] = (),
        root: Path | None = None,
        start_agents: bool = True,
        python: str = sys.executable,
    ) -> None:
        if not mdns and not seeds and hosts > 1:
            raise TestbedError("agents need mDNS or seeds to find each other")
        self.hosts_count = hosts
        self.preset = preset
        self.mdns = mdns
        self.seeds = seeds
        self.extra_args = list(extra_args)
        self.root = Path(root) if root is not None else default_root()
        self.start_agents = start_agents
        self.python = python
        self.id = ""
        self.workdir = Path()
        self.network: Network | None = None
        self.state: dict[str, Any] = {}
        self._agents: dict[str, AgentProcess] = {}

    # -- lifecycle ----------------------------------------------------------------------------

    def __enter__(self) -> Testbed:
        try:
            self.up()
        except BaseException:
            self.down()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    def up(self) -> None:
        """Build the network and start one agent per host."""
        if not netns.is_root():
            raise TestbedError("the namespace testbed needs root (network namespaces)")
        if shutil.which("nft") is None:
            raise TestbedError("nft not found: apt-get install -y nftables")
        self.root.mkdir(parents=True, exist_ok=True)
        existing = netns.list_netns()
        while True:
            self.id = secrets.token_hex(2)
            prefix = f"{netns.NS_PREFIX}{self.id}-"
            if not (self.root / self.id).exists() and not any(n.startswith(prefix) for n in existing):
                break
        self.workdir = self.root / self.id
        self.workdir.mkdir()
        octet = netns.pick_subnet_octet(int(self.id, 16) % 256, avoid=_octets_in_use(self.root))
        self.state = {
            "id": self.id,
            "workdir": str(self.workdir),
            "hosts": self.hosts_count,
            "subnet_octet": octet,
            "preset": self.preset,
            "mdns": self.mdns,
            "seeds": self.seeds,
            "extra_args": self.extra_args,
            "python": self.python,
            "namespaces": [],
            "agents": {},
        }
        self._save()
        self.network = Network(self.id, self.hosts_count, octet)
        self.network.create(self._record_netns)
        ca = new_ca(f"testbed-{self.id}")
        for host in self.network.hosts:
            self._write_config(host, ca)
        if self.start_agents:
            for host in self.network.hosts:
                self.start(host.name)
            for host in self.network.hosts:
                self.wait_ready(host.name)

    def down(self) -> None:
        """Remove every process, namespace and file this testbed created. Safe to repeat."""
        if not self.state:
            return
        for name in list(self.state["agents"]):
            self._kill(self._agent(name))
        for ns in reversed(self.state["namespaces"]):
            for pid in netns.netns_pids(ns):
                # Only processes inside our own namespace: we started them (agents or exec).
                _signal(pid, signal.SIGKILL)
            netns.delete_netns(ns)
        for agent in self._agents.values():
            if agent.process is not None:
                agent.process.wait()  # reap what the namespace sweep killed
        self._agents.clear()
        if self.workdir.is_dir():
            shutil.rmtree(self.workdir)
        self.state = {}

    @classmethod
    def load(cls, testbed_id: str | None = None, *, root: Path | None = None) -> Testbed:
        """Find a testbed started earlier (by id, or the only one under ``root``)."""
        root = Path(root) if root is not None else default_root()
        testbed_id = pick_id(root, testbed_id)
        state = json.loads((root / testbed_id / STATE_FILE).read_text())
        tb = cls(
            state["hosts"],
            preset=state["preset"],
            mdns=state["mdns"],
            seeds=state["seeds"],
            extra_args=state["extra_args"],
            root=root,
            python=state["python"],
        )
        tb.id = testbed_id
        tb.workdir = root / testbed_id
        tb.state = state
        tb.network = Network(testbed_id, state["hosts"], state["subnet_octet"])
        return tb

    # -- agents -------------------------------------------------------------------------------

    @property
    def subnet(self) -> str:
        """The private test subnet, e.g. ``10.213.7.0/24``."""
        return self._net.subnet

    @property
    def hosts(self) -> list[HostNet]:
        """The hosts, h1 first."""
        return self._net.hosts

    def host(self, name: str | int) -> HostNet:
        """A host by name (``"h2"``), number string (``"2"``) or number (``2``)."""
        try:
            return self._net.host(str(name))
        except KeyError as exc:
            raise TestbedError(str(exc.args[0])) from None

    def host_dir(self, name: str | int) -> Path:
        return self.workdir / self.host(name).name

    def state_dir(self, name: str | int) -> Path:
        """The agent's ``--state-dir`` (its control socket lives there)."""
        return self.host_dir(name) / "state"

    def log_path(self, name: str | int) -> Path:
        return self.host_dir(name) / "agent.log"

    def pid(self, name: str | int) -> int | None:
        """The PID of the host's agent if it is running."""
        return self._agent(name).pid

    def start(self, name: str | int) -> int:
        """Start the host's agent (it must not be running); return its PID."""
        agent = self._agent(name)
        if agent.running:
            raise TestbedError(f"{agent.name} is already running")
        try:
            pid = agent.start(wait=False)
        except AgentProcessError:
            raise TestbedError(f"{agent.name}: agent exited at once; see {agent.log_path}") from None
        with self._locked():
            self.state["agents"][agent.name] = {"pid": pid, "start_time": agent.start_time}
            self._save()
        return pid

    def wait_ready(self, name: str | int, timeout: float = READY_TIMEOUT) -> None:
        """Wait until the host's agent answers on its control socket; TestbedError if it died."""
        agent = self._agent(name)
        try:
            agent.wait_ready(timeout)
        except AgentProcessError:
            tail = agent.log_tail(1).strip()
            raise TestbedError(f"{agent.name}: agent exited ({tail}); log {agent.log_path}") from None
        except TimeoutError:
            raise TestbedError(
                f"timed out after {timeout:g} s waiting for {agent.name}'s agent to answer"
            ) from None

    def kill(self, name: str | int) -> None:
        """SIGKILL the host's agent (a crash) and wait until it is gone."""
        agent = self._agent(name)
        if not self._kill(agent):
            raise TestbedError(f"{agent.name} is not running")

    def stop(self, name: str | int, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM the host's agent (graceful leave); SIGKILL it after ``timeout``."""
        agent = self._agent(name)
        if not agent.running:
            raise TestbedError(f"{agent.name} is not running")
        try:
            agent.terminate(timeout)
        except AgentProcessError as exc:
            raise TestbedError(str(exc)) from None

    def restart(self, name: str | int) -> int:
        """Kill the host's agent if it runs (SIGKILL), start it again with the same state, wait."""
        agent = self._agent(name)
        self._kill(agent)
        pid = self.start(agent.name)
        self.wait_ready(agent.name)
        return pid

    def agent_argv(self, host: HostNet) -> list[str]:
        """The agent's command line (inside its namespace)."""
        return [
            self.python, "-m", "edgeagent", "run",
            "-c", str(self.host_dir(host.name) / "agent.toml"),
            *self.extra_args,
        ]

    def _write_config(self, host: HostNet, ca: ClusterCA) -> None:
        hdir = self.host_dir(host.name)
        provision_member(ca, hdir / "state", host.name)
        join: list[str] = []
        if self.seeds and len(self.hosts) > 1:
            seed = self.hosts[1] if host.index == 1 else self.hosts[0]
            join = [f"{seed.ip}:{GOSSIP_PORT}"]
        lines = [
            "# Generated by testbed.cluster for one host of the namespace testbed.",
            f"name = {_toml_str(host.name)}",
            f"bind = {_toml_str(f'{host.ip}:{GOSSIP_PORT}')}",
            f"advertise = {_toml_str(f'{host.ip}:{GOSSIP_PORT}')}",
            f"join = [{', '.join(_toml_str(j) for j in join)}]",
            f"cluster = {_toml_str(f'testbed-{self.id}')}",
            f"state_dir = {_toml_str(str(hdir / 'state'))}",
            "log_format = \"text\"",
            "log_level = \"info\"",
            f"mdns = {'true' if self.mdns else 'false'}",
            "metrics = false",
            "dns = false",
            "",
            "[gossip]",
            f"preset = {_toml_str(self.preset)}",
            "",
        ]
        (hdir / "agent.toml").write_text("\n".join(lines))

    # -- observing ----------------------------------------------------------------------------

    def members(self, name: str | int, timeout: float = 5.0) -> list[dict[str, Any]]:
        """The host's membership list (``edgeagent members --json``); TestbedError if down."""
        agent = self._agent(name)
        try:
            return agent.members(timeout)
        except AgentUnavailable as exc:
            raise TestbedError(f"{agent.name}: {exc}") from None

    def states(self, name: str | int) -> dict[str, str]:
        """The host's view: member name -> state (alive, suspect, dead, left); {} if down."""
        try:
            return {m["name"]: m["state"] for m in self.members(name)}
        except TestbedError:
            return {}

    def views(self, names: Sequence[str | int] | None = None) -> dict[str, dict[str, str]]:
        """:meth:`states` of several hosts (default: all that run)."""
        chosen = [self.host(n).name for n in names] if names is not None else [
            h.name for h in self.hosts if self.pid(h.name) is not None
        ]
        return {n: self.states(n) for n in chosen}

    def wait_until(
        self, predicate: Callable[[], T], timeout: float, interval: float = 0.5, what: str = "condition"
    ) -> T:
        """Poll ``predicate`` until it returns something truthy; TestbedError after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() >= deadline:
                raise TestbedError(f"timed out after {timeout:g} s waiting for {what}")
            time.sleep(interval)

    def status(self) -> dict[str, Any]:
        """Per host: address, PID, faults and what its agent sees (counts by state)."""
        faults = self._net.faults()
        hosts = {}
        for host in self.hosts:
            pid = self.pid(host.name)
            view = self.states(host.name) if pid is not None else {}
            counts: dict[str, int] = {}
            for state in view.values():
                counts[state] = counts.get(state, 0) + 1
            hosts[host.name] = {
                "ip": host.ip,
                "netns": host.netns,
                "pid": pid,
                "members": counts,
                **faults[host.name],
            }
        return {"id": self.id, "subnet": self._net.subnet, "workdir": str(self.workdir), "hosts": hosts}

    # -- faults -------------------------------------------------------------------------------

    def partition(self, groups: Sequence[Sequence[str | int]], *, oneway: bool = False) -> None:
        """Cut the network between groups of hosts (see :meth:`Network.partition`)."""
        self._net.partition([[self.host(n) for n in g] for g in groups], oneway=oneway)

    def heal(self) -> None:
        """Remove partitions and bring every link up (loss stays; ``loss(host, 0)`` clears it)."""
        self._net.heal_partitions()
        for host in self.hosts:
            self._net.set_link(host, True)

    def loss(self, name: str | int, percent: int) -> None:
        """Drop ``percent`` % of the host's frames in each direction (0: no loss)."""
        self._net.set_loss(self.host(name), percent)

    def isolate(self, name: str | int) -> None:
        """Take the host's link down (it reaches and hears no one until :meth:`heal`)."""
        self._net.set_link(self.host(name), False)

    def exec_argv(self, name: str | int, argv: Sequence[str]) -> list[str]:
        """A command line that runs ``argv`` inside the host's namespace."""
        return self._net.exec_argv(self.host(name), argv)

    # -- internals ----------------------------------------------------------------------------

    @property
    def _net(self) -> Network:
        if self.network is None:
            raise TestbedError("the testbed is not up")
        return self.network

    def _record_netns(self, name: str) -> None:
        with self._locked():
            self.state["namespaces"].append(name)
            self._save()

    def _agent(self, name: str | int) -> AgentProcess:
        """The host's agent process, in step with its record (another CLI run may have
        restarted it)."""
        host = self.host(name)
        agent = self._agents.get(host.name)
        if agent is None:
            argv = self._net.exec_argv(host, self.agent_argv(host))
            agent = AgentProcess(host.name, argv, self.state_dir(host.name), self.log_path(host.name))
            self._agents[host.name] = agent
        record = self.state.get("agents", {}).get(host.name)
        if record and (record["pid"], record["start_time"]) != (agent.last_pid, agent.start_time):
            agent.adopt(record["pid"], record["start_time"])
        return agent

    def _kill(self, agent: AgentProcess) -> bool:
        """SIGKILL the agent if it still runs; wait until gone. True if it was running."""
        try:
            return agent.kill()
        except AgentProcessError as exc:
            raise TestbedError(str(exc)) from None

    def _save(self) -> None:
        tmp = self.workdir / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(self.state, indent=1))
        os.replace(tmp, self.workdir / STATE_FILE)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Serialise state-file updates between concurrent CLI invocations."""
        with open(self.workdir / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                current = self.workdir / STATE_FILE
                if current.exists():
                    on_disk = json.loads(current.read_text())
                    # Another invocation may have started or restarted agents meanwhile.
                    self.state["agents"] = {**on_disk.get("agents", {}), **self.state["agents"]}
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


def list_ids(root: Path | None = None) -> list[str]:
    """Ids of the testbeds that have a state file under ``root``."""
    return ids_under(Path(root) if root is not None else default_root())


def ids_under(root: Path) -> list[str]:
    """Ids of the testbeds (namespace or container ones) with a state file under ``root``."""
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / STATE_FILE).is_file())


def pick_id(
    root: Path,
    testbed_id: str | None,
    *,
    what: str = "testbed",
    start: str = "start one with 'up'",
    error: type[TestbedError] = TestbedError,
) -> str:
    """``testbed_id`` if a testbed of that id is up under ``root``; without one, the only one
    up. Anything else is ``error`` naming what to do (``start`` when none is up)."""
    ids = ids_under(root)
    if testbed_id is None:
        if not ids:
            raise error(f"no {what} is up (nothing in {root}); {start}")
        if len(ids) > 1:
            raise error(f"several {what}s are up ({', '.join(ids)}); pass --id")
        testbed_id = ids[0]
    if testbed_id not in ids:
        raise error(f"no {what} {testbed_id!r} in {root}")
    return testbed_id


def _octets_in_use(root: Path) -> set[int]:
    octets = set()
    for tid in list_ids(root):
        try:
            octets.add(int(json.loads((root / tid / STATE_FILE).read_text())["subnet_octet"]))
        except (OSError, ValueError, KeyError):
            continue
    return octets


def _signal(pid: int, sig: signal.Signals) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _toml_str(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


__all__ = ["NetnsError", "Testbed", "TestbedError", "default_root", "list_ids", "process_start_time"]
