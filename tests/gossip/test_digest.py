"""Digest push-pull (gossip/digest.py): cheap when settled, exact when not, still healing."""

from __future__ import annotations

import pytest

from gossip.codec import decode_frame, encode_frame
from gossip.config import lan
from gossip.core import Membership
from gossip.errors import DecodeError
from gossip.messages import (
    MemberRecord,
    MemberState,
    MemberSummary,
    OwnerSummary,
    PushPull,
    StateEntry,
    Summary,
    Want,
)
from gossip.state_store import StateStore
from testbed.sim import Simulator

H16, H8, H4 = b"\x01" * 16, b"\x02" * 8, b"\x03" * 4


def test_digest_push_pull_round_trips() -> None:
    msg = PushPull(
        "a", False, True,
        (MemberRecord("b", ("10.0.0.2", 7946), 3, MemberState.SUSPECT, b"m"),),
        (("b", (StateEntry("k", 4, {"x": 1}),)),),
        Summary(H16, H16, (MemberSummary("b", 3, MemberState.ALIVE),), (OwnerSummary("b", 4, H8),)),
        Want(("c",), (("c", (("k", 2, H4),)),)),
    )
    assert decode_frame(encode_frame(msg), 1 << 20) == msg
    hashes_only = PushPull("a", False, False, (), (), Summary(H16, H16))
    assert decode_frame(encode_frame(hashes_only), 1 << 20) == hashes_only
    full = PushPull("a", True, False, (), ())
    assert decode_frame(encode_frame(full), 1 << 20) == full


@pytest.mark.parametrize(
    "tail",
    [
        [None, None],  # a digest push-pull needs one of them
        [[b"\x01" * 15, H16, None, None], None],  # short hash
        [[H16, H16, [["b", 1, 9]], None], None],  # unknown state
        [None, [["b"], [["c", [["k", 1, b"\x00"]]]]]],  # short entry hash
        [None, [["b"], [["c", [["k", -1, H4]]]]]],  # negative version
        [None, "x"],
    ],
)
def test_decoder_refuses_malformed_digests(tail: list[object]) -> None:
    import msgpack

    raw = [10, "a", False, False, [], [], *tail]
    with pytest.raises(DecodeError):
        decode_frame(b"\x01" + msgpack.packb(raw, use_bin_type=True), 1 << 20)


def _exchange(a: Membership, b: Membership, now: float) -> list[int]:
    """Run a's push-pull with b to the end (follow-ups included); the frame sizes."""
    sizes: list[int] = []
    a._request_push_pull(b.addr, join=False)
    for _ in range(4):
        streams = a.streams_to_send()
        if not streams:
            return sizes
        ((dst, request),) = streams
        assert dst == b.addr
        reply = b.handle_stream(request, a.addr, now)
        assert reply is not None
        sizes += [len(request), len(reply)]
        a.receive_stream_reply(reply, b.addr, now)
    raise AssertionError("a digest exchange took more than two rounds")


def _cluster(n: int, seed: int) -> Simulator:
    sim = Simulator(seed, lan())
    sim.converge_cluster(n, width=1)
    for i in range(n):
        sim.call(f"n{i}", lambda m, now, i=i: m.set_state("svc", {"port": 1000 + i, "pad": "x" * 200}, now))
    sim.run_for(40.0)
    return sim


def test_settled_exchange_is_two_small_frames() -> None:
    sim = _cluster(8, 31)
    a, b = sim.nodes["n1"].core, sim.nodes["n2"].core
    before = a.stats.kind_bytes_out["push_pull_members"] + a.stats.kind_bytes_out["push_pull_state"]
    sizes = _exchange(a, b, sim.now)
    assert len(sizes) == 2 and max(sizes) < 150, sizes  # hashes one way, an empty reply back
    after = a.stats.kind_bytes_out["push_pull_members"] + a.stats.kind_bytes_out["push_pull_state"]
    assert after == before


