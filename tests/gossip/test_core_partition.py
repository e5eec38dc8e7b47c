"""Anti-entropy: push-pull merge rules and healing after partitions."""

from __future__ import annotations

import random

import pytest

from gossip.codec import decode_frame, encode_frame
from gossip.config import lan
from gossip.core import (
    JOIN_SETTLE_GOSSIP_INTERVALS,
    MERGE_REBROADCAST_MAX,
    Membership,
    push_pull_scale,
)
from gossip.events import MemberFailed
from gossip.messages import Dead, MemberRecord, MemberState, PushPull
from testbed.sim import Simulator, drain_events, make_keyring, seal, sent

SRC = ("10.0.9.9", 7946)


def make_core(name: str = "a", host: str = "10.0.0.1") -> Membership:
    return Membership(name, (host, 7946), lan(), random.Random(1), 0.0, keyring=make_keyring(random.Random(1)))


def push_pull_from(core: Membership, members: list[MemberRecord], now: float = 1.0) -> PushPull:
    ring = make_keyring(random.Random(2))
    frame = ring.encrypt(encode_frame(PushPull("r", False, False, tuple(members), ())), b"edgeagent")
    reply = core.handle_stream(frame, SRC, now)
    assert reply is not None
    return decode_frame(ring.decrypt(reply, b"edgeagent"), 1 << 20)


def test_push_pull_scale_matches_memberlist() -> None:
    assert push_pull_scale(30.0, 32) == 30.0
    assert push_pull_scale(30.0, 33) == 60.0
    assert push_pull_scale(30.0, 64) == 60.0
    assert push_pull_scale(30.0, 100) == 90.0
    assert push_pull_scale(30.0, 1000) == 180.0


def test_remote_dead_about_a_live_member_only_makes_it_suspect() -> None:
    core = make_core()
    push_pull_from(core, [MemberRecord("b", ("10.0.0.2", 7946), 3, MemberState.ALIVE, b"")])
    reply = push_pull_from(core, [MemberRecord("b", ("10.0.0.2", 7946), 3, MemberState.DEAD, b"")])
    assert core.member("b").state == MemberState.SUSPECT
    assert {r.name: r.state for r in reply.members} == {"a": MemberState.ALIVE, "b": MemberState.SUSPECT}


def test_remote_dead_about_us_is_refuted_and_the_reply_carries_it() -> None:
    core = make_core()
    reply = push_pull_from(core, [MemberRecord("a", ("10.0.0.1", 7946), 4, MemberState.DEAD, b"")])
    assert core.incarnation == 5
    assert [(r.incarnation, r.state) for r in reply.members if r.name == "a"] == [(5, MemberState.ALIVE)]


def test_remote_left_is_recorded_left_and_unknown_gone_members_are_recorded() -> None:
    # Unlike memberlist, a member first heard of as DEAD or LEFT is recorded, so a
    # node that joins while it is down still holds its replicated state.
    core = make_core()
    push_pull_from(core, [MemberRecord("b", ("10.0.0.2", 7946), 1, MemberState.ALIVE, b"")])
    push_pull_from(core, [
        MemberRecord("b", ("10.0.0.2", 7946), 1, MemberState.LEFT, b""),
        MemberRecord("ghost", ("10.0.0.3", 7946), 1, MemberState.DEAD, b""),
        MemberRecord("gone", ("10.0.0.4", 7946), 2, MemberState.LEFT, b""),
    ])
    assert core.member("b").state == MemberState.LEFT
    assert core.member("ghost").state == MemberState.DEAD
    assert core.member("gone").state == MemberState.LEFT
    assert core.num_alive == 1  # only ourselves: recorded gone members are never counted alive


def test_a_reaped_member_is_not_learned_again_from_a_push_pull() -> None:
    core = make_core()
    ghost = MemberRecord("ghost", ("10.0.0.3", 7946), 1, MemberState.DEAD, b"")
    push_pull_from(core, [ghost])
    later = 1.0 + core.config.dead_member_ttl + 1.0
    core.handle_timeout(later)
    assert core.member("ghost") is None
    push_pull_from(core, [ghost], now=later + 1.0)
    assert core.member("ghost") is None


def test_stale_alive_in_a_push_pull_does_not_revive_a_dead_member() -> None:
    core = make_core()
    push_pull_from(core, [MemberRecord("b", ("10.0.0.2", 7946), 2, MemberState.ALIVE, b"")])
    core.receive(seal([Dead("b", 2, "c")], to=core.name), SRC, 2.0)
    push_pull_from(core, [MemberRecord("b", ("10.0.0.2", 7946), 2, MemberState.ALIVE, b"")], now=3.0)
    assert core.member("b").state == MemberState.DEAD


