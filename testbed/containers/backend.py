"""The container testbed: one agent per docker container on a private bridge, and its faults.

How it works. ``ContainerBackend(nodes=5).up()`` makes sure the images exist
(:mod:`testbed.containers.image`, cached), picks an id and a free ``172.29.X.0/24``, writes
``<root>/<id>/compose.yaml`` (:mod:`testbed.containers.compose`; root:
``$EDGEAGENT_CONTAINERS_DIR`` or ``/tmp/edgeagent-containers``) and runs ``compose up -d``
under the project ``edgeagent-tb-<id>``; h1 creates the cluster and publishes a join token,
the others enroll with it and find each other by mDNS. ``up`` returns when every node's
healthcheck (``edgeagent status``) passes.

Faults are one nftables table (``inet ea_tb``, hooks input and output) inside each
container's own network namespace, applied with ``docker exec`` (the containers have
NET_ADMIN) and rebuilt whole from the faults recorded in ``<root>/<id>/state.json`` each time
one changes: a partition drops traffic to and from the other groups' addresses (``oneway``:
only what the first group receives from the others), loss drops PCT % of the packets each way
(``numgen random``), isolate drops everything but loopback. A container that is started again
gets a new namespace, so :meth:`start` applies its recorded faults again.

With ``policy=True`` it also runs the HTTPS policy endpoint (service ``policy``): a CA and a
server certificate made at ``up`` (:mod:`.policy_tls`), the CA in ``/shared/policy-ca.pem``
for the agents' ``[policy] ca``; :meth:`policy_publish` serves an envelope,
:meth:`policy_stop` / :meth:`policy_start` are an outage.

``down`` runs ``compose down`` and then removes whatever still carries the project's label
(containers, the network), then the run dir; the images stay (``down(images=True)`` removes
them too). It is idempotent and works from the label alone after a crash halfway through
``up``.

The method names are those of :class:`testbed.cluster.Testbed` (the namespace testbed), so a
scenario can drive either: ``up``, ``down``, ``start``, ``stop``, ``kill``, ``restart``,
``wait_ready``, ``partition``, ``heal``, ``loss``, ``isolate``, ``members``, ``states``,
``views``, ``wait_until``, ``status``, ``exec_argv``; plus ``exec`` and ``logs``. Nodes are
``h1``..``hN`` (a bare number works too). Errors are :class:`ContainerError`, a
:class:`testbed.cluster.TestbedError`.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from edgeagent.commands.members import pages
from edgeagent.control import ControlClient, ControlError, socket_path
from edgeagent.errors import AgentUnavailable

from ..cluster import STATE_FILE, TestbedError, ids_under, pick_id
from . import image as images
from .compose import (
    IMAGE_PYTHON,
    POLICY_CA,
    POLICY_FILE,
    POLICY_HOST,
    POLICY_PORT,
    POLICY_REPORT_URL,
    POLICY_URL,
    PROJECT_PREFIX,
    TESTBED_LABEL,
    Plan,
    write_compose,
)
from .policy_tls import write_tls

DEFAULT_ROOT = Path("/tmp/edgeagent-containers")
ROOT_ENV = "EDGEAGENT_CONTAINERS_DIR"
NFT_TABLE = "ea_tb"
SUBNET_BASE = "172.29"
READY_TIMEOUT = 180.0  # seconds for every node's healthcheck to pass after compose up
START_TIMEOUT = 60.0  # one node started again
STOP_TIMEOUT = 10  # seconds docker stop gives the agent to leave before SIGKILL
EXEC_TIMEOUT = 30.0
POLL_S = 0.5
CALL_TIMEOUT = 5.0  # one control command over a node's socket
CONFIG_NAME = "agent.toml"  # the agents' config file in the shared dir (``config``)
SUBNET_TRIES = 3  # compose up again on a fresh subnet when ours was taken meanwhile

T = TypeVar("T")


class ContainerError(TestbedError):
    """A container testbed operation failed; the message is one line for a person."""


def default_root() -> Path:
    return Path(os.environ.get(ROOT_ENV) or DEFAULT_ROOT)


def compose_command() -> list[str]:
    """``docker compose`` (v2) when present, else ``docker-compose`` (v1)."""
    probe = subprocess.run(["docker", "compose", "version"], capture_output=True)
    if probe.returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    raise ContainerError("neither 'docker compose' nor 'docker-compose' is installed")


class ContainerBackend:
    """Agents in docker containers. A context manager: up, then down.

    ``nodes``: number of agents (h1..hN). ``token_mode``: ``mdns`` (the join token names no
    address: enrollment finds the issuer by mDNS) or ``address``. ``broker``: also run the
    mosquitto "cloud" service. ``run_args``: more ``edgeagent run`` flags for every agent.
    ``config``: TOML every agent reads as its config file (``/shared/agent.toml``; "" none).
    ``build``: build the images if missing or stale (else they must exist).
    ``policy``: also run the HTTPS policy endpoint (service ``policy``; TLS made at ``up``).
    ``node_configs``: node name -> TOML that node reads instead of ``config``
    (``/shared/agent-hN.toml``), e.g. ``[policy] url`` on only some nodes.
    """

    def __init__(
        self,
        nodes: int = 5,
        *,
        root: Path | None = None,
        token_mode: str = "mdns",
        broker: bool = False,
        run_args: Sequence[str] = (),
        config: str = "",
        policy: bool = False,
        node_configs: Mapping[str, str] | None = None,
        build: bool = True,
        log: Callable[[str], None] = lambda line: None,
    ) -> None:
        self.nodes_count = nodes
        self.root = Path(root) if root is not None else default_root()
        self.token_mode = token_mode
        self.broker = broker
        self.run_args = tuple(run_args)
        self.config = config
        self.policy = policy
        self.node_configs = dict(node_configs or {})
        self.build = build
        self.log = log
        self.id = ""
        self.workdir = Path()
        self.plan: Plan | None = None
        self.state: dict[str, Any] = {}
        self._compose: list[str] | None = None

    # -- lifecycle ----------------------------------------------------------------------------

    def __enter__(self) -> ContainerBackend:
        try:
            self.up()
        except BaseException:
            self.down()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    def up(self, nodes: int | None = None) -> None:
        """Start the containers and wait until every agent answers (``down`` on failure is
        the caller's: the context manager and the CLI do it)."""
        if nodes is not None:
            self.nodes_count = nodes
        if not 1 <= self.nodes_count <= 200:
            raise ContainerError(f"nodes must be 1..200, not {self.nodes_count}")
        reason = images.docker_available()
        if reason is not None:
            raise ContainerError(reason)
        tag = self._image()
        if self.broker and not images.has_mosquitto(tag):
            raise ContainerError(f"{tag} has no mosquitto; rebuild the base image or drop --broker")
        self._new_workdir()
        run_args, node_args = self._write_configs()
        self.plan = Plan(
            project=f"{PROJECT_PREFIX}{self.id}", image=tag,
            subnet_prefix=pick_subnet(int(self.id, 16)), nodes=self.nodes_count,
            cluster=f"tb-{self.id}", token_mode=self.token_mode, broker=self.broker,
            run_args=run_args, policy=self.policy, node_args=node_args,
        )
        self.state = {
            "id": self.id, "project": self.plan.project, "image": tag,
            "subnet_prefix": self.plan.subnet_prefix, "nodes": self.nodes_count,
            "cluster": self.plan.cluster, "token_mode": self.token_mode, "broker": self.broker,
            "run_args": list(run_args), "policy": self.policy,
            "node_args": [[n, list(a)] for n, a in node_args],
            "faults": {"partition": [], "oneway": False, "loss": {}, "isolated": []},
        }
        self._save()
        for attempt in range(SUBNET_TRIES):
            write_compose(self.plan, self.workdir)
            try:
                self._compose_run("up", "-d", "--no-build", timeout=300)
                break
            except ContainerError as exc:
                # Another testbed created a network on our subnet since we picked it.
                if "overlap" not in str(exc).lower() or attempt == SUBNET_TRIES - 1:
                    raise
                self._compose_run("down", "--remove-orphans", timeout=120, check=False)
                self.plan = dataclasses.replace(self.plan, subnet_prefix=pick_subnet(int(self.id, 16)))
                self.state["subnet_prefix"] = self.plan.subnet_prefix
                self._save()
        for name in self.names():
            self.wait_ready(name, READY_TIMEOUT)

    def _write_configs(self) -> tuple[tuple[str, ...], tuple[tuple[str, tuple[str, ...]], ...]]:
        """The config files and the policy endpoint's TLS into the new run dir; the common
        run flags and each node's own."""
        shared = self.workdir / "shared"
        shared.mkdir()
        run_args = self.run_args
        if self.config:
            (shared / CONFIG_NAME).write_text(self.config)
            run_args = (*run_args, "--config", f"/shared/{CONFIG_NAME}")
        node_args = []
        for name, text in sorted(self.node_configs.items()):
            (shared / f"agent-{name}.toml").write_text(text)
            node_args.append((name, ("--config", f"/shared/agent-{name}.toml")))
        if self.policy:
            ca = write_tls(self.workdir / "policy" / "tls", (POLICY_HOST,))
            shutil.copyfile(ca, shared / Path(POLICY_CA).name)
        return run_args, tuple(node_args)

    def down(self, images_too: bool = False) -> None:
        """Remove the containers, the network and the run dir (and the images if asked)."""
        if self.state:
            project = self.state["project"]
            if (self.workdir / "compose.yaml").is_file():
                self._compose_run("down", "--remove-orphans", "--timeout", "5", "--volumes",
                                  timeout=180, check=False)
            remove_labelled(project)
            if self.workdir.is_dir():
                _remove_run_dir(self.workdir, self.state.get("image"))
            self.state = {}
        if images_too:
            images.remove_images()

    @classmethod
    def load(cls, testbed_id: str | None = None, *, root: Path | None = None) -> ContainerBackend:
        """Find a container testbed started earlier (by id, or the only one under ``root``)."""
        root = Path(root) if root is not None else default_root()
        testbed_id = pick_id(root, testbed_id, what="container testbed", start="use 'up'",
                             error=ContainerError)  # fmt: skip
        state = json.loads((root / testbed_id / STATE_FILE).read_text())
        tb = cls(state["nodes"], root=root, token_mode=state["token_mode"],
                 broker=state["broker"], run_args=state["run_args"], build=False)
        tb.id = testbed_id
        tb.workdir = root / testbed_id
        tb.state = state
        tb.plan = Plan(project=state["project"], image=state["image"],
                       subnet_prefix=state["subnet_prefix"], nodes=state["nodes"],
                       cluster=state["cluster"], token_mode=state["token_mode"],
                       broker=state["broker"], run_args=tuple(state["run_args"]),
                       policy=state.get("policy", False),
                       node_args=tuple((n, tuple(a)) for n, a in state.get("node_args", [])))
        return tb

    # -- nodes --------------------------------------------------------------------------------

    @property
    def project(self) -> str:
        return self._plan.project

    @property
    def subnet(self) -> str:
        return self._plan.subnet

    def names(self) -> list[str]:
        """The nodes, h1 first."""
        return self._plan.names()

    def node(self, name: str | int) -> str:
        """A node's canonical name from ``"h2"``, ``"2"`` or ``2``."""
        text = str(name)
        canonical = f"h{text}" if text.isdigit() else text
        if canonical not in self.names():
            raise ContainerError(f"no node {text!r} (nodes are h1..h{self.nodes_count})")
        return canonical

    def ip(self, name: str | int) -> str:
        return self._plan.ip(self.node(name))

    def container(self, name: str | int) -> str:
        """The docker container name of a node."""
        return self._plan.container(self.node(name))

    def running(self, name: str | int) -> bool:
        return self._inspect(self.container(name)).get("Running") is True

    def start(self, name: str | int, wait: bool = True) -> None:
        """Start a stopped or killed node (same container, same state dir), re-apply its
        recorded faults and, with ``wait``, wait until its agent answers."""
        node = self.node(name)
        if self.running(node):
            raise ContainerError(f"{node} is already running")
        _docker("start", self.container(node))
        self._apply_faults(node)
        if wait:
            self.wait_ready(node, START_TIMEOUT)

    def stop(self, name: str | int, timeout: int = STOP_TIMEOUT) -> None:
        """SIGTERM the agent (graceful leave); docker SIGKILLs it after ``timeout`` s."""
        node = self._running_node(name)
        _docker("stop", "--time", str(timeout), self.container(node), timeout=timeout + 30)

    def kill(self, name: str | int) -> None:
        """SIGKILL the container (a crash)."""
        node = self._running_node(name)
        _docker("kill", "--signal", "KILL", self.container(node))

    def restart(self, name: str | int) -> None:
        """Kill the node if it runs, start it again and wait until its agent answers."""
        node = self.node(name)
        if self.running(node):
            self.kill(node)
        self.start(node)

    def wait_ready(self, name: str | int, timeout: float = START_TIMEOUT) -> None:
        """Wait until the node's healthcheck (``edgeagent status``) passes."""
        container = self.container(name)
        deadline = time.monotonic() + timeout
        while True:
            state = self._inspect(container)
            if not state.get("Running"):
                tail = self.logs(name, tail=1).strip() or f"exit code {state.get('ExitCode')}"
                raise ContainerError(f"{self.node(name)}: container exited ({tail})")
            if (state.get("Health") or {}).get("Status") == "healthy" or self._answers(name):
                return
            if time.monotonic() >= deadline:
                raise ContainerError(f"timed out after {timeout:g} s waiting for {self.node(name)} to be healthy")
            time.sleep(POLL_S)

    def cloud_running(self) -> bool:
        """Whether the "cloud" broker container runs (ContainerError without a broker)."""
        return self._inspect(self._cloud()).get("Running") is True

    def cloud_stop(self) -> None:
        """Stop the "cloud" broker (a cloud outage); the agents keep running."""
        _docker("stop", "--time", "1", self._cloud(), timeout=40)

    def cloud_start(self) -> None:
        """Start the "cloud" broker again (same container, same address)."""
        _docker("start", self._cloud())

    def policy_running(self) -> bool:
        """Whether the policy endpoint container runs (ContainerError without one)."""
        return self._inspect(self._policy()).get("Running") is True

    def policy_stop(self) -> None:
        """Stop the policy endpoint (an outage); agents keep their last-known-good bundle."""
        _docker("stop", "--time", "1", self._policy(), timeout=40)

    def policy_start(self) -> None:
        """Start the policy endpoint again (same container, same served dir)."""
        _docker("start", self._policy())

    def policy_publish(self, envelope: bytes) -> Path:
        """Serve ``envelope`` as the endpoint's bundle (``POLICY_URL``): atomically replaced,
        so a poll sees the old one or the new one. The file's path on the host."""
        self._policy()
        path = self.workdir / "policy" / "www" / POLICY_FILE
        tmp = path.with_name(f".{POLICY_FILE}.tmp")
        tmp.write_bytes(envelope)
        os.replace(tmp, path)
        return path

    def policy_reports(self) -> dict[str, Any]:
        """The endpoint's kept reports, ``{node: {"count", "last"}}`` (``GET /reports`` from a
        node's container, which resolves ``policy`` and trusts its CA)."""
        self._policy()
        script = ("import json,ssl,sys,urllib.request as u;"
                  "c=ssl.create_default_context(cafile=sys.argv[2]);"
                  "sys.stdout.write(u.urlopen(sys.argv[1],context=c,timeout=5).read(1<<22).decode())")  # fmt: skip
        url = POLICY_REPORT_URL + "s"  # /reports
        node = next((n for n in self.names() if self.running(n)), None)
        if node is None:
            raise ContainerError("no node runs to ask the policy endpoint")
        proc = self.exec(node, [IMAGE_PYTHON, "-c", script, url, POLICY_CA], timeout=EXEC_TIMEOUT)
        try:
            doc = json.loads(proc.stdout) if proc.returncode == 0 else None
        except json.JSONDecodeError:
            doc = None
        if not isinstance(doc, dict):
            raise ContainerError(f"policy reports: {images.last_line(proc.stderr) or 'no JSON'}")
        return doc

    def _policy(self) -> str:
        if not self.state.get("policy"):
            raise ContainerError("this testbed has no policy endpoint (up --policy)")
        return self._plan.container(POLICY_HOST)

    def _cloud(self) -> str:
        if not self.state.get("broker"):
            raise ContainerError("this testbed has no cloud broker (up --broker)")
        return self._plan.container("cloud")

    def _answers(self, name: str | int) -> bool:
        """The agent answers ``status`` on its socket (sooner than docker's next healthcheck)."""
        if not self.control_socket(name).is_socket():
            return False
        try:
            self.call(name, "status")
        except ContainerError:
            return False
        return True

    # -- observing ----------------------------------------------------------------------------

    def exec_argv(self, name: str | int, argv: Sequence[str]) -> list[str]:
        """A command line that runs ``argv`` inside the node's container."""
        return ["docker", "exec", self.container(name), *argv]

    def exec(self, name: str | int, argv: Sequence[str], *, input: str | None = None,
             timeout: float = EXEC_TIMEOUT) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in the node's container; the completed process (not checked)."""
        cmd = ["docker", "exec", *(["-i"] if input is not None else []), self.container(name), *argv]
        try:
            return subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise ContainerError(f"{self.node(name)}: {' '.join(argv)} timed out after {timeout:g} s") from None

    def logs(self, name: str | int, tail: int | None = None) -> str:
        """The node's container output (the agent's log lines), all or the last ``tail``;
        ``cloud`` is the broker's."""
        if name in ("cloud", POLICY_HOST) and self.state.get("broker" if name == "cloud" else "policy"):
            container = self._plan.container(str(name))
        else:
            container = self.container(name)
        argv = ["docker", "logs", *(["--tail", str(tail)] if tail else []), container]
        proc = subprocess.run(argv, capture_output=True, text=True)
        return proc.stdout + proc.stderr

    def control_socket(self, name: str | int) -> Path:
        """The node's control socket on the host (its state dir is bind-mounted)."""
        return socket_path(self.workdir / "state" / self.node(name))

    def call(self, name: str | int, cmd: str, /, timeout: float = CALL_TIMEOUT, **args: Any) -> Any:
        """One control command to the node's agent over its socket; ContainerError if it
        does not answer or refuses. ``name`` and ``cmd`` are positional only, so a command's
        own ``name`` argument (``service register``) goes to the agent."""
        try:
            return ControlClient(self.control_socket(name), timeout=timeout).call(cmd, **args)
        except (AgentUnavailable, ControlError, OSError) as exc:
            raise ContainerError(f"{self.node(name)}: {cmd}: {exc}") from None

    def members(self, name: str | int, timeout: float = EXEC_TIMEOUT) -> list[dict[str, Any]]:
        """The node's membership list (over its control socket, else ``edgeagent members
        --json`` in the container); ContainerError if down."""
        node = self.node(name)
        if self.control_socket(node).is_socket():
            return list(pages(lambda **page: self.call(node, "members", timeout=min(timeout, CALL_TIMEOUT), **page)))
        proc = self.exec(node, ["edgeagent", "members", "--json"], timeout=timeout)
        if proc.returncode != 0:
            raise ContainerError(f"{node}: {images.last_line(proc.stderr) or 'members failed'}")
        try:
            members = json.loads(proc.stdout)
        except json.JSONDecodeError:
            raise ContainerError(f"{node}: members --json printed no JSON") from None
        return list(members)

    def states(self, name: str | int) -> dict[str, str]:
        """The node's view: member name -> state (alive, suspect, dead, left); {} if down."""
        try:
            return {m["name"]: m["state"] for m in self.members(name)}
        except ContainerError:
            return {}

    def views(self, names: Sequence[str | int] | None = None) -> dict[str, dict[str, str]]:
        """:meth:`states` of several nodes (default: all that run)."""
        chosen = [self.node(n) for n in names] if names is not None else [
            n for n in self.names() if self.running(n)
        ]
        return {n: self.states(n) for n in chosen}

    def wait_until(self, predicate: Callable[[], T], timeout: float, interval: float = 1.0,
                   what: str = "condition") -> T:
        """Poll ``predicate`` until it returns something truthy; ContainerError after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() >= deadline:
                raise ContainerError(f"timed out after {timeout:g} s waiting for {what}")
            time.sleep(interval)

    def status(self) -> dict[str, Any]:
        """Per node: address, container state, health, faults and what its agent sees."""
        faults = self.state["faults"]
        nodes = {}
        for name in self.names():
            state = self._inspect(self.container(name))
            counts: dict[str, int] = {}
            for member_state in (self.states(name) if state.get("Running") else {}).values():
                counts[member_state] = counts.get(member_state, 0) + 1
            nodes[name] = {
                "ip": self.ip(name),
                "container": self.container(name),
                "state": state.get("Status", "missing"),
                "health": (state.get("Health") or {}).get("Status"),
                "members": counts,
                "loss_percent": faults["loss"].get(name, 0),
                "partitioned": any(name in g for g in faults["partition"]),
                "isolated": name in faults["isolated"],
            }
        out: dict[str, Any] = {"id": self.id, "project": self.project, "subnet": self.subnet,
                               "image": self.state["image"], "workdir": str(self.workdir),
                               "nodes": nodes}
        if self.state["broker"]:
            out["broker"] = {"address": f"{self._plan.broker_ip}:1883",
                             "state": self._inspect(self._plan.container("cloud")).get("Status", "missing")}
        if self.state.get("policy"):
            out["policy"] = {"url": POLICY_URL, "address": f"{self._plan.policy_ip}:{POLICY_PORT}",
                             "state": self._inspect(self._policy()).get("Status", "missing")}
        return out

    # -- faults -------------------------------------------------------------------------------

    def partition(self, groups: Sequence[Sequence[str | int]], *, oneway: bool = False) -> None:
        """Cut the network between groups of nodes (``oneway``: only traffic into the first
        group is dropped). Replaces an earlier partition."""
        named = [[self.node(n) for n in g] for g in groups]
        if len(named) < 2 or not all(named):
            raise ContainerError("partition needs two or more non-empty groups: h1,h2/h3,h4")
        flat = [n for g in named for n in g]
        if len(set(flat)) != len(flat):
            raise ContainerError("a node is in two partition groups")
        self._set_faults(partition=named, oneway=oneway)

    def heal(self) -> None:
        """Remove the partition and isolation (loss stays; ``loss(node, 0)`` clears it)."""
        self._set_faults(partition=[], oneway=False, isolated=[])

    def loss(self, name: str | int, percent: int) -> None:
        """Drop ``percent`` % of the node's packets in each direction (0: no loss)."""
        if not 0 <= int(percent) <= 100:
            raise ContainerError(f"loss percent must be 0..100, not {percent}")
        node = self.node(name)
        loss = {k: v for k, v in self.state["faults"]["loss"].items() if k != node}
        if percent:
            loss[node] = int(percent)
        self._set_faults(loss=loss)

    def isolate(self, name: str | int) -> None:
        """Drop all of the node's traffic but loopback until :meth:`heal`."""
        node = self.node(name)
        isolated = sorted({*self.state["faults"]["isolated"], node})
        self._set_faults(isolated=isolated)

    def nft_rules(self, name: str) -> list[tuple[str, str]]:
        """The (chain, rule) pairs the recorded faults give one node."""
        faults = self.state["faults"]
        rules: list[tuple[str, str]] = []
        if name in faults["isolated"]:
            rules += [("input", 'iifname != "lo" drop'), ("output", 'oifname != "lo" drop')]
        pct = faults["loss"].get(name, 0)
        if pct:
            rules += [("input", f'iifname != "lo" numgen random mod 100 < {pct} drop'),
                      ("output", f'oifname != "lo" numgen random mod 100 < {pct} drop')]
        groups: list[list[str]] = faults["partition"]
        mine = next((i for i, g in enumerate(groups) if name in g), None)
        if mine is not None:
            others = [self.ip(n) for i, g in enumerate(groups) if i != mine for n in g]
            addresses = "{ " + ", ".join(others) + " }"
            if not faults["oneway"]:
                rules += [("input", f"ip saddr {addresses} drop"),
                          ("output", f"ip daddr {addresses} drop")]
            elif mine == 0:
                rules += [("input", f"ip saddr {addresses} drop")]
        return rules

    # -- internals ----------------------------------------------------------------------------

    @property
    def _plan(self) -> Plan:
        if self.plan is None:
            raise ContainerError("the container testbed is not up")
        return self.plan

    def _image(self) -> str:
        if self.build:
            try:
                return images.ensure_images(log=self.log).tag
            except images.ImageError as exc:
                raise ContainerError(str(exc)) from None
        tag = images.node_tag()
        if images.image_id(tag) is None:
            raise ContainerError(f"no image {tag}; build it: python -m testbed containers build")
        return tag

    def _new_workdir(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        while True:
            self.id = secrets.token_hex(2)
            if not (self.root / self.id).exists() and not _labelled("ps", f"{PROJECT_PREFIX}{self.id}"):
                break
        self.workdir = self.root / self.id
        self.workdir.mkdir()

    def _running_node(self, name: str | int) -> str:
        node = self.node(name)
        if not self.running(node):
            raise ContainerError(f"{node} is not running")
        return node

    def _inspect(self, container: str) -> dict[str, Any]:
        proc = subprocess.run(["docker", "inspect", "--format", "{{json .State}}", container],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            return {}
        return dict(json.loads(proc.stdout))

    def _set_faults(self, **changes: Any) -> None:
        with self._locked():
            self.state["faults"].update(changes)
            self._save()
        for name in self.names():
            if self.running(name):
                self._apply_faults(name)

    def _apply_faults(self, name: str) -> None:
        """Replace the node's nftables table with the rules of its recorded faults."""
        rules = self.nft_rules(name)
        script = [f"add table inet {NFT_TABLE}", f"delete table inet {NFT_TABLE}"]
        if rules:
            script.append(f"table inet {NFT_TABLE} {{")
            for chain in ("input", "output"):
                script.append(f"  chain {chain} {{")
                script.append(f"    type filter hook {chain} priority -10; policy accept;")
                script += [f"    {rule}" for c, rule in rules if c == chain]
                script.append("  }")
            script.append("}")
        proc = self.exec(name, ["nft", "-f", "-"], input="\n".join(script) + "\n")
        if proc.returncode != 0:
            raise ContainerError(f"{name}: nft failed: {images.last_line(proc.stderr)}")

    def _compose_run(self, *args: str, timeout: float, check: bool = True) -> None:
        if self._compose is None:
            self._compose = compose_command()
        argv = [*self._compose, "-p", self.state["project"], "-f", str(self.workdir / "compose.yaml"), *args]
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise ContainerError(f"compose {args[0]} timed out after {timeout:g} s") from None
        if check and proc.returncode != 0:
            raise ContainerError(f"compose {args[0]} failed: {images.last_line(proc.stderr)}")

    def _save(self) -> None:
        tmp = self.workdir / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(self.state, indent=1))
        os.replace(tmp, self.workdir / STATE_FILE)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Serialise fault updates between concurrent CLI invocations (re-read, then change)."""
        with open(self.workdir / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                current = self.workdir / STATE_FILE
                if current.exists():
                    self.state["faults"] = json.loads(current.read_text())["faults"]
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


def list_ids(root: Path | None = None) -> list[str]:
    """Ids of the container testbeds that have a state file under ``root``."""
    return ids_under(Path(root) if root is not None else default_root())


def pick_subnet(start: int) -> str:
    """A ``172.29.X`` prefix no docker network and no host route uses (X from ``start``)."""
    used = _used_prefixes()
    for step in range(256):
        prefix = f"{SUBNET_BASE}.{(start + step) % 256}"
        if prefix not in used:
            return prefix
    raise ContainerError(f"every {SUBNET_BASE}.X.0/24 is in use")


def _used_prefixes() -> set[str]:
    used: set[str] = set()
    ids = subprocess.run(["docker", "network", "ls", "-q"], capture_output=True, text=True).stdout.split()
    if ids:
        out = subprocess.run(["docker", "network", "inspect", "--format",
                              "{{range .IPAM.Config}}{{.Subnet}} {{end}}", *ids],
                             capture_output=True, text=True).stdout
        used |= {".".join(s.split(".")[:3]) for s in out.split() if s.startswith(f"{SUBNET_BASE}.")}
    routes = subprocess.run(["ip", "-4", "route", "show"], capture_output=True, text=True).stdout
    used |= {".".join(w.split(".")[:3]) for w in routes.split() if w.startswith(f"{SUBNET_BASE}.")}
    return used


def _labelled(kind: str, project: str) -> list[str]:
    """Ids of containers (``ps``) or networks (``network``) carrying the project's label."""
    argv = (["docker", "ps", "-aq"] if kind == "ps" else ["docker", "network", "ls", "-q"])
    proc = subprocess.run([*argv, "--filter", f"label={TESTBED_LABEL}={project}"],
                          capture_output=True, text=True)
    return proc.stdout.split()


def remove_labelled(project: str) -> None:
    """Remove every container and network labelled as the project's (what compose left)."""
    containers = _labelled("ps", project)
    if containers:
        subprocess.run(["docker", "rm", "-f", "-v", *containers], capture_output=True)
    networks = _labelled("network", project)
    if networks:
        subprocess.run(["docker", "network", "rm", *networks], capture_output=True)
    left = _labelled("ps", project) + _labelled("network", project)
    if left:
        raise ContainerError(f"could not remove {len(left)} docker objects of {project}")


def _remove_run_dir(workdir: Path, image: str | None) -> None:
    """Remove the run dir. The agents (root in their containers) wrote the bind-mounted state
    and shared dirs; a user in the docker group who is not root cannot remove those, so then
    a throwaway container of the node image removes them first."""
    try:
        shutil.rmtree(workdir)
        return
    except PermissionError:
        if not image:
            raise ContainerError(f"cannot remove {workdir}: files the containers wrote; remove it as root") from None
    subprocess.run(["docker", "run", "--rm", "--network", "none", "--entrypoint", "/bin/rm",
                    "-v", f"{workdir}:/run-dir", image, "-rf", "/run-dir/state", "/run-dir/shared"],
                   capture_output=True, timeout=120)  # fmt: skip
    try:
        shutil.rmtree(workdir)
    except PermissionError:
        raise ContainerError(f"cannot remove {workdir}: files the containers wrote; remove it as root") from None


def _docker(*args: str, timeout: float = 60) -> str:
    try:
        proc = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise ContainerError(f"docker {args[0]} timed out after {timeout:g} s") from None
    if proc.returncode != 0:
        raise ContainerError(f"docker {args[0]} failed: {images.last_line(proc.stderr)}")
    return proc.stdout
