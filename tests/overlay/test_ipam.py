"""Unit tests of the sans-IO allocator, driven with synthetic claims and member changes."""

from __future__ import annotations

import functools
import ipaddress
from typing import Any

import pytest

from gossip.messages import MemberState
from overlay.hlc import Timestamp
from overlay.ipam import (
    MAX_LOCAL_ADDRESSES,
    AddressExhausted,
    Allocator,
    BlockClaimed,
    ClaimState,
    IpamConfigError,
    NoBlock,
    PrefixExhausted,
    Renumbered,
)

PREFIX = "10.99.0.0/16"
Q = 600.0


class Net:
    """Allocators joined by a perfect, instant 'gossip' with optional partitions."""

    def __init__(self) -> None:
        self.nodes: dict[str, Allocator] = {}
        self.groups: list[set[str]] | None = None
        self.published: dict[str, Any] = {}
        self.events: dict[str, list[Any]] = {}

    def add(
        self, name: str, now: float, prefix: str = PREFIX, plen: int = 28, **kw: Any
    ) -> Allocator:
        node_id = kw.pop("node_id", f"id-{name}")
        a = Allocator(name, node_id, prefix, plen, kw.pop("quarantine_s", Q), now, **kw)
        self.nodes[name] = a
        self.events[name] = []
        return a

    def linked(self, a: str, b: str) -> bool:
        return self.groups is None or any(a in g and b in g for g in self.groups)

    def introduce(self, name: str, now: float) -> None:
        """What a join's push-pull gives: every reachable member and its claim."""
        a = self.nodes[name]
        for other in self.nodes:
            if other != name and self.linked(name, other):
                a.on_member(other, MemberState.ALIVE, now)
                if other in self.published:
                    a.on_claim(other, self.published[other], now)
                self.nodes[other].on_member(name, MemberState.ALIVE, now)
        a.synced(now)

    def run(self, now: float) -> None:
        """Run due timers and deliver claims until nothing changes."""
        for _ in range(100):
            busy = False
            for name, a in self.nodes.items():
                timer = a.get_timer()
                if timer is not None and timer <= now:
                    a.handle_timeout(now)
                    busy = True
                update = a.claim_to_publish()
                while (ev := a.next_event()) is not None:
                    self.events[name].append(ev)
                if update is not None:
                    busy = True
                    self.published[name] = update.value
                    for other, b in self.nodes.items():
                        if other != name and self.linked(name, other):
                            b.on_claim(name, update.value, now)
            if not busy:
                return
        raise AssertionError("did not quiesce")

    def resync(self, now: float) -> None:
        """Anti-entropy after a heal: everyone learns every claim."""
        for name, a in self.nodes.items():
            for other in self.nodes:
                if other != name and self.linked(name, other) and other in self.published:
                    a.on_claim(other, self.published[other], now)


def start_of(node_id: str, prefix: str = PREFIX, plen: int = 28) -> int:
    return Allocator("x", node_id, prefix, plen, Q, 0.0)._start_index()


@functools.cache
def colliding_ids(n: int, prefix: str = "10.99.0.0/24", plen: int = 28) -> tuple[str, ...]:
    """n node ids whose hash start is the same block."""
    by_start: dict[int, list[str]] = {}
    for i in range(10_000):
        ids = by_start.setdefault(start_of(f"n{i}", prefix, plen), [])
        ids.append(f"n{i}")
        if len(ids) == n:
            return tuple(ids)
    raise AssertionError("no collision found")


# ---- claiming ------------------------------------------------------------------


def test_first_claim_waits_for_sync_then_takes_hash_start_block() -> None:
    net = Net()
    a = net.add("a", 0.0)
    net.run(0.0)
    assert a.block is None
    a.synced(0.5)
    net.run(0.5)
    assert a.claim is not None and a.claim.index == a._start_index()
    assert a.address == a.block[1]  # type: ignore[index]
    assert isinstance(net.events["a"][0], BlockClaimed)


def test_first_claim_happens_at_settle_deadline_without_sync() -> None:
    net = Net()
    a = net.add("a", 0.0, settle_s=2.0)
    assert a.get_timer() == 2.0
    net.run(1.9)
    assert a.block is None
    net.run(2.0)
    assert a.block is not None


