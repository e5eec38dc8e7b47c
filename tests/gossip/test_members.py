"""members.can_change: the one rule for which news about a member wins, rule by rule."""

from __future__ import annotations

import random

import pytest

from gossip.members import MemberTable, Node, can_change
from gossip.messages import MemberState

ALIVE, SUSPECT, DEAD, LEFT = MemberState.ALIVE, MemberState.SUSPECT, MemberState.DEAD, MemberState.LEFT
ALL = (ALIVE, SUSPECT, DEAD, LEFT)


@pytest.mark.parametrize("held", ALL)
def test_alive_replaces_any_state_only_at_a_newer_incarnation(held: MemberState) -> None:
    assert can_change(held, 3, ALIVE, 4)
    assert not can_change(held, 3, ALIVE, 3)
    assert not can_change(held, 3, ALIVE, 2)


def test_suspect_replaces_alive_at_the_same_or_newer_incarnation() -> None:
    assert can_change(ALIVE, 3, SUSPECT, 3) and can_change(ALIVE, 3, SUSPECT, 4)
    assert not can_change(ALIVE, 3, SUSPECT, 2)


def test_suspect_replaces_a_suspicion_only_at_a_newer_incarnation() -> None:
    assert can_change(SUSPECT, 3, SUSPECT, 4)  # the old suspicion was refuted
    assert not can_change(SUSPECT, 3, SUSPECT, 3)  # a confirmation, not a change
    assert not can_change(SUSPECT, 3, SUSPECT, 2)


@pytest.mark.parametrize("held", [DEAD, LEFT])
def test_suspect_never_replaces_a_gone_member(held: MemberState) -> None:
    assert not can_change(held, 3, SUSPECT, 9)


@pytest.mark.parametrize("held", [ALIVE, SUSPECT])
def test_dead_and_left_replace_a_live_member_unless_older(held: MemberState) -> None:
    for incoming in (DEAD, LEFT):
        assert can_change(held, 3, incoming, 3) and can_change(held, 3, incoming, 4)
        assert not can_change(held, 3, incoming, 2)


def test_a_leave_is_recorded_over_a_death_never_the_reverse() -> None:
    assert can_change(DEAD, 3, LEFT, 3)
    assert not can_change(DEAD, 3, LEFT, 2)
    assert not can_change(LEFT, 3, DEAD, 9)
    assert not can_change(DEAD, 3, DEAD, 9)
    assert not can_change(LEFT, 3, LEFT, 9)


def test_table_keeps_counts_and_the_random_pick_index_in_step() -> None:
    me = Node("me", ("10.0.0.1", 7946), 0, ALIVE, b"", 0.0)
    table = MemberTable(me)
    nodes = [table.add(f"p{i}", (f"10.0.1.{i}", 7946), 0, b"", 0.0) for i in range(5)]
    table.set_state(nodes[1], DEAD, 1.0)
    table.remove(nodes[0])
    assert len(table) == 5 and table.n_estimate() == 4 and table.counts == [3, 0, 1, 0]
    assert all(table.others[i].index == i for i in range(len(table.others)))
    picked = table.k_random(10, lambda n: n.state == ALIVE, random.Random(1))
    assert sorted(n.name for n in picked) == ["p2", "p3", "p4"]
