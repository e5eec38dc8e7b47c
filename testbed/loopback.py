"""N real agents as processes on loopback addresses: no root, no namespaces.

How it works. :class:`LoopbackCluster` picks a random ``127.A.B.0/24`` (so concurrent clusters
on one machine do not collide) and one free port, and gives agent *i* the address
``127.A.B.(i+1):PORT``, its own state dir (identity, keyring, control socket, ``agent.log``),
the same freshly generated cluster key, and the first few agents as seeds. Each agent is
``python -m edgeagent run --no-mdns --preset local ...``: the real daemon on real sockets.
The harness talks to each agent through its control socket, exactly as the CLI does.

Options: ``seeds=False`` and ``mdns=True`` make agents find each other by mDNS alone (only
inside a network namespace whose loopback has multicast: pass ``wrapper=["ip", "netns",
"exec", NS]``); ``debug_commands=True`` enables the agent's ``debug-*`` control commands; ``metrics=True``
serves each agent's metrics on its own address (port picked by the kernel;
:meth:`LoopbackAgent.scrape_metrics` reads them).

Used by the real-socket tests, the README demo and the benchmarks::

    with LoopbackCluster(5) as cluster:
        cluster.wait_converged()
        cluster.agents[2].kill()              # SIGKILL
        cluster.wait_for(lambda: all(a.state_of("node3") == "dead" for a in cluster.running()))
        cluster.agents[2].start()             # same name and state dir: a restart
"""

from __future__ import annotations

import http.client
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from edgeagent.control import ControlClient, socket_path
from edgeagent.errors import AgentUnavailable
from edgeagent.persist import save_keyring
from gossip.keyring import Keyring

READY_TIMEOUT = 30.0  # seconds for a started agent to answer on its control socket
STOP_TIMEOUT = 10.0  # seconds to wait for a graceful exit before SIGKILL
POLL_INTERVAL = 0.1
MAX_SEEDS = 3  # seeds handed to each agent: enough to survive one dead seed
DEBUG_COMMANDS_ENV = "EDGEAGENT_DEBUG_COMMANDS"  # edgeagent.agent: enables debug-block


def free_port(hosts: Sequence[str]) -> int:
    """A port free for both UDP and TCP on every host (checked, then released)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.bind((hosts[0], 0))
            port = int(probe.getsockname()[1])
        if all(_port_free(host, port) for host in hosts):
            return port
    raise OSError("no free port found on the loopback hosts")


def _port_free(host: str, port: int) -> bool:
    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
        with socket.socket(socket.AF_INET, kind) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                return False
    return True


class LoopbackAgent:
    """One agent process; it keeps its name, address and state dir across restarts."""

    def __init__(
        self,
        name: str,
        host: str,
        port: int,
        state_dir: Path,
        argv: list[str],
        env: dict[str, str],
    ) -> None:
        self.name = name
        self.host = host
        self.port = port
        self.state_dir = state_dir
        self.argv = argv
        self.env = env
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = state_dir / "agent.log"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, wait: bool = True) -> None:
        """Start (or restart) the process; with ``wait``, until its control socket answers."""
        if self.running:
            raise RuntimeError(f"{self.name} is already running")
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,
            )
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if not self.running:
                raise RuntimeError(f"{self.name} exited at start-up:\n{self.log_tail()}")
            try:
                self.call("status")
                return
            except AgentUnavailable:
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"{self.name} not ready in {timeout} s:\n{self.log_tail()}"
                    ) from None
                time.sleep(POLL_INTERVAL)

    def kill(self) -> None:
        """SIGKILL: a crash, no leave."""
        if self.process is not None and self.running:
            self.process.kill()
            self.process.wait()

    def terminate(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM (graceful leave); SIGKILL after ``timeout``. Returns the exit code."""
        if self.process is None:
            return None
        if self.running:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def restart(self, wait: bool = True) -> None:
        """SIGKILL if running, then start again with the same state dir."""
        self.kill()
        self.start(wait=wait)

    def call(self, cmd: str, timeout: float = 30.0, **args: Any) -> Any:
        """One control-API request (see :mod:`edgeagent.control`)."""
        return ControlClient(socket_path(self.state_dir), timeout=timeout).call(cmd, **args)

    def members(self) -> list[dict[str, Any]]:
        return list(self.call("members"))

    def states(self) -> dict[str, str]:
        """``{member name: state}`` as this agent sees it."""
        return {m["name"]: m["state"] for m in self.members()}

    def state_of(self, name: str) -> str | None:
        return self.states().get(name)

    def status(self) -> dict[str, Any]:
        return dict(self.call("status"))

    def scrape_metrics(self, timeout: float = 10.0) -> dict[str, float]:
        """The agent's Prometheus samples, ``{'name{labels}': value}`` (needs ``metrics=True``)."""
        where = self.status().get("metrics")
        if not where:
            raise RuntimeError(f"{self.name} serves no metrics (start the cluster with metrics=True)")
        host, port = where.rsplit(":", 1)
        conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
        try:
            conn.request("GET", "/metrics")
            text = conn.getresponse().read().decode()
        finally:
            conn.close()
        samples: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                samples[name] = float(value)
        return samples

    def rss_kb(self) -> int | None:
        """Resident set size from /proc, in KiB (None if not running)."""
        if not self.running or self.pid is None:
            return None
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return None

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


