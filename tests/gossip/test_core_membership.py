"""Cluster-level behaviour of the core on the virtual network: join, detect, leave, restart."""

from __future__ import annotations

import random

from gossip.config import lan
from gossip.core import Membership
from gossip.events import (
    MemberAlive,
    MemberFailed,
    MemberJoined,
    MemberLeft,
    MemberReaped,
    MemberSuspected,
)
from gossip.messages import Ack, Alive, Dead, MemberState, Ping, Suspect
from testbed.sim import Simulator, drain_events, make_keyring, seal, sent


def test_nodes_joining_through_one_seed_all_see_each_other_alive() -> None:
    sim = Simulator(1, lan(), record_events=True)
    names = [f"n{i}" for i in range(8)]
    sim.add_node("n0")
    for name in names[1:]:
        sim.add_node(name, join=["n0"])
    assert sim.run_until_converged(60.0)
    assert sim.converged(names)
    for name in names:
        assert sorted(e.member.name for e in sim.events_of(name, MemberJoined)) == sorted(set(names) - {name})


def test_crashed_member_is_declared_dead_by_every_live_member() -> None:
    sim = Simulator(2, lan(), record_events=True)
    names = sim.converge_cluster(6, width=1)
    sim.crash("n3")
    live = [n for n in names if n != "n3"]
    assert sim.wait_for(lambda: all(sim.view(n)["n3"] == MemberState.DEAD for n in live), 60.0)
    for name in live:
        assert [e.member.name for e in sim.events_of(name, MemberFailed)] == ["n3"]


def test_graceful_leave_is_recorded_left_everywhere_never_dead() -> None:
    sim = Simulator(3, lan(), record_events=True)
    names = sim.converge_cluster(6, width=1)
    sim.call("n2", lambda m, now: m.leave(now))
    sim.wait_for(lambda: sim.nodes["n2"].core.pending_broadcasts == 0, 10.0)
    sim.crash("n2")
    sim.run_for(60.0)
    for name in names:
        if name == "n2":
            continue
        assert sim.view(name)["n2"] == MemberState.LEFT
        assert not sim.events_of(name, MemberFailed)
        assert [e.member.name for e in sim.events_of(name, MemberLeft)] == ["n2"]


def test_restart_with_higher_incarnation_rejoins_as_alive() -> None:
    sim = Simulator(4, lan(), record_events=True)
    names = sim.converge_cluster(5, width=1)
    sim.crash("n4")
    sim.wait_for(lambda: sim.view("n0")["n4"] == MemberState.DEAD, 60.0)
    old = sim.nodes["n4"].core.incarnation
    sim.restart("n4", join=["n0"])
    assert sim.nodes["n4"].core.incarnation == old + 1
    assert sim.wait_for(lambda: sim.converged(names), 30.0)
    assert any(e.member.name == "n4" for e in sim.events_of("n1", MemberJoined)[-1:])


def test_restart_with_lower_incarnation_jumps_above_what_the_cluster_knows() -> None:
    sim = Simulator(5, lan())
    names = sim.converge_cluster(4, width=1)
    sim.call("n3", lambda m, now: m.set_meta(b"v2", now))  # incarnation 1 everywhere
    sim.run_for(5.0)
    assert sim.nodes["n0"].core.member("n3").incarnation == 1
    sim.crash("n3")
    sim.run_for(1.0)
    sim.restart("n3", join=["n0"], incarnation=0)
    n3 = sim.nodes["n3"].core
    assert sim.wait_for(
        lambda: sim.converged(names) and n3.incarnation >= 2
        and all(sim.nodes[n].core.member("n3").incarnation == n3.incarnation for n in names),
        30.0,
    )


def test_dead_members_are_reaped_after_the_ttl() -> None:
    sim = Simulator(6, lan(dead_member_ttl=20.0), record_events=True)
    names = sim.converge_cluster(4, width=1)
    sim.crash("n1")
    sim.wait_for(lambda: sim.view("n0").get("n1") == MemberState.DEAD, 60.0)
    died = sim.now
    sim.run_for(19.0)
    assert "n1" in sim.view("n0")
    sim.run_for(2.0)
    assert "n1" not in sim.view("n0")
    assert [e.member.name for e in sim.events_of("n0", MemberReaped)] == ["n1"]
    assert sim.now - died >= 20.0
    assert names


