"""CoAP Observe (RFC 7641) through the mesh, with real agents on loopback.

Two agents; node1 runs a plain aiocoap server (``testbed.coap_server``: ``/obs`` notifies
every 0.2 s while observed, ``/observers`` counts its observers) and publishes it as
``sensor``. A client registers at node2's CoAP port, so every notification crosses the agent
channel (node2 -> node1 -> the server and back); another registers at node1 (its own
instance). Cancelling frees the server's observation; killing node1 ends node2's client's
observation with a final 5.02. The kill must stay the last test.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import subprocess
import warnings
from collections.abc import Callable, Iterator

import aiocoap
import pytest

from testbed.loopback import LoopbackAgent, LoopbackCluster, free_port
from tests.edgeagent.test_coap import start_server

TIMEOUT = 30.0
LIBCOAP = shutil.which("coap-client-notls")


class Scene:
    def __init__(self, cluster: LoopbackCluster, port: int, coap_port: int) -> None:
        self.cluster, self.port, self.coap_port = cluster, port, coap_port
        self.node1, self.node2 = cluster.agents
        self.server = f"coap://{self.node1.host}:{port}"

    def uri(self, agent: LoopbackAgent, path: str = "obs") -> str:
        return f"coap://{agent.host}:{self.coap_port}/mesh/sensor/{path}"

    def stats(self, agent: LoopbackAgent) -> dict[str, int]:
        found: dict[str, int] = agent.status()["observe_stats"]
        return found


def coap_on_one_port(n: int) -> tuple[LoopbackCluster, int]:
    """``n`` agents (not started) whose CoAP listeners share one free port."""
    cluster = LoopbackCluster(n, coap=True)
    coap_port = free_port([a.host for a in cluster.agents])  # not 5683: others' agents hold it
    for agent in cluster.agents:
        agent.argv[agent.argv.index("--coap") + 1] = f"{agent.host}:{coap_port}"
    return cluster, coap_port


@contextlib.contextmanager
def sensor_beside_node1(
    start: Callable[[str, int], subprocess.Popen[str]],
) -> Iterator[tuple[LoopbackCluster, int, int, list[subprocess.Popen[str]]]]:
    """Two agents on one CoAP port; the server ``start(host, port)`` beside node1, published
    as ``sensor`` and healthy at node2. Yields the cluster, the CoAP port, the server's port
    and the servers (a test may replace the one in the list); they are killed at the end."""
    cluster, coap_port = coap_on_one_port(2)
    with cluster:
        cluster.wait_converged(TIMEOUT)
        node1 = cluster.agents[0]
        port = free_port([node1.host])
        servers = [start(node1.host, port)]
        try:
            node1.call("service", op="register", name="sensor", uri=f"coap://{node1.host}:{port}")
            cluster.wait_for(
                lambda: any(
                    r["name"] == "sensor" and r["state"] == "healthy"
                    for r in cluster.agents[1].call("services")
                ),
                TIMEOUT,
                "node2 sees the sensor",
            )
            yield cluster, coap_port, port, servers
        finally:
            for proc in servers:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module")
def scene() -> Iterator[Scene]:
    with sensor_beside_node1(lambda host, port: start_server(host, port, "node1")) as found:
        cluster, coap_port, port, _ = found
        yield Scene(cluster, port, coap_port)


async def get(uri: str) -> aiocoap.Message:
    ctx = await aiocoap.Context.create_client_context(transports=["udp6"])
    try:
        async with asyncio.timeout(15):
            return await ctx.request(aiocoap.Message(code=aiocoap.GET, uri=uri)).response
    finally:
        await ctx.shutdown()


async def observers(scene: Scene) -> int:
    return int((await get(f"{scene.server}/observers")).payload)


async def wait_until(predicate: object, what: str) -> None:
    deadline = asyncio.get_running_loop().time() + TIMEOUT
    while not await predicate():  # type: ignore[operator]
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.2)


def counter(msg: aiocoap.Message) -> int:
    name, _, n = msg.payload.decode().partition(":")
    assert name == "node1", msg.payload
    return int(n)


async def observe(uri: str, notifications: int) -> tuple[aiocoap.Message, list[aiocoap.Message]]:
    """Register, take the first response and ``notifications`` more, then cancel."""
    ctx = await aiocoap.Context.create_client_context(transports=["udp6"])
    try:
        request = ctx.request(aiocoap.Message(code=aiocoap.GET, uri=uri, observe=0))
        async with asyncio.timeout(15):
            first = await request.response
            seen: list[aiocoap.Message] = []
            async for note in request.observation:
                seen.append(note)
                if len(seen) == notifications:
                    break
        if not request.observation.cancelled:  # leaving the loop cancelled it already
            request.observation.cancel()
        await asyncio.sleep(1.0)  # let the next notification come and be RST (the deregistration)
        return first, seen
    finally:
        await ctx.shutdown()


async def observe_through_a_kill(
    uri: str, victim: Callable[[list[aiocoap.Message]], LoopbackAgent], after: int | None
) -> list[aiocoap.Message]:
    """Register at ``uri``; after the first response and two notifications SIGKILL the agent
    ``victim(seen)`` names; return what came until ``after`` more arrived or an error ended
    it (``after`` None: wait for the error).

    Callbacks, not ``async for``: aiocoap's iterator is a lossy one-slot queue, and the
    error that follows the last notification at once overwrites it.
    """
    ctx = await aiocoap.Context.create_client_context(transports=["udp6"])
    seen: list[aiocoap.Message] = []
    ended = asyncio.Event()
    try:
        request = ctx.request(aiocoap.Message(code=aiocoap.GET, uri=uri, observe=0))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            request.observation.register_callback(seen.append)
            request.observation.register_errback(lambda _e: ended.set())
        async with asyncio.timeout(TIMEOUT):
            seen.insert(0, await request.response)
            while len(seen) < 3:
                await asyncio.sleep(0.05)
            await asyncio.to_thread(victim(seen).kill)
            killed_at = len(seen)
            while not ended.is_set() and (after is None or len(seen) < killed_at + after):
                await asyncio.sleep(0.05)
        if not request.observation.cancelled:  # an error (a 5.02) ended it already
            request.observation.cancel()
        return seen
    finally:
        await ctx.shutdown()


@pytest.mark.parametrize("ingress", ["node2", "node1"])
def test_notifications_arrive_and_cancelling_frees_the_upstream(scene: Scene, ingress: str) -> None:
    agent = scene.node2 if ingress == "node2" else scene.node1

    async def run() -> None:
        first, notes = await observe(scene.uri(agent), 4)
        assert first.code == aiocoap.CONTENT and first.opt.observe is not None, first
        values = [counter(first), *(counter(n) for n in notes)]
        assert values == sorted(values) and len(set(values)) == 5, values
        observes = [first.opt.observe, *(n.opt.observe for n in notes)]
        assert observes == sorted(observes) and len(set(observes)) == 5, observes

        async def freed() -> bool:
            return await observers(scene) == 0

        await wait_until(freed, "the server's observation to be freed")
        stats = scene.stats(agent)
        assert stats["observing"] == 0 and stats["observe_notifications"] >= 4, stats
        if ingress == "node2":
            assert stats["observe_remote"] >= 1
            owner = scene.stats(scene.node1)
            assert owner["observe_channel_registrations"] >= 1
            assert owner["observed_for_peers"] == 0, owner
        else:
            assert stats["observe_local"] >= 1

    asyncio.run(run())


def test_a_plain_get_of_an_observable_resource_is_answered_once(scene: Scene) -> None:
    async def run() -> None:
        response = await get(scene.uri(scene.node2))
        assert response.code == aiocoap.CONTENT and response.opt.observe is None
        await asyncio.sleep(0.5)
        assert await observers(scene) == 0

    asyncio.run(run())


def test_one_client_over_its_observation_limit_gets_5_03(scene: Scene) -> None:
    from overlay.coap_observe import MAX_PER_CLIENT

    async def run() -> None:
        ctx = await aiocoap.Context.create_client_context(transports=["udp6"])  # one address
        try:
            requests = [
                ctx.request(
                    aiocoap.Message(code=aiocoap.GET, uri=scene.uri(scene.node2), observe=0)
                )
                for _ in range(MAX_PER_CLIENT + 1)
            ]
            async with asyncio.timeout(15):
                firsts = [await r.response for r in requests]
            codes = sorted(str(m.code) for m in firsts)
            assert codes.count(str(aiocoap.CONTENT)) == MAX_PER_CLIENT, codes
            assert codes.count(str(aiocoap.SERVICE_UNAVAILABLE)) == 1, codes
            assert scene.stats(scene.node2)["observe_refused_limit"] >= 1
        finally:
            await ctx.shutdown()  # drops every observation: the next notifications are RST

        async def freed() -> bool:
            return await observers(scene) == 0 and scene.stats(scene.node2)["observing"] == 0

        await wait_until(freed, "the observations to be freed")

    asyncio.run(run())


@pytest.mark.skipif(
    LIBCOAP is None,
    reason="libcoap's coap-client-notls not installed (apt-get install libcoap3-bin)",
)
def test_libcoap_client_observes_through_the_mesh(scene: Scene) -> None:
    assert LIBCOAP is not None
    out = subprocess.run(
        [LIBCOAP, "-s", "2", "-B", "4", scene.uri(scene.node2)],
        capture_output=True,
        text=True,
        timeout=15,
    ).stdout
    values = [int(n) for n in re.findall(r"node1:(\d+)", out)]  # printed without newlines
    assert len(values) >= 4 and values == sorted(values), out

    async def freed() -> bool:
        return await observers(scene) == 0

    asyncio.run(wait_until(freed, "libcoap's observation to be freed"))


def test_the_owner_dying_ends_the_observation_with_5_02(scene: Scene) -> None:
    """Must be last: SIGKILLs node1 (its server keeps running). The only instance is gone,
    so the observation cannot move (test_coap_observe_move.py): it ends with a 5.02."""
    seen = asyncio.run(observe_through_a_kill(scene.uri(scene.node2), lambda _: scene.node1, None))
    assert all(m.code == aiocoap.CONTENT for m in seen[:-1]) and len(seen) >= 4
    assert seen[-1].code == aiocoap.BAD_GATEWAY and seen[-1].opt.observe is None, seen[-1]
    stats = scene.stats(scene.node2)
    assert stats["observing"] == 0, stats
