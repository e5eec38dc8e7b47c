"""An observation through the mesh moves when the node serving it dies (issue 9).

Three agents; node1 and node2 each run a plain aiocoap server (``/obs`` notifies every
0.2 s, payload ``NAME:N``) published as ``sensor``. A client observes at node3, so its
notifications cross the channel from whichever owner the balancer picked. That owner is
SIGKILLed: the client's one observation goes on with the other server's notifications,
Observe values still increasing, no 5.02 (the single-instance case, where it ends with a
final 5.02, is in test_coap_observe.py).
"""

from __future__ import annotations

import asyncio
import warnings
from collections.abc import Iterator

import aiocoap
import pytest

from testbed.loopback import LoopbackCluster, free_port
from tests.edgeagent.test_coap import start_server

TIMEOUT = 30.0


@pytest.fixture(scope="module")
def cluster() -> Iterator[tuple[LoopbackCluster, int]]:
    cluster = LoopbackCluster(3, coap=True)
    coap_port = free_port([a.host for a in cluster.agents])  # not 5683: others' agents hold it
    for agent in cluster.agents:
        agent.argv[agent.argv.index("--coap") + 1] = f"{agent.host}:{coap_port}"
    with cluster:
        cluster.wait_converged(TIMEOUT)
        owners = cluster.agents[:2]
        port = free_port([a.host for a in owners])
        servers = [start_server(a.host, port, a.name) for a in owners]
        try:
            for agent in owners:
                agent.call("service", op="register", name="sensor", uri=f"coap://{agent.host}:{port}")
            cluster.wait_for(
                lambda: sum(r["state"] == "healthy" for r in cluster.agents[2].call("services")) == 2,
                TIMEOUT,
                "node3 sees both instances healthy",
            )
            yield cluster, coap_port
        finally:
            for proc in servers:
                proc.kill()
                proc.wait()


def test_the_owner_dying_moves_the_observation_to_the_other_instance(
    cluster: tuple[LoopbackCluster, int],
) -> None:
    mesh, coap_port = cluster
    ingress = mesh.agents[2]
    by_name = {a.name: a for a in mesh.agents}

    async def run() -> list[aiocoap.Message]:
        ctx = await aiocoap.Context.create_client_context(transports=["udp6"])
        seen: list[aiocoap.Message] = []
        ended = asyncio.Event()
        uri = f"coap://{ingress.host}:{coap_port}/mesh/sensor/obs"
        try:
            request = ctx.request(aiocoap.Message(code=aiocoap.GET, uri=uri, observe=0))
            with warnings.catch_warnings():  # callbacks: aiocoap's iterator is a lossy slot
                warnings.simplefilter("ignore", DeprecationWarning)
                request.observation.register_callback(seen.append)
                request.observation.register_errback(lambda _e: ended.set())
            async with asyncio.timeout(TIMEOUT):
                seen.insert(0, await request.response)
                while len(seen) < 3:
                    await asyncio.sleep(0.05)
                owner = seen[-1].payload.decode().partition(":")[0]
                await asyncio.to_thread(by_name[owner].kill)
                killed_at = len(seen)
                while len(seen) < killed_at + 5 and not ended.is_set():
                    await asyncio.sleep(0.05)
            if not request.observation.cancelled:  # an error (the 5.02) ended it already
                request.observation.cancel()
            return seen
        finally:
            await ctx.shutdown()

    seen = asyncio.run(run())
    assert all(m.code == aiocoap.CONTENT for m in seen), [(m.code, m.payload) for m in seen]
    owners = [m.payload.decode().partition(":")[0] for m in seen]
    first, last = owners[0], owners[-1]
    assert first != last and set(owners) == {first, last}, owners  # moved once, to the other
    values = [m.opt.observe for m in seen]
    assert None not in values and values == sorted(values) and len(set(values)) == len(values)
    stats = ingress.status()["observe_stats"]
    assert stats["observe_moved"] >= 1 and stats.get("observe_lost", 0) == 0, stats