def test_probe_skips_claimed_block_to_next_one() -> None:
    ids = colliding_ids(2)
    net = Net()
    a = net.add("a", 0.0, prefix="10.99.0.0/24", node_id=ids[0])
    net.introduce("a", 0.0)
    net.run(0.0)
    b = net.add("b", 1.0, prefix="10.99.0.0/24", node_id=ids[1])
    net.introduce("b", 1.0)
    net.run(1.0)
    assert a.claim is not None and b.claim is not None
    assert b.claim.index == (a.claim.index + 1) % 16
    assert net.events["b"] == [BlockClaimed(str(b.block), str(b.address), b.claim.time)]


def test_probe_wraps_around_the_prefix_end() -> None:
    a = Allocator("a", "id-a", "10.99.0.0/24", 28, Q, 0.0)
    start = a._start_index()
    for i in range(16):
        if i != (start + 15) % 16:  # leave only the block just below the start free
            block = ipaddress.ip_network(f"10.99.0.{i * 16}/28")
            a.on_claim(f"o{i}", {"v": 1, "block": str(block), "t": [1, 0], "id": f"o{i}"}, 0.0)
    a.synced(0.0)
    a.handle_timeout(0.0)
    assert a.claim is not None and a.claim.index == (start + 15) % 16


# ---- conflicts -----------------------------------------------------------------


def partitioned_pair(t_a: float, t_b: float, ids: tuple[str, ...] | list[str]) -> Net:
    """a and b claim the same block on two sides of a partition, then the partition heals."""
    net = Net()
    net.groups = [{"a"}, {"b"}]
    net.add("a", t_a, prefix="10.99.0.0/24", node_id=ids[0])
    net.add("b", t_b, prefix="10.99.0.0/24", node_id=ids[1])
    net.nodes["a"].synced(t_a)
    net.run(t_a)
    net.nodes["b"].synced(t_b)
    net.run(t_b)
    assert net.nodes["a"].block == net.nodes["b"].block
    net.groups = None
    for x, y in (("a", "b"), ("b", "a")):
        net.nodes[x].on_member(y, MemberState.ALIVE, 10.0)
    net.resync(10.0)
    net.run(10.0)
    return net


def test_later_claim_loses_conflict_and_renumbers_with_event() -> None:
    ids = colliding_ids(2)
    net = partitioned_pair(1.0, 2.0, ids)
    a, b = net.nodes["a"], net.nodes["b"]
    assert a.claim is not None and b.claim is not None
    assert a.claim.index == start_of(ids[0], "10.99.0.0/24")  # winner kept its block
    assert b.claim.index != a.claim.index
    renumbered = [e for e in net.events["b"] if isinstance(e, Renumbered)]
    assert renumbered == [Renumbered(str(a.block), str(b.block), "a", a.claim.time)]
    assert not [e for e in net.events["a"] if isinstance(e, Renumbered)]
    assert b.stats["conflicts_lost"] == 1


def test_earlier_claim_wins_whichever_side_claimed_first() -> None:
    ids = colliding_ids(2)
    net = partitioned_pair(2.0, 1.0, ids)
    a, b = net.nodes["a"], net.nodes["b"]
    assert b.claim is not None and b.claim.index == start_of(ids[1], "10.99.0.0/24")
    assert [type(e) for e in net.events["a"]] == [BlockClaimed, Renumbered, BlockClaimed]
    assert a.block != b.block


def test_equal_claim_times_are_broken_by_smaller_node_id() -> None:
    ids = sorted(colliding_ids(2))
    net = partitioned_pair(1.0, 1.0, [ids[1], ids[0]])  # a has the larger id
    a, b = net.nodes["a"], net.nodes["b"]
    assert a.claim is not None and b.claim is not None
    first_a = next(e for e in net.events["a"] if isinstance(e, BlockClaimed))
    assert first_a.time == b.claim.time  # the tie really happened
    assert b.claim.index == start_of(ids[0], "10.99.0.0/24")
    assert any(isinstance(e, Renumbered) and e.because == "b" for e in net.events["a"])


def test_third_party_sees_loser_as_conflict_until_it_moves() -> None:
    ids = colliding_ids(2)
    c = Allocator("c", "id-c", "10.99.0.0/24", 28, Q, 0.0)
    block = str(ipaddress.ip_network(f"10.99.0.{start_of(ids[0], '10.99.0.0/24') * 16}/28"))
    c.on_claim("a", {"v": 1, "block": block, "t": [1000, 0], "id": ids[0]}, 0.0)
    c.on_claim("b", {"v": 1, "block": block, "t": [2000, 0], "id": ids[1]}, 0.0)
    states = {row.node: row.state for row in c.claims(0.0)}
    assert states == {"a": ClaimState.ACTIVE, "b": ClaimState.CONFLICT}


