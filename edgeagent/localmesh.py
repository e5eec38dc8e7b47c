"""N real agents as processes on loopback addresses: no root, no namespaces.

How it works. :class:`LocalMesh` picks a random ``127.A.B.0/24`` (so concurrent meshes on one
machine do not collide) and one port free on all of it, and gives agent *i* the address
``127.A.B.(i+1):PORT``, its own state dir (identity, control socket, ``agent.log``) provisioned
as a member of one fresh cluster (:func:`edgeagent.onboarding.provision_member`: the same keyring,
a node certificate from a mesh CA held in memory by the mesh, :attr:`LocalMesh.ca`), and the first
few agents as seeds. Each agent is an
:class:`edgeagent.agent_process.AgentProcess` running ``python -m edgeagent run --no-mdns
--preset local ...``: the real daemon on real sockets, talked to through its control socket
exactly as the CLI does.

Options: ``seeds=False`` and ``mdns=True`` make agents find each other by mDNS alone (only
inside a network namespace whose loopback has multicast: pass ``wrapper=["ip", "netns",
"exec", NS]``); ``debug_commands=True`` enables the agent's ``debug-*`` control commands;
``metrics=True`` serves each agent's metrics on its own address (port picked by the kernel);
``coap=True`` serves CoAP on each agent's own address at port 5683, or at ``coap_port``
(None: one port free on every agent's address, :attr:`LocalMesh.coap_port`); ``mqtt=True``
serves MQTT at ``mqtt_port`` (None, the default: one port free on every agent's address,
:attr:`LocalMesh.mqtt_port`; a device would use 1883). Each is off otherwise.

``edgeagent demo`` runs on it, so it ships in the package; the test harness
(``testbed.loopback``) builds on it from a checkout::

    with LocalMesh(5) as mesh:
        mesh.agents[2].kill()                 # SIGKILL
        mesh.agents[2].start()                # same name and state dir: a restart
"""

from __future__ import annotations

import random
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Generic, TypeVar, cast

from .agent_process import AgentProcess, agent_env
from .host import DEBUG_COMMANDS_ENV
from .onboarding import new_ca, provision_member

MAX_SEEDS = 3  # seeds handed to each agent: enough to survive one dead seed
PORT_ATTEMPTS = 50  # kernel-picked ports tried before giving up
COAP_PORT = 5683  # with coap=True each agent serves CoAP on its own address, the usual port


def free_port(hosts: Sequence[str]) -> int:
    """A port free for both UDP and TCP on every host (checked, then released)."""
    for _ in range(PORT_ATTEMPTS):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.bind((hosts[0], 0))
            port = int(probe.getsockname()[1])
        if all(port_free(host, port) for host in hosts):
            return port
    raise OSError("no free port found on the loopback hosts")


def _other_port(hosts: Sequence[str], port: int) -> int:
    """A free port that is none of an agent's own (gossip ``port``, + 1 and + 2 beside it)."""
    for _ in range(PORT_ATTEMPTS):
        other = free_port(hosts)
        if not 0 <= other - port <= 2:
            return other
    raise OSError("no free port found on the loopback hosts")


def port_free(host: str, port: int) -> bool:
    """Can ``port`` be bound on ``host`` for both UDP and TCP now (checked, then released)?"""
    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
        with socket.socket(socket.AF_INET, kind) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                return False
    return True


class MeshAgent(AgentProcess):
    """One agent of a :class:`LocalMesh`: an agent process with its loopback address."""

    def __init__(
        self, name: str, host: str, port: int, state_dir: Path, argv: list[str], env: dict[str, str]
    ) -> None:
        super().__init__(name, argv, state_dir, state_dir / "agent.log", env)
        self.host = host
        self.port = port

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


A = TypeVar("A", bound=MeshAgent)


class LocalMesh(Generic[A]):
    """Start ``n`` agents on loopback; stop them all (and remove their files) at exit.

    ``agent_class`` builds each agent (a :class:`MeshAgent` subclass adds helpers).
    """

    agent_class: type[MeshAgent] = MeshAgent

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
        coap: bool = False,
        mqtt: bool = False,
        coap_port: int | None = COAP_PORT,
        mqtt_port: int | None = None,
        wrapper: Sequence[str] = (),
    ) -> None:
        rng = rng or random.Random()
        self._own_dir = base_dir is None
        # Short path: control sockets must fit in a Unix socket path (108 bytes).
        self.base_dir = Path(base_dir or tempfile.mkdtemp(prefix="ea-loop-"))
        a, b = rng.randrange(100, 255), rng.randrange(1, 255)
        hosts = [f"127.{a}.{b}.{i + 1}" for i in range(n)]
        self.port = free_port(hosts)
        self.coap_port = _other_port(hosts, self.port) if coap_port is None else coap_port
        self.mqtt_port = _other_port(hosts, self.port) if mqtt_port is None else mqtt_port
        self.ca = new_ca(cluster)  # no agent holds the CA key: no enrollment listener
        self.key = self.ca.keys[0]
        env = agent_env({DEBUG_COMMANDS_ENV: "1"} if debug_commands else None)
        seed_addrs = [f"{h}:{self.port}" for h in hosts[:MAX_SEEDS]] if seeds else []
        self.agents: list[A] = []
        for i, host in enumerate(hosts):
            name = f"{name_prefix}{i + 1}"
            state_dir = self.base_dir / name
            provision_member(self.ca, state_dir, name)
            argv = [
                *wrapper,
                sys.executable, "-m", "edgeagent", "run",
                "--name", name,
                "--bind", f"{host}:{self.port}",
                "--state-dir", str(state_dir),
                "--cluster", cluster,
                "--preset", preset,
                "--metrics", f"{host}:0" if metrics else "off",
                "--coap", f"{host}:{self.coap_port}" if coap else "off",
                "--mqtt", f"{host}:{self.mqtt_port}" if mqtt else "off",
            ]  # fmt: skip
            if not mdns:
                argv.append("--no-mdns")
            for seed in seed_addrs:
                if seed != f"{host}:{self.port}":
                    argv += ["--join", seed]
            argv += list(extra_args)
            agent = self.agent_class(name, host, self.port, state_dir, argv, env)
            self.agents.append(cast(A, agent))  # agent_class is A's class

    def __enter__(self) -> LocalMesh[A]:
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
        """SIGTERM every running agent (SIGKILL stragglers); remove a temporary base dir.

        Idempotent. All agents get SIGTERM first, so they leave in parallel.
        """
        for agent in self.agents:
            agent.send_signal(signal.SIGTERM)
        for agent in self.agents:
            agent.terminate()
        if self._own_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def agent(self, name: str) -> A:
        return next(a for a in self.agents if a.name == name)

    def running(self) -> list[A]:
        return [a for a in self.agents if a.running]
