"""Uplink holder selection on virtual membership views: deterministic, stable while
non-holders come and go, moves only when the holder leaves, one holder per partition side."""

from __future__ import annotations

import random

import pytest

from gossip.messages import MemberState
from overlay.uplink_select import (
    Reach,
    UplinkSelectError,
    UplinkSelector,
    choose_holder,
    decode_capability,
    encode_capability,
    score,
)

A, S, D, L = MemberState.ALIVE, MemberState.SUSPECT, MemberState.DEAD, MemberState.LEFT


def view(names: list[str], site: str = "s1") -> tuple[dict[str, str], dict[str, MemberState]]:
    return {n: site for n in names}, {n: A for n in names}


def test_same_holder_whatever_the_order_of_the_view() -> None:
    names = [f"n{i}" for i in range(30)]
    rng = random.Random(5)
    holders = set()
    for _ in range(20):
        rng.shuffle(names)
        capable, states = view(names)
        holders.add(choose_holder("s1", dict(capable), dict(states)))
    assert len(holders) == 1 and holders != {None}


def test_stable_while_non_holders_join_and_leave() -> None:
    rng = random.Random(11)
    names = [f"n{i}" for i in range(20)]
    capable, states = view(names)
    holder = choose_holder("s1", capable, states)
    moves = 0
    for _step in range(200):
        name = rng.choice([n for n in names if n != holder])
        states[name] = rng.choice([A, S, D, L])
        new = choose_holder("s1", capable, states)
        if new != holder:
            moves += 1
    assert moves == 0
    # A newcomer moves it only if its score beats the holder's; count that this happens
    # for some and not for others (so the test can tell stability from a constant).
    moved, kept = 0, 0
    for i in range(100):
        c2, s2 = dict(capable), dict(states)
        c2[f"new{i}"], s2[f"new{i}"] = "s1", A
        if choose_holder("s1", c2, s2) == holder:
            kept += 1
        else:
            moved += 1
    assert kept > 50 and moved > 0


def test_moves_when_the_holder_dies_and_only_then() -> None:
    capable, states = view([f"n{i}" for i in range(10)])
    holder = choose_holder("s1", capable, states)
    assert holder is not None
    states[holder] = S
    assert choose_holder("s1", capable, states) == holder  # suspicion does not move it
    states[holder] = D
    second = choose_holder("s1", capable, states)
    assert second not in (None, holder)
    states[holder] = A  # it comes back (higher incarnation): it wins again
    assert choose_holder("s1", capable, states) == holder


def test_only_capable_members_of_the_site() -> None:
    capable, states = view([f"n{i}" for i in range(10)])
    capable["other"], states["other"] = "s2", A
    states["plain"] = A  # alive but not uplink-capable
    assert choose_holder("s1", capable, states) not in ("other", "plain")
    assert choose_holder("s2", capable, states) == "other"
    assert choose_holder("s3", capable, states) is None
    assert choose_holder("s1", capable, {}) is None  # no view: nobody


def test_sites_spread_over_nodes() -> None:
    names = [f"n{i}" for i in range(10)]
    states = {n: A for n in names}
    holders = {
        choose_holder(f"site{k}", {n: f"site{k}" for n in names}, states) for k in range(100)
    }
    assert len(holders) >= 8


def test_partition_sides_each_pick_one_and_agree_after_heal() -> None:
    names = [f"n{i}" for i in range(12)]
    left, right = names[:5], names[5:]
    capable = {n: "s1" for n in names}
    sels = {n: UplinkSelector(n, "s1") for n in names}
    for me, sel in sels.items():
        for other in names:
            if other != me:
                sel.on_state(other, encode_capability("s1"))
                same_side = (me in left) == (other in left)
                sel.on_member(other, A if same_side else D)
    left_holders = {sels[n].holder() for n in left}
    right_holders = {sels[n].holder() for n in right}
    assert len(left_holders) == 1 and left_holders <= set(left)
    assert len(right_holders) == 1 and right_holders <= set(right)
    assert sum(sels[n].i_hold() for n in names) == 2
    for sel in sels.values():  # heal
        for other in names:
            if other != sel.local:
                sel.on_member(other, A)
    healed = {sel.holder() for sel in sels.values()}
    assert healed == {choose_holder("s1", capable, {n: A for n in names})}
    assert sum(sels[n].i_hold() for n in names) == 1


def test_selector_drops_hostile_values_and_withdrawals() -> None:
    sel = UplinkSelector("me", "s1")
    for bad in (
        None,
        1,
        "x",
        {"v": 2, "site": "s1"},
        {"v": 1},
        {"v": 1, "site": ""},
        {"v": 1, "site": "a\0b"},
        {"v": 1, "site": "x" * 64},
        [1, 2],
    ):
        ok = sel.on_state("peer", bad)
        assert ok is (bad is None)
    assert sel.stats["bad_values"] == 8
    assert list(sel.candidates()) == ["me"]
    assert sel.i_hold()
    sel.on_state("peer", encode_capability("s1"))
    sel.on_member("peer", A)
    assert list(sel.candidates()) == ["me", "peer"]
    sel.on_reaped("peer")
    assert list(sel.candidates()) == ["me"]