class LoopbackCluster:
    """Start ``n`` agents on loopback; stop them all (and remove their files) at exit."""

    def __init__(
        self,
        n: int,
        *,
        preset: str = "local",
        cluster: str = "loopback",
        base_dir: Path | None = None,
        extra_args: Iterable[str] = (),
        debug_commands: bool = False,
        name_prefix: str = "node",
        rng: random.Random | None = None,
        seeds: bool = True,
        mdns: bool = False,
        metrics: bool = False,
        wrapper: Sequence[str] = (),
    ) -> None:
        rng = rng or random.Random()
        self._own_dir = base_dir is None
        # Short path: control sockets must fit in a Unix socket path (108 bytes).
        self.base_dir = Path(base_dir or tempfile.mkdtemp(prefix="ea-loop-"))
        a, b = rng.randrange(100, 255), rng.randrange(1, 255)
        hosts = [f"127.{a}.{b}.{i + 1}" for i in range(n)]
        self.port = free_port(hosts)
        self.key = Keyring.generate_key()
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        if debug_commands:
            env[DEBUG_COMMANDS_ENV] = "1"
        seed_addrs = [f"{h}:{self.port}" for h in hosts[:MAX_SEEDS]] if seeds else []
        self.agents: list[LoopbackAgent] = []
        for i, host in enumerate(hosts):
            name = f"{name_prefix}{i + 1}"
            state_dir = self.base_dir / name
            state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            save_keyring(state_dir / "keyring", [self.key])
            argv = [
                *wrapper,
                sys.executable, "-m", "edgeagent", "run",
                "--name", name,
                "--bind", f"{host}:{self.port}",
                "--state-dir", str(state_dir),
                "--cluster", cluster,
                "--preset", preset,
                "--metrics", f"{host}:0" if metrics else "off",
            ]  # fmt: skip
            if not mdns:
                argv.append("--no-mdns")
            for seed in seed_addrs:
                if seed != f"{host}:{self.port}":
                    argv += ["--join", seed]
            argv += list(extra_args)
            self.agents.append(LoopbackAgent(name, host, self.port, state_dir, argv, env))

    def __enter__(self) -> LoopbackCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Start every agent, then wait until each answers on its control socket."""
        try:
            for agent in self.agents:
                agent.start(wait=False)
            for agent in self.agents:
                agent.wait_ready()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """SIGTERM every running agent (SIGKILL stragglers); remove a temporary base dir."""
        for agent in self.agents:
            if agent.running and agent.process is not None:
                agent.process.send_signal(signal.SIGTERM)
        for agent in self.agents:
            agent.terminate()
        if self._own_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def agent(self, name: str) -> LoopbackAgent:
        return next(a for a in self.agents if a.name == name)

    def running(self) -> list[LoopbackAgent]:
        return [a for a in self.agents if a.running]

    def wait_for(
        self, predicate: Callable[[], bool], timeout: float = 60.0, what: str = "condition"
    ) -> float:
        """Poll ``predicate`` until true; return the seconds it took. TimeoutError otherwise.

        A control socket that does not answer for a moment counts as "not yet".
        """
        start = time.monotonic()
        while True:
            try:
                if predicate():
                    return time.monotonic() - start
            except AgentUnavailable:
                pass
            if time.monotonic() - start > timeout:
                raise TimeoutError(f"{what} not reached in {timeout} s")
            time.sleep(POLL_INTERVAL)

    def views_agree(
        self, expected: dict[str, str], observers: Iterable[LoopbackAgent] | None = None
    ) -> bool:
        """Every observer sees each named member in the expected state."""
        for agent in self.running() if observers is None else observers:
            states = agent.states()
            if any(states.get(name) != state for name, state in expected.items()):
                return False
        return True

    def wait_converged(self, timeout: float = 60.0) -> float:
        """Wait until every running agent sees every running agent alive."""

        def converged() -> bool:
            alive = {a.name: "alive" for a in self.running()}
            return self.views_agree(alive)

        return self.wait_for(converged, timeout, "all running agents alive everywhere")
