"""Five real agents as processes on loopback: join, crash detection, restart, graceful leave.

Real sockets, LOCAL gossip preset, generous deadlines: the wait loops only bound how long a
broken build can hang; what is asserted is the logical outcome (states, incarnations).
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator

import pytest

from testbed.loopback import LoopbackAgent, LoopbackCluster

pytestmark = pytest.mark.slow

CONVERGE_TIMEOUT = 60.0
DETECT_TIMEOUT = 90.0  # LOCAL preset detects in a few seconds; the machine is shared


@pytest.fixture
def cluster() -> Iterator[LoopbackCluster]:
    with LoopbackCluster(5, debug_commands=True) as c:
        c.wait_converged(CONVERGE_TIMEOUT)
        yield c


def others(cluster: LoopbackCluster, agent: LoopbackAgent) -> list[LoopbackAgent]:
    return [a for a in cluster.running() if a is not agent]


def seen_by_all(cluster: LoopbackCluster, agent: LoopbackAgent, state: str) -> bool:
    return all(o.state_of(agent.name) == state for o in others(cluster, agent))


def test_five_agents_see_each_other_alive(cluster: LoopbackCluster) -> None:
    names = {a.name for a in cluster.agents}
    for agent in cluster.agents:
        members = agent.members()
        assert {m["name"] for m in members} == names
        assert all(m["state"] == "alive" for m in members)
        by_name = {m["name"]: m for m in members}
        assert all(by_name[a.name]["address"] == a.address for a in cluster.agents)


def test_sigkilled_agent_is_dead_everywhere_then_rejoins_with_higher_incarnation(
    cluster: LoopbackCluster,
) -> None:
    victim = cluster.agents[2]
    before = {m["name"]: m["incarnation"] for m in cluster.agents[0].members()}[victim.name]
    victim.kill()
    cluster.wait_for(
        lambda: seen_by_all(cluster, victim, "dead"), DETECT_TIMEOUT, "victim dead everywhere"
    )

    victim.start()
    restarted = time.monotonic()

    def back_alive() -> bool:
        for o in others(cluster, victim):
            m = {x["name"]: x for x in o.members()}[victim.name]
            if m["state"] != "alive" or m["incarnation"] <= before:
                return False
        return True

    cluster.wait_for(back_alive, CONVERGE_TIMEOUT, "restarted agent alive everywhere")
    took = time.monotonic() - restarted
    print(f"restarted agent alive everywhere {took:.2f} s after restart")  # 5 s target
    status = victim.status()
    assert status["incarnation"] > before
    assert status["members"]["alive"] == 5
    cluster.wait_converged(CONVERGE_TIMEOUT)


def test_sigterm_leaves_gracefully_and_peers_record_left(cluster: LoopbackCluster) -> None:
    leaver = cluster.agents[4]
    assert leaver.terminate() == 0
    cluster.wait_for(
        lambda: seen_by_all(cluster, leaver, "left"), DETECT_TIMEOUT, "left everywhere"
    )
    time.sleep(3.0)  # long enough for a wrong suspicion to have turned it DEAD
    assert seen_by_all(cluster, leaver, "left")


def test_agent_without_mdns_never_imports_zeroconf(cluster: LoopbackCluster) -> None:
    modules = set(cluster.agents[0].call("debug-modules"))
    assert "edgeagent.driver" in modules
    assert "zeroconf" not in modules
    assert "overlay.mdns" not in modules
    assert "edgeagent.metrics" not in modules  # --metrics off


def test_refuted_incarnation_is_persisted_and_a_restart_goes_above_it(
    cluster: LoopbackCluster,
) -> None:
    victim = cluster.agents[1]
    assert victim.process is not None
    start_incarnation = victim.status()["incarnation"]
    victim.process.send_signal(signal.SIGSTOP)  # frozen: probes to it fail, peers suspect it
    try:
        cluster.wait_for(
            lambda: any(
                o.state_of(victim.name) in ("suspect", "dead") for o in others(cluster, victim)
            ),
            DETECT_TIMEOUT,
            "victim suspected",
        )
    finally:
        victim.process.send_signal(signal.SIGCONT)
    # It refutes with a higher incarnation, which the agent saves for its next start.
    cluster.wait_for(lambda: victim.status()["incarnation"] > start_incarnation, DETECT_TIMEOUT)
    cluster.wait_for(
        lambda: (
            json.loads((victim.state_dir / "identity.json").read_text())["incarnation"]
            == victim.status()["incarnation"]
        ),
        30.0,
        "refuted incarnation saved",
    )
    refuted = victim.status()["incarnation"]
    victim.restart()
    assert victim.status()["incarnation"] > refuted
    cluster.wait_converged(CONVERGE_TIMEOUT)
