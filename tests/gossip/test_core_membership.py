"""Cluster-level behaviour of the core on the virtual network: join, detect, leave, restart."""

from __future__ import annotations

from gossip.events import MemberFailed, MemberJoined, MemberLeft, MemberReaped
from gossip.messages import MemberState

from .netsim import NetSim


def test_nodes_joining_through_one_seed_all_see_each_other_alive() -> None:
    sim = NetSim(seed=1)
    names = sim.cluster(8)
    assert sim.converged(names)
    for name in names:
        assert sorted(e.member.name for e in sim.events_of(name, MemberJoined)) == sorted(set(names) - {name})


def test_crashed_member_is_declared_dead_by_every_live_member() -> None:
    sim = NetSim(seed=2)
    names = sim.cluster(6)
    sim.crash("n3")
    live = [n for n in names if n != "n3"]
    assert sim.run_until(lambda: all(sim.view(n)["n3"] == MemberState.DEAD for n in live), limit=60.0)
    for name in live:
        assert [e.member.name for e in sim.events_of(name, MemberFailed)] == ["n3"]


def test_graceful_leave_is_recorded_left_everywhere_never_dead() -> None:
    sim = NetSim(seed=3)
    names = sim.cluster(6)
    sim.call("n2", lambda m: m.leave(sim.now))
    sim.run_until(lambda: sim.nodes["n2"].pending_broadcasts == 0, limit=10.0)
    sim.crash("n2")
    sim.run(60.0)
    for name in names:
        if name == "n2":
            continue
        assert sim.view(name)["n2"] == MemberState.LEFT
        assert not sim.events_of(name, MemberFailed)
        assert [e.member.name for e in sim.events_of(name, MemberLeft)] == ["n2"]


def test_restart_with_higher_incarnation_rejoins_as_alive() -> None:
    sim = NetSim(seed=4)
    names = sim.cluster(5)
    sim.crash("n4")
    sim.run_until(lambda: sim.view("n0")["n4"] == MemberState.DEAD, limit=60.0)
    old = sim.nodes["n4"].incarnation
    sim.add("n4", incarnation=old + 1)
    sim.join("n4", ["n0"])
    assert sim.run_until(lambda: sim.converged(names), limit=30.0)
    assert any(e.member.name == "n4" for e in sim.events_of("n1", MemberJoined)[-1:])


def test_restart_with_lower_incarnation_jumps_above_what_the_cluster_knows() -> None:
    sim = NetSim(seed=5)
    names = sim.cluster(4)
    sim.call("n3", lambda m: m.set_meta(b"v2", sim.now))  # incarnation 1 everywhere
    sim.run(5.0)
    assert sim.nodes["n0"].member("n3").incarnation == 1
    sim.crash("n3")
    sim.run(1.0)
    sim.add("n3", incarnation=0)
    sim.join("n3", ["n0"])
    assert sim.run_until(
        lambda: sim.converged(names) and sim.nodes["n3"].incarnation >= 2
        and all(sim.nodes[n].member("n3").incarnation == sim.nodes["n3"].incarnation for n in names),
        limit=30.0,
    )


def test_dead_members_are_reaped_after_the_ttl() -> None:
    sim = NetSim(seed=6)
    config = sim.config.with_overrides(dead_member_ttl=20.0)
    sim.config = config
    names = sim.cluster(4)
    sim.crash("n1")
    sim.run_until(lambda: sim.view("n0").get("n1") == MemberState.DEAD, limit=60.0)
    died = sim.now
    sim.run(19.0)
    assert "n1" in sim.view("n0")
    sim.run(2.0)
    assert "n1" not in sim.view("n0")
    assert [e.member.name for e in sim.events_of("n0", MemberReaped)] == ["n1"]
    assert sim.now - died >= 20.0
    assert names