def test_claim_seen_raises_clock_so_next_claim_is_later() -> None:
    a = Allocator("a", "id-a", PREFIX, 28, Q, 0.0)
    a.on_claim("z", {"v": 1, "block": "10.99.0.0/28", "t": [50_000, 3], "id": "z"}, 0.0)
    a.synced(1.0)
    a.handle_timeout(1.0)
    assert a.claim is not None and a.claim.time > Timestamp(50_000, 3)


# ---- quarantine, leave, restart ------------------------------------------------


def holder_and_newcomer(quarantine_s: float = Q) -> tuple[Net, Allocator]:
    """'old' holds the block 'new' would hash to; returns the net and 'old'."""
    ids = colliding_ids(2)
    net = Net()
    old = net.add("old", 0.0, prefix="10.99.0.0/24", node_id=ids[0], quarantine_s=quarantine_s)
    net.introduce("old", 0.0)
    net.run(0.0)
    return net, old


def test_dead_owners_block_stays_occupied_during_quarantine() -> None:
    net, old = holder_and_newcomer()
    new = net.add("new", 10.0, prefix="10.99.0.0/24", node_id=colliding_ids(2)[1])
    new.on_claim("old", net.published["old"], 10.0)
    new.on_member("old", MemberState.DEAD, 10.0)
    new.synced(10.0 + Q - 1)
    new.handle_timeout(10.0 + Q - 1)
    assert new.block is not None and new.block != old.block


def test_dead_owners_block_is_free_after_quarantine() -> None:
    net, old = holder_and_newcomer()
    new = net.add("new", 10.0, prefix="10.99.0.0/24", node_id=colliding_ids(2)[1])
    new.on_claim("old", net.published["old"], 10.0)
    new.on_member("old", MemberState.DEAD, 10.0)
    new.synced(10.0 + Q)
    new.handle_timeout(10.0 + Q)
    assert new.block == old.block
    assert {r.node: r.state for r in new.claims(10.0 + Q)}["old"] is ClaimState.FREE


def test_quarantine_is_configurable() -> None:
    net, old = holder_and_newcomer(quarantine_s=30.0)
    new = net.add("new", 0.0, prefix="10.99.0.0/24", node_id=colliding_ids(2)[1], quarantine_s=30.0)
    new.on_claim("old", net.published["old"], 0.0)
    new.on_member("old", MemberState.DEAD, 0.0)
    new.synced(31.0)
    new.handle_timeout(31.0)
    assert new.block == old.block


def test_left_owners_block_is_free_at_once() -> None:
    net, old = holder_and_newcomer()
    new = net.add("new", 10.0, prefix="10.99.0.0/24", node_id=colliding_ids(2)[1])
    new.on_claim("old", net.published["old"], 10.0)
    new.on_member("old", MemberState.LEFT, 10.0)
    new.synced(10.0)
    new.handle_timeout(10.0)
    assert new.block == old.block


def test_restart_from_persisted_state_keeps_block_with_later_timestamp() -> None:
    a = Allocator("a", "id-a", PREFIX, 28, Q, 0.0)
    a.synced(0.0)
    a.handle_timeout(0.0)
    saved = a.state_to_persist()
    assert saved is not None and a.claim is not None
    again = Allocator("a", "id-a", PREFIX, 28, Q, 0.0, persisted=saved)  # clock even went back
    assert again.block == a.block
    assert again.claim is not None and again.claim.time > a.claim.time
    update = again.claim_to_publish()
    assert update is not None and update.value is not None
    assert update.value["block"] == str(a.block)


def test_restart_ignores_persisted_block_of_another_prefix() -> None:
    a = Allocator("a", "id-a", "10.98.0.0/16", 28, Q, 0.0)
    a.synced(0.0)
    a.handle_timeout(0.0)
    saved = a.state_to_persist()
    again = Allocator("a", "id-a", PREFIX, 28, Q, 0.0, persisted=saved)
    assert again.block is None