def test_a_missed_update_is_repaired_with_only_the_new_entry() -> None:
    sim = _cluster(6, 32)
    a, b = sim.nodes["n1"].core, sim.nodes["n2"].core
    owner = sim.nodes["n3"].core
    update = owner._store.set_local("extra", "y" * 300)  # n3's change, seen by b only
    assert b._store.apply(update)
    b_sent = b.stats.kind_bytes_out["push_pull_state"]
    sizes = _exchange(a, b, sim.now)
    assert a.state_of("n3")["extra"] == "y" * 300
    assert len(sizes) == 4  # hashes, lists, the Want, the entry
    sent_state = b.stats.kind_bytes_out["push_pull_state"] - b_sent
    assert 300 < sent_state < 400  # the one entry, not n3's whole map (which has svc too)
    assert _exchange(a, b, sim.now) and a._store.digest("n3") == b._store.digest("n3")


def test_a_gap_below_the_top_version_is_found_and_filled() -> None:
    sim = _cluster(5, 33)
    a, b = sim.nodes["n1"].core, sim.nodes["n2"].core
    owner = sim.nodes["n3"].core
    first = owner._store.set_local("k1", 1)
    second = owner._store.set_local("k2", 2)
    assert b._store.apply(first) and b._store.apply(second)
    assert a._store.apply(second)  # a missed k1: same top version, a gap
    assert a._store.max_version("n3") == b._store.max_version("n3")
    _exchange(a, b, sim.now)
    assert a.state_of("n3").get("k1") == 1


def test_the_exchange_tells_a_peer_what_it_lacks_too() -> None:
    sim = _cluster(5, 34)
    a, b = sim.nodes["n1"].core, sim.nodes["n2"].core
    update = sim.nodes["n4"].core._store.set_local("late", True)
    assert a._store.apply(update)  # only the requester has it
    _exchange(a, b, sim.now)
    assert b.state_of("n4").get("late") is True


def test_an_owner_restarted_at_the_same_version_with_another_value_reasserts() -> None:
    sim = _cluster(4, 35)
    a, b = sim.nodes["n1"].core, sim.nodes["n2"].core
    version = b._store.max_version("n1")
    # n1 "restarted": its store is fresh and holds another svc value at the same version.
    fresh = StateStore("n1", a.config.max_state_bytes, version - 1)
    fresh.set_local("svc", {"port": 1})
    a._store = fresh
    assert a._store.max_version("n1") == version
    _exchange(a, b, sim.now)
    assert a._store.version > version  # it saw its earlier life's value and re-stamped
    assert a.pending_broadcasts > 0


def test_a_member_is_learned_through_a_digest_exchange() -> None:
    sim = _cluster(4, 36)
    a, b = sim.nodes["n1"].core, sim.nodes["n2"].core
    node = a._table.get("n3")
    assert node is not None
    a._forget(node)  # a lost n3 (and its map) entirely
    _exchange(a, b, sim.now)
    assert a.member("n3") is not None and a.state_of("n3") == b.state_of("n3") != {}


def test_a_forged_suspicion_held_by_the_peer_is_refuted_in_the_exchange() -> None:
    sim = _cluster(4, 37)
    a, b = sim.nodes["n1"].core, sim.nodes["n2"].core
    held = b._table.get("n1")
    assert held is not None
    b._table.set_state(held, MemberState.SUSPECT, sim.now)
    inc = a.incarnation
    _exchange(a, b, sim.now)
    assert a.incarnation == inc + 1
    view = b.member("n1")
    assert view is not None and view.state == MemberState.ALIVE and view.incarnation == inc + 1


def test_a_restarted_owner_learns_every_key_of_its_earlier_life() -> None:
    sim = _cluster(4, 38)
    a, b = sim.nodes["n1"].core, sim.nodes["n2"].core
    extra = a._store.set_local("gone", 1)
    assert b._store.apply(extra)
    # n1 restarted: fresh store, counter back at 0, as many changes as its earlier life
    # (svc@1, gone@2 there; svc@1, other@2 here): the same top version.
    a._store = StateStore("n1", a.config.max_state_bytes)
    a._store.set_local("svc", {"port": 1})
    a._store.set_local("other", 2)
    assert a._store.max_version("n1") == b._store.max_version("n1")
    a.join([b.addr], sim.now)
    ((_, request),) = a.streams_to_send()
    reply = b.handle_stream(request, a.addr, sim.now)
    assert reply is not None
    a.receive_stream_reply(reply, b.addr, sim.now)
    entries = {e.key: e for e in a._store.entries("n1")}
    assert entries["gone"].deleted and not entries["svc"].deleted  # tombstoned in one exchange
    assert entries["svc"].version > 2  # the earlier life's svc value is outbid too
    assert a._store.version > b._store.max_version("n1")
