"""Where a scenario runs: the :class:`ScenarioBackend` protocol and its three adapters.

The runner (:mod:`testbed.scenario_run`) speaks only this protocol. Nodes are numbered
``1..N`` in scenario files; an adapter maps number ``i`` to its own name (``h{i}`` on the
namespace testbed, ``n{i}`` in the simulator) and answers in the neutral names ``n1..nN``.

- :class:`SimBackend`: :class:`testbed.sim.Simulator` with an :class:`overlay.ipam.Allocator`
  per node (:class:`testbed.ipam_mesh.IpamMesh`), on virtual time: ``advance`` runs the
  simulator, so a 60 s scenario takes a fraction of a second. Membership and overlay only.
- :class:`NetnsBackend`: :class:`testbed.cluster.Testbed` (root), one real agent per
  namespace, seeds and no mDNS; also CoAP: ``coap_serve`` runs a :mod:`testbed.coap_server`
  inside a host's namespace and registers it with that host's agent, ``coap_load`` runs
  :mod:`testbed.coap_load` inside the ingress host. ``kill`` also kills the host's CoAP
  server (the host crashed); ``stop`` stops only the agent.
- :func:`containers_backend`: the same adapter over ``testbed.containers.backend.
  ContainerBackend`` (built elsewhere, imported only when asked for; without it
  :class:`BackendUnavailable`). CoAP as on netns, but the server and the load client run in
  the node's container as their module's source piped to the image's python (the image has
  aiocoap, not ``testbed/``); ``kill`` and ``stop`` both end the server (the container goes).

Errors a backend raises for an action that cannot be done are :class:`BackendError` (one line);
the runner records them as a failed step.
"""

from __future__ import annotations

import concurrent.futures
import importlib
import json
import select
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from gossip.config import preset as gossip_preset

STATES = ("alive", "suspect", "dead", "left")
LOAD_TIMEOUT_EXTRA = 30.0  # seconds past a load's own length before it is killed
SERVE_READY_TIMEOUT = 30.0  # a CoAP server prints "ready", its instance turns healthy
COAP_PORT = 5683  # each agent's own CoAP listener (the default, one per namespace)
SERVER_PORT = 5700  # the plain CoAP server beside an agent, inside the same namespace
SLOW_MS = 20  # how late a "slow" coap-serve instance answers GET /temp
MQTT_PORT = 1883  # each agent's own MQTT listener (the default, one per namespace)
MQTT_SETTLE = 2.0  # seconds between subscribing and the first publish: interest spreads


class BackendError(Exception):
    """An action failed on the backend; one line for a person."""


class BackendUnavailable(Exception):
    """The backend cannot run here at all (not root, missing module); exit 2."""


def neutral(i: int) -> str:
    return f"n{i}"


@dataclass(frozen=True, slots=True)
class PolicyEndpoint:
    """The HTTPS policy endpoint a scenario asks for: the pollers' ``[policy] interval`` and
    which nodes poll it (the others get bundles from peers only)."""

    interval: float
    pollers: tuple[int, ...]


class LoadHandle(Protocol):
    """A CoAP or MQTT load running in the background."""

    started: float | None  # backend time its load began (None until then, or if it never did)

    def done(self) -> bool: ...  # the process ended (result() will not wait)
    def result(self) -> dict[str, Any]: ...  # waits; CoAP: ok, failed, records [[t, ok, payload,
    # ms]]; MQTT: received, lost, duplicates, records [[t, delivered, "", ms | None]]
    def cancel(self) -> None: ...