def test_returning_node_whose_block_was_retaken_is_the_one_to_move() -> None:
    net, old = holder_and_newcomer()
    saved = old.state_to_persist()
    old_block = old.block
    # old leaves; new takes its block at once; old restarts later with its persisted claim
    new = net.add("new", 10.0, prefix="10.99.0.0/24", node_id=colliding_ids(2)[1])
    new.on_claim("old", net.published["old"], 10.0)
    new.on_member("old", MemberState.LEFT, 10.0)
    net.nodes["new"].synced(10.0)
    net.run(10.0)
    assert new.block == old_block
    back = Allocator("old", old.node_id, "10.99.0.0/24", 28, Q, 20.0, persisted=saved)
    net.nodes["old"] = back
    # the stale claim and the comeback reach 'new' before the restarted node's new claim
    new.on_member("old", MemberState.ALIVE, 20.0)
    net.run(20.0)
    back.on_member("new", MemberState.ALIVE, 20.0)
    back.on_claim("new", net.published["new"], 20.0)
    net.run(20.1)
    assert new.block == old_block
    assert back.block is not None and back.block != old_block
    assert not [e for e in net.events["new"] if isinstance(e, Renumbered)]
    assert [e.because for e in net.events["old"] if isinstance(e, Renumbered)] == ["new"]


def test_revived_member_with_stale_earlier_claim_wins_after_grace() -> None:
    """A member seen DEAD that comes back without re-claiming really held the block."""
    ids = colliding_ids(2)
    b = Allocator("b", ids[1], "10.99.0.0/24", 28, 5.0, 0.0, revive_grace_s=1.0)
    block = str(ipaddress.ip_network(f"10.99.0.{start_of(ids[0], '10.99.0.0/24') * 16}/28"))
    b.on_claim("a", {"v": 1, "block": block, "t": [0, 0], "id": ids[0]}, 0.0)
    b.on_member("a", MemberState.DEAD, 0.0)
    b.synced(10.0)
    b.handle_timeout(10.0)
    assert str(b.block) == block  # quarantine over
    b.on_member("a", MemberState.ALIVE, 20.0)
    b.handle_timeout(20.0)
    assert str(b.block) == block  # within grace
    b.handle_timeout(20.9)
    assert b.get_timer() == 21.0
    b.handle_timeout(21.0)
    assert str(b.block) != block
    assert isinstance(b.next_event(), BlockClaimed)
    assert b.next_event() == Renumbered(block, str(b.block), "a", Timestamp(0, 0))


# ---- exhaustion ----------------------------------------------------------------


def full_prefix() -> Allocator:
    """A 10.99.0.0/28 prefix of four /30 blocks, all claimed by others."""
    a = Allocator("a", "id-a", "10.99.0.0/28", 30, Q, 0.0)
    for i in range(4):
        block = f"10.99.0.{i * 4}/30"
        a.on_claim(f"o{i}", {"v": 1, "block": block, "t": [1, 0], "id": f"o{i}"}, 0.0)
    a.synced(0.0)
    a.handle_timeout(0.0)
    return a


def test_exhausted_prefix_gives_event_and_no_block_never_a_duplicate() -> None:
    a = full_prefix()
    assert a.block is None
    assert a.next_event() == PrefixExhausted("10.99.0.0/28")
    assert a.claim_to_publish() is None
    with pytest.raises(AddressExhausted, match="exhausted"):
        a.allocate("svc")


def test_allocate_before_first_claim_raises_no_block() -> None:
    a = Allocator("a", "id-a", PREFIX, 28, Q, 0.0)
    with pytest.raises(NoBlock):
        a.allocate("svc")


def test_exhausted_node_claims_block_freed_by_a_leave() -> None:
    a = full_prefix()
    a.on_member("o2", MemberState.LEFT, 5.0)
    a.handle_timeout(5.0)
    assert str(a.block) == "10.99.0.8/30"


def test_exhausted_node_wakes_when_a_quarantine_ends() -> None:
    a = full_prefix()
    a.on_member("o1", MemberState.DEAD, 5.0)
    a.handle_timeout(5.0)
    assert a.block is None
    assert a.get_timer() == 5.0 + Q
    a.handle_timeout(5.0 + Q)
    assert str(a.block) == "10.99.0.4/30"


def test_loser_with_no_free_block_withdraws_its_claim() -> None:
    a = Allocator("a", "id-a", "10.99.0.0/29", 30, Q, 0.0)
    a.synced(0.0)
    a.handle_timeout(0.0)
    a.claim_to_publish()
    for i in range(2):
        a.on_claim(
            f"o{i}", {"v": 1, "block": f"10.99.0.{i * 4}/30", "t": [0, i], "id": f"o{i}"}, 1.0
        )
    a.handle_timeout(1.0)
    assert a.block is None
    update = a.claim_to_publish()
    assert update is not None and update.value is None
    events = [a.next_event() for _ in range(3)]
    assert isinstance(events[1], Renumbered) and events[1].new_block is None
    assert events[2] == PrefixExhausted("10.99.0.0/29")


