"""MQTT across the mesh with real agents on loopback and real clients (issue 10).

Three agents (``LoopbackCluster(3, mqtt=True)``: each the broker on its own 127.x address, one port). ``mosquitto_sub`` on two nodes, ``mosquitto_pub`` on the third: plain fan-out
(each subscriber gets each message once), a share group spanning two nodes gets each of
1,000 messages exactly once, a retained value reaches a node's subscriber that subscribes
later, and a retained value set while a node was down reaches it after it restarts.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections import Counter
from collections.abc import Iterator

import pytest

from testbed.loopback import LoopbackCluster

pytestmark = pytest.mark.skipif(
    not (shutil.which("mosquitto_pub") and shutil.which("mosquitto_sub")),
    reason="mosquitto_pub/mosquitto_sub not installed (Debian mosquitto-clients)",
)
TIMEOUT = 30.0


@pytest.fixture(scope="module")
def cluster() -> Iterator[LoopbackCluster]:
    global PORT
    with LoopbackCluster(3, mqtt=True) as c:
        PORT = c.mqtt_port
        c.wait_converged(TIMEOUT)
        yield c


PORT = 0  # the cluster's MQTT port (LocalMesh picks one free on every agent's address)


def sub(host: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        ["mosquitto_sub", "-h", host, "-p", str(PORT), "-W", "60", *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def pub(host: str, *args: str) -> None:
    out = subprocess.run(
        ["mosquitto_pub", "-h", host, "-p", str(PORT), *args],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr


def interest_seen(cluster: LoopbackCluster, by: int, owners: int) -> None:
    """Wait until agent ``by`` routes to ``owners`` agents' interest (besides its own)."""

    def ready() -> bool:
        stats = cluster.agents[by].status()["mqtt_stats"]
        return int(stats.get("router_interest_nodes", 0)) >= owners

    cluster.wait_for(ready, TIMEOUT, f"node{by + 1} sees {owners} agents' MQTT interest")


def finish(proc: subprocess.Popen[str]) -> list[str]:
    out, _ = proc.communicate(timeout=90)
    assert proc.returncode == 0, out
    return out.splitlines()


def test_plain_fan_out_each_subscriber_once(cluster: LoopbackCluster) -> None:
    a, b, c = (x.host for x in cluster.agents)
    subs = [sub(h, "-t", "fan/#", "-q", "1", "-C", "20", "-V", v)
            for h, v in ((a, "mqttv5"), (b, "mqttv311"), (b, "mqttv5"))]  # fmt: skip
    interest_seen(cluster, 2, 2)
    for i in range(20):
        pub(c, "-t", f"fan/{i}", "-m", f"m{i}", "-q", "1")
    expected = [f"m{i}" for i in range(20)]
    for proc in subs:
        assert finish(proc) == expected


def test_share_group_across_two_nodes_exactly_once(cluster: LoopbackCluster) -> None:
    a, b, c = (x.host for x in cluster.agents)
    members = [sub(h, "-t", "$share/workers/jobs/#", "-q", "1", "-v") for h in (a, b)]
    try:
        interest_seen(cluster, 2, 2)
        time.sleep(1.0)  # both agents' share memberships announced
        lines = "\n".join(f"job{i}" for i in range(1000)) + "\n"
        out = subprocess.run(
            ["mosquitto_pub", "-h", c, "-p", str(PORT), "-t", "jobs/x", "-q", "1", "-l"],
            input=lines, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            stats = [cluster.agents[i].status()["mqtt_stats"] for i in (0, 1)]
            if sum(s["publishes_sent"] for s in stats) >= 1000:
                break
            time.sleep(0.5)
        time.sleep(1.0)
    finally:
        for proc in members:
            proc.terminate()
    got = [line.split()[1] for proc in members for line in proc.communicate(timeout=30)[0].splitlines()]
    counts = Counter(got)
    assert sorted(counts) == sorted(f"job{i}" for i in range(1000)), len(counts)
    assert max(counts.values()) == 1  # no duplicates


def test_retained_reaches_late_subscribers_and_a_restarted_node(cluster: LoopbackCluster) -> None:
    a, b, c = (x.host for x in cluster.agents)
    pub(a, "-t", "state/door", "-m", "open", "-r", "-q", "1")
    cluster.wait_for(
        lambda: cluster.agents[1].status()["mqtt_stats"]["retained_set"] >= 1
        or cluster.agents[1].status()["mqtt_stats"].get("retained_synced", 0) >= 1,
        TIMEOUT, "node2 holds the retained value",
    )  # fmt: skip
    assert finish(sub(b, "-t", "state/#", "-C", "1", "-v")) == ["state/door open"]
    # node3 is down while the value changes; it catches up by anti-entropy after its restart
    cluster.agents[2].kill()
    pub(a, "-t", "state/door", "-m", "closed", "-r", "-q", "1")
    cluster.agents[2].start()
    cluster.wait_converged(TIMEOUT)

    def has_closed() -> bool:
        proc = subprocess.run(
            ["mosquitto_sub", "-h", c, "-p", str(PORT), "-t", "state/door", "-C", "1", "-W", "2"],
            capture_output=True, text=True, timeout=10,
        )  # fmt: skip
        return proc.stdout.strip() == "closed"

    cluster.wait_for(has_closed, TIMEOUT, "node3's subscriber gets the latest retained value")
