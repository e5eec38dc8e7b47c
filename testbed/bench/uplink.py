"""The MQTT uplink with real agents and a real cloud broker: failover and store-and-forward.

``python -m testbed.bench uplink --json``. Real agent processes on loopback
(:class:`testbed.loopback.LoopbackCluster`, MQTT on) share one config whose ``[uplink]``
points at a mosquitto on a loopback port (the "cloud") through :class:`Gate`, a TCP
forwarder in the bench's loop: closing it (listener and every connection) makes the cloud
unreachable for the agents while the bench's own subscriber stays connected to mosquitto.

- **failover**: N agents (all uplink-capable); a client on a non-holder publishes QoS 1
  messages at a steady rate; the holder is SIGKILLed mid-stream. ``failover_s`` is the time
  from the kill until another agent reports ``mode = hold`` (the membership's failure
  detection, then the takeover, until its client is connected), ``detection_s`` until every
  survivor sees the killed holder DEAD (polled, so both are 0.1 s coarse and include the
  control calls' time); ``qos1_lost`` is how many
  published (PUBACKed)
  messages never reached the cloud; ``failover_duplicates`` the copies beyond the first
  (at-least-once: the new holder re-sends its standby memory).
- **outage**: the cloud is unreachable for ``--down-s`` seconds (issue 11 says 60; the
  tests use less) while a client publishes QoS 1; then it is reachable again.
  ``spool_max_pending`` is the spool's depth seen during the outage, ``spool_drain_s`` the
  time from the reopening until the last message arrived, ``spool_drained_in_order`` whether
  the cloud saw the messages in publish order (first copies), ``outage_lost`` how many never
  arrived.
- with ``kill=True`` (the tests) the outage run SIGKILLs the holder during the outage and
  restarts it from its state dir: its spool must survive.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from edgeagent.errors import AgentUnavailable
from edgeagent.localmesh import free_port
from testbed.bench import UsageError
from testbed.loopback import LoopbackAgent, LoopbackCluster

MOSQUITTO = shutil.which("mosquitto") or (
    "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None
)
TOPICS = ['s/# out 1 "" cloud/', 'cmd/# in 1 "" cloud/']
TIMEOUT = 90.0


class Cloud:
    """mosquitto on a loopback port, anonymous."""

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        if MOSQUITTO is None:
            raise RuntimeError("needs the mosquitto broker (Debian package mosquitto)")
        self.port = port or free_port(["127.0.0.1"])  # a given port: restarts keep it
        self.conf = workdir / f"cloud-{self.port}.conf"
        self.conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\n")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        assert MOSQUITTO is not None
        self.proc = subprocess.Popen(
            [MOSQUITTO, "-c", str(self.conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        import socket

        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), 0.2),
            ):
                return
            time.sleep(0.05)
        raise RuntimeError(f"mosquitto did not listen on {self.port}")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None


class Gate:
    """A TCP forwarder to the cloud: ``close`` cuts every connection and refuses new ones."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.port = free_port(["127.0.0.1"])
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def open(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for w in list(self._writers):
            w.transport.abort()
        self._writers.clear()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, up_w}

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, ConnectionError):
                while data := await r.read(65536):
                    w.write(data)
                    await w.drain()
            w.transport.abort()

        await asyncio.gather(pipe(reader, up_w), pipe(up_r, writer))
        self._writers -= {writer, up_w}


class Collector:
    """The cloud side's subscriber to ``cloud/s/#``: payloads in arrival order."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.got: list[bytes] = []
        self.ready = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        import aiomqtt

        async with aiomqtt.Client("127.0.0.1", self.port, identifier="bench-cloud-sub") as sub:
            await sub.subscribe("cloud/s/#", qos=1)
            self.ready.set()
            async for msg in sub.messages:
                if isinstance(msg.payload, bytes):
                    self.got.append(msg.payload)

    async def start(self) -> None:
        self.task = asyncio.create_task(self._run())
        await asyncio.wait_for(self.ready.wait(), 10)

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)


def write_config(workdir: Path, gate_port: int, topics: list[str] | None = None,
                 **extra: object) -> Path:  # fmt: skip
    """The agents' config file: ``[uplink]`` to the gate, ``topics`` (default :data:`TOPICS`)."""
    quoted = ", ".join('"' + t.replace('"', '\\"') + '"' for t in topics or TOPICS)
    lines = ["[uplink]", f'brokers = ["127.0.0.1:{gate_port}"]', f"topics = [{quoted}]"]
    lines += [f"{k} = {v}" for k, v in extra.items()]
    path = workdir / "uplink.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def uplink_status(agent: LoopbackAgent) -> dict[str, Any]:
    try:
        return dict(agent.status().get("uplink") or {})
    except (AgentUnavailable, OSError):
        return {}


