"""Anti-replay: the per-sender boot epoch and counter window (gossip/replay.py) and the core's use of it."""

from __future__ import annotations

import random
from typing import Any

import msgpack
from hypothesis import given, settings
from hypothesis import strategies as st

from gossip.codec import (
    MAX_COUNTER,
    MAX_UINT64,
    PROTOCOL_VERSION,
    DatagramHeader,
    decode_datagram,
    destination_tag,
)
from gossip.config import lan
from gossip.core import REPLAY_SPARE_SENDERS, Membership
from gossip.errors import DecodeError
from gossip.members import ALIVE
from gossip.messages import Ack, Alive, Message, StateUpdate, UserBroadcast
from gossip.replay import WINDOW_BITS, ReplayGuard, Window
from testbed.sim import TEST_AAD, Simulator, make_keyring, seal

B = ("10.0.0.2", 7946)
TO_A = destination_tag("a")  # make_core's name


def make_core(**overrides: Any) -> Membership:
    return Membership(
        "a", ("10.0.0.1", 7946), lan(**overrides), random.Random(1), 0.0, keyring=make_keyring(random.Random(1))
    )


def from_b(core: Membership, epoch: int, counter: int, msgs: list[Message], now: float = 0.0) -> None:
    core.receive(seal(msgs, header=DatagramHeader("b", epoch, counter, TO_A)), B, now)


# --- The window -----------------------------------------------------------------------


def test_in_order_counters_are_fresh_and_repeats_are_not() -> None:
    w = Window(1, 0)
    assert [w.accept(1, c) for c in (1, 2, 3)] == [True, True, True]
    assert [w.accept(1, c) for c in (0, 1, 2, 3)] == [False, False, False, False]


def test_reordering_inside_the_window_is_accepted_once() -> None:
    w = Window(1, 10)
    assert w.accept(1, 8) and w.accept(1, 9) and w.accept(1, 5)
    assert not w.accept(1, 8) and not w.accept(1, 5)
    assert w.accept(1, 7)


def test_window_edges() -> None:
    w = Window(1, 100)
    assert w.accept(1, 100 - (WINDOW_BITS - 1))  # the oldest counter the window still holds
    assert not w.accept(1, 100 - WINDOW_BITS)  # one further left: too old to tell, dropped
    assert not w.accept(1, 0)
    # A jump of exactly the window width forgets every bit; one less keeps the top's.
    w = Window(1, 0)
    assert w.accept(1, WINDOW_BITS - 1)
    assert not w.accept(1, 0)  # offset 63: still marked
    w = Window(1, 0)
    assert w.accept(1, WINDOW_BITS)
    assert not w.accept(1, 0)  # offset 64: left of the window
    assert w.accept(1, 1)  # offset 63, never seen
    big = Window(1, 5)
    assert big.accept(1, MAX_UINT64) and not big.accept(1, MAX_UINT64) and big.accept(1, MAX_UINT64 - 63)


def test_a_higher_epoch_starts_over_and_an_older_one_is_refused() -> None:
    w = Window(3, 1000)
    assert w.accept(4, 0)  # restarted: its counter starts again at 0
    assert w.accept(4, 1)
    assert not w.accept(3, 1001)  # the previous life, however new its counter
    assert not w.accept(4, 0)
    assert w.accept(MAX_COUNTER, 0)


@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 200)), max_size=300))
@settings(max_examples=300, deadline=None)
def test_window_matches_a_model_that_remembers_everything(datagrams: list[tuple[int, int]]) -> None:
    """Fresh iff newer epoch, or same epoch, never seen and within 63 of the highest."""
    window: Window | None = None
    seen: set[tuple[int, int]] = set()
    best = (-1, -1)  # (epoch, highest counter in it)
    for epoch, counter in datagrams:
        if epoch > best[0]:
            expected = True
        elif epoch < best[0]:
            expected = False
        else:
            expected = (epoch, counter) not in seen and counter > best[1] - WINDOW_BITS
        if window is None:
            window, got = Window(epoch, counter), True
        else:
            got = window.accept(epoch, counter)
        assert got == expected, (epoch, counter)
        if got:
            seen.add((epoch, counter))
            best = (epoch, counter) if epoch > best[0] else (epoch, max(best[1], counter))


