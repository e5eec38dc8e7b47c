"""QoS 1 at-least-once through the loss of the PUBLISHER's agent (real agents, paho clients).

Two agents. A persistent subscriber (paho, clean session off, QoS 1) on node2; a publisher
(paho, clean session off, QoS 1, reconnecting) on node1. Phase 1: messages flow. Phase 2:
node2 is SIGKILLed, the publisher sends more and node1 is SIGKILLed while those are still in
its outbox (node1's retries to node2 take seconds, the kill comes at once). node2 restarts
(its persistent subscriber session comes back from disk), node1 restarts, the publisher
reconnects and resends what it has no PUBACK for, and sends more. Phase 3: node1 is
restarted once more (clean stop) and more is published, node2 staying up.

The subscriber must get every message (duplicates allowed). It fails without the held
PUBACK (node1 acknowledged phase 2's messages on receipt; they died with it in the outbox),
and phase 3 fails if a restarted agent numbers its envelopes from 1 again (node2 drops them
as duplicates of the previous run's).
"""

from __future__ import annotations

import collections
import subprocess
import threading
import time
from collections.abc import Iterator

import pytest

from testbed.loopback import LoopbackCluster

paho = pytest.importorskip("paho.mqtt.client")
TIMEOUT = 30.0
TOPIC = "pk/x"


@pytest.fixture()
def cluster() -> Iterator[LoopbackCluster]:
    with LoopbackCluster(2, mqtt=True) as c:
        c.wait_converged(TIMEOUT)
        yield c


class Subscriber:
    """A persistent QoS 1 subscriber that reconnects; what it got, in arrival order."""

    def __init__(self, host: str, port: int) -> None:
        self.got: list[str] = []
        self.lock = threading.Lock()
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, "sub-k", clean_session=False)
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(TOPIC, qos=1)
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(0.2, 1)
        self.client.connect_async(host, port, keepalive=10)
        self.client.loop_start()

    def _on_message(self, client: object, userdata: object, msg: object) -> None:
        with self.lock:
            self.got.append(msg.payload.decode())  # type: ignore[attr-defined]

    def distinct(self) -> set[str]:
        with self.lock:
            return set(self.got)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def publisher(host: str, port: int, acked: set[int]) -> object:
    """A persistent QoS 1 publisher that reconnects (paho resends what has no PUBACK)."""
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, "pub-k", clean_session=False)
    client.on_publish = lambda c, u, mid, rc, p: acked.add(mid)
    client.reconnect_delay_set(0.2, 1)
    client.connect_async(host, port, keepalive=10)
    client.loop_start()
    return client


def test_sigkilled_publisher_agent_loses_no_qos1_message(cluster: LoopbackCluster) -> None:
    node1, node2 = cluster.agents
    port = cluster.mqtt_port
    sub = Subscriber(node2.host, port)
    acked: set[int] = set()
    pub = publisher(node1.host, port, acked)
    mids: list[int] = []

    def send(first: int, count: int) -> None:
        for i in range(first, first + count):  # queued by paho while it is not connected
            mids.append(pub.publish(TOPIC, f"m{i}", qos=1).mid)  # type: ignore[attr-defined]

    def stats(agent: object) -> dict[str, int]:
        # {} until the MQTT feature registered its status (the control socket answers first)
        found = agent.status().get("mqtt_stats", {})  # type: ignore[attr-defined]
        return collections.defaultdict(int, found)

    def all_acked() -> bool:
        return set(mids) <= acked

    try:
        cluster.wait_for(lambda: stats(node1)["router_interest_nodes"] >= 1, TIMEOUT,
                         "node1 sees node2's interest")  # fmt: skip
        send(0, 10)
        cluster.wait_for(all_acked, TIMEOUT, "phase 1 acknowledged")
        node2.kill()
        base = stats(node1)["publishes_received"]
        send(10, 10)  # node1 holds their PUBACKs: node2 has not got them
        cluster.wait_for(lambda: stats(node1)["publishes_received"] >= base + 10, TIMEOUT,
                         "node1 received phase 2")  # fmt: skip
        node1.kill()
        node2.start()
        node1.start()
        send(20, 10)  # the reconnecting publisher resends 10..19, then sends these
        cluster.wait_for(all_acked, 2 * TIMEOUT, "phase 2 acknowledged")
        node1.terminate()
        node1.start()
        send(30, 10)
        cluster.wait_for(all_acked, 2 * TIMEOUT, "phase 3 acknowledged")
        want = {f"m{i}" for i in range(40)}
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline and not want <= sub.distinct():
            time.sleep(0.2)
        assert sorted(want - sub.distinct()) == []
    finally:
        pub.loop_stop()  # type: ignore[attr-defined]
        sub.close()


def test_a_restarted_agent_serves_clients_only_once_it_knows_the_mesh_interest(
    cluster: LoopbackCluster,
) -> None:
    """The first publish a just-restarted node1 accepts reaches node2's subscriber: node1
    reads no client before the other agents' state arrived (``MeshLink.warm``). Served at
    once, it would route that message by an empty interest table, to no one, and ack it
    (without the gate this failed 1 run in 2 here: the window is the join's first exchange)."""
    node1, node2 = cluster.agents
    port = cluster.mqtt_port
    sub = Subscriber(node2.host, port)
    try:
        cluster.wait_for(
            lambda: node1.status().get("mqtt_stats", {}).get("router_interest_nodes", 0) >= 1,
            TIMEOUT, "node1 sees node2's interest",
        )  # fmt: skip
        node1.terminate()
        node1.start()
        argv = ["mosquitto_pub", "-h", node1.host, "-p", str(port), "-t", TOPIC, "-q", "1",
                "-m", "first"]  # fmt: skip
        deadline = time.monotonic() + TIMEOUT
        while subprocess.run(argv, capture_output=True, timeout=30).returncode != 0:
            assert time.monotonic() < deadline, "node1's MQTT listener never opened"
            time.sleep(0.02)  # connection refused: the listener is not open yet
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and "first" not in sub.distinct():
            time.sleep(0.1)
        assert "first" in sub.distinct()
    finally:
        sub.close()