# ---- IPv6, local addresses, config, hostile input ------------------------------


def test_ipv6_ula_prefix_with_64_blocks() -> None:
    a = Allocator("a", "id-a", "fd00:99::/48", 64, Q, 0.0)
    a.synced(0.0)
    a.handle_timeout(0.0)
    assert a.block is not None and a.block.prefixlen == 64
    assert a.block.subnet_of(ipaddress.IPv6Network("fd00:99::/48"))  # type: ignore[arg-type]
    assert a.address == a.block.network_address + 1
    assert a.allocate("svc") == a.block.network_address + 2
    assert a.num_blocks == 65536


def test_allocate_is_idempotent_and_release_frees_the_address() -> None:
    a = Allocator("a", "id-a", PREFIX, 28, Q, 0.0)
    a.synced(0.0)
    a.handle_timeout(0.0)
    x, y = a.allocate("x"), a.allocate("y")
    assert a.allocate("x") == x and x != y and a.address not in (x, y)
    assert a.release("x") and not a.release("x")
    assert a.allocate("z") == x


def test_allocate_raises_when_block_is_full_excluding_broadcast() -> None:
    a = Allocator("a", "id-a", PREFIX, 29, Q, 0.0)  # 8 addresses: net, own, 5 free, broadcast
    a.synced(0.0)
    a.handle_timeout(0.0)
    assert a.block is not None
    addresses = [a.allocate(f"s{i}") for i in range(5)]
    assert a.block.broadcast_address not in addresses
    with pytest.raises(AddressExhausted):
        a.allocate("one-too-many")


def test_named_addresses_are_bounded() -> None:
    a = Allocator("a", "id-a", "fd00:99::/48", 64, Q, 0.0)
    a.synced(0.0)
    a.handle_timeout(0.0)
    for i in range(MAX_LOCAL_ADDRESSES):
        a.allocate(f"s{i}")
    with pytest.raises(AddressExhausted):
        a.allocate("extra")


def test_local_addresses_survive_restart_and_follow_renumbering() -> None:
    a = Allocator("a", "id-a", PREFIX, 28, Q, 0.0)
    a.synced(0.0)
    a.handle_timeout(0.0)
    svc = a.allocate("svc")
    again = Allocator("a", "id-a", PREFIX, 28, Q, 1.0, persisted=a.state_to_persist())
    assert again.local_addresses() == {"svc": str(svc)}
    assert again.block is not None
    again.on_claim("w", {"v": 1, "block": str(again.block), "t": [0, 0], "id": "w"}, 2.0)
    again.handle_timeout(2.0)
    assert (
        again.block is not None
        and ipaddress.ip_address(again.local_addresses()["svc"]) in again.block
    )


@pytest.mark.parametrize(
    "prefix,plen",
    [
        ("10.99.0.0/16", 12),
        ("10.99.0.0/16", 31),
        ("10.99.0.1/16", 28),
        ("nonsense", 28),
        ("fd00::/48", 128),
    ],
)
def test_bad_prefix_or_block_size_is_a_config_error(prefix: str, plen: int) -> None:
    with pytest.raises(IpamConfigError):
        Allocator("a", "id-a", prefix, plen, Q, 0.0)


@pytest.mark.parametrize(
    "value",
    [
        "junk",
        {"v": 2, "block": "10.99.0.0/28", "t": [1, 0], "id": "x"},
        {"v": 1, "block": 7, "t": [1, 0], "id": "x"},
        {"v": 1, "block": "10.99.0.0/28", "t": "soon", "id": "x"},
        {"v": 1, "block": "10.99.0.0/28", "t": [1, 0], "id": ""},
        {"v": 1, "block": "x" * 1000, "t": [1, 0], "id": "x"},
    ],
)
def test_malformed_claim_is_dropped_and_counted(value: object) -> None:
    a = Allocator("a", "id-a", PREFIX, 28, Q, 0.0)
    a.on_claim("o", value, 0.0)
    assert a.stats["bad_claims"] == 1 and a.claims() == []


