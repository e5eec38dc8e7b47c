"""Gossip's residue, repaired (issue 13): a member the epidemic missed is asked for.

Repeats heard now count as sends (broadcast_queue.py), so an update goes out fewer times
and now and then one member misses a new member's Alive. It is not left to the periodic
push-pull (30 s or more): a member that gets datagrams from a member it does not know, or
that member's state through another, asks for its record once a grace has passed.
"""

from __future__ import annotations

import random
import statistics

from gossip.codec import DatagramHeader, destination_tag
from gossip.config import lan
from gossip.core import (
    START_NEWS_S,
    UNKNOWN_SENDER_ASKS,
    UNKNOWN_SENDER_GRACE,
    UNKNOWN_SENDERS_MAX,
    Membership,
)
from gossip.messages import Alive, MemberState, StateUpdate
from testbed.sim import Simulator, make_keyring, seal

A, B, C = ("10.0.0.1", 7946), ("10.0.0.2", 7946), ("10.0.0.3", 7946)


def make(name: str, addr: tuple[str, int]) -> Membership:
    return Membership(name, addr, lan(), random.Random(1), 0.0, keyring=make_keyring(random.Random(0)))


def from_(sender: str, to: str, msgs: list, counter: list[int] = [0]) -> bytes:  # noqa: B006
    counter[0] += 1
    return seal(msgs, header=DatagramHeader(sender, 0, counter[0], destination_tag(to)))


def test_a_member_that_sends_to_us_unknown_is_asked_for_its_record_after_the_grace() -> None:
    a, b = make("a", A), make("b", B)
    b.receive(from_("a", "b", [Alive("a", 1, A, b"")]), A, 0.0)  # b knows a; a missed b's Alive
    b.handle_timeout(0.5)
    a.receive(from_("b", "a", [Alive("c", 1, C, b"")]), B, 0.5)  # b gossips to a
    assert a.member("b") is None
    a.handle_timeout(0.5 + UNKNOWN_SENDER_GRACE / 2)
    assert a.streams_to_send() == []  # gossip may still bring it: not yet
    a.handle_timeout(0.6 + UNKNOWN_SENDER_GRACE)
    (dst, frame), = a.streams_to_send()
    assert dst == B and a.stats.unknown_sender_asks == 1
    reply = b.handle_stream(frame, A, 3.0)
    assert reply is not None
    a.receive_stream_reply(reply, B, 3.0)
    member = a.member("b")
    assert member is not None and member.state == MemberState.ALIVE
    a.handle_timeout(10.0)
    assert a.streams_to_send() == [] and a._unknown_senders == {}  # known now: asked once


def test_a_member_whose_state_reaches_us_is_asked_of_the_member_that_sent_it() -> None:
    a = make("a", A)
    a.receive(from_("c", "a", [Alive("c", 1, C, b"")]), C, 0.0)
    a.receive(from_("c", "a", [StateUpdate("b", 1, "ipam", {"v": 1}, False)]), C, 0.1)  # b unknown to a
    a.handle_timeout(0.2 + UNKNOWN_SENDER_GRACE)
    (dst, _frame), = a.streams_to_send()
    assert dst == C  # c knows b; a does not know where b is


def test_asks_are_bounded_in_count_and_in_members() -> None:
    a = make("a", A)
    for i in range(UNKNOWN_SENDERS_MAX + 10):  # a key holder inventing senders
        a.receive(from_(f"x{i}", "a", [Alive("c", 1, C, b"")]), C, 0.0)
    for t in range(1, 40):
        a.handle_timeout(float(t))
        a.streams_to_send()
    assert a.stats.unknown_sender_asks == UNKNOWN_SENDERS_MAX * UNKNOWN_SENDER_ASKS
    assert a._unknown_senders == {}


def _queued_with_feedback(a: Membership, key: tuple[str, str]) -> bool:
    return a._queue._items[a._queue._by_key[key]].feedback


def test_only_a_new_members_first_values_are_news_of_a_start() -> None:
    """A starting member's first values (claims, key fingerprint) are sent fewer times as
    they are heard back; a key a settled member publishes later (a service registered)
    goes out the full limit, so it reaches everyone in the first burst. With feedback for
    every first value, seed 10 of the N = 50 warm cluster left one member without it
    (tests/testbed/test_scaling_engines.py)."""
    a = make("a", A)
    a.receive(from_("c", "a", [Alive("c", 1, C, b"")]), C, 0.0)
    a.receive(from_("c", "a", [StateUpdate("c", 1, "ipam", {"v": 1}, False)]), C, 1.0)
    assert _queued_with_feedback(a, ("c", "ipam"))
    a.receive(from_("c", "a", [StateUpdate("c", 2, "ipam", {"v": 2}, False)]), C, 2.0)
    assert not _queued_with_feedback(a, ("c", "ipam"))  # a later value: the full limit
    a.receive(from_("c", "a", [StateUpdate("c", 3, "svc", {"v": 1}, False)]), C, START_NEWS_S + 1.0)
    assert not _queued_with_feedback(a, ("c", "svc"))  # first value, but c is settled


def _cold_start_converged(seed: int, n: int) -> float:
    sim = Simulator(seed, lan(), latency=0.002, jitter=0.002)
    rng = random.Random(seed)
    names = [f"n{i:03d}" for i in range(n)]
    starts = sorted((rng.uniform(0, 0.3) if i < 3 else rng.uniform(0.3, 2.5), nm) for i, nm in enumerate(names))
    for at, name in starts:
        sim.run_until(at)
        sim.add_node(name, join=[s for s in names[:3] if s in sim.nodes and s != name])
    assert sim.wait_for(sim.converged, 60.0)
    return sim.now


def test_a_cold_start_converges_without_waiting_for_push_pull() -> None:
    """N = 50 at once, seeded: every member sees every other within seconds, none waits
    the 30 s push-pull for an Alive the epidemic missed. Without the repeated settle
    push-pull (core.JOIN_SETTLES = 1) seed 5 took 23.9 s."""
    times = [_cold_start_converged(seed, 50) for seed in (1, 2, 5, 6)]
    assert max(times) < 10.0, times
    assert statistics.median(times) < 4.0, times