async def poll(cond: Callable[[], bool], what: str, timeout: float = TIMEOUT) -> float:
    start = time.monotonic()
    while not await asyncio.to_thread(cond):
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"{what} not reached in {timeout} s")
        await asyncio.sleep(0.1)
    return time.monotonic() - start


def holder_of(cluster: LoopbackCluster) -> LoopbackAgent | None:
    """The one running agent in mode hold, if exactly one is and every agent names it."""
    running = cluster.running()
    stats = {a.name: uplink_status(a) for a in running}
    holding = [a for a in running if stats[a.name].get("mode") == "hold"]
    if len(holding) != 1 or any(s.get("holder") != holding[0].name for s in stats.values()):
        return None
    return holding[0] if stats[holding[0].name].get("connected_to") else None


async def interest_everywhere(cluster: LoopbackCluster) -> None:
    """Every agent routes to every other's MQTT interest (each candidate's bridge filters);
    before that a mapped publish reaches only the agents whose interest is known, as any
    MQTT subscriber's."""
    n = len(cluster.agents)

    def routed() -> bool:
        return all(int(a.status()["mqtt_stats"].get("router_interest_nodes", 0)) >= n - 1
                   for a in cluster.running())  # fmt: skip

    await poll(routed, "every agent routes to every candidate")


async def publish(host: str, port: int, payloads: list[bytes], rate: float,
                  on_sent: Callable[[int], None] | None = None) -> int:  # fmt: skip
    """QoS 1 ``s/bench`` publishes, each awaited (PUBACK); how many were acknowledged."""
    import aiomqtt

    done = 0
    async with aiomqtt.Client(host, port, identifier=f"bench-pub-{time.monotonic_ns()}") as pub:
        for payload in payloads:
            # 30 s: the agent holds a QoS 1 PUBACK until every destination agent has the
            # message; one just SIGKILLed answers only once declared dead (detection plus a
            # channel timeout), which a 10 s client timeout cut short under load
            await pub.publish("s/bench", payload, qos=1, timeout=30)
            done += 1
            if on_sent is not None:
                on_sent(done)
            await asyncio.sleep(1 / rate)
    return done


def _cluster(n: int, config: Path) -> LoopbackCluster:
    return LoopbackCluster(n, mqtt=True, extra_args=["--config", str(config)])


@contextlib.asynccontextmanager
async def _site(n: int, **config: object) -> AsyncIterator[tuple[LoopbackCluster, Gate, Collector, LoopbackAgent]]:  # fmt: skip
    """``n`` agents with ``[uplink]`` (plus ``config``) to a mosquitto cloud behind a gate,
    converged, with a connected holder and mesh interest everywhere: (cluster, gate, the
    cloud-side collector, the holder); everything stopped after."""
    with tempfile.TemporaryDirectory(prefix="ea-uplink-") as tmp:
        cloud = Cloud(Path(tmp))
        cloud.start()
        gate = Gate(cloud.port)
        await gate.open()
        collector = Collector(cloud.port)
        cluster = _cluster(n, write_config(Path(tmp), gate.port, **config))
        try:
            await asyncio.to_thread(cluster.start)
            await asyncio.to_thread(cluster.wait_converged, TIMEOUT)
            await collector.start()
            await poll(lambda: holder_of(cluster) is not None, "one connected holder")
            holder = holder_of(cluster)
            assert holder is not None
            await interest_everywhere(cluster)
            yield cluster, gate, collector, holder
        finally:
            await collector.stop()
            await asyncio.to_thread(cluster.stop)
            await gate.close()
            cloud.stop()


async def failover(n: int = 3, count: int = 600, rate: float = 100.0, kill_at: int = 200,
                   **config: object) -> dict[str, Any]:  # fmt: skip
    """SIGKILL the holder while a non-holder's client publishes QoS 1 (see the docstring);
    ``config``: more ``[uplink]`` keys (a test turns the standby memory off with it)."""
    async with _site(n, **config) as (cluster, _, collector, old):
        pub_agent = next(a for a in cluster.agents if a is not old)
        return await _failover_stream(cluster, old, pub_agent, collector, count, rate, kill_at)


