"""Failure detection at message level: ping, ping-req, nack, LHM, buddy, refutation."""

from __future__ import annotations

import random
from typing import Any

import pytest

from gossip.config import lan
from gossip.core import Membership
from gossip.events import MemberAlive, MemberSuspected
from gossip.messages import Ack, Alive, Dead, MemberState, Nack, Ping, PingReq, Suspect
from testbed.sim import drain_events, make_keyring, seal, sent

SRC = ("10.0.9.9", 7946)


def peer_addr(i: int) -> tuple[str, int]:
    return (f"10.0.1.{i}", 7946)


def make_core(peers: int = 4, **overrides: Any) -> Membership:
    core = Membership("a", ("10.0.0.1", 7946), lan(**overrides), random.Random(1), 0.0,
                      keyring=make_keyring(random.Random(2)))
    if peers:
        core.receive(seal([Alive(f"p{i}", 1, peer_addr(i), b"") for i in range(peers)], to=core.name), SRC, 0.0)
    sent(core)
    drain_events(core)
    return core


class Clock:
    """Steps a core's timers in small increments, collecting what it sends."""

    def __init__(self, core: Membership, now: float = 0.0) -> None:
        self.core = core
        self.now = now

    def step(self, dt: float) -> list[tuple[tuple[str, int], list[Any]]]:
        end = self.now + dt
        out = []
        while True:
            t = self.core.get_timer()
            if t is None or t > end:
                break
            self.now = max(self.now, t)
            self.core.handle_timeout(self.now)
            out.extend(sent(self.core))
        self.now = end
        return out

    def until_ping(self, limit: float = 5.0) -> tuple[tuple[str, int], list[Any]]:
        waited = 0.0
        while waited < limit:
            for dst, msgs in self.step(0.01):
                if isinstance(msgs[0], Ping):
                    return dst, msgs
            waited += 0.01
        raise AssertionError("no ping sent")


def of_type(out: list[tuple[Any, list[Any]]], kind: type) -> list[tuple[Any, Any]]:
    return [(dst, m) for dst, msgs in out for m in msgs if isinstance(m, kind)]


def test_probe_pings_then_pingreqs_with_nack_then_suspects() -> None:
    core = make_core()
    clock = Clock(core)
    dst, msgs = clock.until_ping()
    ping = msgs[0]
    assert ping.source == "a" and ping.target.startswith("p") and dst == peer_addr(int(ping.target[1:]))
    out = clock.step(0.49)
    assert not of_type(out, PingReq)
    out = clock.step(0.02)  # probe timeout (0.5 s) passes
    reqs = of_type(out, PingReq)
    assert len(reqs) == 3
    assert {d for d, _ in reqs}.isdisjoint({dst})
    assert all(r.seq == ping.seq and r.target == ping.target and r.nack for _, r in reqs)
    out = clock.step(0.5)  # end of the probe interval
    assert core.member(ping.target).state == MemberState.SUSPECT
    assert any(isinstance(e, MemberSuspected) for e in drain_events(core))
    assert core.health_score == 3  # three nacks expected, none came (memberlist probeNode)


def test_ack_ends_the_probe_and_lowers_the_health_score() -> None:
    core = make_core()
    clock = Clock(core)
    dst, msgs = clock.until_ping()
    core.receive(seal([Alive("x", 1, ("10.0.3.1", 7946), b"")], to=core.name), SRC, clock.now)  # unrelated traffic
    # raise the score first: two failed probes worth
    core._awareness.apply_delta(2)
    core.receive(seal([Ack(msgs[0].seq, msgs[0].target)], to=core.name), dst, clock.now + 0.1)
    assert core.health_score == 1
    out = clock.step(1.0)
    assert not of_type(out, PingReq)
    assert core.member(msgs[0].target).state == MemberState.ALIVE


def test_nacks_from_relays_spare_our_health_score() -> None:
    core = make_core()
    clock = Clock(core)
    _, msgs = clock.until_ping()
    out = clock.step(0.51)
    reqs = of_type(out, PingReq)
    for relay_dst, req in reqs[:2]:
        core.receive(seal([Nack(req.seq, "relay")], to=core.name), relay_dst, clock.now)
    clock.step(0.5)
    assert core.health_score == 1  # expected 3, got 2


def test_failed_probe_with_no_relays_costs_one() -> None:
    core = make_core(peers=1)
    clock = Clock(core)
    clock.until_ping()
    out = clock.step(1.0)
    assert not of_type(out, PingReq)
    assert core.health_score == 1


