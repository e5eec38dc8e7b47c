"""Broadcast queue: order, supersession, retransmit limit, budget packing, bound."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gossip.broadcast_queue import (
    PRIORITY_MEMBERSHIP,
    PRIORITY_STATE,
    PRIORITY_USER,
    BroadcastQueue,
    retransmit_limit,
)
from gossip.messages import Ack, Alive, Dead, Message, StateUpdate, Suspect, UserBroadcast

BIG = 10_000
LIMIT = 3


def msg(i: int) -> Message:
    return Ack(i, "n")


def test_membership_goes_before_state_before_user() -> None:
    q = BroadcastQueue(10)
    user = UserBroadcast("o", 1, b"x")
    state = StateUpdate("o", 1, "k", 1)
    alive = Alive("a", 1, ("h", 1), b"")
    q.push(user, key=None, priority=PRIORITY_USER, size=10)
    q.push(state, key=("state", "o", "k"), priority=PRIORITY_STATE, size=10)
    q.push(alive, key=("member", "a"), priority=PRIORITY_MEMBERSHIP, size=10)
    assert q.take(BIG, LIMIT) == [alive, state, user]


def test_less_transmitted_goes_first_within_a_class() -> None:
    q = BroadcastQueue(10)
    q.push(msg(1), key=None, priority=0, size=10)
    assert q.take(BIG, LIMIT) == [msg(1)]  # msg(1) now sent once
    q.push(msg(2), key=None, priority=0, size=10)
    assert q.take(BIG, LIMIT) == [msg(2), msg(1)]


def test_newest_first_among_equally_transmitted() -> None:
    q = BroadcastQueue(10)
    for i in range(3):
        q.push(msg(i), key=None, priority=0, size=10)
    assert q.take(BIG, LIMIT) == [msg(2), msg(1), msg(0)]
    # After one send each they stay newest first.
    assert q.take(BIG, LIMIT) == [msg(2), msg(1), msg(0)]


def test_newer_update_about_the_same_member_supersedes_the_queued_one() -> None:
    q = BroadcastQueue(10)
    q.push(Suspect("a", 1, "b"), key=("member", "a"), priority=0, size=10)
    q.push(Alive("b", 1, ("h", 1), b""), key=("member", "b"), priority=0, size=10)
    q.push(Dead("a", 1, "c"), key=("member", "a"), priority=0, size=10)
    assert len(q) == 2
    assert q.take(BIG, LIMIT) == [Dead("a", 1, "c"), Alive("b", 1, ("h", 1), b"")]


def test_superseding_item_starts_again_with_zero_transmits() -> None:
    q = BroadcastQueue(10)
    q.push(msg(1), key="k", priority=0, size=10)
    q.take(BIG, 2)
    q.push(msg(2), key="k", priority=0, size=10)
    assert q.take(BIG, 2) == [msg(2)]
    assert q.take(BIG, 2) == [msg(2)]
    assert q.take(BIG, 2) == []


def test_items_without_a_key_never_supersede() -> None:
    q = BroadcastQueue(10)
    q.push(msg(1), key=None, priority=0, size=10)
    q.push(msg(1), key=None, priority=0, size=10)
    assert len(q) == 2


def test_item_is_retired_after_retransmit_limit_sends() -> None:
    q = BroadcastQueue(10)
    q.push(msg(1), key="k", priority=0, size=10)
    sent = [q.take(BIG, LIMIT) for _ in range(LIMIT + 2)]
    assert sent == [[msg(1)]] * LIMIT + [[], []]
    assert len(q) == 0


def test_limit_zero_still_sends_once_as_memberlist_does() -> None:
    q = BroadcastQueue(10)
    q.push(msg(1), key=None, priority=0, size=10)
    assert q.take(BIG, 0) == [msg(1)]
    assert len(q) == 0


def test_retired_key_can_be_pushed_again() -> None:
    q = BroadcastQueue(10)
    q.push(msg(1), key="k", priority=0, size=10)
    q.take(BIG, 1)
    q.push(msg(2), key="k", priority=0, size=10)
    assert q.take(BIG, 1) == [msg(2)]


def test_budget_skips_items_that_do_not_fit_and_packs_smaller_ones() -> None:
    q = BroadcastQueue(10)
    q.push(msg(1), key=None, priority=0, size=30)
    q.push(msg(2), key=None, priority=0, size=80)  # too big after msg(3)
    q.push(msg(3), key=None, priority=0, size=50)
    assert q.take(100, LIMIT) == [msg(3), msg(1)]
    # The skipped item keeps its zero transmit count and goes first next time.
    assert q.take(100, LIMIT) == [msg(2)]


def test_taken_sizes_never_exceed_the_budget() -> None:
    q = BroadcastQueue(100)
    sizes = {i: 7 + (i * 37) % 90 for i in range(60)}
    for i, size in sizes.items():
        q.push(msg(i), key=None, priority=i % 3, size=size)
    for budget in (0, 5, 50, 200, 1000):
        taken = q.take(budget, LIMIT)
        assert sum(sizes[m.seq] for m in taken if isinstance(m, Ack)) <= budget


def test_empty_queue_and_zero_budget_give_nothing() -> None:
    q = BroadcastQueue(10)
    assert q.take(BIG, LIMIT) == []
    q.push(msg(1), key=None, priority=0, size=10)
    assert q.take(0, LIMIT) == []
    assert len(q) == 1


def test_over_the_bound_the_item_sent_last_is_dropped_and_counted() -> None:
    q = BroadcastQueue(3)
    q.push(msg(1), key=None, priority=PRIORITY_MEMBERSHIP, size=10)
    q.push(msg(2), key=None, priority=PRIORITY_USER, size=10)
    q.push(msg(3), key=None, priority=PRIORITY_USER, size=10)
    q.push(msg(4), key=None, priority=PRIORITY_STATE, size=10)
    assert q.dropped == 1 and len(q) == 3
    assert q.take(BIG, LIMIT) == [msg(1), msg(4), msg(3)]  # oldest user item (2) went


def test_over_the_bound_most_transmitted_goes_before_fresh_in_a_class() -> None:
    q = BroadcastQueue(2)
    q.push(msg(1), key=None, priority=0, size=10)
    q.take(BIG, LIMIT)
    q.push(msg(2), key=None, priority=0, size=10)
    q.push(msg(3), key=None, priority=0, size=10)
    assert q.dropped == 1
    assert q.take(BIG, LIMIT) == [msg(3), msg(2)]


def test_a_new_low_priority_item_is_dropped_when_urgent_ones_fill_the_queue() -> None:
    q = BroadcastQueue(2)
    q.push(msg(1), key=None, priority=PRIORITY_MEMBERSHIP, size=10)
    q.push(msg(2), key=None, priority=PRIORITY_MEMBERSHIP, size=10)
    q.push(msg(3), key=None, priority=PRIORITY_USER, size=10)
    assert q.dropped == 1
    assert q.take(BIG, LIMIT) == [msg(2), msg(1)]


def test_reset_forgets_everything() -> None:
    q = BroadcastQueue(10)
    q.push(msg(1), key="k", priority=0, size=10)
    q.reset()
    assert len(q) == 0 and q.take(BIG, LIMIT) == []
    q.push(msg(2), key="k", priority=0, size=10)
    assert q.take(BIG, LIMIT) == [msg(2)]


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError):
        BroadcastQueue(0)
    with pytest.raises(ValueError):
        BroadcastQueue(1).push(msg(1), key=None, priority=0, size=-1)
    with pytest.raises(ValueError):
        retransmit_limit(4, -1)


@pytest.mark.parametrize(
    ("n", "expected"),
    [(0, 0), (1, 4), (9, 4), (10, 8), (99, 8), (100, 12), (999, 12), (1000, 16), (10**6, 28)],
)
def test_retransmit_limit_is_mult_times_ceil_log10_of_n_plus_one(n: int, expected: int) -> None:
    assert retransmit_limit(4, n) == expected


def test_retransmit_limit_matches_the_float_formula() -> None:
    for n in range(100_000):
        assert retransmit_limit(3, n) == 3 * math.ceil(math.log10(n + 1)), n


# --- Against a naive model that re-sorts everything -----------------------------------


@dataclass
class ModelItem:
    ident: int
    msg: Message
    key: Any
    priority: int
    size: int
    transmits: int = 0


@dataclass
class Model:
    max_items: int
    items: list[ModelItem] = field(default_factory=list)
    dropped: int = 0
    next_id: int = 0

    def push(self, m: Message, key: Any, priority: int, size: int) -> None:
        if key is not None:
            self.items = [i for i in self.items if i.key != key]
        self.items.append(ModelItem(self.next_id, m, key, priority, size))
        self.next_id += 1
        while len(self.items) > self.max_items:
            worst = max(self.items, key=lambda i: (i.priority, i.transmits, -i.ident))
            self.items.remove(worst)
            self.dropped += 1

    def take(self, budget: int, limit: int) -> list[Message]:
        picked = []
        for item in sorted(self.items, key=lambda i: (i.priority, i.transmits, -i.ident)):
            if item.size <= budget:
                picked.append(item)
                budget -= item.size
        for item in picked:
            item.transmits += 1
            if item.transmits >= limit:
                self.items.remove(item)
        return [i.msg for i in picked]


operations = st.lists(
    st.one_of(
        st.tuples(
            st.just("push"),
            st.none() | st.integers(0, 6),
            st.integers(0, 2),
            st.integers(1, 60),
        ),
        st.tuples(st.just("take"), st.integers(0, 200), st.integers(0, 4)),
    ),
    max_size=80,
)


@given(st.integers(1, 12), operations)
@settings(max_examples=300, deadline=None)
def test_queue_behaves_like_the_naive_sorted_model(max_items: int, ops: list[Any]) -> None:
    q = BroadcastQueue(max_items)
    model = Model(max_items)
    for n, op in enumerate(ops):
        if op[0] == "push":
            _, key, priority, size = op
            q.push(msg(n), key=key, priority=priority, size=size)
            model.push(msg(n), key, priority, size)
        else:
            _, budget, limit = op
            assert q.take(budget, limit) == model.take(budget, limit)
        assert len(q) == len(model.items)
        assert q.dropped == model.dropped


def test_an_item_is_skipped_for_a_holder_and_retired_once_every_peer_holds_it() -> None:
    q = BroadcastQueue(10)
    q.push(UserBroadcast("o", 1, b"x"), key="k", priority=0, size=10, known=("a",))
    assert q.take(100, 8, to="a", peers=3) == []  # a holds it: not sent, not counted
    assert len(q.take(100, 8, to="b", peers=3)) == 1  # b now holds it too
    q.heard("k", UserBroadcast("o", 1, b"x"), "c")
    q.heard("k", UserBroadcast("o", 2, b"y"), "d")  # another update: says nothing about ours
    assert q.take(100, 8, to="d", peers=3) == [] and len(q) == 0  # a, b, c: all three peers
    assert q.retired_known == 1


def test_a_holder_that_is_gone_does_not_count_towards_every_peer() -> None:
    q = BroadcastQueue(10)
    q.push(UserBroadcast("o", 1, b"x"), key="k", priority=0, size=10, known=("a", "gone"))
    assert len(q.take(100, 8, to="b", peers=3, live=lambda n: n != "gone")) == 1
    assert len(q) == 1  # a and b of the three live peers: c still lacks it


def test_a_repeat_heard_counts_as_a_send_once_we_sent_it_ourselves_twice() -> None:
    """Rumour-mongering feedback (issue 13): repeats heard retire an update sooner, but
    only after MIN_SENT sends of our own."""
    q = BroadcastQueue(10)
    x = UserBroadcast("o", 1, b"x")
    q.push(x, key="k", priority=0, size=10, feedback=True)
    for name in "abcdefgh":  # eight repeats: the limit, but we have not sent it yet
        q.heard("k", x, name)
    assert len(q) == 1
    assert q.take(100, 8) == [x]  # sent once: still below MIN_SENT
    assert q.take(100, 8) == [x]  # twice: now spent
    assert len(q) == 0 and q.retired_heard == 0


def test_repeats_heard_after_our_sends_retire_it_unsent() -> None:
    q = BroadcastQueue(10)
    x = UserBroadcast("o", 1, b"x")
    q.push(x, key="k", priority=0, size=10, feedback=True)
    assert q.take(100, 8) == [x] and q.take(100, 8) == [x]  # 2 of 8
    for name in "abcde":
        q.heard("k", x, name)  # 7 of 8
    assert q.take(100, 8) == [x]  # 8 of 8: retired after this send
    assert len(q) == 0
    q.push(x, key="k", priority=0, size=10, feedback=True)
    assert q.take(100, 4) == [x] and q.take(100, 4) == [x]
    for name in "abc":
        q.heard("k", x, name)  # 5 of 4: over the limit before the next send
    assert q.take(100, 4) == [] and len(q) == 0 and q.retired_heard == 1


def test_a_different_update_heard_counts_nothing() -> None:
    q = BroadcastQueue(10)
    x = UserBroadcast("o", 1, b"x")
    q.push(x, key="k", priority=0, size=10, feedback=True)
    q.take(100, 3), q.take(100, 3)
    for name in "abc":
        q.heard("k", UserBroadcast("o", 2, b"y"), name)
    assert q.take(100, 3) == [x]  # the third send is ours to make


def test_a_repeat_counts_nothing_without_feedback() -> None:
    """Only news of a start is pushed with feedback: a refutation or a Suspect goes out the
    full limit however often it comes back."""
    q = BroadcastQueue(10)
    x = UserBroadcast("o", 1, b"x")
    q.push(x, key="k", priority=0, size=10)
    q.take(100, 3), q.take(100, 3)
    for name in "abc":
        q.heard("k", x, name)
    assert q.take(100, 3) == [x]
