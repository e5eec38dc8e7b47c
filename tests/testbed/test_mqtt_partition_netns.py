"""MQTT across a partition and its heal, three agents in network namespaces (issue 10).

h1, h2, h3 on one bridge, each agent the broker on its own address. A ``$share`` group has
one member on h2 and one on h3 (``mosquitto_sub``, clean sessions, QoS 1). The bridge drops
traffic between {h1, h2} and {h3} (nftables, ``netns.Network.partition``); once each side
holds the other dead, both sides publish: jobs for the group on h1 and on h3, and the
retained topic ``state/x`` on h1 ("left-1"), then h3 ("right", seen by h3's side), then h2
("left-2", the latest by the hybrid clock). After the heal more jobs are published on h1.
Every agent's subscriber must then get "left-2" for ``state/x`` (retained anti-entropy,
last writer wins), and the group must have got every job exactly once.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from edgeagent.agent_process import AgentProcess, agent_env
from edgeagent.onboarding import new_ca, provision_member
from testbed import netns
from tests.host_tools import missing, needs_netns

pytestmark = [
    needs_netns("ip", "nft"),
    pytest.mark.skipif(
        bool(missing("mosquitto_pub", "mosquitto_sub")),
        reason="needs mosquitto_pub/mosquitto_sub: apt-get install -y mosquitto-clients",
    ),
    pytest.mark.root,
    pytest.mark.slow,
]

ROOT = Path(__file__).resolve().parents[2]
PORT = 7946
MQTT_PORT = 1883
TIMEOUT = 60.0
JOBS = 30  # per side during the partition, and after the heal


def _wait(predicate: object, what: str, agents: list[AgentProcess]) -> None:
    deadline = time.monotonic() + TIMEOUT
    while True:
        try:
            if predicate():  # type: ignore[operator]
                return
        except Exception:  # an agent not answering yet
            pass
        if time.monotonic() > deadline:
            for agent in agents:
                print(f"===== {agent.name} =====\n{agent.log_tail(30)}")
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.5)


def test_partition_heal_retained_converges_and_share_group_has_no_duplicates(
    tmp_path: Path,
) -> None:
    ca = new_ca("nsmqtt")
    env = agent_env({"PYTHONPATH": str(ROOT)})
    agents: list[AgentProcess] = []
    members: list[subprocess.Popen[str]] = []
    with netns.scoped_network(3) as net:
        h1, h2, h3 = net.hosts

        def pub(host: netns.HostNet, *args: str, stdin: str | None = None) -> None:
            argv = ["mosquitto_pub", "-h", host.ip, "-p", str(MQTT_PORT), "-q", "1", *args]
            out = subprocess.run(net.exec_argv(host, argv), input=stdin, capture_output=True,
                                 text=True, timeout=60)  # fmt: skip
            assert out.returncode == 0, out.stderr

        def retained(host: netns.HostNet) -> str:
            argv = ["mosquitto_sub", "-h", host.ip, "-p", str(MQTT_PORT), "-t", "state/x",
                    "-C", "1", "-W", "3"]  # fmt: skip
            out = subprocess.run(net.exec_argv(host, argv), capture_output=True, text=True,
                                 timeout=20)  # fmt: skip
            return out.stdout.strip()

        def states(agent: AgentProcess) -> set[str]:
            return set(agent.states().values())

        try:
            for host in net.hosts:
                state = tmp_path / host.name
                provision_member(ca, state, host.name)
                argv = [sys.executable, "-m", "edgeagent", "run", "--name", host.name,
                        "--bind", f"{host.ip}:{PORT}", "--state-dir", str(state),
                        "--preset", "local", "--mqtt", f"{host.ip}:{MQTT_PORT}"]  # fmt: skip
                if host is not h1:
                    argv += ["--join", f"{h1.ip}:{PORT}"]
                agent = AgentProcess(host.name, net.exec_argv(host, argv), state,
                                     tmp_path / f"{host.name}.log", env)  # fmt: skip
                agents.append(agent)
                agent.start(wait=False)
            for agent in agents:
                agent.wait_ready()
            _wait(lambda: all(a.states() and states(a) == {"alive"} and len(a.states()) == 3
                              for a in agents), "three alive members", agents)  # fmt: skip
            for host in (h2, h3):
                argv = ["mosquitto_sub", "-h", host.ip, "-p", str(MQTT_PORT), "-q", "1", "-v",
                        "-t", "$share/g/jobs/#"]  # fmt: skip
                members.append(subprocess.Popen(net.exec_argv(host, argv), stdout=subprocess.PIPE,
                                                stderr=subprocess.STDOUT, text=True))  # fmt: skip

            def interest(agent: AgentProcess, nodes: int) -> bool:
                return int(agent.status()["mqtt_stats"]["router_interest_nodes"]) >= nodes

            _wait(lambda: interest(agents[0], 2) and interest(agents[1], 1)
                  and interest(agents[2], 1), "the group's interest everywhere", agents)  # fmt: skip
            net.partition([[h1, h2], [h3]])
            _wait(lambda: agents[0].state_of("h3") == "dead" and agents[2].state_of("h1") == "dead"
                  and agents[2].state_of("h2") == "dead", "each side holds the other dead",
                  agents)  # fmt: skip
            pub(h1, "-t", "jobs/a", "-l", stdin="".join(f"L{i}\n" for i in range(JOBS)))
            pub(h3, "-t", "jobs/b", "-l", stdin="".join(f"R{i}\n" for i in range(JOBS)))
            pub(h1, "-t", "state/x", "-r", "-m", "left-1")
            time.sleep(0.05)  # the next writes are later by the hybrid clock, not a race
            pub(h3, "-t", "state/x", "-r", "-m", "right")
            time.sleep(0.05)
            pub(h2, "-t", "state/x", "-r", "-m", "left-2")
            assert retained(h3) == "right"  # h3's side holds its own write while cut off
            net.heal_partitions()
            _wait(lambda: all(states(a) == {"alive"} for a in agents), "the heal", agents)
            _wait(lambda: [retained(h) for h in net.hosts] == ["left-2"] * 3,
                  "state/x = left-2 on every agent", agents)  # fmt: skip
            _wait(lambda: interest(agents[0], 2), "h1 sees both members again", agents)
            pub(h1, "-t", "jobs/c", "-l", stdin="".join(f"H{i}\n" for i in range(JOBS)))
            time.sleep(2.0)  # the last deliveries reach the members; then they are stopped
        except BaseException:
            for agent in agents:
                print(f"===== {agent.name} =====\n{agent.log_tail(30)}")
            raise
        finally:
            for proc in members:
                proc.terminate()
            for agent in agents:
                agent.kill()
        got = [line.split()[1] for proc in members
               for line in proc.communicate(timeout=30)[0].splitlines() if " " in line]  # fmt: skip
        counts = Counter(got)
        expected = {f"{side}{i}" for side in "LRH" for i in range(JOBS)}
        assert sorted(expected - set(counts)) == []
        assert [job for job, n in counts.items() if n > 1] == []  # no duplicates