def test_health_score_stretches_probe_timeout_and_interval() -> None:
    core = make_core()
    core._awareness.apply_delta(3)  # multiplier 4
    clock = Clock(core)
    clock.until_ping()
    out = clock.step(1.9)
    assert not of_type(out, PingReq)
    out = clock.step(0.2)  # 4 x 0.5 s
    assert of_type(out, PingReq)
    clock.step(1.8)
    assert all(m.state == MemberState.ALIVE for m in core.members())
    clock.step(0.2)  # 4 x 1 s
    assert any(m.state == MemberState.SUSPECT for m in core.members())


def test_ping_to_a_suspect_carries_the_suspicion_buddy_system() -> None:
    core = make_core(peers=1)
    core.receive(seal([Suspect("p0", 1, "someone")], to=core.name), SRC, 0.0)
    sent(core)
    clock = Clock(core)
    _, msgs = clock.until_ping()
    assert Suspect("p0", 1, "a") in msgs


def test_suspect_about_ourselves_is_refuted_with_a_higher_incarnation() -> None:
    core = make_core(peers=1)
    core.receive(seal([Suspect("a", 0, "p0")], to=core.name), SRC, 0.1)
    assert core.incarnation == 1
    assert core.health_score == 1  # refuting costs one (memberlist refute)
    core.receive(seal([Dead("a", 5, "p0")], to=core.name), SRC, 0.2)
    assert core.incarnation == 6
    assert core.local_member.state == MemberState.ALIVE
    out = Clock(core).step(0.3)
    alive = [m for _, m in of_type(out, Alive) if m.name == "a"]
    assert alive and alive[0].incarnation == 6


def test_ack_to_a_buddy_ping_already_carries_the_refutation() -> None:
    core = make_core(peers=1)
    core.receive(seal([Ping(7, "a", "p0", peer_addr(0)), Suspect("a", 0, "p0")], to=core.name), peer_addr(0), 0.1)
    out = sent(core)
    assert out[0][1][0] == Ack(7, "a")
    assert Alive("a", 1, ("10.0.0.1", 7946), b"") in out[0][1]


def test_ping_for_another_name_is_dropped() -> None:
    core = make_core(peers=0)
    core.receive(seal([Ping(1, "someone-else", "p0", peer_addr(0))], to=core.name), peer_addr(0), 0.0)
    assert sent(core) == []
    assert core.stats.dropped == 1


def test_relay_forwards_the_ack_to_the_origin() -> None:
    core = make_core(peers=0)
    origin, target = ("10.0.5.1", 7946), ("10.0.5.2", 7946)
    core.receive(seal([PingReq(42, "t", target, "o", origin, True)], to=core.name), origin, 0.0)
    (dst, msgs), = sent(core)
    assert dst == target and isinstance(msgs[0], Ping) and msgs[0].target == "t"
    core.receive(seal([Ack(msgs[0].seq, "t")], to=core.name), target, 0.1)
    (dst, msgs), = sent(core)
    assert dst == origin and msgs[0] == Ack(42, "a")
    assert not of_type(Clock(core, 0.1).step(1.0), Nack)


def test_relay_nacks_the_origin_when_the_target_stays_silent() -> None:
    core = make_core(peers=0)
    origin, target = ("10.0.5.1", 7946), ("10.0.5.2", 7946)
    core.receive(seal([PingReq(42, "t", target, "o", origin, True)], to=core.name), origin, 0.0)
    sent(core)
    clock = Clock(core)
    assert not of_type(clock.step(0.49), Nack)
    nacks = of_type(clock.step(0.02), Nack)
    assert nacks == [(origin, Nack(42, "a"))]


def test_relay_does_not_nack_unless_asked() -> None:
    core = make_core(peers=0)
    core.receive(seal([PingReq(42, "t", ("10.0.5.2", 7946), "o", SRC, False)], to=core.name), SRC, 0.0)
    sent(core)
    assert not of_type(Clock(core).step(2.0), Nack)


def test_without_lifeguard_no_nacks_no_buddy_no_health_and_fixed_timeout() -> None:
    core = make_core(peers=4, lifeguard=False)
    core.receive(seal([Suspect("p0", 1, "someone")], to=core.name), SRC, 0.0)
    sent(core)
    clock = Clock(core)
    for _ in range(6):
        _, msgs = clock.until_ping()
        assert Suspect(msgs[0].target, 1, "a") not in msgs
        out = clock.step(0.6)
        assert all(not r.nack for _, r in of_type(out, PingReq))
    assert core.health_score == 0
    # classic SWIM: suspicion lasts exactly min = 4 * max(1, log10(5)) * 1 s = 4 s
    assert core.member("p0").state == MemberState.DEAD


@pytest.mark.parametrize("lifeguard", [True, False])
def test_probe_round_robin_visits_every_member_once_per_round(lifeguard: bool) -> None:
    core = make_core(peers=5, lifeguard=lifeguard)
    clock = Clock(core)
    targets = []
    for _ in range(10):
        dst, msgs = clock.until_ping()
        targets.append(msgs[0].target)
        core.receive(seal([Ack(msgs[0].seq, msgs[0].target)], to=core.name), dst, clock.now)
    assert sorted(targets[:5]) == sorted(targets[5:]) == [f"p{i}" for i in range(5)]


