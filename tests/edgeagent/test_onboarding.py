"""Onboarding as a user does it: real agent processes driven only through the CLI.

``init`` on A, ``run`` A, ``token create`` through A, ``join TOKEN`` on B, ``run`` B with no
``--join`` (it joins the seeds saved at enrollment), ``run --token`` on C; expired, revoked and
forged tokens, an unreachable issuer, a state dir with no material, a missing explicit key
file and a conflicting cluster name are each one stderr line and exit 2. Each agent has its own
state dir and its own 127.A.B.x address.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgeagent.agent_process import AgentProcess
from edgeagent.localmesh import free_port
from edgeagent.onboarding import CA_KEY_FILE, KEYRING_FILE, NODE_KEY_FILE
from overlay.tokens import JoinToken, parse_token

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 60.0


def cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "edgeagent", *args],
        capture_output=True, text=True, timeout=TIMEOUT, input=stdin, env=env,
    )  # fmt: skip


def one_line_error(result: subprocess.CompletedProcess[str], needle: str) -> None:
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and needle in result.stderr, result.stderr


class Site:
    """A base dir and a loopback /24 for the agents of one test module."""

    def __init__(self) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="ea-onb-"))
        a, b = random.randrange(100, 255), random.randrange(1, 255)
        self.hosts = [f"127.{a}.{b}.{i}" for i in range(1, 6)]
        self.port = free_port(self.hosts)
        self.agents: list[AgentProcess] = []

    def dir(self, name: str) -> Path:
        return self.base / name

    def run(self, name: str, host: str, *extra: str) -> AgentProcess:
        argv = [sys.executable, "-m", "edgeagent", "run", "--name", name,
                "--bind", f"{host}:{self.port}", "--state-dir", str(self.dir(name)),
                "--no-mdns", "--preset", "local", *extra]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
        self.dir(name).mkdir(mode=0o700, exist_ok=True)
        agent = AgentProcess(name, argv, self.dir(name), self.base / f"{name}.log", env)
        self.agents.append(agent)
        agent.start()
        return agent

    def close(self) -> None:
        for agent in self.agents:
            agent.terminate()
        shutil.rmtree(self.base, ignore_errors=True)


def wait_alive(agent: AgentProcess, names: set[str]) -> None:
    deadline = time.monotonic() + TIMEOUT
    while {m["name"] for m in agent.members() if m["state"] == "alive"} != names:
        assert time.monotonic() < deadline, f"{agent.name} never saw {names}: {agent.members()}"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def site() -> Iterator[Site]:
    s = Site()
    try:
        yield s
    finally:
        s.close()


@pytest.fixture(scope="module")
def issuer(site: Site) -> AgentProcess:
    """A: ``edgeagent init`` then ``edgeagent run``."""
    a = site.dir("a")
    out = cli("init", "--state-dir", str(a), "--name", "a", "--cluster", "site",
              "--bind", f"{site.hosts[0]}:{site.port}")  # fmt: skip
    assert out.returncode == 0, out.stderr
    token = parse_token(out.stdout.splitlines()[-1])  # the last line is the token
    assert token.addresses == ((site.hosts[0], site.port + 1),)
    for secret in (CA_KEY_FILE, NODE_KEY_FILE, KEYRING_FILE):
        assert stat.S_IMODE((a / secret).stat().st_mode) == 0o600
    return site.run("a", site.hosts[0])


def create_token(issuer: AgentProcess, *extra: str) -> str:
    out = cli("token", "create", "--state-dir", str(issuer.state_dir), *extra)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("\n") == 1  # the token is the only line
    return out.stdout.strip()


def test_init_refuses_a_state_dir_with_cluster_material(site: Site, issuer: AgentProcess) -> None:
    one_line_error(cli("init", "--state-dir", str(issuer.state_dir)), "already holds cluster material")


def test_join_then_run_without_join_sees_each_other_alive(site: Site, issuer: AgentProcess) -> None:
    token = create_token(issuer, "--ttl", "10m", "--uses", "1")
    assert parse_token(token).addresses == ((site.hosts[0], site.port + 1),)
    out = cli("join", token, "--state-dir", str(site.dir("b")), "--name", "b")
    assert out.returncode == 0, out.stderr
    saved = json.loads((site.dir("b") / "cluster.json").read_text())
    assert saved["cluster"] == "site" and saved["seeds"] == [f"{site.hosts[0]}:{site.port}"]
    assert not (site.dir("b") / CA_KEY_FILE).exists()  # the CA key stays on the issuer
    # The issuer's time is saved as b's clock: a joiner booted in 1970 starts from it.
    clock = json.loads((site.dir("b") / "clock.json").read_text())
    assert abs(clock["hlc"][0] - time.time() * 1000) < 60_000
    b = site.run("b", site.hosts[1])  # no --join: the saved seeds
    wait_alive(b, {"a", "b"})
    wait_alive(issuer, {"a", "b"})
    assert b.status()["cluster"] == "site"
    # The single-use token is used up now.
    again = cli("join", token, "--state-dir", str(site.dir("b2")), "--name", "b2")
    one_line_error(again, "token used up")


def test_run_with_token_enrolls_first_then_runs(site: Site, issuer: AgentProcess) -> None:
    token = create_token(issuer)
    c = site.run("c", site.hosts[2], "--token", token)
    wait_alive(c, {m["name"] for m in issuer.members() if m["state"] == "alive"} | {"c"})
    wait_alive(issuer, {m["name"] for m in c.members() if m["state"] == "alive"})
    listing = json.loads(cli("token", "list", "--json", "--state-dir", str(issuer.state_dir)).stdout)
    assert any(t["used"] >= 1 for t in listing)
    status = issuer.status()
    assert status["enroll"]["issued"] >= 1
    text = cli("status", "--state-dir", str(issuer.state_dir)).stdout
    assert f"enrollment:   {site.hosts[0]}:{site.port + 1}" in text


def test_join_reads_the_token_from_stdin(site: Site, issuer: AgentProcess) -> None:
    token = create_token(issuer)
    out = cli("join", "-", "--state-dir", str(site.dir("d")), "--name", "d", stdin=token + "\n")
    assert out.returncode == 0, out.stderr
    assert (site.dir("d") / KEYRING_FILE).exists()


def test_expired_revoked_forged_and_unreachable_tokens_are_refused(
    site: Site, issuer: AgentProcess
) -> None:
    expired = create_token(issuer, "--ttl", "1s")
    time.sleep(1.5)
    one_line_error(cli("join", expired, "--state-dir", str(site.dir("x1"))), "token expired")
    revoked = create_token(issuer)
    token_id = parse_token(revoked).token_id
    out = cli("token", "revoke", token_id, "--state-dir", str(issuer.state_dir))
    assert out.returncode == 0, out.stderr
    one_line_error(cli("join", revoked, "--state-dir", str(site.dir("x2"))), "token revoked")
    real = parse_token(create_token(issuer))
    forged = JoinToken(real.token_id, bytes(16), real.ca_pin, real.addresses).text()
    one_line_error(cli("join", forged, "--state-dir", str(site.dir("x3"))), "proof does not match")
    pin = JoinToken(real.token_id, real.secret, bytes(32), real.addresses).text()
    # --no-mdns: after the token's address fails, join would browse mDNS on this host's LAN.
    x4 = cli("join", pin, "--no-mdns", "--state-dir", str(site.dir("x4")))
    one_line_error(x4, "not the one in the token")
    nowhere = JoinToken(real.token_id, real.secret, real.ca_pin, ((site.hosts[4], 1),)).text()
    x5 = cli("join", nowhere, "--no-mdns", "--state-dir", str(site.dir("x5")))
    one_line_error(x5, "could not enroll")
    bare = parse_token(create_token(issuer, "--no-address"))
    assert bare.addresses == () and bare.ca_pin == real.ca_pin
    x7 = cli("join", bare.text(), "--no-mdns", "--state-dir", str(site.dir("x7")))
    one_line_error(x7, "the token names no issuer address and mDNS browsing is off")
    one_line_error(cli("join", "ea1.nonsense", "--state-dir", str(site.dir("x6"))), "join token")
    for name in ("x1", "x2", "x3", "x4", "x5", "x7"):
        assert not (site.dir(name) / KEYRING_FILE).exists()  # nothing half-enrolled


def test_token_commands_on_a_member_without_the_ca_key_say_so(
    site: Site, issuer: AgentProcess
) -> None:
    b = next(a for a in site.agents if a.name == "b")
    out = cli("token", "create", "--state-dir", str(b.state_dir))
    one_line_error(out, "does not hold the mesh CA key")


def test_run_with_no_material_is_one_line_exit_2(tmp_path: Path) -> None:
    out = cli("run", "--state-dir", str(tmp_path / "empty"), "--no-mdns", "--bind", "127.0.0.1:0")
    one_line_error(out, "no cluster material in")
    assert "edgeagent init" in out.stderr and "edgeagent join TOKEN" in out.stderr
    assert not (tmp_path / "empty" / KEYRING_FILE).exists()  # no key generated
    assert not (tmp_path / "empty" / "identity.json").exists()


def test_missing_explicit_key_file_and_other_cluster_are_errors(tmp_path: Path) -> None:
    state = tmp_path / "s"
    assert cli("init", "--state-dir", str(state), "--name", "s", "--cluster", "mine",
               "--bind", "127.0.0.1:7000").returncode == 0  # fmt: skip
    run = ["run", "--state-dir", str(state), "--no-mdns", "--bind", "127.0.0.1:0"]
    missing = tmp_path / "no-such-keyring"
    one_line_error(cli(*run, "--key-file", str(missing)), f"key file {missing} not found")
    assert not missing.exists()
    one_line_error(cli(*run, "--cluster", "other"), "enrolled in cluster 'mine'")
