"""The real CLI (``python -m edgeagent ...``) against a running agent, and without one."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edgeagent.control import ControlClient, socket_path
from edgeagent.errors import AgentUnavailable
from testbed.loopback import LoopbackCluster
from tests.host_tools import needs_netns

pytestmark = pytest.mark.slow


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgeagent", *args], capture_output=True, text=True, timeout=60
    )


@pytest.fixture(scope="module")
def cluster() -> Iterator[LoopbackCluster]:
    with LoopbackCluster(3) as c:
        c.wait_converged(60.0)
        yield c


def test_members_json_lists_every_member_with_the_documented_fields(cluster: LoopbackCluster) -> None:
    out = cli("members", "--json", "--state-dir", str(cluster.agents[0].state_dir))
    assert out.returncode == 0, out.stderr
    members = json.loads(out.stdout)
    assert {m["name"] for m in members} == {a.name for a in cluster.agents}
    for m in members:
        assert set(m) >= {"name", "address", "state", "incarnation", "meta"}
        assert m["state"] == "alive" and m["incarnation"] >= 1
        assert m["address"] == cluster.agent(m["name"]).address


def test_members_table_is_aligned(cluster: LoopbackCluster) -> None:
    out = cli("members", "--state-dir", str(cluster.agents[0].state_dir))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split()[:4] == ["NAME", "ADDRESS", "STATE", "INCARNATION"]
    assert len(lines) == 4
    column = lines[0].index("STATE")
    assert all(line[column:].startswith("alive") for line in lines[1:])


def test_status_reports_identity_and_member_counts(cluster: LoopbackCluster) -> None:
    agent = cluster.agents[1]
    out = cli("status", "--json", "--state-dir", str(agent.state_dir))
    assert out.returncode == 0, out.stderr
    status = json.loads(out.stdout)
    identity = json.loads((agent.state_dir / "identity.json").read_text())
    assert status["name"] == agent.name and status["node_id"] == identity["node_id"]
    assert status["address"] == agent.address
    assert status["incarnation"] == identity["incarnation"]
    assert status["cluster"] == "loopback" and status["preset"] == "local"
    assert status["members"] == {"alive": 3, "suspect": 0, "dead": 0, "left": 0}
    assert status["health_score"] == 0 and status["uptime_s"] >= 0
    text = cli("status", "--state-dir", str(agent.state_dir))
    assert text.returncode == 0 and "name:" in text.stdout and agent.address in text.stdout


def test_leave_stops_the_agent_and_peers_record_left(cluster: LoopbackCluster) -> None:
    leaver = cluster.agents[2]
    out = cli("leave", "--state-dir", str(leaver.state_dir))
    assert out.returncode == 0, out.stderr
    assert leaver.process is not None and leaver.process.wait(30) == 0
    cluster.wait_for(
        lambda: all(a.state_of(leaver.name) == "left" for a in cluster.running()), 60.0, "left"
    )


def test_second_agent_on_a_live_state_dir_is_refused(cluster: LoopbackCluster) -> None:
    agent = cluster.agents[0]
    out = cli("run", "--state-dir", str(agent.state_dir), "--bind", "127.0.0.1:0", "--no-mdns")
    assert out.returncode == 2
    assert out.stderr == f"edgeagent: error: an agent is already running at {agent.state_dir / 'control.sock'}\n"
    assert agent.status()["name"] == agent.name  # the running agent kept its socket


def test_gossip_port_in_use_is_one_line_and_exit_2(cluster: LoopbackCluster) -> None:
    from edgeagent.onboarding import create_cluster

    with tempfile.TemporaryDirectory(prefix="ea-") as tmp:
        create_cluster(tmp, "busy", "busy-site")  # material, so the bind is what fails
        out = cli("run", "--state-dir", tmp, "--bind", cluster.agents[0].address, "--no-mdns")
        assert not (Path(tmp) / "control.sock").exists()
    assert out.returncode == 2
    assert out.stderr.startswith(f"edgeagent: error: bind {cluster.agents[0].address}: cannot bind")
    assert out.stderr.count("\n") == 1


@pytest.mark.parametrize("command", ["members", "status", "leave", "keys list"])
def test_no_agent_is_one_line_and_exit_1(command: str) -> None:
    with tempfile.TemporaryDirectory(prefix="ea-") as empty:
        out = cli(*command.split(), "--state-dir", empty)
    assert out.returncode == 1
    assert out.stdout == ""
    assert out.stderr == f"edgeagent: error: no agent running at {Path(empty) / 'control.sock'}\n"


LAN_ADDR = "10.213.251.1"


@pytest.fixture
def private_netns() -> Iterator[str]:
    """A fresh network namespace: loopback and one LAN interface (a veth pair with both ends
    inside, no default route, no multicast route): nothing leaves it."""
    name = f"ea-run-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        ip = ["ip", "-n", name]
        subprocess.run([*ip, "link", "add", "lan0", "type", "veth", "peer", "lan1"], check=True)
        subprocess.run([*ip, "addr", "add", f"{LAN_ADDR}/24", "dev", "lan0"], check=True)
        for dev in ("lan0", "lan1"):
            subprocess.run([*ip, "link", "set", dev, "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def wait_status(state_dir: Path, proc: subprocess.Popen[bytes]) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    while True:
        assert proc.poll() is None, "agent exited at start-up"
        try:
            return dict(ControlClient(socket_path(state_dir)).call("status"))
        except AgentUnavailable:
            assert time.monotonic() < deadline, "agent not ready"
            time.sleep(0.1)


@needs_netns("ip")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_run_with_defaults_starts_and_exits_0_on_signal(private_netns: str, sig: int) -> None:
    # Everything default but the state dir (root's default is /var/lib/edgeagent): name from
    # the hostname and the node id, 0.0.0.0:7946, detected profile, mDNS on (unavailable here: logged, not
    # fatal), the cluster material made by a plain 'edgeagent init'.
    with tempfile.TemporaryDirectory(prefix="ea-") as tmp:
        state_dir = Path(tmp)
        ea = ["ip", "netns", "exec", private_netns, sys.executable, "-m", "edgeagent"]
        init = subprocess.run([*ea, "init", "--state-dir", tmp], capture_output=True, timeout=60)
        assert init.returncode == 0, init.stderr
        argv = [*ea, "run"]
        proc = subprocess.Popen(
            [*argv, "--state-dir", tmp], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        try:
            status = wait_status(state_dir, proc)
            assert status["name"] == f"{socket.gethostname()}-{status['node_id'][:6]}"
            assert status["address"] == f"{LAN_ADDR}:7946"  # the LAN's: there is no default route
            assert status["members"]["alive"] == 1
            assert (state_dir / "keyring").exists() and (state_dir / "identity.json").exists()
            proc.send_signal(sig)
            assert proc.wait(30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
            out = proc.communicate()[0].decode()
        assert 'msg="left the cluster"' in out
        assert not (state_dir / "control.sock").exists()
