"""Dissemination through the core: retransmit limit, supersession, priority, user broadcasts."""

from __future__ import annotations

import random
from typing import Any

import pytest

from gossip.codec import DatagramHeader, destination_tag
from gossip.config import lan
from gossip.core import InvalidArgument, Membership
from gossip.errors import BroadcastTooLarge
from gossip.events import MemberUpdated, UserMessage
from gossip.messages import Ack, Alive, Ping, StateUpdate, Suspect, UserBroadcast
from testbed.sim import Simulator, drain_events, make_keyring, seal, sent

SRC = ("10.0.9.9", 7946)


def make_core(peers: int, **overrides: Any) -> Membership:
    core = Membership("a", ("10.0.0.1", 7946), lan(**overrides), random.Random(3), 0.0,
                      keyring=make_keyring(random.Random(4)))
    if peers:
        core.receive(seal([Alive(f"p{i}", 1, (f"10.0.1.{i}", 7946), b"") for i in range(peers)], to=core.name), SRC, 0.0)
    return core


def run(core: Membership, start: float, end: float, ack: bool = True) -> list[list[Any]]:
    """Run timers from start to end, acking every ping at once; return each datagram's messages."""
    out: list[list[Any]] = []
    now = start
    while (t := core.get_timer()) is not None and t <= end:
        now = max(now, t)
        core.handle_timeout(now)
        for dst, msgs in sent(core):
            out.append(msgs)
            if ack and isinstance(msgs[0], Ping):
                core.receive(seal([Ack(msgs[0].seq, msgs[0].target)], to=core.name), dst, now)
    return out


def test_each_update_is_sent_retransmit_mult_times_log_n() -> None:
    core = make_core(peers=4)  # N = 5: 4 * ceil(log10(6)) = 4 sends
    run(core, 0.0, 30.0)  # drain the join-time broadcasts
    core.set_state("k", 1, 30.0)
    out = run(core, 30.0, 60.0)
    assert sum(StateUpdate("a", 1, "k", 1) in msgs for msgs in out) == 4
    assert core.pending_broadcasts == 0


def test_retransmit_limit_grows_with_log_of_cluster_size() -> None:
    core = make_core(peers=20)  # N = 21: 4 * ceil(log10(22)) = 8 sends
    run(core, 0.0, 60.0)
    core.set_state("k", 1, 60.0)
    out = run(core, 60.0, 120.0)
    assert sum(StateUpdate("a", 1, "k", 1) in msgs for msgs in out) == 8


def test_newer_update_about_a_member_supersedes_the_queued_one() -> None:
    core = make_core(peers=4)
    run(core, 0.0, 30.0)
    core.receive(seal([Suspect("p1", 1, "p2")], to=core.name), SRC, 30.0)
    core.receive(seal([Alive("p1", 2, ("10.0.1.1", 7946), b"")], to=core.name), SRC, 30.0)
    assert core.pending_broadcasts == 1
    out = run(core, 30.0, 60.0)
    assert not any(isinstance(m, Suspect) for msgs in out for m in msgs)
    # p1 holds its own Alive: it goes to the three others once each, then every other
    # member is known to hold it and it retires before the limit of 4 (issue 13).
    assert sum(Alive("p1", 2, ("10.0.1.1", 7946), b"") in msgs for msgs in out) == 3
    assert core.pending_broadcasts == 0


def test_an_update_is_not_sent_to_members_known_to_hold_it() -> None:
    core = make_core(peers=4)
    run(core, 0.0, 30.0)
    news = Alive("p1", 2, ("10.0.1.1", 7946), b"")
    core.receive(seal([news], to=core.name), SRC, 30.0)  # from TEST_SENDER, about p1
    core.receive(seal([news], header=DatagramHeader("p2", 0, 1, destination_tag(core.name)), to=core.name), SRC, 30.0)
    for i in range(10):
        for peer in ("p1", "p2"):  # the subject and a member that told us: never sent to
            core._send(("10.0.1.9", 7946), peer, [Ack(i, core.name)])
    assert news not in [m for _, msgs in sent(core) for m in msgs]
    core._send(("10.0.1.3", 7946), "p3", [Ack(99, core.name)])
    assert news in [m for _, msgs in sent(core) for m in msgs]


