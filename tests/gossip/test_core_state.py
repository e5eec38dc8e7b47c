"""Replicated per-node state through the core: gossip, push-pull, restart, limits."""

from __future__ import annotations

import random

import pytest

from gossip.config import lan
from gossip.core import (
    PENDING_STATE_MAX,
    PENDING_STATE_MEMORY,
    PENDING_STATE_TTL,
    InvalidArgument,
    Membership,
)
from gossip.errors import BroadcastTooLarge
from gossip.events import StateChanged
from gossip.messages import Ack, Alive, StateEntry, StateUpdate
from gossip.state_store import StateStore
from testbed.sim import Simulator, drain_events, make_keyring, seal, sent

SRC = ("10.0.9.9", 7946)


def test_set_state_reaches_every_member_with_one_event_each() -> None:
    sim = Simulator(11, lan(), loss=0.05, record_events=True)
    names = sim.converge_cluster(8, width=1)
    sim.call("n3", lambda m, now: m.set_state("svc", {"port": 5683}, now))
    assert sim.wait_for(lambda: all(sim.nodes[n].core.state_of("n3") == {"svc": {"port": 5683}} for n in names), 10.0)
    sim.run_for(10.0)
    for name in names:
        if name != "n3":
            changes = [e for e in sim.events_of(name, StateChanged) if e.owner == "n3"]
            assert len(changes) == 1 and changes[0].key == "svc" and changes[0].version == 1


def test_delete_state_spreads_a_tombstone() -> None:
    sim = Simulator(12, lan(), record_events=True)
    names = sim.converge_cluster(4, width=1)
    sim.call("n1", lambda m, now: m.set_state("a", 1, now))
    sim.call("n1", lambda m, now: m.set_state("b", 2, now))
    sim.run_for(5.0)
    sim.call("n1", lambda m, now: m.delete_state("a", now))
    assert sim.wait_for(lambda: all(sim.nodes[n].core.state_of("n1") == {"b": 2} for n in names), 10.0)
    deletions = [e for e in sim.events_of("n0", StateChanged) if e.deleted]
    assert [(e.owner, e.key, e.version) for e in deletions] == [("n1", "a", 3)]


def test_push_pull_brings_a_joining_node_every_map() -> None:
    sim = Simulator(13, lan())
    names = sim.converge_cluster(4, width=1)
    for name in names:
        sim.call(name, lambda m, now, name=name: m.set_state("who", name, now))
    sim.run_for(10.0)  # the gossip has died out: only push-pull can teach a newcomer
    late = sim.add_node("late", join=["n0"]).core
    sim.run_for(0.1)
    assert all(late.state_of(n) == {"who": n} for n in names)


def test_restarted_owner_reasserts_its_map_over_what_the_cluster_remembers() -> None:
    sim = Simulator(14, lan())
    names = sim.converge_cluster(4, width=1)
    sim.call("n2", lambda m, now: m.set_state("old", "x", now))
    sim.call("n2", lambda m, now: m.set_state("keep", "v1", now))
    sim.call("n2", lambda m, now: m.set_state("keep", "v2", now))
    sim.run_for(5.0)
    sim.crash("n2")
    sim.run_for(1.0)
    fresh = sim.restart("n2", join=[]).core  # incarnation + 1; state_version starts at 0 again
    sim.call("n2", lambda m, now: m.set_state("keep", "new", now))
    sim.call("n2", lambda m, now: m.join([sim.nodes["n0"].addr], now))
    want = {"keep": "new"}
    assert sim.wait_for(lambda: all(sim.nodes[n].core.state_of("n2") == want for n in names), 20.0)
    assert fresh.state_of("n2") == want
    assert fresh._store.version > 3


def test_state_over_budget_is_refused_locally() -> None:
    core = Membership("a", ("10.0.0.1", 7946), lan(max_state_bytes=200), random.Random(1), 0.0,
                      keyring=make_keyring(random.Random(1)))
    core.set_state("k1", "x" * 100, 0.0)
    with pytest.raises(BroadcastTooLarge):
        core.set_state("k2", "y" * 120, 0.0)
    assert core.state_of("a") == {"k1": "x" * 100}


