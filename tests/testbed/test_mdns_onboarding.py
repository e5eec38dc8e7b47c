"""Onboarding by mDNS on five network-namespace hosts, with the real CLI only.

h1 runs ``edgeagent init`` and ``edgeagent run`` (its enrollment listener announces
``_edgeagent-join._tcp``); it issues a token naming no address (``token create
--no-address``) and one whose only address is unreachable from the others. h2..h5 run
``edgeagent join TOKEN`` (two with each token) and find the issuer by mDNS, then ``edgeagent
run``; all five must see each other alive. A token whose CA pin shares the advertised prefix
but is not the issuer's is refused by the TLS pin check, and one of another CA finds no issuer:
each one stderr line and exit 2, and nothing enrolled. Each host has its own state dir;
every process and namespace is removed by PID / name afterwards, whatever happens.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgeagent.agent_process import AgentProcess, agent_env
from overlay.tokens import JoinToken, parse_token
from testbed import netns
from tests.host_tools import needs_netns

pytestmark = [needs_netns("ip"), pytest.mark.root, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
PORT = 7946  # gossip; enrollment on PORT + 1
CLI_TIMEOUT = 30.0
CONVERGE_TIMEOUT = 40.0


class Hosts:
    """Five namespace hosts, each with its own state dir, and the agents started on them."""

    def __init__(self, network: netns.Network, base: Path) -> None:
        self.net = network
        self.base = base
        self.agents: list[AgentProcess] = []
        self.env = agent_env({"PYTHONPATH": str(ROOT)})

    def state(self, i: int, tag: str = "") -> Path:
        return self.base / f"h{i}{tag}"

    def argv(self, i: int, *args: str) -> list[str]:
        return self.net.exec_argv(self.net.hosts[i - 1], [sys.executable, "-m", "edgeagent", *args])

    def cli(self, i: int, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.argv(i, *args), capture_output=True, text=True,
                              timeout=CLI_TIMEOUT, env=self.env)  # fmt: skip

    def popen(self, i: int, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(self.argv(i, *args), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=self.env)  # fmt: skip

    def ip(self, i: int) -> str:
        return self.net.hosts[i - 1].ip

    def run(self, i: int) -> AgentProcess:
        argv = self.argv(i, "run", "--name", f"h{i}", "--bind", f"{self.ip(i)}:{PORT}",
                         "--state-dir", str(self.state(i)), "--preset", "local")  # fmt: skip
        agent = AgentProcess(f"h{i}", argv, self.state(i), self.base / f"h{i}.log", self.env)
        self.agents.append(agent)
        agent.start(wait=False)
        return agent

    def stop(self) -> None:
        for agent in self.agents:
            agent.kill()  # by PID; the namespace sweep catches anything else

    def dump_logs(self) -> None:
        for agent in self.agents:
            print(f"===== {agent.name} =====\n{agent.log_tail(40)}")


@pytest.fixture
def hosts(tmp_path: Path) -> Iterator[Hosts]:
    with netns.scoped_network(5) as network:
        h = Hosts(network, tmp_path)
        try:
            yield h
        finally:
            h.stop()


def _one_line_exit_2(proc: subprocess.Popen[str], needle: str) -> None:
    out, err = proc.communicate(timeout=CLI_TIMEOUT)
    assert proc.returncode == 2, (out, err)
    assert "Traceback" not in err and err.count("\n") == 1 and needle in err, err


def _alive(agent: AgentProcess) -> set[str]:
    try:
        return {m["name"] for m in agent.members() if m["state"] == "alive"}
    except Exception:  # not answering yet
        return set()


def test_four_hosts_join_by_mdns_with_tokens_naming_no_reachable_issuer(hosts: Hosts) -> None:
    try:
        _onboard_by_mdns(hosts)
    except BaseException:
        hosts.dump_logs()
        raise


def _onboard_by_mdns(hosts: Hosts) -> None:
    started = time.monotonic()
    out = hosts.cli(1, "init", "--state-dir", str(hosts.state(1)), "--name", "h1",
                    "--cluster", "nsmesh", "--bind", f"{hosts.ip(1)}:{PORT}")  # fmt: skip
    assert out.returncode == 0, out.stderr
    issuer = hosts.run(1)
    issuer.wait_ready()
    created = hosts.cli(1, "token", "create", "--no-address", "--state-dir", str(hosts.state(1)))
    assert created.returncode == 0, created.stderr
    bare = parse_token(created.stdout.strip())
    assert bare.addresses == ()
    # A token (with its own id and secret) whose only address no host can reach.
    other = parse_token(hosts.cli(1, "token", "create", "--state-dir", str(hosts.state(1))).stdout)
    nowhere = JoinToken(other.token_id, other.secret, other.ca_pin, ((f"{hosts.ip(1)[:-1]}250", 7947),))
    # Same pin prefix as the issuer's announcement, another pin: only TLS can tell them apart.
    impostor_pin = bare.ca_pin[:8] + bytes(24)
    wrong_pin = JoinToken(bare.token_id, bare.secret, impostor_pin, ()).text()
    other_ca = JoinToken(bare.token_id, bare.secret, bytes(32), ()).text()

    tokens = {2: bare.text(), 3: bare.text(), 4: nowhere.text(), 5: nowhere.text()}
    joins = {i: hosts.popen(i, "join", t, "--state-dir", str(hosts.state(i)), "--name", f"h{i}")
             for i, t in tokens.items()}  # fmt: skip
    refused = hosts.popen(2, "join", wrong_pin, "--state-dir", str(hosts.state(2, "-x")))
    unknown = hosts.popen(3, "join", other_ca, "--state-dir", str(hosts.state(3, "-y")))
    for i, proc in joins.items():
        out, err = proc.communicate(timeout=CLI_TIMEOUT)
        assert proc.returncode == 0, (i, err)
        assert f"via {hosts.ip(1)}:{PORT + 1}" in out, out  # the issuer, found by mDNS
    _one_line_exit_2(refused, "is not the one in the token")
    _one_line_exit_2(unknown, "no issuer of this CA announced itself on mDNS")
    for tag, i in (("-x", 2), ("-y", 3)):
        assert not (hosts.state(i, tag) / "keyring").exists()  # nothing half-enrolled

    agents = [issuer] + [hosts.run(i) for i in range(2, 6)]
    names = {f"h{i}" for i in range(1, 6)}
    deadline = time.monotonic() + CONVERGE_TIMEOUT
    while not all(_alive(a) == names for a in agents):
        assert time.monotonic() < deadline, {a.name: sorted(_alive(a)) for a in agents}
        time.sleep(0.5)
    status = issuer.status()
    assert status["enroll"]["issued"] == 4 and status["enroll_mdns"] is True
    assert status["enroll"].get("pin", 0) == 0  # the impostor pin is refused by the joiner
    print(f"onboarding of 5 hosts by mDNS took {time.monotonic() - started:.1f} s")