class ScenarioBackend(Protocol):
    """What a scenario needs from a cluster. Nodes are 1-based numbers; names are ``n<i>``."""

    name: str
    features: frozenset[str]  # beyond membership: "coap", "mqtt", "overlay"

    # network, no agents yet; policy_key: base64 Ed25519 key every agent trusts for policy
    # bundles ("policy"); cloud: also run the "cloud" MQTT broker ("cloud"); policy_endpoint:
    # also run the HTTPS policy endpoint, polled by its pollers ("policy-endpoint")
    def up(self, nodes: int, preset: str, seed: int, *, policy_key: str | None = None,
           cloud: bool = False, policy_endpoint: PolicyEndpoint | None = None) -> None: ...  # fmt: skip
    def down(self) -> None: ...  # remove everything; safe to repeat
    def now(self) -> float: ...  # seconds since up (virtual for the simulator)
    def advance(self, seconds: float) -> None: ...  # let time pass
    def start(self, nodes: Sequence[int]) -> None: ...  # start (or restart) agents, wait ready
    def kill(self, node: int) -> None: ...  # SIGKILL: a crash
    def stop(self, node: int) -> None: ...  # graceful leave
    def partition(self, groups: Sequence[Sequence[int]]) -> None: ...
    def heal(self) -> None: ...  # partitions only; loss stays
    def loss(self, node: int, percent: int) -> None: ...
    def running(self) -> set[int]: ...
    def views(self) -> dict[str, dict[str, str]]: ...  # observer -> member -> state
    def overlay_addresses(self) -> dict[str, str | None]: ...  # running node -> own block
    def coap_serve(self, service: str, nodes: Sequence[int], slow: Sequence[int] = ()) -> None: ...
    def coap_load(self, ingress: int, service: str, seconds: float, rate: float,
                  concurrency: int) -> LoadHandle: ...  # fmt: skip
    def mqtt_load(self, pub: int, sub: int, count: int, rate: float, qos: int,
                  drain: float) -> LoadHandle: ...  # fmt: skip
    def policy_apply(self, node: int, envelope: bytes) -> dict[str, Any]: ...  # the agent's
    # answer: accepted, version, reason, detail (as the control command policy-apply)
    def policy_versions(self) -> dict[str, int | None]: ...  # running node -> version enforced
    def cloud(self, running: bool) -> None: ...  # stop (False) or start (True) the cloud broker
    def policy_publish(self, envelope: bytes) -> None: ...  # serve it at the policy endpoint
    def policy_endpoint(self, running: bool) -> None: ...  # stop or start the policy endpoint


# --- the simulator ----------------------------------------------------------------------------