def _core_with_peer() -> tuple[Membership, tuple[str, int]]:
    core = Membership("a", ("10.0.0.1", 7946), lan(), random.Random(1), 0.0, keyring=make_keyring(random.Random(1)))
    addr = ("10.0.0.2", 7946)
    core.receive(seal([Alive("b", 3, addr, b"")], to=core.name), addr, 0.0)
    drain_events(core)
    return core, addr


def test_left_member_is_never_turned_dead_by_later_suspect_or_dead() -> None:
    core, addr = _core_with_peer()
    core.receive(seal([Dead("b", 3, "b")], to=core.name), addr, 1.0)
    assert core.member("b").state == MemberState.LEFT
    core.receive(seal([Suspect("b", 3, "c"), Dead("b", 3, "c"), Dead("b", 4, "c")], to=core.name), addr, 2.0)
    assert core.member("b").state == MemberState.LEFT
    assert [type(e) for e in drain_events(core)] == [MemberLeft]


def test_member_held_dead_that_announces_its_leave_is_recorded_left() -> None:
    core, addr = _core_with_peer()
    core.receive(seal([Dead("b", 3, "c")], to=core.name), addr, 1.0)
    core.receive(seal([Dead("b", 3, "b")], to=core.name), addr, 2.0)
    assert core.member("b").state == MemberState.LEFT
    assert [type(e) for e in drain_events(core)] == [MemberFailed, MemberLeft]


def test_alive_with_higher_incarnation_revives_a_left_member_as_a_join() -> None:
    core, addr = _core_with_peer()
    core.receive(seal([Dead("b", 3, "b")], to=core.name), addr, 1.0)
    core.receive(seal([Alive("b", 3, addr, b"")], to=core.name), addr, 2.0)  # same incarnation: still left
    assert core.member("b").state == MemberState.LEFT
    core.receive(seal([Alive("b", 4, ("10.0.0.9", 7946), b"")], to=core.name), addr, 3.0)
    b = core.member("b")
    assert (b.state, b.incarnation, b.addr) == (MemberState.ALIVE, 4, ("10.0.0.9", 7946))
    assert [type(e) for e in drain_events(core)] == [MemberLeft, MemberJoined]


def test_suspect_refuted_by_the_member_emits_member_alive() -> None:
    core, addr = _core_with_peer()
    core.receive(seal([Suspect("b", 3, "c")], to=core.name), addr, 1.0)
    core.receive(seal([Alive("b", 4, addr, b"")], to=core.name), addr, 1.5)
    assert core.member("b").state == MemberState.ALIVE
    assert [type(e) for e in drain_events(core)] == [MemberSuspected, MemberAlive]
    core.handle_timeout(100.0)  # the old suspicion timer is stale
    assert core.member("b").state == MemberState.ALIVE


def test_stale_suspect_with_lower_incarnation_is_ignored() -> None:
    core, addr = _core_with_peer()
    core.receive(seal([Suspect("b", 2, "c"), Dead("b", 2, "c")], to=core.name), addr, 1.0)
    assert core.member("b").state == MemberState.ALIVE
    assert drain_events(core) == []


def test_after_leaving_we_stop_probing_but_still_answer_pings() -> None:
    core, addr = _core_with_peer()
    core.leave(0.5)
    assert core.local_member.state == MemberState.LEFT and core.num_alive == 1
    core.handle_timeout(5.0)
    out = sent(core)
    assert not any(isinstance(m, Ping) for _, msgs in out for m in msgs)
    assert any(Dead("a", 0, "a") in msgs for _, msgs in out)
    core.receive(seal([Ping(9, "a", "b", addr), Suspect("a", 0, "b")], to=core.name), addr, 5.1)
    (dst, msgs), = sent(core)
    assert dst == addr and msgs[0] == Ack(9, "a")
    assert core.incarnation == 0  # a leaving member does not refute


def test_stats_count_what_goes_in_and_out() -> None:
    core, addr = _core_with_peer()
    core.handle_timeout(3.0)
    out = core.datagrams_to_send()
    streams = core.streams_to_send()  # the test's datagram came from a sender "a" does not know: asked
    assert core.stats.datagrams_out == len(out) > 0
    assert core.stats.bytes_out == sum(len(d) for _, d in out) + sum(len(s) for _, s in streams)
    assert core.stats["datagrams_in"] == 1
    core.receive(b"\x01garbage-not-sealed-properly-at-all", addr, 3.1)
    assert core.stats.as_dict()["decrypt_errors"] == 1