def test_guard_is_bounded_and_forgets_the_least_recently_heard() -> None:
    guard = ReplayGuard(3)
    for name in "abc":
        assert guard.accept(name, 1, 0)
    assert guard.accept("a", 1, 1)  # a heard again: b is now the oldest
    assert guard.accept("d", 1, 0)
    assert len(guard) == 3 and "b" not in guard and "a" in guard
    assert guard.accept("b", 1, 0)  # forgotten: its next datagram starts a new window
    guard.forget("c")
    assert "c" not in guard and guard.epoch_of("c") is None and guard.epoch_of("b") == 1


# --- The core ---------------------------------------------------------------------------


def test_a_replayed_datagram_is_dropped_and_counted() -> None:
    core = make_core()
    from_b(core, 1, 0, [Alive("b", 1, B, b"")])
    from_b(core, 1, 1, [StateUpdate("b", 1, "k", "v1")])
    from_b(core, 1, 2, [StateUpdate("b", 2, "k", None, True)])
    assert core.state_of("b") == {}
    from_b(core, 1, 1, [StateUpdate("b", 1, "k", "v1")])  # the capture, replayed
    assert core.state_of("b") == {} and core.stats.replayed == 1
    assert core.stats.decode_errors == 0 and core.stats.dropped == 0


def test_a_replayed_user_broadcast_is_not_delivered_again() -> None:
    core = make_core()
    from_b(core, 1, 0, [Alive("b", 1, B, b""), UserBroadcast("b", 7, b"rotate")])
    delivered = sum(1 for e in iter(core.next_event, None) if type(e).__name__ == "UserMessage")
    core._user_seen.clear()  # as after USER_DEDUP_CAPACITY other broadcasts
    from_b(core, 1, 0, [UserBroadcast("b", 7, b"rotate")])
    again = sum(1 for e in iter(core.next_event, None) if type(e).__name__ == "UserMessage")
    assert (delivered, again) == (1, 0) and core.stats.replayed == 1


def test_a_restarted_sender_with_a_higher_epoch_is_accepted_at_once() -> None:
    core = make_core()
    from_b(core, 1, 5000, [Alive("b", 1, B, b"")])
    from_b(core, 2, 0, [Alive("b", 2, B, b"new")])  # new life, counter back at 0
    member = core.member("b")
    assert member is not None and member.incarnation == 2 and member.meta == b"new"
    from_b(core, 1, 5001, [Alive("b", 3, B, b"old")])  # the old life's, newer counter: refused
    member = core.member("b")
    assert member is not None and member.incarnation == 2 and core.stats.replayed == 1


def test_reordered_datagrams_inside_the_window_all_apply() -> None:
    core = make_core()
    from_b(core, 1, 100, [Alive("b", 1, B, b"")])
    for counter, version in ((98, 1), (99, 2), (40, 3)):
        from_b(core, 1, counter, [StateUpdate("b", version, f"k{version}", version)])
    assert core.state_of("b") == {"k1": 1, "k2": 2, "k3": 3}
    from_b(core, 1, 100 - WINDOW_BITS, [StateUpdate("b", 4, "k4", 4)])  # left of the window
    assert "k4" not in core.state_of("b") and core.stats.replayed == 1


def test_own_datagrams_carry_the_epoch_a_growing_counter_and_the_destination() -> None:
    ring = make_keyring(random.Random(1))
    core = Membership("a", ("10.0.0.1", 7946), lan(), random.Random(1), 0.0, keyring=ring, epoch=9)
    core.receive(seal([Alive("b", 1, B, b""), Alive("c", 1, ("10.0.0.3", 7946), b"")], to="a"), B, 0.0)
    headers = []
    for t in range(1, 30):
        core.handle_timeout(float(t))
        headers += [decode_datagram(ring.decrypt(d, TEST_AAD))[0] for _, d in core.datagrams_to_send()]
    assert len(headers) > 10
    assert [h.counter for h in headers] == list(range(len(headers)))
    assert {(h.sender, h.epoch) for h in headers} == {("a", 9)}
    assert {h.to for h in headers} == {destination_tag("b"), destination_tag("c")}


def test_a_datagram_addressed_to_another_member_is_dropped() -> None:
    core = make_core()
    from_b(core, 1, 0, [Alive("b", 1, B, b"")])
    core.receive(seal([StateUpdate("b", 1, "k", 1)], header=DatagramHeader("b", 1, 1, destination_tag("c"))), B, 0.0)
    assert core.state_of("b") == {} and core.stats.dropped == 1
    from_b(core, 1, 1, [StateUpdate("b", 1, "k", 1)])  # the window was not touched by it
    assert core.state_of("b") == {"k": 1} and core.stats.replayed == 0