def test_unsolicited_stream_reply_is_dropped() -> None:
    core = make_core()
    other = make_core("b", "10.0.0.2")
    other.join([core.addr], 0.0)
    (_, request), = other.streams_to_send()
    reply = core.handle_stream(request, other.addr, 0.0)
    assert reply is not None
    other.receive_stream_reply(reply, other.addr, 0.1)  # from the wrong address: not asked
    assert other.stats.dropped == 1 and other.member("a") is None
    other.receive_stream_reply(reply, core.addr, 0.1)
    assert other.member("a") is not None
    drain_events(other)
    sent(other)


def test_join_seeds_are_retried_while_we_are_alone() -> None:
    sim = Simulator(41, lan())
    sim.add_node("n0")
    sim.add_node("n1")
    sim.partition([["n0"], ["n1"]])
    sim.call("n1", lambda m, now: m.join([sim.nodes["n0"].addr], now))
    sim.run_for(15.0)
    assert sim.nodes["n1"].core.member("n0") is None
    sim.heal()
    assert sim.wait_for(lambda: sim.converged(["n0", "n1"]), 25.0)


@pytest.mark.parametrize("seed", [42, 43, 44])
def test_partition_longer_than_suspicion_heals_within_60_s(seed: int) -> None:
    sim = Simulator(seed, lan(), loss=0.01)
    names = sim.converge_cluster(8, width=1)
    left, right = names[:4], names[4:]
    sim.partition([left, right])
    assert sim.wait_for(
        lambda: all(sim.view(a)[b] == MemberState.DEAD for a in left for b in right)
        and all(sim.view(b)[a] == MemberState.DEAD for a in left for b in right),
        120.0,
    )
    sim.run_for(30.0)
    sim.heal()
    assert sim.wait_for(lambda: sim.converged(names), 60.0)


def test_a_broken_link_is_bridged_by_indirect_probes() -> None:
    sim = Simulator(45, lan(), record_events=True)
    names = sim.converge_cluster(6, width=1)
    sim.block("n0", "n5")
    sim.block("n5", "n0")
    sim.run_for(60.0)
    assert sim.converged(names)
    assert not any(e.member.name == "n5" for e in sim.events_of("n0", MemberFailed))




def test_members_learned_by_push_pull_are_rebroadcast_up_to_a_bound() -> None:
    small, large = make_core(), make_core()
    few = [MemberRecord(f"m{i}", (f"10.0.3.{i}", 7946), 1, MemberState.ALIVE, b"") for i in range(5)]
    many = [MemberRecord(f"m{i}", (f"10.0.3.{i}", 7946), 1, MemberState.ALIVE, b"") for i in range(100)]
    push_pull_from(small, few)
    push_pull_from(large, many)
    assert len(small.members()) == 6 and len(large.members()) == 101
    assert small.pending_broadcasts == 1 + 5  # our own Alive, and every new member
    assert large.pending_broadcasts == 1 + MERGE_REBROADCAST_MAX


def test_members_learned_in_a_join_exchange_are_not_rebroadcast() -> None:
    """Issue 13: after a site-wide restart every joiner re-gossiped the whole cluster it had
    just learnt from its seed; its own push-pull a moment later repairs overlapping joins."""
    core = make_core()
    ring = make_keyring(random.Random(2))
    few = [MemberRecord(f"m{i}", (f"10.0.3.{i}", 7946), 1, MemberState.ALIVE, b"") for i in range(5)]
    join = PushPull("r", True, False, (MemberRecord("r", SRC, 1, MemberState.ALIVE, b""), *few), ())
    assert core.handle_stream(ring.encrypt(encode_frame(join), b"edgeagent"), SRC, 1.0) is not None
    assert len(core.members()) == 7
    assert core.pending_broadcasts == 2  # our own Alive and the joiner's: not the 5 it knew


def test_a_joiner_push_pulls_once_more_a_moment_after_its_join() -> None:
    core = make_core()
    sent(core)
    core.join([SRC], 0.0)
    assert [addr for addr, _ in core.streams_to_send()] == [SRC]
    ring = make_keyring(random.Random(2))
    others = [MemberRecord(f"m{i}", (f"10.0.3.{i}", 7946), 1, MemberState.ALIVE, b"") for i in range(3)]
    reply = PushPull("r", True, True, (MemberRecord("r", SRC, 1, MemberState.ALIVE, b""), *others), ())
    core.receive_stream_reply(ring.encrypt(encode_frame(reply), b"edgeagent"), SRC, 0.1)
    settle = JOIN_SETTLE_GOSSIP_INTERVALS * core.config.gossip_interval

    def streams_until(t: float) -> list[tuple[str, int]]:
        while (deadline := core.get_timer()) is not None and deadline <= t:
            core.handle_timeout(deadline)
        return [addr for addr, _ in core.streams_to_send()]

    assert streams_until(0.1 + settle - 0.01) == []
    (addr,) = streams_until(0.1 + settle + 0.01)
    assert addr in {r.addr for r in reply.members}
    assert streams_until(0.1 + 3 * settle) == []  # once, not a ticker