def test_state_entry_too_big_for_a_datagram_is_refused() -> None:
    core = Membership("a", ("10.0.0.1", 7946), lan(), random.Random(1), 0.0,
                      keyring=make_keyring(random.Random(1)))
    with pytest.raises(BroadcastTooLarge):
        core.set_state("big", "z" * 1500, 0.0)
    assert core.state_of("a") == {}


def test_state_value_the_wire_cannot_carry_is_a_local_error() -> None:
    core = Membership("a", ("10.0.0.1", 7946), lan(), random.Random(1), 0.0,
                      keyring=make_keyring(random.Random(1)))
    with pytest.raises(InvalidArgument):
        core.set_state("k", {1: "non-str map key"}, 0.0)  # type: ignore[dict-item]


def test_remote_update_over_budget_is_rejected_and_counted() -> None:
    core = Membership("a", ("10.0.0.1", 7946), lan(max_state_bytes=200), random.Random(1), 0.0,
                      keyring=make_keyring(random.Random(1)))
    core.receive(seal([Alive("b", 1, SRC, b"")], to=core.name), SRC, 0.0)
    core.receive(seal([StateUpdate("b", 1, "k", "x" * 100)], to=core.name), SRC, 0.1)
    core.receive(seal([StateUpdate("b", 2, "j", "y" * 150)], to=core.name), SRC, 0.2)
    assert core.state_of("b") == {"k": "x" * 100}
    assert core.stats.state_rejected == 1


def test_stale_and_duplicate_updates_change_nothing() -> None:
    core = Membership("a", ("10.0.0.1", 7946), lan(), random.Random(1), 0.0,
                      keyring=make_keyring(random.Random(1)))
    core.receive(seal([Alive("b", 1, SRC, b"")], to=core.name), SRC, 0.0)
    core.receive(seal([StateUpdate("b", 5, "k", "new")], to=core.name), SRC, 0.1)
    core.receive(seal([StateUpdate("b", 3, "k", "old"), StateUpdate("b", 5, "k", "new")], to=core.name), SRC, 0.2)
    assert core.state_of("b") == {"k": "new"}
    assert [e for e in drain_events(core) if isinstance(e, StateChanged)] == [StateChanged("b", "k", "new", 5, False)]


def _core(name: str = "a") -> Membership:
    return Membership(name, ("10.0.0.1", 7946), lan(), random.Random(1), 0.0, keyring=make_keyring(random.Random(1)))


def test_update_about_an_unknown_owner_is_kept_until_its_alive_arrives() -> None:
    core = _core()
    core.receive(seal([StateUpdate("ghost", 1, "k", 1)], to=core.name), SRC, 0.0)
    assert core.state_of("ghost") == {}
    assert core.stats.pending_state == 1 and core.stats.dropped == 0
    drain_events(core)
    core.receive(seal([Alive("ghost", 1, SRC, b"")], to=core.name), SRC, 1.0)
    assert core.state_of("ghost") == {"k": 1}
    assert StateChanged("ghost", "k", 1, 1, False) in drain_events(core)


def test_update_about_an_unknown_owner_expires() -> None:
    core = _core()
    core.receive(seal([StateUpdate("ghost", 1, "k", 1)], to=core.name), SRC, 0.0)
    core.receive(seal([StateUpdate("other", 1, "k", 1)], to=core.name), SRC, PENDING_STATE_TTL + 0.1)  # expires the first
    assert core.stats.dropped == 1
    core.receive(seal([Alive("ghost", 1, SRC, b"")], to=core.name), SRC, PENDING_STATE_TTL + 0.2)
    assert core.state_of("ghost") == {}


def test_updates_about_unknown_owners_are_bounded_in_count_and_memory() -> None:
    core = _core()
    for i in range(PENDING_STATE_MAX + 10):
        core.receive(seal([StateUpdate(f"ghost{i}", 1, "k", i)], to=core.name), SRC, 0.0)
    assert core.stats.dropped == 10
    big = "x" * 3000
    for i in range(PENDING_STATE_MAX):
        core.receive(seal([StateUpdate(f"big{i}", 1, "k", big)], to=core.name), SRC, 0.0)
    assert core._pending_memory <= PENDING_STATE_MEMORY
    assert len(core._pending_state) < PENDING_STATE_MAX
    # The oldest went first: the earliest ghosts are gone, the newest big one is kept.
    core.receive(seal([Alive(f"big{PENDING_STATE_MAX - 1}", 1, SRC, b""), Alive("ghost0", 1, SRC, b"")], to=core.name), SRC, 0.1)
    assert core.state_of(f"big{PENDING_STATE_MAX - 1}") == {"k": big}
    assert core.state_of("ghost0") == {}