def test_an_old_format_datagram_is_a_counted_decode_error() -> None:
    core = make_core()
    ring = make_keyring(random.Random(3))
    v1 = b"\x01" + msgpack.packb([[5, "b", 1, list(B), b""]], use_bin_type=True)  # no header
    core.receive(ring.encrypt(v1, TEST_AAD), B, 0.0)
    assert core.stats.decode_errors == 1 and core.member("b") is None and core.stats.replayed == 0


_odd = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.integers(0, 2**32),
    st.floats(allow_nan=True), st.text(max_size=140), st.binary(max_size=140),
    st.lists(st.integers(-(2**63), 2**63), max_size=3), st.just("a"), st.just(TO_A),
)  # fmt: skip


@given(header=st.lists(_odd, max_size=6))
@settings(max_examples=500, deadline=None)
def test_any_header_is_decoded_or_refused_with_decode_error_and_the_core_survives(header: list[Any]) -> None:
    items = [*header, [2, 1, "b"]]
    plain = bytes((PROTOCOL_VERSION,)) + msgpack.packb(items, use_bin_type=True)
    try:
        decoded, msgs = decode_datagram(plain)
    except DecodeError:
        decoded = None
    else:
        assert type(decoded.sender) is str and 0 < len(decoded.sender.encode()) <= 128
        assert type(decoded.epoch) is int and 0 <= decoded.epoch <= MAX_COUNTER
        assert type(decoded.counter) is int and 0 <= decoded.counter <= MAX_UINT64
        assert type(decoded.to) is int and 0 <= decoded.to < 2**32
        assert msgs == [Ack(1, "b")]
    core = make_core()
    ring = make_keyring(random.Random(4))
    core.receive(ring.encrypt(plain, TEST_AAD), B, 0.0)
    assert core.stats.decode_errors == (decoded is None)


def test_the_sender_table_stays_bounded() -> None:
    core = make_core(max_members=4)
    for i in range(100):
        core.receive(seal([Ack(1, "x")], header=DatagramHeader(f"s{i}", 1, 0, TO_A)), B, 0.0)
    assert len(core._replay) == 2 * 4 + REPLAY_SPARE_SENDERS


# --- In the simulator: captures of real traffic ---------------------------------------------


def capture(sim: Simulator) -> list[tuple[str, tuple[str, int], bytes]]:
    """Every delivered datagram as (sender name, destination, sealed bytes), from now on."""
    log: list[tuple[str, tuple[str, int], bytes]] = []
    sim.on_datagram(lambda now, src, dst, data, fate: log.append((src, dst, data)) if fate == "delivered" else None)
    return log


def carries_alive_of(sim: Simulator, data: bytes, name: str) -> bool:
    ring = make_keyring(random.Random(0), keys=[sim.key])
    _, msgs = decode_datagram(ring.decrypt(data, sim.config.cluster_name.encode()))
    return any(type(m) is Alive and m.name == name for m in msgs)


def test_captured_datagrams_cannot_revive_a_reaped_member() -> None:
    sim = Simulator(11, lan(dead_member_ttl=20.0))
    sim.converge_cluster(4, width=1)
    log = capture(sim)
    sim.call("n3", lambda core, now: core.set_meta(b"v2", now))  # n3 and others spread Alive(n3)
    sim.run_for(5.0)
    sim.leave("n3")
    assert sim.wait_for(lambda: all("n3" not in sim.view(n) for n in ("n0", "n1", "n2")), 60.0)
    alive_n3 = [(src, dst, data) for src, dst, data in log if carries_alive_of(sim, data, "n3")]
    assert any(src == "n3" for src, _, _ in alive_n3) and any(src != "n3" for src, _, _ in alive_n3)
    n0 = sim.nodes["n0"]
    before = n0.core.stats.replayed + n0.core.stats.dropped
    for src, _, data in alive_n3:
        sim.call("n0", lambda core, now, d=data, s=src: core.receive(d, sim.nodes[s].addr, now))
    sim.run_for(10.0)
    assert all("n3" not in sim.view(n) for n in ("n0", "n1", "n2"))
    # Captures of datagrams to n0 fail the window; those to n1 and n2 are not addressed to n0.
    assert n0.core.stats.replayed + n0.core.stats.dropped - before == len(alive_n3)
    assert n0.core.stats.replayed > 0
    assert "n3" in n0.core._replay  # remembered as long as the reaped name is