async def _failover_stream(cluster: LoopbackCluster, old: LoopbackAgent, pub_agent: LoopbackAgent,
                           collector: Collector, count: int, rate: float, kill_at: int) -> dict[str, Any]:  # fmt: skip
    payloads = [b"%06d" % i for i in range(count)]
    killed = asyncio.Event()

    def on_sent(i: int) -> None:
        if i == kill_at:
            killed.set()

    pub = asyncio.create_task(publish(pub_agent.host, cluster.mqtt_port, payloads, rate, on_sent))
    await killed.wait()
    await asyncio.to_thread(old.kill)
    new_holder: list[str] = []

    def taken_over() -> bool:
        h = holder_of(cluster)
        if h is not None and h is not old:
            new_holder.append(h.name)
            return True
        return False

    def declared() -> bool:
        return all(a.state_of(old.name) in ("dead", "left", None) for a in cluster.running())

    detect = asyncio.create_task(poll(declared, "the holder declared dead everywhere"))
    failover_s = await poll(taken_over, "another agent holds the uplink")
    detection_s = await detect
    sent = await pub
    want = set(payloads[:sent])
    with contextlib.suppress(TimeoutError):
        await poll(lambda: want <= set(collector.got), "every message in the cloud", 60)
    got = collector.got
    return {
        "nodes": len(cluster.agents),
        "published": sent,
        "failover_s": round(failover_s, 2),
        "detection_s": round(detection_s, 2),
        "qos1_lost": len(want - set(got)),
        "failover_duplicates": len(got) - len(set(got)),
        "holder_before": old.name,
        "holder_after": new_holder[0] if new_holder else None,
    }


async def outage(
    n: int = 2, down_s: float = 10.0, rate: float = 20.0, kill: bool = False
) -> dict[str, Any]:
    """The cloud unreachable for ``down_s`` while QoS 1 is published (see the docstring)."""
    async with _site(n) as (cluster, gate, collector, holder):
        return await _outage_stream(cluster, holder, gate, collector, down_s, rate, kill)


async def _outage_stream(cluster: LoopbackCluster, holder: LoopbackAgent, gate: Gate, collector: Collector,
                         down_s: float, rate: float, kill: bool) -> dict[str, Any]:  # fmt: skip
    pub_agent = next((a for a in cluster.agents if a is not holder), holder)
    host, port = pub_agent.host, cluster.mqtt_port
    live = [b"live-%06d" % i for i in range(20)]
    await publish(host, port, live, 50.0)
    await poll(lambda: set(live) <= set(collector.got), "live messages in the cloud", 30)
    await gate.close()
    t_down = time.monotonic()
    n_down = max(int(down_s * rate), 10)
    spooled = [b"down-%06d" % i for i in range(n_down)]
    half = n_down // 2
    await publish(host, port, spooled[:half], rate)
    depth = [0]

    def pending() -> int:
        depth[0] = max(depth[0], int(uplink_status(holder).get("spool", {}).get("pending", 0)))
        return depth[0]

    await poll(lambda: pending() >= half, "the first half spooled", 30)
    if kill:  # kill -9 with the spool full of undelivered messages, and back
        await asyncio.to_thread(holder.kill)
        await asyncio.to_thread(holder.start)
        await poll(lambda: uplink_status(holder).get("mode") == "hold", "the holder back", 60)
        host = pub_agent.host if pub_agent is not holder else holder.host
    await publish(host, port, spooled[half:], rate)
    await asyncio.sleep(max(0.0, down_s - (time.monotonic() - t_down)))
    pending()
    await gate.open()
    t_up = time.monotonic()
    after = [b"after-%06d" % i for i in range(20)]  # live traffic while the backlog drains
    await publish(host, port, after, 50.0)
    want = spooled + after
    drained = True
    try:
        await poll(lambda: set(want) <= set(collector.got), "the spool drained", TIMEOUT)
    except TimeoutError:
        drained = False
    drain_s = time.monotonic() - t_up
    firsts = [m for m in dict.fromkeys(collector.got) if m.startswith(b"down-")]
    return {
        "outage_s": round(t_up - t_down, 1),
        "outage_published": len(spooled),
        "spool_max_pending": depth[0],
        "spool_drain_s": round(drain_s, 2) if drained else None,
        "spool_drained_in_order": drained and firsts == sorted(firsts),
        "outage_lost": len(set(want) - set(collector.got)),
        "outage_duplicates": len(collector.got) - len(set(collector.got)),
        "outage_kill9": kill,
    }


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nodes", type=int, default=3, help="agents in the failover run (default 3)")
    p.add_argument("--count", type=int, default=600, help="QoS 1 messages in the failover run")
    p.add_argument("--rate", type=float, default=100.0, help="messages/s of the publisher")
    p.add_argument("--down-s", type=float, default=60.0, help="cloud outage, seconds (default 60)")


def run(args: argparse.Namespace) -> dict[str, Any]:
    if not 2 <= args.nodes <= 20 or not 100 <= args.count <= 100_000 or args.down_s <= 0:
        raise UsageError("uplink: --nodes 2..20, --count 100..100000, --down-s > 0")

    async def both() -> dict[str, Any]:
        result = await failover(args.nodes, args.count, args.rate, kill_at=args.count // 3)
        result |= await outage(2, args.down_s, 20.0)
        return result

    return {"machine": "loaded machine (2 cores shared)", **asyncio.run(both())}
