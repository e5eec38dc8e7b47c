"""Services across real agent processes on loopback: register on one node with the CLI, see
it healthy on another with ``edgeagent services --json``, SIGKILL the owner (its instances
stop being healthy there), restart it (the registrations are still there, even one made just
before the kill), deregister."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import dns.message
import dns.query
import dns.rcode
import pytest

from testbed.loopback import LoopbackAgent, LoopbackCluster, free_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 90.0
KEYS = {"name", "protocol", "node", "endpoint", "state", "weight", "tags"}


def edgeagent(*argv: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "edgeagent", *argv],
        capture_output=True, text=True, timeout=60, env=env, check=False,
    )  # fmt: skip


def services_json(agent: LoopbackAgent) -> list[dict[str, object]]:
    result = edgeagent("services", "--json", "--state-dir", str(agent.state_dir))
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert all(set(row) == KEYS for row in rows)
    return rows


def state_on(agent: LoopbackAgent, service: str, node: str) -> str | None:
    for row in services_json(agent):
        if row["name"] == service and row["node"] == node:
            return str(row["state"])
    return None


def mesh_dns(agent: LoopbackAgent, qname: str) -> tuple[int, list[str]]:
    host, port = agent.dns  # type: ignore[attr-defined]
    reply = dns.query.udp(dns.message.make_query(qname, "A"), host, port=port, timeout=10)
    return reply.rcode(), [rd.to_text() for rrset in reply.answer for rd in rrset]


@pytest.fixture
def cluster() -> Iterator[LoopbackCluster]:
    c = LoopbackCluster(3)
    b = c.agents[1]
    b.dns = (b.host, free_port([b.host]))  # type: ignore[attr-defined]
    b.argv += ["--dns", f"{b.host}:{b.dns[1]}"]  # type: ignore[attr-defined]
    with c:
        c.wait_converged(TIMEOUT)
        yield c


def test_register_kill_restart_deregister_across_processes(cluster: LoopbackCluster) -> None:
    a, b, _ = cluster.agents
    result = edgeagent(
        "service", "register", "temperature", "coap://127.0.0.1:5684/sensors",
        "--tag", "site=hall", "--state-dir", str(a.state_dir),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    cluster.wait_for(lambda: state_on(b, "temperature", a.name) == "healthy", TIMEOUT, "on b")
    (row,) = services_json(b)
    assert row == {
        "name": "temperature", "protocol": "coap", "node": a.name,
        "endpoint": "coap://127.0.0.1:5684/sensors", "state": "healthy", "weight": 1,
        "tags": {"site": "hall"},
    }  # fmt: skip
    cluster.wait_for(lambda: a.status().get("overlay_address") is not None, TIMEOUT, "a's address")
    address = a.status()["overlay_address"]
    cluster.wait_for(
        lambda: mesh_dns(b, "temperature.mesh.") == (dns.rcode.NOERROR, [address]),
        TIMEOUT, "temperature.mesh answered on b with a's overlay address",
    )  # fmt: skip
    assert mesh_dns(b, "nothing.mesh.")[0] == dns.rcode.NXDOMAIN

    # Registered, then killed at once: the answer came after the atomic save.
    result = edgeagent("service", "register", "humidity", "coap://127.0.0.1:5685",
                       "--state-dir", str(a.state_dir))  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert a.kill()
    cluster.wait_for(
        lambda: state_on(b, "temperature", a.name) in ("suspect", "down"), TIMEOUT, "not healthy"
    )
    cluster.wait_for(lambda: state_on(b, "temperature", a.name) == "down", TIMEOUT, "down on b")
    assert mesh_dns(b, "temperature.mesh.")[0] == dns.rcode.NXDOMAIN  # no healthy instance

    a.start()
    cluster.wait_converged(TIMEOUT)
    assert {(r["name"], r["state"]) for r in services_json(a)} == {
        ("temperature", "healthy"), ("humidity", "healthy")
    }  # fmt: skip
    cluster.wait_for(
        lambda: {(r["name"], r["state"]) for r in services_json(b)}
        == {("temperature", "healthy"), ("humidity", "healthy")},
        TIMEOUT, "both healthy on b after the restart",
    )  # fmt: skip

    result = edgeagent("service", "deregister", "temperature", "coap://127.0.0.1:5684/sensors",
                       "--state-dir", str(a.state_dir))  # fmt: skip
    assert result.returncode == 0, result.stderr
    cluster.wait_for(
        lambda: [r["name"] for r in services_json(b)] == ["humidity"], TIMEOUT, "withdrawn on b"
    )
    result = edgeagent("service", "deregister", "temperature", "coap://127.0.0.1:5684/sensors",
                       "--state-dir", str(a.state_dir))  # fmt: skip
    assert result.returncode == 2 and "not registered" in result.stderr

    # Restarted with no registration left (the file is gone): an agent without services
    # publishes no instance list at start, so its last life's list must still be withdrawn
    # (the gossip core tombstones the key it no longer has).
    assert a.kill()
    (a.state_dir / "services.json").unlink()
    a.start()
    cluster.wait_converged(TIMEOUT)
    cluster.wait_for(lambda: services_json(b) == [], TIMEOUT, "the old life's list withdrawn on b")
    assert services_json(a) == []