class SimBackend:
    """Real gossip cores and IPAM allocators on the simulator's virtual network and clock."""

    name = "sim"
    features = frozenset({"overlay"})

    def __init__(self) -> None:
        self.mesh: Any = None
        self._t0 = 0.0
        self._names: list[str] = []

    def up(self, nodes: int, preset: str, seed: int, *, policy_key: str | None = None,
           cloud: bool = False, policy_endpoint: PolicyEndpoint | None = None) -> None:  # fmt: skip
        from testbed.ipam_mesh import IpamMesh, prefix_for
        from testbed.sim import Simulator

        sim = Simulator(f"scenario:{seed}", gossip_preset(preset))
        self.mesh = IpamMesh(sim, prefix=prefix_for(max(nodes, 4)))
        self._names = [f"n{i}" for i in range(1, nodes + 1)]
        self._t0 = sim.now

    @property
    def sim(self) -> Any:
        return self.mesh.sim

    def down(self) -> None:
        self.mesh = None

    def now(self) -> float:
        return float(self.sim.now - self._t0)

    def advance(self, seconds: float) -> None:
        self.sim.run_for(seconds)

    def _name(self, node: int) -> str:
        return self._names[node - 1]

    def start(self, nodes: Sequence[int]) -> None:
        for node in nodes:
            self._start(node)

    def _start(self, node: int) -> None:
        name, sim = self._name(node), self.sim
        existing = sim.nodes.get(name)
        if existing is not None and existing.status == "leaving":
            sim.wait_for(lambda: existing.status == "left", 30.0)
        if existing is None:
            live = [n.name for n in sim.live_nodes()]
            self.mesh.add(name, join=sim.rng.sample(live, min(3, len(live))))
            sim.run_for(0.01)  # joins 10 ms apart, as the simulator's add_cluster does
        elif existing.alive:
            raise BackendError(f"{neutral(node)} is already running")
        else:
            self.mesh.restart(name)

    def _running_node(self, node: int) -> str:
        name = self._name(node)
        sim_node = self.sim.nodes.get(name)
        if sim_node is None or not sim_node.alive or sim_node.status != "up":
            raise BackendError(f"{neutral(node)} is not running")
        return name

    def kill(self, node: int) -> None:
        self.mesh.crash(self._running_node(node))

    def stop(self, node: int) -> None:
        self.mesh.leave(self._running_node(node))  # gossips its leave for a while, then stops

    def partition(self, groups: Sequence[Sequence[int]]) -> None:
        self.sim.heal()
        self.sim.partition([[self._name(n) for n in g] for g in groups])

    def heal(self) -> None:
        self.sim.heal()

    def loss(self, node: int, percent: int) -> None:
        name = self._name(node)
        for other in self._names:
            if other != name and other in self.sim.nodes and name in self.sim.nodes:
                self.sim.set_link(name, other, loss=percent / 100 if percent else None)

    def running(self) -> set[int]:
        return {
            i for i, name in enumerate(self._names, start=1)
            if (n := self.sim.nodes.get(name)) is not None and n.alive and n.status == "up"
        }  # fmt: skip

    def views(self) -> dict[str, dict[str, str]]:
        back = {name: neutral(i) for i, name in enumerate(self._names, start=1)}
        out = {}
        for i in sorted(self.running()):
            view = self.sim.view(self._name(i))
            out[neutral(i)] = {back.get(m, m): s.name.lower() for m, s in view.items()}
        return out

    def overlay_addresses(self) -> dict[str, str | None]:
        out: dict[str, str | None] = {}
        for i in sorted(self.running()):
            block = self.mesh.allocs[self._name(i)].block
            out[neutral(i)] = None if block is None else str(block)
        return out

    def coap_serve(self, service: str, nodes: Sequence[int], slow: Sequence[int] = ()) -> None:
        raise BackendError("the simulator has no CoAP")

    def coap_load(
        self, ingress: int, service: str, seconds: float, rate: float, concurrency: int
    ) -> LoadHandle:
        raise BackendError("the simulator has no CoAP")

    def mqtt_load(self, pub: int, sub: int, count: int, rate: float, qos: int, drain: float) -> LoadHandle:
        raise BackendError("the simulator has no MQTT")

    def policy_apply(self, node: int, envelope: bytes) -> dict[str, Any]:
        raise BackendError("the simulator has no policy bundles")

    def policy_versions(self) -> dict[str, int | None]:
        raise BackendError("the simulator has no policy bundles")

    def cloud(self, running: bool) -> None:
        raise BackendError("the simulator has no cloud broker")

    def policy_publish(self, envelope: bytes) -> None:
        raise BackendError("the simulator has no policy endpoint")

    def policy_endpoint(self, running: bool) -> None:
        raise BackendError("the simulator has no policy endpoint")


# --- real agents: the namespace testbed and containers ----------------------------------------