def test_set_state_with_an_unchanged_value_is_a_no_op() -> None:
    core = _core()
    core.set_state("k", {"a": [1, 2]}, 0.0)
    version, queued = core._store.version, core.pending_broadcasts
    core.set_state("k", {"a": [1, 2]}, 1.0)
    assert core._store.version == version and core.pending_broadcasts == queued
    core.set_state("k", {"a": [1, 3]}, 2.0)
    assert core._store.version == version + 1
    core.delete_state("k", 3.0)
    core.set_state("k", None, 4.0)  # a value None after a delete is a change (the key comes back)
    assert core._store.version == version + 3


def test_rebroadcast_state_keeps_the_version() -> None:
    core = _core()
    core.set_state("k", 1, 0.0)
    for i in range(40):  # retire every queued update by sending it out (to 40 members: one
        core._send(("10.0.0.2", 7946), f"b{i}", [Ack(i, "a")])  # that holds it is skipped)
    assert core.pending_broadcasts == 0
    version = core._store.version
    core.rebroadcast_state("k", 50.0)
    core.rebroadcast_state("missing", 50.0)
    assert core.pending_broadcasts == 1 and core._store.version == version
    core._send(("10.0.0.2", 7946), "b", [Ack(99, "a")])
    updates = [m for _, msgs in sent(core) for m in msgs if isinstance(m, StateUpdate)]
    assert updates[-1] == StateUpdate("a", version, "k", 1)


def test_update_about_us_from_an_earlier_life_is_overridden() -> None:
    core = Membership("a", ("10.0.0.1", 7946), lan(), random.Random(1), 0.0,
                      keyring=make_keyring(random.Random(1)))
    core.set_state("k", "mine", 0.0)
    sent(core)
    core.receive(seal([Alive("b", 1, SRC, b"")], to=core.name), SRC, 0.0)
    core.receive(seal([StateUpdate("a", 7, "gone", "ghost")], to=core.name), SRC, 0.1)
    assert core.state_of("a") == {"k": "mine"}
    assert core._store.version == 9  # jumped past 7, re-stamped "k" (8) and tombstoned "gone" (9)
    core.handle_timeout(1.0)
    updates = [m for _, msgs in sent(core) for m in msgs if isinstance(m, StateUpdate)]
    assert StateUpdate("a", 8, "k", "mine") in updates
    assert StateUpdate("a", 9, "gone", None, True) in updates


class TestStateStore:
    def test_newest_version_wins_per_key_in_any_order(self) -> None:
        entries = [StateEntry("k", v, f"v{v}") for v in (3, 1, 4, 2)]
        a = StateStore("a", 4096)
        b = StateStore("b", 4096)
        a.merge("o", entries)
        b.merge("o", list(reversed(entries)))
        assert a.values("o") == b.values("o") == {"k": "v4"}

    def test_whole_remote_map_over_budget_is_rejected(self) -> None:
        store = StateStore("a", 100)
        assert store.merge("o", [StateEntry(f"k{i}", i + 1, "x" * 20) for i in range(5)]) == []
        assert store.rejected == 1 and store.values("o") == {}

    def test_tombstone_blocks_an_older_value(self) -> None:
        store = StateStore("a", 4096)
        store.merge("o", [StateEntry("k", 2, None, True)])
        store.merge("o", [StateEntry("k", 1, "resurrected")])
        assert store.values("o") == {}

    def test_own_entry_echoed_back_needs_no_correction(self) -> None:
        store = StateStore("a", 4096)
        update = store.set_local("k", [1, 2])
        assert store.reconcile_own([StateEntry("k", update.version, [1, 2])]) == []
        assert store.reconcile_own([StateEntry("k", update.version, (1, 2))]) == []  # tuple == list on the wire

    def test_forget_drops_a_reaped_owner(self) -> None:
        store = StateStore("a", 4096)
        store.merge("o", [StateEntry("k", 1, 1)])
        store.forget("o")
        assert store.values("o") == {} and store.snapshot() == ()
