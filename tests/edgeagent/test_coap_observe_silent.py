"""An observation whose server goes silent is registered again after its Max-Age (issue 9).

Two agents; node1 runs a plain aiocoap server whose ``/obs`` notifications carry Max-Age 1
(one every 0.2 s, payload ``NAME:N``), published as ``sensor``. A client observes through an
agent, the server's own node (a local instance) or the other one (over the channel). The
server is SIGKILLed and started again on the same port: it forgot its observers, and node1's
agent lives on, so nothing fails, the notifications just stop. Within the Max-Age and
``SILENCE_MARGIN_S`` the ingress registers again: the client's one observation goes on with
the new server's notifications, Observe values still increasing, no 5.02, nothing ejected.
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

import aiocoap
import pytest

from testbed.loopback import LoopbackCluster
from tests.edgeagent import test_coap
from tests.edgeagent.test_coap_observe import observe_through_a_kill, sensor_beside_node1

TIMEOUT = 30.0
MAX_AGE_S = 1


def start_server(host: str, port: int, name: str) -> subprocess.Popen[str]:
    return test_coap.start_server(host, port, name, "--max-age", str(MAX_AGE_S))


@dataclass
class Restart:
    """What observe_through_a_kill "kills": the server, started again under a new name."""

    host: str
    port: int
    servers: list[subprocess.Popen[str]]
    name: str

    def kill(self) -> None:
        old = self.servers.pop()
        old.kill()
        old.wait()
        self.servers.append(start_server(self.host, self.port, self.name))


@dataclass
class Scene:
    cluster: LoopbackCluster
    coap_port: int
    port: int
    servers: list[subprocess.Popen[str]]


@pytest.fixture(scope="module")
def scene() -> Iterator[Scene]:
    with sensor_beside_node1(lambda host, port: start_server(host, port, "first")) as found:
        yield Scene(*found)


@pytest.mark.parametrize("ingress", [0, 1], ids=["local-instance", "over-the-channel"])
def test_a_silent_server_is_registered_at_again(scene: Scene, ingress: int) -> None:
    agent = scene.cluster.agents[ingress]
    before = agent.status()["observe_stats"]
    name = f"restarted{ingress}"
    restart = Restart(scene.cluster.agents[0].host, scene.port, scene.servers, name)
    uri = f"coap://{agent.host}:{scene.coap_port}/mesh/sensor/obs"
    seen = asyncio.run(observe_through_a_kill(uri, lambda _seen: restart, 4))
    assert all(m.code == aiocoap.CONTENT for m in seen), [(m.code, m.payload) for m in seen]
    names = [m.payload.decode().partition(":")[0] for m in seen]
    assert names[-1] == name and names[0] != name, names  # the restarted server's, at the end
    values = [m.opt.observe for m in seen]
    assert None not in values and values == sorted(values) and len(set(values)) == len(values)
    stats = agent.status()["observe_stats"]
    assert stats["observe_refreshed"] > before.get("observe_refreshed", 0), stats
    assert stats.get("observe_lost", 0) == before.get("observe_lost", 0), stats
    assert stats.get("observe_moved", 0) == before.get("observe_moved", 0), stats  # not a failure
    rows = scene.cluster.agents[1].call("services")
    assert [r["state"] for r in rows if r["name"] == "sensor"] == ["healthy"], rows