def test_membership_updates_go_before_state_and_user_payloads() -> None:
    core = make_core(peers=4)
    run(core, 0.0, 30.0)
    for i in range(40):
        core.set_state(f"k{i}", "v" * 60, 30.0)
    core.broadcast(b"u" * 900, 30.0)
    core.receive(seal([Suspect("p1", 1, "p2")], to=core.name), SRC, 30.0)
    first = run(core, 30.0, 30.25)[0]
    assert first[0] == Suspect("p1", 1, "p2") or Suspect("p1", 1, "p2") in first
    assert not any(isinstance(m, UserBroadcast) for m in first)  # no room left for 900 bytes


def test_gossip_is_only_sent_when_there_is_something_to_send() -> None:
    core = make_core(peers=4)
    run(core, 0.0, 30.0)
    out = run(core, 30.0, 40.0)
    assert out and all(isinstance(msgs[0], (Ping, Ack)) and len(msgs) == 1 for msgs in out)


def test_every_datagram_fits_even_when_the_queues_overflow() -> None:
    core = make_core(peers=4)
    for i in range(100):
        core.set_state(f"key-{i}", "x" * 30, 0.0)
        core.broadcast(bytes([i]) * 700, 0.0)
    run(core, 0.0, 20.0)  # sent() asserts the size of each datagram


def test_user_broadcast_reaches_everyone_exactly_once_and_not_the_sender() -> None:
    sim = Simulator(21, lan(), loss=0.05, record_events=True)
    names = sim.converge_cluster(10, width=1)
    sim.call("n4", lambda m, now: m.broadcast(b"hello", now))
    sim.run_for(20.0)
    for name in names:
        got = [e for e in sim.events_of(name, UserMessage)]
        assert got == ([] if name == "n4" else [UserMessage("n4", b"hello")])


def test_user_broadcast_is_rebroadcast_by_receivers() -> None:
    core = make_core(peers=4)
    run(core, 0.0, 30.0)
    msg = UserBroadcast("p1", 99, b"payload")
    core.receive(seal([msg], to=core.name), SRC, 30.0)
    core.receive(seal([msg], to=core.name), SRC, 30.1)  # duplicate: delivered once
    assert [e for e in drain_events(core) if isinstance(e, UserMessage)] == [UserMessage("p1", b"payload")]
    out = run(core, 30.1, 60.0)
    assert sum(msg in msgs for msgs in out) == 4


def test_broadcast_that_can_never_fit_is_refused() -> None:
    core = make_core(peers=0)
    with pytest.raises(BroadcastTooLarge):
        core.broadcast(b"x" * 1400, 0.0)
    assert core.pending_broadcasts == 1  # only our own Alive


def test_meta_over_the_limit_is_refused_and_a_change_bumps_incarnation() -> None:
    sim = Simulator(22, lan(), record_events=True)
    sim.converge_cluster(3, width=1)
    with pytest.raises(BroadcastTooLarge):
        sim.nodes["n1"].core.set_meta(b"m" * 513, sim.now)
    sim.call("n1", lambda m, now: m.set_meta(b"role=gw", now))
    assert sim.nodes["n1"].core.incarnation == 1
    assert sim.wait_for(lambda: sim.nodes["n2"].core.member("n1").meta == b"role=gw", 5.0)
    updated = sim.events_of("n2", MemberUpdated)
    assert updated and updated[-1].member.meta == b"role=gw"


def test_bad_arguments_are_local_errors_and_change_nothing() -> None:
    with pytest.raises(InvalidArgument):
        Membership("", ("10.0.0.1", 7946), lan(), random.Random(1), 0.0, keyring=make_keyring(random.Random(1)))
    core = make_core(peers=0)
    with pytest.raises(InvalidArgument):
        core.set_meta("not bytes", 0.0)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument):
        core.set_state("", 1, 0.0)
    assert core.incarnation == 0 and core.state_of("a") == {}
