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
from collections.abc import Iterator

import aiocoap
import pytest

from testbed.loopback import LoopbackAgent, LoopbackCluster, free_port
from tests.edgeagent.test_coap import start_server
from tests.edgeagent.test_coap_observe import coap_on_one_port, observe_through_a_kill

TIMEOUT = 30.0


@pytest.fixture(scope="module")
def cluster() -> Iterator[tuple[LoopbackCluster, int]]:
    cluster, coap_port = coap_on_one_port(3)
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

    def owner(seen: list[aiocoap.Message]) -> LoopbackAgent:
        return by_name[seen[-1].payload.decode().partition(":")[0]]

    uri = f"coap://{ingress.host}:{coap_port}/mesh/sensor/obs"
    seen = asyncio.run(observe_through_a_kill(uri, owner, 5))
    assert all(m.code == aiocoap.CONTENT for m in seen), [(m.code, m.payload) for m in seen]
    owners = [m.payload.decode().partition(":")[0] for m in seen]
    first, last = owners[0], owners[-1]
    assert first != last and set(owners) == {first, last}, owners  # moved once, to the other
    values = [m.opt.observe for m in seen]
    assert None not in values and values == sorted(values) and len(set(values)) == len(values)
    stats = ingress.status()["observe_stats"]
    assert stats["observe_moved"] >= 1 and stats.get("observe_lost", 0) == 0, stats
