"""Persistent MQTT sessions survive a SIGKILL of their agent (real agents, mosquitto clients).

Two agents. A persistent subscriber (``mosquitto_sub -c``, QoS 1) subscribes on node2 and
goes offline; messages published on node1 are queued in its session on node2. Then node2 is
SIGKILLed, more messages are published on node1 while it is down (node1's outbox retries),
node2 restarts from its state dir, node1's outbox delivers, and only then does the
subscriber reconnect: it must get every message, in order. With a clean stop (SIGTERM)
instead of the kill node2 leaves the membership at once: what is published meanwhile is
kept in node1's spool for node2 (node2's interest names the persistent session's filter)
and delivered when node2 is back. Without the session store the restarted node2 has no
session and drops what node1 sends it; without the spool what is published while node2 is
away (left, or dead after the retries) is lost: either way this test fails.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator

import pytest

from testbed.loopback import LoopbackCluster

pytestmark = pytest.mark.skipif(
    not (shutil.which("mosquitto_pub") and shutil.which("mosquitto_sub")),
    reason="mosquitto_pub/mosquitto_sub not installed (Debian mosquitto-clients)",
)
TIMEOUT = 30.0
BEFORE, DURING = 20, 20  # messages queued before the kill, published while node2 is down


@pytest.fixture()
def cluster() -> Iterator[LoopbackCluster]:
    with LoopbackCluster(2, mqtt=True) as c:
        c.wait_converged(TIMEOUT)
        yield c


def mosquitto(cluster: LoopbackCluster, tool: str, host: str, *args: str) -> str:
    out = subprocess.run([tool, "-h", host, "-p", str(cluster.mqtt_port), *args],
                         capture_output=True, text=True, timeout=90)  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def sent(cluster: LoopbackCluster) -> int:
    return int(cluster.agents[0].status()["mqtt_stats"]["mesh_sent"])


def publish(cluster: LoopbackCluster, first: int, count: int) -> None:
    for i in range(first, first + count):
        mosquitto(
            cluster,
            "mosquitto_pub",
            cluster.agents[0].host,
            "-t",
            "dur/x",
            "-m",
            f"m{i}",
            "-q",
            "1",
        )


@pytest.mark.parametrize("how", ["sigkill", "sigterm"])
def test_sigkilled_subscriber_node_loses_no_qos1_message_of_a_persistent_session(
    cluster: LoopbackCluster, how: str
) -> None:
    node1, node2 = cluster.agents
    sub = ("-i", "persistent-sub", "-c", "-q", "1", "-t", "dur/#")
    mosquitto(cluster, "mosquitto_sub", node2.host, *sub, "-E")  # subscribe, then offline

    def interest() -> bool:
        return int(node1.status()["mqtt_stats"].get("router_interest_nodes", 0)) >= 1

    cluster.wait_for(interest, TIMEOUT, "node1 sees node2's interest")
    base = sent(cluster)
    publish(cluster, 0, BEFORE)
    cluster.wait_for(lambda: sent(cluster) >= base + BEFORE, TIMEOUT, "node1 delivered to node2")
    if how == "sigkill":
        node2.kill()  # the queued messages were acknowledged by node2 once saved
    else:
        node2.terminate()  # a clean stop saves at the end too
    during = DURING
    publish(cluster, BEFORE, during)  # node1 retries, then spools these while node2 is down
    node2.start()
    total = base + BEFORE + during
    cluster.wait_for(lambda: sent(cluster) >= total, TIMEOUT, "node1 delivered after the restart")
    stats = node1.status()["mqtt_stats"]
    assert stats["mesh_lost"] == 0
    assert stats["mesh_spooled"] >= 1 and stats["mesh_unspooled"] == stats["mesh_spooled"]
    # the control socket answers before the MQTT feature has started (and registered its
    # status); a clean stop has nothing to wait for above, so wait for the feature here
    cluster.wait_for(lambda: "mqtt_stats" in node2.status(), TIMEOUT, "node2's MQTT is up")
    restored = node2.status()["mqtt_stats"]["sessions_restored"]
    assert restored == 1
    out = mosquitto(
        cluster, "mosquitto_sub", node2.host, *sub, "-C", str(BEFORE + during), "-W", "20"
    )
    assert out.splitlines() == [f"m{i}" for i in range(BEFORE + during)]


def test_local_publish_to_a_persistent_session_is_acknowledged_only_once_saved(
    cluster: LoopbackCluster,
) -> None:
    """Publisher and persistent subscriber on one agent, SIGKILL right after mosquitto_pub got
    its PUBACKs: the restarted agent still holds them all (the PUBACK waited for the save).
    Acknowledged on receipt, they were in memory only until the next save (up to 1 s)."""
    node1 = cluster.agents[0]
    sub = ("-i", "local-sub", "-c", "-q", "1", "-t", "loc/#")
    mosquitto(cluster, "mosquitto_sub", node1.host, *sub, "-E")
    lines = "\n".join(f"l{i}" for i in range(10)) + "\n"
    out = subprocess.run(
        ["mosquitto_pub", "-h", node1.host, "-p", str(cluster.mqtt_port), "-t", "loc/x", "-q", "1", "-l"],
        input=lines, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    node1.kill()  # at once: every message mosquitto_pub was told is safe must be on disk
    node1.start()
    cluster.wait_for(lambda: "mqtt_stats" in node1.status(), TIMEOUT, "node1's MQTT is up")
    got = mosquitto(cluster, "mosquitto_sub", node1.host, *sub, "-C", "10", "-W", "20")
    assert got.splitlines() == [f"l{i}" for i in range(10)]