def test_not_capable_never_holds() -> None:
    sel = UplinkSelector("me")
    sel.on_state("peer", encode_capability("s1"))
    sel.on_member("peer", A)
    assert not sel.i_hold()
    assert sel.holder() is None
    assert sel.holder("s1") == "peer"


def test_decode_capability_is_total() -> None:
    rng = random.Random(3)
    accepted = refused = 0
    for _ in range(2000):
        value = rng.choice(
            [
                {
                    "v": rng.randrange(3),
                    "site": rng.choice(["s", "", 5, None, "é" * rng.randrange(70)]),
                },
                rng.randbytes(4),
                rng.random(),
                [rng.random()],
                {"site": "s"},
            ]
        )
        try:
            decoded = decode_capability(value)
        except UplinkSelectError:
            refused += 1
        else:
            assert decoded == value["site"]  # type: ignore[index]
            accepted += 1
    assert accepted > 30 and refused > 1000
    with pytest.raises(UplinkSelectError):
        encode_capability("")


# -- reachability levels: only agents that reach the cloud hold (issue 11) -------------------


def test_reach_hysteresis() -> None:
    r = Reach(down_after=3, up_after=2)
    assert r.failure() == 0 and r.failure() == 0  # never reached: stays 0
    assert r.success() == 2  # the first success ever: up
    assert r.failure() == 2 and r.failure() == 2  # one or two failures do not withdraw
    assert r.success() == 2 and r.failure() == 2 and r.failure() == 2
    assert r.failure() == 1  # three in a row do
    assert r.success() == 1  # back up only after two successes in a row
    assert r.failure() == 1 and r.success() == 1  # the run of successes starts again
    assert r.success() == 2
    for _ in range(3):
        r.failure()
    assert r.level == 1 and r.success(holding=True) == 2  # a connected holder: at once
    assert r.failure(conclusive=True) == 1  # a failed probe before a takeover: at once
    for _ in range(10):
        assert r.failure() == 1  # never back to 0 in a run


def test_holder_is_the_best_reachable_candidate_then_by_score() -> None:
    names = ["a", "b", "c"]
    top, mid, low = sorted(names, key=lambda n: score("s1", n), reverse=True)
    capable, states = view(names)
    assert choose_holder("s1", capable, states) == top  # no levels: 2 each (older agents)
    assert choose_holder("s1", capable, states, {top: 0, mid: 0, low: 2}) == low
    assert choose_holder("s1", capable, states, {top: 0, mid: 1, low: 1}) == mid
    assert choose_holder("s1", capable, states, {top: 1, mid: 1, low: 1}) == top
    assert choose_holder("s1", capable, {**states, low: D}, {top: 0, mid: 0, low: 2}) == top


def _mesh(names: list[str]) -> dict[str, UplinkSelector]:
    sels = {n: UplinkSelector(n, "s1") for n in names}
    for sel in sels.values():
        for other in names:
            sel.on_member(other, A)
    return sels


def _advertise(sels: dict[str, UplinkSelector], name: str, level: int) -> None:
    for sel in sels.values():
        if sel.local == name:
            sel.set_local_level(level)
        else:
            assert sel.on_state(name, encode_capability("s1", level))


def test_only_the_agent_with_a_route_holds_also_through_a_cloud_outage() -> None:
    """The namespace test's story on views: the top scorer never reaches the cloud, the lowest
    does; the lowest holds, and keeps holding (level 1) while the cloud is down for all."""
    names = [f"n{i}" for i in range(5)]
    ranked = sorted(names, key=lambda n: score("s1", n))
    low, top = ranked[0], ranked[-1]
    sels = _mesh(names)
    reach = {n: Reach() for n in names}
    for n in names:
        _advertise(sels, n, reach[n].level)  # 0 everywhere: the top scorer holds
    assert {s.holder() for s in sels.values()} == {top}
    for _ in range(2):  # probes: only `low` gets through
        for n in names:
            _advertise(sels, n, reach[n].success() if n == low else reach[n].failure())
    assert {s.holder() for s in sels.values()} == {low} and sels[low].i_hold()
    for _ in range(5):  # the cloud is down for everyone
        for n in names:
            _advertise(sels, n, reach[n].failure())
    assert reach[low].level == 1 and {s.holder() for s in sels.values()} == {low}


def test_hostile_levels_are_dropped() -> None:
    sel = UplinkSelector("me", "s1")
    for bad in (True, 3, -1, "2", None, 1.0, [2]):
        assert not sel.on_state("peer", {"v": 1, "site": "s1", "up": bad})
    assert sel.stats["bad_values"] == 7 and list(sel.candidates()) == ["me"]
    with pytest.raises(UplinkSelectError):
        encode_capability("s1", 5)
    with pytest.raises(UplinkSelectError):
        sel.set_local_level(-1)