@pytest.mark.parametrize("block", ["10.98.0.0/28", "10.99.0.0/27", "10.99.0.1/28", "fd00::/64"])
def test_claim_outside_prefix_or_of_other_size_is_ignored_and_counted(block: str) -> None:
    a = Allocator("a", "id-a", PREFIX, 28, Q, 0.0)
    a.on_claim("o", {"v": 1, "block": block, "t": [1, 0], "id": "o"}, 0.0)
    assert a.stats["foreign_claims"] == 1 and a.claims() == []


def test_deleted_claim_frees_block() -> None:
    a = Allocator("a", "id-a", PREFIX, 28, Q, 0.0)
    a.on_claim("o", {"v": 1, "block": "10.99.0.0/28", "t": [1, 0], "id": "o"}, 0.0)
    a.on_claim("o", None, 0.0)
    assert a.claims() == []


def test_claims_lists_rows_with_node_block_address_state() -> None:
    a = Allocator("a", "id-a", PREFIX, 28, Q, 0.0)
    a.synced(0.0)
    a.handle_timeout(0.0)
    a.on_claim("o", {"v": 1, "block": "10.99.0.0/28", "t": [1, 0], "id": "o"}, 0.0)
    a.on_member("o", MemberState.DEAD, 0.0)
    rows = [r.to_dict() for r in a.claims(1.0)]
    assert rows[0]["node"] == "a" and rows[0]["member_state"] == "self"
    assert rows[1] == {
        "node": "o",
        "node_id": "o",
        "block": "10.99.0.0/28",
        "address": "10.99.0.1",
        "state": "quarantined",
        "member_state": "dead",
    }


def test_member_comeback_makes_node_reannounce_its_claim_once_per_burst() -> None:
    a = Allocator("a", "id-a", PREFIX, 28, Q, 0.0)
    a.synced(0.0)
    a.handle_timeout(0.0)
    first = a.claim_to_publish()
    assert first is not None and not first.again
    for name in ("x", "y"):
        a.on_member(name, MemberState.DEAD, 4.0)
    a.handle_timeout(4.0)
    assert a.claim_to_publish() is None
    a.on_member("x", MemberState.ALIVE, 5.0)
    a.on_member("y", MemberState.ALIVE, 5.2)
    a.handle_timeout(5.2)
    assert a.claim_to_publish() is None  # batched: one re-announcement per burst
    a.handle_timeout(5.5)
    again = a.claim_to_publish()
    assert again is not None and again.again and again.value == first.value
    a.handle_timeout(6.5)
    assert a.claim_to_publish() is None
    assert a.get_timer() is None  # once: the core keeps a claim that arrives before its owner


def test_burst_of_new_members_makes_node_republish_but_single_join_does_not() -> None:
    a = Allocator("a", "id-a", PREFIX, 28, Q, 0.0)
    a.synced(0.0)
    a.handle_timeout(0.0)
    a.claim_to_publish()
    a.on_member("solo", MemberState.ALIVE, 10.0)
    a.handle_timeout(12.0)
    assert a.claim_to_publish() is None
    a.on_member("p", MemberState.ALIVE, 20.0)
    a.on_member("q", MemberState.ALIVE, 20.1)
    a.handle_timeout(20.6)
    assert a.claim_to_publish() is not None


def test_cold_start_burst_of_new_members_does_not_re_announce_a_fresh_claim() -> None:
    """A site-wide restart: every member is new while our claim is seconds old and still
    spreading; re-announcing it would double its sends (issue 13). A comeback still does."""
    a = Allocator("a", "id-a", PREFIX, 28, Q, 0.0)
    a.synced(0.0)
    a.handle_timeout(0.0)
    assert a.claim_to_publish() is not None
    for i, name in enumerate(("p", "q", "r")):
        a.on_member(name, MemberState.ALIVE, 1.0 + i * 0.1)
    a.handle_timeout(2.0)
    assert a.claim_to_publish() is None and a.get_timer() is None
    a.on_member("p", MemberState.DEAD, 3.0)
    a.on_member("p", MemberState.ALIVE, 4.0)  # back from DEAD: a heal, however fresh
    a.handle_timeout(4.5)
    again = a.claim_to_publish()
    assert again is not None and again.again


def test_new_claim_is_published_once() -> None:
    a = Allocator("a", "id-a", PREFIX, 28, Q, 0.0)
    a.synced(0.0)
    a.handle_timeout(0.0)
    update = a.claim_to_publish()
    assert update is not None and not update.again
    assert a.get_timer() is None
    a.handle_timeout(10.0)
    assert a.claim_to_publish() is None
