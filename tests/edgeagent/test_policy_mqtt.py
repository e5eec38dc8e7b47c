"""mqtt.permissions with real agents and real clients. node1 holds a bundle; node2 runs with
no policy at all (so it forwards everything and does not fetch the bundle from node1): node1
refuses its own clients what the bundle does not allow them (MQTT 5: "not authorized") and
drops node2's messages on topics node2 may not publish, by node2's mTLS identity."""

from __future__ import annotations

import base64
import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from overlay import policy as pol
from testbed.loopback import LoopbackCluster

pytestmark = pytest.mark.skipif(
    not (shutil.which("mosquitto_pub") and shutil.which("mosquitto_sub")),
    reason="mosquitto_pub/mosquitto_sub not installed (Debian mosquitto-clients)",
)
TIMEOUT = 30.0
PERMS = """
[[mqtt.permissions]]
who = "node:node2"
publish = ["site/+/telemetry"]
[[mqtt.permissions]]
who = "node:node1"
subscribe = ["site/#"]
"""


def test_real_agents_enforce_topic_permissions(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    conf = tmp_path / "agent.toml"
    raw = base64.b64encode(pol.raw_public_key(key.public_key())).decode()
    conf.write_text(f'[policy]\ntrusted_keys = ["{raw}"]\n')
    signed = tmp_path / "v1.signed"
    signed.write_bytes(pol.sign(f"version = 1\nissued = 1\n{PERMS}".encode(), key))

    cluster = LoopbackCluster(2, mqtt=True, extra_args=["--config", str(conf)])
    plain = cluster.agents[1]
    plain.argv = plain.argv[: plain.argv.index("--config")]  # node2: no [policy]
    with cluster:
        cluster.wait_converged(TIMEOUT)
        node1, node2 = cluster.agents
        port = str(cluster.mqtt_port)

        def pub(host: str, topic: str, *args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                ["mosquitto_pub", "-h", host, "-p", port, "-t", topic, "-m", topic, "-q", "1", *args],
                capture_output=True, text=True, timeout=30,
            )  # fmt: skip

        assert node1.call("policy-apply", path=str(signed))["accepted"]
        refused = subprocess.run(
            ["mosquitto_sub", "-h", node1.host, "-p", port, "-t", "other/#", "-V", "mqttv5", "-C", "1", "-W", "3"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert "denied" in refused.stderr, refused  # SUBACK 0x87: node1 may subscribe only site/#
        subscriber = subprocess.Popen(
            ["mosquitto_sub", "-h", node1.host, "-p", port, "-t", "#", "-t", "site/#", "-q", "1", "-W", "40", "-C", "2"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip  -- "#" is refused, site/# granted
        cluster.wait_for(
            lambda: int(node2.status()["mqtt_stats"].get("router_interest_nodes", 0)) >= 1,
            TIMEOUT, "node2 sees node1's interest",
        )  # fmt: skip
        assert pub(node2.host, "site/cmd/reboot").returncode == 0  # node2 forwards it
        cluster.wait_for(
            lambda: node1.status()["mqtt_stats"].get("mesh_denied", 0) >= 1, TIMEOUT,
            "node1 drops node2's denied message",
        )  # fmt: skip
        v5 = pub(node1.host, "site/1/telemetry", "-V", "mqttv5")  # node1 may not publish
        assert "not authorized" in (v5.stdout + v5.stderr).lower(), v5
        assert node1.status()["mqtt_stats"]["publishes_denied"] == 1
        assert pub(node2.host, "site/1/telemetry").returncode == 0
        assert pub(node2.host, "site/2/telemetry").returncode == 0
        out, _ = subscriber.communicate(timeout=60)
        assert out.split() == ["site/1/telemetry", "site/2/telemetry"]