def test_suspecting_member_pings_the_suspect_once_halfway_through_the_minimum_timeout() -> None:
    core = make_core(peers=4)
    core.receive(seal([Suspect("p1", 1, "p2")], to=core.name), SRC, 0.0)
    sent(core)
    clock = Clock(core)
    rechecks = []
    while core.member("p1").state == MemberState.SUSPECT and clock.now < 60.0:
        susp = core._table.by_name["p1"].suspicion
        assert susp is not None
        for dst, msgs in clock.step(0.005):
            if dst == peer_addr(1) and isinstance(msgs[0], Ping) and Suspect("p1", 1, "a") in msgs:
                if abs(clock.now - (susp.start + susp.min_timeout / 2)) < 0.01:
                    rechecks.append(clock.now)
            elif isinstance(msgs[0], Ping):
                core.receive(seal([Ack(msgs[0].seq, msgs[0].target)], to=core.name), dst, clock.now)
        if rechecks:
            break
    assert len(rechecks) == 1 and susp.rechecked
    assert clock.now < susp.deadline - 1.0  # time left for a slow member's answer
    # p1 had refuted long ago; its ack carries the Alive we missed
    core.receive(seal([Ack(999, "p1"), Alive("p1", 2, peer_addr(1), b"")], to=core.name), peer_addr(1), clock.now)
    assert core.member("p1").state == MemberState.ALIVE


def test_ping_carrying_a_stale_accusation_is_answered_with_our_current_alive() -> None:
    core = make_core(peers=1)
    core.receive(seal([Suspect("a", 0, "p0")], to=core.name), SRC, 0.1)  # refuted: incarnation 1
    sent(core)
    Clock(core, 0.1).step(5.0)  # the refutation has been gossiped and retired
    core.receive(seal([Ping(5, "a", "p0", peer_addr(0)), Suspect("a", 0, "p0")], to=core.name), peer_addr(0), 5.2)
    (dst, msgs), = sent(core)
    assert msgs[0] == Ack(5, "a") and Alive("a", 1, ("10.0.0.1", 7946), b"") in msgs
    assert core.incarnation == 1  # nothing new to refute
    core.receive(seal([Ping(6, "a", "p0", peer_addr(0))], to=core.name), peer_addr(0), 5.3)
    (dst, msgs), = sent(core)
    assert msgs == [Ack(6, "a")]


@pytest.mark.parametrize(("lifeguard", "expected"), [(False, 4.0), (True, 24.0)])
def test_suspicion_lasts_min_without_lifeguard_and_max_with_it_unconfirmed(lifeguard: bool, expected: float) -> None:
    # N = 5: min = 4 * max(1, log10 5) * 1 s = 4 s; Lifeguard starts at max = 6 * min (k = 2 <= N - 2)
    core = make_core(peers=4, lifeguard=lifeguard)
    core.receive(seal([Suspect("p1", 1, "p2")], to=core.name), SRC, 10.0)
    susp = core._table.by_name["p1"].suspicion
    assert susp is not None and susp.deadline == pytest.approx(10.0 + expected)


def test_suspect_at_a_higher_incarnation_restarts_the_suspicion() -> None:
    core = make_core(peers=4)
    core.receive(seal([Suspect("p1", 1, "p2")], to=core.name), SRC, 0.0)
    old = core._table.by_name["p1"].suspicion
    core.receive(seal([Suspect("p1", 2, "p3")], to=core.name), SRC, 5.0)  # p1 refuted 1; we missed its Alive
    new = core._table.by_name["p1"].suspicion
    assert new is not None and new is not old and new.start == 5.0
    assert core.member("p1").incarnation == 2
    assert new.deadline == pytest.approx(5.0 + 24.0)  # a fresh, unconfirmed suspicion
    assert [type(e) for e in drain_events(core)] == [MemberSuspected, MemberAlive, MemberSuspected]



def test_successful_probes_record_numbered_round_trip_times() -> None:
    core = make_core()
    clock = Clock(core)
    assert core.recent_probe_rtts == ()
    dst, msgs = clock.until_ping()
    core.receive(seal([Ack(msgs[0].seq, msgs[0].target)], to=core.name), dst, clock.now + 0.004)
    ((number, rtt),) = core.recent_probe_rtts
    assert number == 1 and 0.004 <= rtt < 0.05  # the clock steps a little past the send
    core.receive(seal([Ack(msgs[0].seq, msgs[0].target)], to=core.name), dst, clock.now + 0.2)  # duplicate ack
    assert len(core.recent_probe_rtts) == 1