class _Load:
    """A :mod:`testbed.coap_load` or :mod:`testbed.mqtt_load` process (``what``) that prints
    ``started`` on stderr when its load begins and one JSON object on stdout when done.

    Two threads read its pipes (so a long records list cannot block it, and the runner keeps
    observing while it runs); ``started`` is the backend time the line arrived."""

    def __init__(self, proc: subprocess.Popen[str], clock: Any, seconds: float, what: str = "CoAP") -> None:
        self.proc, self.seconds, self.what = proc, seconds, what
        self.started: float | None = None
        self._begun = threading.Event()
        self._out: list[str] = []
        self._err: list[str] = []
        assert proc.stdout is not None and proc.stderr is not None
        stdout, stderr = proc.stdout, proc.stderr

        def read_err() -> None:
            for line in stderr:
                if self.started is None and line.strip() == "started":
                    self.started = clock()
                    self._begun.set()
                else:
                    self._err = [*self._err[-20:], line]
            self._begun.set()  # ended without starting: stop waiting for it

        self._threads = [threading.Thread(target=lambda: self._out.append(stdout.read()), daemon=True),
                         threading.Thread(target=read_err, daemon=True)]  # fmt: skip
        for thread in self._threads:
            thread.start()

    def wait_started(self, timeout: float) -> bool:
        self._begun.wait(timeout)
        return self.started is not None

    def done(self) -> bool:
        return self.proc.poll() is not None and not any(t.is_alive() for t in self._threads)

    def result(self) -> dict[str, Any]:
        deadline = time.monotonic() + self.seconds + LOAD_TIMEOUT_EXTRA
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        if any(t.is_alive() for t in self._threads):
            self.cancel()
            raise BackendError(f"the {self.what} load did not finish in time")
        self.proc.wait()
        tail = ("".join(self._err).strip().splitlines() or ["no output"])[-1]
        if self.started is None:
            raise BackendError(f"the {self.what} load client did not start: {tail}")
        try:
            result: dict[str, Any] = json.loads("".join(self._out).strip().splitlines()[-1])
            if not isinstance(result, dict):
                raise ValueError("not an object")
        except (ValueError, IndexError):
            raise BackendError(f"the {self.what} load failed: {tail}") from None
        result["records"] = [[round(self.started + t, 4), *rest] for t, *rest in result.get("records", [])]
        return result

    def cancel(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for thread in self._threads:
            thread.join(5.0)


class AgentsBackend:
    """The adapter over a cluster object with :class:`testbed.cluster.Testbed`'s methods
    (``start``, ``kill``, ``stop``, ``partition``, ``heal``, ``loss``, ``members``), hosts
    named ``h1..hN``. Subclasses build the cluster in :meth:`_make`."""

    name = "agents"
    features: frozenset[str] = frozenset()
    wall_clock = True  # actions take real time: the runner observes the others meanwhile

    def __init__(self) -> None:
        self.cluster: Any = None
        self.count = 0
        self._t0 = time.monotonic()
        self._down: set[int] = set()
        self.policy_key: str | None = None
        self.with_cloud = False
        self.endpoint: PolicyEndpoint | None = None
        self._servers: dict[int, subprocess.Popen[str]] = {}  # node -> its CoAP server
        self._loads: list[_Load] = []

    def _make(self, nodes: int, preset: str) -> Any:
        raise NotImplementedError

    def up(self, nodes: int, preset: str, seed: int, *, policy_key: str | None = None,
           cloud: bool = False, policy_endpoint: PolicyEndpoint | None = None) -> None:  # fmt: skip
        self.policy_key, self.with_cloud, self.endpoint = policy_key, cloud, policy_endpoint
        self.count = nodes
        self._down = set(range(1, nodes + 1))
        try:
            self.cluster = self._make(nodes, preset)
        except BackendUnavailable:
            raise
        except Exception as exc:  # the cluster's own errors (nft missing, docker down): exit 2
            raise BackendUnavailable(f"the {self.name} backend did not come up: {exc}") from None
        self._t0 = time.monotonic()

    def down(self) -> None:
        for load in self._loads:
            load.cancel()
        self._loads.clear()
        for proc in self._servers.values():
            _end(proc)
        self._servers.clear()
        if self.cluster is not None:
            self.cluster.down()
        self.cluster = None

    def now(self) -> float:
        return time.monotonic() - self._t0

    def advance(self, seconds: float) -> None:
        time.sleep(max(0.0, seconds))

    @staticmethod
    def host(node: int) -> str:
        return f"h{node}"

    def _call(self, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except Exception as exc:  # the cluster's own error types; one line either way
            raise BackendError(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None

    def start(self, nodes: Sequence[int]) -> None:
        """Start them all, then wait until each answers (agents boot in parallel)."""
        for node in nodes:
            self._call(self.cluster.start, self.host(node))
        for node in nodes:
            if hasattr(self.cluster, "wait_ready"):
                self._call(self.cluster.wait_ready, self.host(node))
            self._down.discard(node)

    def kill(self, node: int) -> None:
        """SIGKILL; the node's CoAP server goes too (the host crashed)."""
        self._call(self.cluster.kill, self.host(node))
        self._down.add(node)
        self._end_server(node)

    def _end_server(self, node: int) -> None:
        server = self._servers.pop(node, None)
        if server is not None:
            _end(server)

    def stop(self, node: int) -> None:
        self._call(self.cluster.stop, self.host(node))
        self._down.add(node)

    def partition(self, groups: Sequence[Sequence[int]]) -> None:
        self._call(self.cluster.heal)
        self._call(self.cluster.partition, [[self.host(n) for n in g] for g in groups])

    def heal(self) -> None:
        self._call(self.cluster.heal)

    def loss(self, node: int, percent: int) -> None:
        self._call(self.cluster.loss, self.host(node), percent)

    def running(self) -> set[int]:
        return set(range(1, self.count + 1)) - self._down

    def views(self) -> dict[str, dict[str, str]]:
        back = {self.host(i): neutral(i) for i in range(1, self.count + 1)}
        out = {}
        for i in sorted(self.running()):
            try:
                members = self.cluster.members(self.host(i))
            except Exception:  # noqa: BLE001 - an agent that does not answer has no view now
                continue
            out[neutral(i)] = {back.get(m["name"], m["name"]): str(m["state"]) for m in members}
        return out

    def overlay_addresses(self) -> dict[str, str | None]:
        raise BackendError(f"the {self.name} backend cannot read overlay addresses")

    # The CoAP steps over three hooks: a node's address, a control command to its agent, and a
    # testbed module (coap_server, coap_load) run inside the node.
    def _ip(self, node: int) -> str:
        raise BackendError(f"the {self.name} backend has no CoAP support here")

    def _agent(self, node: int, cmd: str, **args: Any) -> Any:
        raise BackendError(f"the {self.name} backend has no control commands here")

    def _spawn(self, node: int, module: str, args: list[str], *, stderr: bool = True) -> subprocess.Popen[str]:
        raise BackendError(f"the {self.name} backend cannot run {module} here")

    def coap_serve(self, service: str, nodes: Sequence[int], slow: Sequence[int] = ()) -> None:
        """A :mod:`testbed.coap_server` beside each node's agent (its address, SERVER_PORT),
        registered as ``service`` with that agent; waits until every running node sees them
        all healthy. The servers of ``slow`` nodes answer SLOW_MS late (the balancer then
        prefers the others, so a scenario knows which instance serves)."""
        for node in nodes:
            ip = self._ip(node)
            extra = ["--delay-ms", str(SLOW_MS)] if node in slow else []
            proc = self._spawn(node, "coap_server", [ip, str(SERVER_PORT), neutral(node), *extra], stderr=False)
            if not _printed_ready(proc, SERVE_READY_TIMEOUT):
                _end(proc)
                raise BackendError(f"{neutral(node)}: the CoAP server did not start")
            self._servers[node] = proc
            self._agent(node, "service", op="register", name=service, uri=f"coap://{ip}:{SERVER_PORT}")
        deadline = time.monotonic() + SERVE_READY_TIMEOUT
        while not all(self._healthy(i, service) >= len(nodes) for i in self.running()):
            if time.monotonic() > deadline:
                raise BackendError(f"{service}: not every node saw {len(nodes)} healthy instances "
                                   f"within {SERVE_READY_TIMEOUT:g} s")
            time.sleep(0.5)

    def _healthy(self, node: int, service: str) -> int:
        rows = self._agent(node, "coap")["instances"]
        return sum(r.get("state") == "healthy" and r.get("name", service) == service for r in rows)

    def coap_load(
        self, ingress: int, service: str, seconds: float, rate: float, concurrency: int
    ) -> LoadHandle:
        """:mod:`testbed.coap_load` inside the ingress node against its own agent's
        ``/mesh/SERVICE/temp``; returns once the client says it started."""
        ip = self._ip(ingress)
        args = [f"{ip}:{COAP_PORT}", f"coap://{ip}:{COAP_PORT}/mesh/{service}/temp", "--seconds", str(seconds),
                "--rate", str(rate), "--concurrency", str(concurrency), "--records"]  # fmt: skip
        load = _Load(self._spawn(ingress, "coap_load", args), self.now, seconds)
        self._loads.append(load)
        if not load.wait_started(LOAD_TIMEOUT_EXTRA):
            load.cancel()
            raise BackendError("the CoAP load client did not start")
        return load

    def mqtt_load(self, pub: int, sub: int, count: int, rate: float, qos: int, drain: float) -> LoadHandle:
        raise BackendError(f"the {self.name} backend has no MQTT load support here")

    def policy_apply(self, node: int, envelope: bytes) -> dict[str, Any]:
        raise BackendError(f"the {self.name} backend has no policy support here")

    def policy_versions(self) -> dict[str, int | None]:
        raise BackendError(f"the {self.name} backend has no policy support here")

    def cloud(self, running: bool) -> None:
        raise BackendError(f"the {self.name} backend has no cloud broker")

    def policy_publish(self, envelope: bytes) -> None:
        raise BackendError(f"the {self.name} backend has no policy endpoint")

    def policy_endpoint(self, running: bool) -> None:
        raise BackendError(f"the {self.name} backend has no policy endpoint")


class NetnsBackend(AgentsBackend):
    """One real agent per network namespace (:class:`testbed.cluster.Testbed`; root)."""

    name = "netns"
    features = frozenset({"coap", "mqtt", "overlay", "policy"})

    def __init__(self, root: Any = None) -> None:
        super().__init__()
        self.root = root

    def _make(self, nodes: int, preset: str) -> Any:
        from testbed.cluster import Testbed
        from testbed.netns import is_root

        if not is_root():
            raise BackendUnavailable("the netns backend needs root (network namespaces); "
                                     "try --backend sim")
        tb = Testbed(nodes, preset=preset, mdns=False, seeds=True, root=self.root, start_agents=False)
        try:
            tb.up()
            if self.policy_key is not None:
                for i in range(1, nodes + 1):
                    with open(tb.host_dir(self.host(i)) / "agent.toml", "a") as config:
                        config.write(policy_table(self.policy_key))
        except BaseException:
            tb.down()
            raise
        return tb

    def policy_apply(self, node: int, envelope: bytes) -> dict[str, Any]:
        """The envelope written to a file in the work dir, handed to the node's agent."""
        path = self.cluster.workdir / f"policy-{time.monotonic_ns()}.signed"
        path.write_bytes(envelope)
        return dict(self._control(node, "policy-apply", path=str(path)))

    def policy_versions(self) -> dict[str, int | None]:
        out: dict[str, int | None] = {}
        for i in sorted(self.running()):
            try:
                out[neutral(i)] = self._control(i, "policy-status").get("version")
            except BackendError:
                continue  # not answering now: no report
        return out

    def _ip(self, node: int) -> str:
        return str(self.cluster.host(self.host(node)).ip)

    def _agent(self, node: int, cmd: str, **args: Any) -> Any:
        return self._control(node, cmd, **args)

    def _spawn(self, node: int, module: str, args: list[str], *, stderr: bool = True) -> subprocess.Popen[str]:
        argv = [sys.executable, "-m", f"testbed.{module}", *args]
        return subprocess.Popen(self.cluster.exec_argv(self.host(node), argv), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE if stderr else subprocess.DEVNULL, text=True)  # fmt: skip

    def _control(self, node: int, cmd: str, **args: Any) -> Any:
        from edgeagent.control import ControlClient, socket_path

        path = socket_path(self.cluster.state_dir(self.host(node)))
        try:
            return ControlClient(path, timeout=5.0).call(cmd, **args)
        except Exception as exc:  # AgentUnavailable, ControlError: one line
            raise BackendError(f"{neutral(node)}: {cmd}: {exc}") from None

    def overlay_addresses(self) -> dict[str, str | None]:
        out: dict[str, str | None] = {}
        for i in sorted(self.running()):
            rows = self._control(i, "addresses")
            own = [r for r in rows if r.get("node") == self.host(i) and r.get("state") == "active"]
            out[neutral(i)] = str(own[0]["block"]) if own else None
        return out

    def mqtt_load(self, pub: int, sub: int, count: int, rate: float, qos: int, drain: float) -> LoadHandle:
        """:mod:`testbed.mqtt_load` inside the publisher's namespace: it publishes to its own
        agent's broker; its subscriber connects to the sub node's broker across the link."""
        pub_ip, sub_ip = (self.cluster.host(self.host(n)).ip for n in (pub, sub))
        argv = [sys.executable, "-m", "testbed.mqtt_load", "--pub", f"{pub_ip}:{MQTT_PORT}",
                "--sub", f"{sub_ip}:{MQTT_PORT}", "--count", str(count), "--rate", str(rate),
                "--qos", str(qos), "--timeout", str(drain), "--settle", str(MQTT_SETTLE),
                "--topic", f"scenario/{time.monotonic_ns()}", "--records"]  # fmt: skip
        proc = subprocess.Popen(self.cluster.exec_argv(self.host(pub), argv),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        load = _Load(proc, self.now, MQTT_SETTLE + count / rate + drain + 1.0, "MQTT")
        self._loads.append(load)
        return load  # it subscribes and settles first: the runner waits for started, observing


# The image ships the agent only (testbed/ is not in the wheel); a load client runs in a
# container as its module's source piped to the image's python (``python - ARGS``).
IMAGE_PYTHON = "/opt/edgeagent/bin/python"


class _ContainersAdapter(AgentsBackend):
    name = "containers"
    features = frozenset({"coap", "mqtt", "overlay", "policy", "cloud", "policy-endpoint"})

    def __init__(self, cls: Any) -> None:
        super().__init__()
        self._cls = cls

    def stop(self, node: int) -> None:
        """``docker stop``: the container goes, and the CoAP server in it."""
        super().stop(node)
        self._end_server(node)

    def _ip(self, node: int) -> str:
        return str(self.cluster.ip(self.host(node)))

    def _agent(self, node: int, cmd: str, **args: Any) -> Any:
        return self._call(lambda: self.cluster.call(self.host(node), cmd, **args))

    def mqtt_load(self, pub: int, sub: int, count: int, rate: float, qos: int, drain: float) -> LoadHandle:
        """:mod:`testbed.mqtt_load` inside the publisher's container (as on netns: it
        publishes to its own agent's broker, its subscriber crosses the link to the sub node's),
        its source on stdin of the image's python, which has paho-mqtt (aiomqtt's dependency)."""
        pub_ip, sub_ip = (self.cluster.ip(self.host(n)) for n in (pub, sub))
        args = ["--pub", f"{pub_ip}:{MQTT_PORT}", "--sub", f"{sub_ip}:{MQTT_PORT}",
                "--count", str(count), "--rate", str(rate), "--qos", str(qos), "--timeout", str(drain),
                "--settle", str(MQTT_SETTLE), "--topic", f"scenario/{time.monotonic_ns()}",
                "--records"]  # fmt: skip
        load = _Load(self._spawn(pub, "mqtt_load", args), self.now, MQTT_SETTLE + count / rate + drain + 1.0, "MQTT")
        self._loads.append(load)
        return load

    def _spawn(self, node: int, module: str, args: list[str], *, stderr: bool = True) -> subprocess.Popen[str]:
        """``testbed/MODULE.py`` in the node's container: its source on stdin of the image's
        python (``python - ARGS``; the image has aiocoap and paho-mqtt, not ``testbed/``)."""
        source = (Path(__file__).resolve().parent / f"{module}.py").read_text()
        cmd = ["docker", "exec", "-i", self.cluster.container(self.host(node)), IMAGE_PYTHON, "-", *args]
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE if stderr else subprocess.DEVNULL, text=True)  # fmt: skip
        assert proc.stdin is not None
        try:
            proc.stdin.write(source)
            proc.stdin.close()  # python - runs the script at EOF
        except BrokenPipeError:
            pass  # docker exec ended at once: the caller sees it end
        return proc

    def _make(self, nodes: int, preset: str) -> Any:
        from testbed.containers.compose import policy_config

        config = policy_table(self.policy_key) if self.policy_key is not None else ""
        node_configs = {}
        if self.endpoint is not None and self.policy_key is not None:
            poll = policy_config([self.policy_key], poll=True, interval=self.endpoint.interval)
            node_configs = {self.host(i): poll for i in self.endpoint.pollers}
        cluster = self._cls(nodes, run_args=("--preset", preset), broker=self.with_cloud, config=config,
                            policy=self.endpoint is not None, node_configs=node_configs)  # fmt: skip
        try:
            cluster.up()
        except BaseException:
            cluster.down()
            raise
        return cluster

    def policy_apply(self, node: int, envelope: bytes) -> dict[str, Any]:
        """The envelope written to the shared dir (``/shared`` in every container), handed to
        the node's agent (its control socket) by that path."""
        name = f"policy-{time.monotonic_ns()}.signed"
        (self.cluster.workdir / "shared" / name).write_bytes(envelope)
        return dict(self._call(lambda: self.cluster.call(self.host(node), "policy-apply", path=f"/shared/{name}")))

    def policy_versions(self) -> dict[str, int | None]:
        """Every running node's ``policy-status`` (over the control sockets)."""
        out: dict[str, int | None] = {}
        for i in sorted(self.running()):
            try:
                version = self.cluster.call(self.host(i), "policy-status").get("version")
            except Exception:  # noqa: BLE001 - not answering now: no report
                continue
            out[neutral(i)] = version if type(version) is int else None
        return out

    def cloud(self, running: bool) -> None:
        self._call(self.cluster.cloud_start if running else self.cluster.cloud_stop)

    def policy_publish(self, envelope: bytes) -> None:
        """Served at the endpoint; the pollers fetch it within their interval."""
        self._call(self.cluster.policy_publish, envelope)

    def policy_endpoint(self, running: bool) -> None:
        self._call(self.cluster.policy_start if running else self.cluster.policy_stop)

    def start(self, nodes: Sequence[int]) -> None:
        for node in nodes:
            try:  # the containers backend may start every agent in up(); then start is a no-op
                self.cluster.members(self.host(node))
            except Exception:  # noqa: BLE001 - not running yet: start it
                super().start([node])
            self._down.discard(node)

    def views(self) -> dict[str, dict[str, str]]:
        """All running nodes at once: one ``docker exec`` takes ~0.5 s, so a sequential poll of
        five would see each node only every 2.5 s."""
        back = {self.host(i): neutral(i) for i in range(1, self.count + 1)}
        nodes = sorted(self.running())

        def one(i: int) -> tuple[str, dict[str, str]] | None:
            try:
                members = self.cluster.members(self.host(i))
            except Exception:  # noqa: BLE001 - an agent that does not answer has no view now
                return None
            return neutral(i), {back.get(m["name"], m["name"]): str(m["state"]) for m in members}

        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, len(nodes))) as pool:
            return dict(r for r in pool.map(one, nodes) if r is not None)

    def agent_logs(self) -> dict[str, str]:
        """Every node's container output (its agent's log), running or not, before ``down``."""
        if self.cluster is None:
            return {}
        return {neutral(i): self.cluster.logs(self.host(i)) for i in range(1, self.count + 1)}

    def overlay_addresses(self) -> dict[str, str | None]:
        out: dict[str, str | None] = {}
        for i in sorted(self.running()):
            rows = self._call(self.cluster.call, self.host(i), "addresses")
            if not isinstance(rows, list):
                raise BackendError(f"{neutral(i)}: addresses: not a list")
            own = [r for r in rows if r.get("node") == self.host(i) and r.get("state") == "active"]
            out[neutral(i)] = str(own[0]["block"]) if own else None
        return out


def containers_backend() -> AgentsBackend:
    """The containers adapter; BackendUnavailable when testbed.containers is not there."""
    try:
        module = importlib.import_module("testbed.containers.backend")
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.startswith("testbed.containers"):
            raise BackendUnavailable("the containers backend is not available "
                                     "(testbed.containers.backend is missing)") from None
        raise
    return _ContainersAdapter(module.ContainerBackend)


def policy_table(key: str) -> str:
    """The ``[policy]`` config table that trusts one base64 Ed25519 key."""
    return f'\n[policy]\ntrusted_keys = ["{key}"]\n'


def make_backend(name: str) -> ScenarioBackend:
    if name == "sim":
        return SimBackend()
    if name == "netns":
        return NetnsBackend()
    if name == "containers":
        return containers_backend()
    raise BackendUnavailable(f"unknown backend {name!r} (sim, netns, containers)")


def _printed_ready(proc: subprocess.Popen[str], timeout: float) -> bool:
    """The process printed ``ready`` as its first stdout line within ``timeout`` s."""
    assert proc.stdout is not None
    readable, _, _ = select.select([proc.stdout], [], [], timeout)
    return bool(readable) and proc.stdout.readline().strip() == "ready"


def _end(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()