def test_a_restarted_receiver_that_accepts_a_replay_cannot_spread_the_reaped_member() -> None:
    sim = Simulator(12, lan(dead_member_ttl=20.0))
    sim.converge_cluster(4, width=1)
    log = capture(sim)
    sim.call("n3", lambda core, now: core.set_meta(b"v2", now))
    sim.run_for(5.0)
    sim.leave("n3")
    assert sim.wait_for(lambda: all("n3" not in sim.view(n) for n in ("n0", "n1", "n2")), 60.0)
    to_n0 = sim.nodes["n0"].addr
    relayed = next(d for src, dst, d in log if (src, dst) == ("n1", to_n0) and carries_alive_of(sim, d, "n3"))
    sim.crash("n0")
    sim.restart("n0", join=["n2"])
    # Before n0 ever hears from n1 again: n0 has no window for n1 and takes the capture.
    sim.call("n0", lambda core, now: core.receive(relayed, sim.nodes["n1"].addr, now))
    assert sim.nodes["n0"].core.member("n3") is not None
    refused = [sim.nodes[n].core.stats.replayed for n in ("n1", "n2")]
    sim.run_for(30.0)
    assert all("n3" not in sim.view(n) for n in ("n1", "n2"))  # they remember n3's last incarnation
    assert [sim.nodes[n].core.stats.replayed for n in ("n1", "n2")] > refused
    member = sim.nodes["n0"].core.member("n3")
    assert member is None or member.state != ALIVE  # n0's own phantom fails its probes


# --- Push-pull frames carry the epoch: a fresh source for it -----------------------------


def test_sync_takes_a_fresh_epoch_higher_or_lower_and_keeps_an_equal_one() -> None:
    guard = ReplayGuard(4)
    guard.accept("b", 5, 10)
    guard.sync("b", 5)
    assert not guard.accept("b", 5, 10)  # same epoch: what was seen stays seen
    guard.sync("b", 1)  # lower: the sender lost its saved epoch
    assert guard.epoch_of("b") == 1 and guard.accept("b", 1, 0) and not guard.accept("b", 0, 0)
    guard.sync("b", 7)  # higher: older epochs are refused from now on
    assert not guard.accept("b", 1, 1) and guard.accept("b", 7, 0)
    guard.sync("new", 3)
    assert not guard.accept("new", 2, 0) and guard.accept("new", 3, 0)


def push_pull_from_b(epoch: int) -> bytes:
    b = Membership("b", B, lan(), random.Random(2), 0.0, keyring=make_keyring(random.Random(2)), epoch=epoch)
    b.join([("10.0.0.1", 7946)], 0.0)
    ((_, frame),) = b.streams_to_send()
    return frame


def test_a_wiped_sender_back_at_a_lower_epoch_is_heard_again_after_its_push_pull() -> None:
    core = make_core()
    from_b(core, 50, 0, [Alive("b", 9, B, b"")])
    from_b(core, 1, 0, [StateUpdate("b", 1, "k", "lost")])  # state dir wiped: epoch 1
    assert core.stats.replayed == 1 and core.state_of("b") == {}
    assert core.handle_stream(push_pull_from_b(1), B, 1.0) is not None
    from_b(core, 1, 1, [StateUpdate("b", 2, "k", "heard")])
    assert core.state_of("b") == {"k": "heard"} and core.stats.replayed == 1


def test_a_push_pull_teaches_a_restarted_receiver_to_refuse_older_captures() -> None:
    core = make_core()  # a receiver that just restarted: no window for b
    assert core.handle_stream(push_pull_from_b(3), B, 0.0) is not None
    from_b(core, 2, 77, [StateUpdate("b", 5, "ipam", "10.0.9.0/24")])  # b's previous life
    assert "ipam" not in core.state_of("b") and core.stats.replayed == 1
    from_b(core, 3, 0, [StateUpdate("b", 1, "ipam", "10.0.1.0/24")])
    assert core.state_of("b")["ipam"] == "10.0.1.0/24"
