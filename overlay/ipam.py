"""Decentralized overlay address allocation (IPAM), sans-IO.

How it works
------------
The overlay prefix (e.g. ``10.99.0.0/16`` or ``fd00:99::/48``) is cut into equal
blocks (``block_prefixlen``, e.g. /28 or /64). Every node claims one block and
publishes the claim in its gossip-replicated state under :data:`STATE_KEY`::

    {"v": 1, "block": "10.99.3.16/28", "t": [wall_ms, counter], "id": node_id}

``t`` is a hybrid logical clock timestamp (``hlc.py``) merged with every claim this
node has seen, so a claim made after seeing another is always later. Claims are
totally ordered by ``(t, id, owner)``: the earlier claim wins an overlap.

Choosing a block: start at ``blake2b(node_id) mod number_of_blocks`` and probe
upwards (wrapping) to the first block no *occupying* claim covers. A claim occupies
its block unless its owner LEFT (free at once) or has been DEAD for ``quarantine_s``
(measured from when this node saw it die). A fresh node waits until the driver
says the join's state exchange is applied (:meth:`Allocator.synced`) or
``settle_s`` passes, so it chooses knowing the mesh's claims.

Conflicts: when this node holds a block and sees an overlapping claim of a live
owner (alive or suspect, or not yet in the member list) that is earlier, it has
lost: it picks a new block, publishes a new claim and emits :class:`Renumbered`.
The winner does nothing; everyone else just watches. Both sides of a healed
partition decide alike because the order is a property of the claims alone.
After a burst of arrivals (members back from DEAD or LEFT, or several new ones:
a heal), every node re-announces its claim once (``ClaimUpdate.again``: the
driver calls ``core.rebroadcast_state``, the same version again, which only
members lacking it pass on), so the sides learn each other's claims by gossip
within seconds instead of waiting for anti-entropy. A claim is published once:
the gossip core keeps an update about a member it does not know yet until the
member's Alive arrives (``gossip.core.PENDING_STATE_TTL``), so a claim that
overtakes its owner's Alive is no longer lost.

Restarts: a node restarted from its persisted state claims its old block again at
once, with a fresh timestamp. While it was away its block was quarantined, so
normally nobody took it and it keeps it; if someone did take it legitimately
(quarantine over, or it had left), the returning node must be the loser, not the
innocent holder. A fresh timestamp says so only if this node's clock is right: one
that boots in 1970 (no RTC) restores its saved clock, which is older than the
holder's claim. So the restored claim is *provisional*: the first time it meets
another claim on its block, or when the join's state exchange is applied (or
``settle_s`` passed), it is stamped again, later than every claim known on the
block (and later than the clock, pulled forward meanwhile), so the holder wins.

New claims: a block is always claimed with a timestamp later than every claim this
node knows on it (a dead or departed owner's included), whatever its clock says, so
a node whose clock is behind never takes a block and then wins it back from the
owner it took it from. The clock itself (``hlc.py``) is shared with the agent,
restored from its saved reading, and pulled forward by the claims it observes,
bounded against forged far-future ones. Because a member that comes back may still
be represented by its stale pre-restart claim for a moment, conflicts with a
member that was DEAD or LEFT and is alive again are judged only after
``revive_grace_s``.

Exhaustion: if no block is free, the node holds none, emits
:class:`PrefixExhausted`, and retries whenever a claim or member changes or a
quarantine ends. It never takes an occupied block.

Local addresses: offset 1 of the block is the node's own address;
:meth:`Allocator.allocate` hands further offsets to named local services (bounded,
persisted, kept at the same offsets when the node is renumbered).

Driving it: feed ``on_member`` / ``on_claim`` / ``on_reaped``, call
``handle_timeout(now)`` when ``get_timer()`` is due (inputs set it to ``now`` so
that all inputs of one batch are seen before a decision), then drain
``claim_to_publish()`` (-> ``core.set_state(STATE_KEY, update.value)``, or
``core.rebroadcast_state(STATE_KEY)`` when ``update.again``),
``state_to_persist()`` and ``next_event()``.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections import deque
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from gossip.messages import MemberState

from .hlc import HybridClock, Timestamp

STATE_KEY = "ipam"  # key of the claim in the node's replicated state
CLAIM_VERSION = 1
PERSIST_VERSION = 1
DEFAULT_QUARANTINE_S = 600.0  # issue 4: a dead owner's block is reclaimed after 10 minutes
# A fresh node with no join reply yet claims after this long anyway (alone, or seeds down).
# Two LAN push-pull round trips are far below it; it only bounds the no-peer case.
DEFAULT_SETTLE_S = 2.0
# How long a member that came back from DEAD/LEFT may be represented by its stale claim
# before we judge a conflict with it: a restarted node's Alive and its new claim travel
# as separate gossip updates; 5 LAN gossip intervals (memberlist GossipInterval 200 ms)
# cover the gap with room to spare.
DEFAULT_REVIVE_GRACE_S = 1.0
# After a burst of arrivals (a member back from DEAD/LEFT, or two new members within
# this window: a healed partition), re-announce our own claim once, this long after the
# burst began, so one heal costs one update per node. The gossip core spreads what
# anti-entropy merges only every push-pull interval (30 s); a fresh update reaches
# the whole mesh by piggybacking in about a second. A single join does not trigger it:
# the joiner gets every claim in its join exchange. (Until issue 13 the claim was
# re-published with a new version at +0.5 s and +8 s after a burst and at +1 s and
# +3 s after every new claim, because the core dropped state of members it did not
# know yet; it now keeps it, and a re-announcement keeps the version.)
DEFAULT_REANNOUNCE_DELAY_S = 0.5
# New members arriving in a burst within this long after we published our claim do not make
# us re-announce it: the claim is still being spread by gossip, and every one of them got it
# or gets it in a join exchange. That is a cold start (a site-wide power cut: every member is
# new and every claim a second old), where the re-announcement doubled a claim's sends. A
# member back from DEAD or LEFT (a heal) still re-announces at once (issue 13).
FRESH_CLAIM_S = 10.0
FIRST_HOST_OFFSET = 1  # the node's own address: the first usable address of its block
MAX_LOCAL_ADDRESSES = 64  # named local allocations kept (persisted state stays small)
MAX_NAME_LEN = 64
MAX_NODE_ID_LEN = 128
MAX_BLOCK_TEXT_LEN = 64  # longest IPv6 network text is 43 characters
PARSE_CACHE_SIZE = 4096  # block texts remembered; cleared when full (bounded memory)

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class IpamError(Exception):
    """Base of the errors this module raises on purpose."""


class IpamConfigError(IpamError, ValueError):
    """Bad prefix or block size (a person's mistake in the config)."""


class AddressExhausted(IpamError):
    """No free block in the prefix, or no free address in this node's block."""


class NoBlock(IpamError):
    """This node holds no block yet (still settling, or the prefix is exhausted)."""


class ClaimState(StrEnum):
    """How this node judges one claim (for ``claims()`` and the ``addresses`` CLI)."""

    ACTIVE = "active"  # owner live, no earlier overlapping claim
    CONFLICT = "conflict"  # owner live, an earlier live claim overlaps: it must move
    QUARANTINED = "quarantined"  # owner DEAD, quarantine not over: block still occupied
    FREE = "free"  # owner LEFT, or DEAD past quarantine: block free


@dataclass(frozen=True, slots=True)
class Claim:
    """One node's claim on one block."""

    owner: str
    node_id: str
    block: IPNetwork
    index: int  # block number within the prefix
    time: Timestamp

    def order_key(self) -> tuple[Timestamp, str, str]:
        """Earlier sorts first; the earliest claim of an overlap wins."""
        return (self.time, self.node_id, self.owner)

    def to_value(self) -> dict[str, Any]:
        """The value published under :data:`STATE_KEY`."""
        return {
            "v": CLAIM_VERSION,
            "block": str(self.block),
            "t": self.time.to_value(),
            "id": self.node_id,
        }


@dataclass(frozen=True, slots=True)
class BlockClaimed:
    """This node claimed ``block`` (first claim, restart, or after renumbering)."""

    block: str
    address: str
    time: Timestamp


@dataclass(frozen=True, slots=True)
class Renumbered:
    """This node lost a conflict for ``old_block`` to ``because`` and moved.

    ``new_block`` is None when no block was free (a PrefixExhausted follows).
    """

    old_block: str
    new_block: str | None
    because: str
    winner_time: Timestamp


@dataclass(frozen=True, slots=True)
class PrefixExhausted:
    """No free block in ``prefix``; this node holds none until one frees up."""

    prefix: str


IpamEvent = BlockClaimed | Renumbered | PrefixExhausted


@dataclass(frozen=True, slots=True)
class ClaimUpdate:
    """Replicated-state change for the driver: ``core.set_state(STATE_KEY, value)``.

    ``value`` is None when this node withdrew its claim (prefix exhausted).
    """

    value: dict[str, Any] | None
    again: bool = False  # a re-announcement of the unchanged claim (``core.rebroadcast_state``)


@dataclass(frozen=True, slots=True)
class ClaimInfo:
    """One row of :meth:`Allocator.claims`."""

    node: str
    node_id: str
    block: str
    address: str
    state: ClaimState
    member_state: str  # "self", "alive", "suspect", "dead", "left" or "unknown"

    def to_dict(self) -> dict[str, str]:
        """JSON-able form for the control API."""
        return {
            "node": self.node,
            "node_id": self.node_id,
            "block": self.block,
            "address": self.address,
            "state": str(self.state),
            "member_state": self.member_state,
        }


def parse_prefix(prefix: str, block_prefixlen: int) -> IPNetwork:
    """Validate the overlay prefix and block size; raise IpamConfigError if unusable."""
    try:
        net = ipaddress.ip_network(prefix, strict=True)
    except ValueError as exc:
        raise IpamConfigError(f"overlay prefix {prefix!r}: {exc}") from None
    # A block needs room for the node's own address: IPv4 loses network and broadcast.
    longest = 30 if net.version == 4 else 127
    if not net.prefixlen <= block_prefixlen <= longest:
        raise IpamConfigError(
            f"block prefix length /{block_prefixlen} must be between /{net.prefixlen} "
            f"(the overlay prefix {net}) and /{longest}"
        )
    return net


class Allocator:
    """One node's view of the mesh's address claims, and its own claim."""

    def __init__(
        self,
        node: str,
        node_id: str,
        prefix: str,
        block_prefixlen: int,
        quarantine_s: float,
        now: float,
        persisted: dict[str, Any] | None = None,
        *,
        settle_s: float = DEFAULT_SETTLE_S,
        revive_grace_s: float = DEFAULT_REVIVE_GRACE_S,
        wall_offset: float = 0.0,
        clock: HybridClock | None = None,
    ) -> None:
        """``now`` is the driver's clock (seconds); ``now + wall_offset`` must be wall
        time (``time.time()``), used for claim timestamps. ``persisted`` is a value
        :meth:`state_to_persist` returned in an earlier run. ``clock`` is the node's
        hybrid clock when it is shared (the agent's, restored from its saved reading)."""
        if not node or not node_id or len(node_id) > MAX_NODE_ID_LEN:
            raise IpamConfigError("node name and node id must be non-empty (id <= 128 chars)")
        self.node = node
        self.node_id = node_id
        self.prefix = parse_prefix(prefix, block_prefixlen)
        self.block_prefixlen = block_prefixlen
        self.quarantine_s = quarantine_s
        self.settle_s = settle_s
        self.revive_grace_s = revive_grace_s
        self.wall_offset = wall_offset
        self.num_blocks = 1 << (block_prefixlen - self.prefix.prefixlen)
        self._block_size = 1 << (self.prefix.max_prefixlen - block_prefixlen)
        self._last_offset = self._block_size - (2 if self.prefix.version == 4 else 1)
        self.stats: dict[str, int] = {
            "bad_claims": 0,  # undecodable claim values (dropped)
            "foreign_claims": 0,  # valid but another prefix or block size (ignored)
            "clock_skew": 0,  # claim timestamps too far ahead to merge into our clock
            "conflicts_lost": 0,
            "exhausted": 0,
        }
        self._clock = clock if clock is not None else HybridClock()
        self._provisional_until: float | None = None  # restored claim not yet confirmed
        self._parsed: dict[str, int | None] = {}  # block text -> index (parsing is slow)
        self._blocks: dict[int, IPNetwork] = {}  # index -> network
        self._own: Claim | None = None
        self._claims: dict[str, Claim] = {}  # other owners' claims
        self._by_index: dict[int, set[str]] = {}  # block index -> owners claiming it
        self._members: dict[str, MemberState] = {}
        self._dead_since: dict[str, float] = {}  # owner -> when we saw it die
        self._grace_until: dict[str, float] = {}  # owner -> conflicts judged after this
        self._local: dict[str, int] = {}  # local service name -> offset in our block
        self._events: deque[IpamEvent] = deque()
        self._publish: ClaimUpdate | None = None
        self._persist_due = False
        self._synced = False
        self._settled = False  # a first claim has been attempted
        self._quarantine_check_at: float | None = None  # exhausted: next quarantine end
        self._exhausted = False
        self._decide_at: float | None = None
        self._settle_at: float | None = now + settle_s
        self._reannounce: list[float] = []  # pending re-announcement times, ascending
        self._arrival_window_end: float | None = None  # a second new member soon is a burst
        self._claimed_at: float | None = None  # when we last published a claim of our own
        if persisted is not None:
            self._restore(persisted, now)

    # ---- queries -------------------------------------------------------------------

    @property
    def block(self) -> IPNetwork | None:
        """The block this node holds, or None (settling, or prefix exhausted)."""
        return self._own.block if self._own else None

    @property
    def address(self) -> IPAddress | None:
        """This node's own overlay address: the first usable address of its block."""
        return self._address_at(FIRST_HOST_OFFSET)

    @property
    def claim(self) -> Claim | None:
        """This node's current claim."""
        return self._own

    def local_addresses(self) -> dict[str, str]:
        """Named local allocations: name -> address (empty without a block)."""
        return {n: str(self._address_at(o)) for n, o in sorted(self._local.items()) if self._own}

    def owner_address(self, owner: str) -> IPAddress | None:
        """Overlay address of ``owner`` if it holds a claim this node considers its own."""
        if owner == self.node:
            return self.address
        claim = self._claims.get(owner)
        if claim is None or self._claim_state(claim, None) is not ClaimState.ACTIVE:
            return None
        return claim.block[FIRST_HOST_OFFSET]

    def claims(self, now: float | None = None) -> list[ClaimInfo]:
        """Every claim known, own first, then by block; ``now`` refines quarantine state."""
        rows: list[ClaimInfo] = []
        if self._own is not None:
            rows.append(self._info(self._own, ClaimState.ACTIVE, "self"))
        for claim in sorted(self._claims.values(), key=lambda c: (c.index, c.owner)):
            state = self._members.get(claim.owner)
            member = state.name.lower() if state is not None else "unknown"
            rows.append(self._info(claim, self._claim_state(claim, now), member))
        return rows

    # ---- inputs --------------------------------------------------------------------

    def synced(self, now: float) -> None:
        """The driver applied the join's full state exchange: claim now, not at settle."""
        self._synced = True
        self._wake(now)

    def on_member(self, name: str, state: MemberState, now: float) -> None:
        """A membership change (from MemberJoined/Updated/Suspected/Alive/Failed/Left)."""
        if name == self.node:
            return
        previous = self._members.get(name)
        self._members[name] = state
        if state is MemberState.DEAD:
            self._dead_since.setdefault(name, now)
        else:
            self._dead_since.pop(name, None)
        if state in (MemberState.ALIVE, MemberState.SUSPECT) and previous in (
            MemberState.DEAD,
            MemberState.LEFT,
        ):
            self._grace_until[name] = now + self.revive_grace_s
            self._arrival(now, burst=True)
        elif previous is None and state in (MemberState.ALIVE, MemberState.SUSPECT):
            self._arrival(now, burst=False)
        self._wake(now)

    def on_reaped(self, name: str, now: float) -> None:
        """The gossip core forgot ``name`` (MemberReaped): forget its claim too."""
        self._members.pop(name, None)
        self._dead_since.pop(name, None)
        self._grace_until.pop(name, None)
        self._drop_claim(name)
        self._wake(now)

    def on_claim(self, owner: str, value: object, now: float) -> None:
        """``owner``'s replicated STATE_KEY changed to ``value`` (None when deleted).

        Undecodable values are dropped and counted; they never raise.
        """
        if owner == self.node:
            return
        if value is None:
            self._drop_claim(owner)
            self._wake(now)
            return
        claim = self._parse_claim(owner, value)
        if claim is None:
            return
        if not self._clock.observe(claim.time, now + self.wall_offset, owner):
            self.stats["clock_skew"] += 1
        self._drop_claim(owner)
        self._claims[owner] = claim
        self._by_index.setdefault(claim.index, set()).add(owner)
        self._wake(now)

    def handle_timeout(self, now: float) -> None:
        """Run the decisions due at or before ``now``."""
        for owner, until in list(self._grace_until.items()):
            if until <= now:
                del self._grace_until[owner]
        self._decide_at = None
        self._quarantine_check_at = None
        republish = False
        while self._reannounce and self._reannounce[0] <= now:
            self._reannounce.pop(0)
            republish = True
        if republish and self._own is not None and self._publish is None:
            self._publish = ClaimUpdate(self._own.to_value(), again=True)
        if self._own is not None and self._provisional_until is not None:
            self._confirm_restored(now)
        if self._own is None:
            if self._synced or (self._settle_at is not None and now >= self._settle_at):
                self._settled = True
                self._settle_at = None
            if self._settled:
                self._claim_free_block(now, lost=None)
            if self._own is None and self._settled:
                ends = [t + self.quarantine_s for t in self._dead_since.values()]
                self._quarantine_check_at = min((t for t in ends if t > now), default=None)
            return
        winner = self._earliest_rival()
        if winner is not None:
            self.stats["conflicts_lost"] += 1
            self._claim_free_block(now, lost=winner)

    def get_timer(self) -> float | None:
        """The earliest time :meth:`handle_timeout` has work to do, or None."""
        candidates = (
            self._decide_at,
            self._settle_at,
            self._quarantine_check_at,
            self._reannounce[0] if self._reannounce else None,
            self._provisional_until,
        )
        deadlines = [t for t in candidates if t is not None]
        if self._grace_until and self._own is not None:
            deadlines.append(min(self._grace_until.values()))
        return min(deadlines) if deadlines else None

    # ---- commands ------------------------------------------------------------------

    def allocate(self, name: str) -> IPAddress:
        """Give local service ``name`` an address from this node's block (idempotent)."""
        if not name or len(name) > MAX_NAME_LEN:
            raise IpamError(f"address name must be 1..{MAX_NAME_LEN} characters")
        if self._own is None:
            if self._exhausted:
                raise AddressExhausted(f"overlay prefix {self.prefix} is exhausted: no block here")
            raise NoBlock("this node holds no address block yet")
        if name in self._local:
            return self._address_or_fail(self._local[name])
        if len(self._local) >= MAX_LOCAL_ADDRESSES:
            raise AddressExhausted(f"at most {MAX_LOCAL_ADDRESSES} named addresses per node")
        used = set(self._local.values())
        for offset in range(FIRST_HOST_OFFSET + 1, self._last_offset + 1):
            if offset not in used:
                self._local[name] = offset
                self._persist_due = True
                return self._address_or_fail(offset)
        raise AddressExhausted(f"block {self._own.block} has no free address")

    def release(self, name: str) -> bool:
        """Return ``name``'s address to the block; False if it held none."""
        if self._local.pop(name, None) is None:
            return False
        self._persist_due = True
        return True

    # ---- outputs -------------------------------------------------------------------

    def claim_to_publish(self) -> ClaimUpdate | None:
        """The claim change to put in replicated state, or None (drained: returned once)."""
        update, self._publish = self._publish, None
        return update

    def state_to_persist(self) -> dict[str, Any] | None:
        """What to save atomically when it changed (drained); feed back as ``persisted``."""
        if not self._persist_due:
            return None
        self._persist_due = False
        own = self._own
        return {
            "v": PERSIST_VERSION,
            "prefix": str(self.prefix),
            "block": str(own.block) if own else None,
            "t": own.time.to_value() if own else None,
            "hlc": self._clock.last.to_value(),
            "addresses": dict(self._local),
        }

    def next_event(self) -> IpamEvent | None:
        """The next event for the driver to log, or None."""
        return self._events.popleft() if self._events else None

    # ---- internals -----------------------------------------------------------------

    def _wake(self, now: float) -> None:
        if self._decide_at is None or now < self._decide_at:
            self._decide_at = now

    def _arrival(self, now: float, burst: bool) -> None:
        """A member arrived (new, or back): schedule a re-publish if it is a burst."""
        if self._own is None or self._reannounce:
            return
        fresh = self._claimed_at is not None and now - self._claimed_at < FRESH_CLAIM_S
        if fresh and not burst:
            return  # new members while our claim still spreads: see FRESH_CLAIM_S
        window = self._arrival_window_end
        if burst or (window is not None and now <= window):
            self._reannounce = [now + DEFAULT_REANNOUNCE_DELAY_S]
            self._arrival_window_end = None
        else:
            self._arrival_window_end = now + DEFAULT_REANNOUNCE_DELAY_S

    def _restore(self, persisted: dict[str, Any], now: float) -> None:
        if not isinstance(persisted, dict) or persisted.get("v") != PERSIST_VERSION:
            return
        try:  # our own saved reading: trusted, however far ahead of a clock reset to 1970
            self._clock.restore(Timestamp.from_value(persisted.get("hlc")), now + self.wall_offset)
        except ValueError:
            pass
        addresses = persisted.get("addresses")
        if isinstance(addresses, dict):
            for name, offset in list(addresses.items())[:MAX_LOCAL_ADDRESSES]:
                if (
                    isinstance(name, str)
                    and 0 < len(name) <= MAX_NAME_LEN
                    and type(offset) is int
                    and FIRST_HOST_OFFSET < offset <= self._last_offset
                ):
                    self._local[name] = offset
        index = self._parse_block(persisted.get("block"))
        if index is None:
            return
        # Claim the old block at once, with a fresh (later) timestamp: see the module doc.
        self._settle_at = None
        self._settled = True
        self._take(index, now)
        self._provisional_until = now + self.settle_s

    def _parse_block(self, text: object) -> int | None:
        """Block index of ``text`` in our prefix, None if absent or another geometry."""
        if not isinstance(text, str) or len(text) > MAX_BLOCK_TEXT_LEN:
            return None
        cache = self._parsed
        if text in cache:
            return cache[text]
        if len(cache) >= PARSE_CACHE_SIZE:
            cache.clear()
        index = cache[text] = self._parse_block_text(text)
        return index

    def _parse_block_text(self, text: str) -> int | None:
        try:
            block = ipaddress.ip_network(text, strict=True)
        except ValueError:
            return None
        if (
            block.version != self.prefix.version
            or block.prefixlen != self.block_prefixlen
            or not block.subnet_of(self.prefix)  # type: ignore[arg-type]
        ):
            return None
        offset = int(block.network_address) - int(self.prefix.network_address)
        return offset // self._block_size

    def _parse_claim(self, owner: str, value: object) -> Claim | None:
        if not isinstance(value, dict) or value.get("v") != CLAIM_VERSION:
            self.stats["bad_claims"] += 1
            return None
        node_id, block = value.get("id"), value.get("block")
        try:
            time = Timestamp.from_value(value.get("t"))
        except ValueError:
            time = None
        if (
            time is None
            or not isinstance(node_id, str)
            or not 0 < len(node_id) <= MAX_NODE_ID_LEN
            or not isinstance(block, str)
            or len(block) > MAX_BLOCK_TEXT_LEN
        ):
            self.stats["bad_claims"] += 1
            return None
        index = self._parse_block(block)
        if index is None:
            self.stats["foreign_claims"] += 1
            return None
        return Claim(owner, node_id, self._block_at(index), index, time)

    def _block_at(self, index: int) -> IPNetwork:
        block = self._blocks.get(index)
        if block is None:
            if len(self._blocks) >= PARSE_CACHE_SIZE:
                self._blocks.clear()
            first = int(self.prefix.network_address) + index * self._block_size
            block = self._blocks[index] = ipaddress.ip_network((first, self.block_prefixlen))
        return block

    def _address_at(self, offset: int) -> IPAddress | None:
        return self._own.block[offset] if self._own is not None else None

    def _address_or_fail(self, offset: int) -> IPAddress:
        address = self._address_at(offset)
        if address is None:
            raise NoBlock("this node holds no address block yet")
        return address

    def _drop_claim(self, owner: str) -> None:
        old = self._claims.pop(owner, None)
        if old is not None:
            owners = self._by_index[old.index]
            owners.discard(owner)
            if not owners:
                del self._by_index[old.index]

    def _occupies(self, claim: Claim, now: float) -> bool:
        """Does ``claim`` keep its block from being claimed by someone else?"""
        state = self._members.get(claim.owner)
        if state is MemberState.LEFT:
            return False
        if state is MemberState.DEAD:
            return now < self._dead_since[claim.owner] + self.quarantine_s
        return True

    def _is_rival(self, claim: Claim) -> bool:
        """Can ``claim`` beat ours? Only a live owner's, outside its revive grace."""
        state = self._members.get(claim.owner)
        return state not in (MemberState.DEAD, MemberState.LEFT) and (
            claim.owner not in self._grace_until
        )

    def _earliest_rival(self) -> Claim | None:
        own = self._own
        assert own is not None
        rivals = [
            self._claims[o]
            for o in self._by_index.get(own.index, ())
            if self._is_rival(self._claims[o])
        ]
        earlier = [c for c in rivals if c.order_key() < own.order_key()]
        return min(earlier, key=Claim.order_key) if earlier else None

    def _claim_state(self, claim: Claim, now: float | None) -> ClaimState:
        state = self._members.get(claim.owner)
        if state is MemberState.LEFT:
            return ClaimState.FREE
        if state is MemberState.DEAD:
            if now is not None and not self._occupies(claim, now):
                return ClaimState.FREE
            return ClaimState.QUARANTINED
        rivals = [self._claims[o] for o in self._by_index.get(claim.index, ()) if o != claim.owner]
        if self._own is not None and self._own.index == claim.index:
            rivals.append(self._own)
        if any(self._is_live(r) and r.order_key() < claim.order_key() for r in rivals):
            return ClaimState.CONFLICT
        return ClaimState.ACTIVE

    def _is_live(self, claim: Claim) -> bool:
        if claim.owner == self.node:
            return True
        return self._members.get(claim.owner) not in (MemberState.DEAD, MemberState.LEFT)

    def _info(self, claim: Claim, state: ClaimState, member: str) -> ClaimInfo:
        return ClaimInfo(
            node=claim.owner,
            node_id=claim.node_id,
            block=str(claim.block),
            address=str(claim.block[FIRST_HOST_OFFSET]),
            state=state,
            member_state=member,
        )

    def _start_index(self) -> int:
        digest = hashlib.blake2b(self.node_id.encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big") % self.num_blocks

    def _free_index(self, now: float) -> int | None:
        """First free block probing up from the hash start, or None if all are taken."""
        taken = {
            index
            for index, owners in self._by_index.items()
            if any(self._occupies(self._claims[o], now) for o in owners)
        }
        if len(taken) >= self.num_blocks:
            return None
        start = self._start_index()
        # Pigeonhole: one of the first len(taken) + 1 probes is free.
        for step in range(len(taken) + 1):
            index = (start + step) % self.num_blocks
            if index not in taken:
                return index
        return None  # unreachable: the pigeonhole bound above guarantees a free probe

    def _claim_free_block(self, now: float, lost: Claim | None) -> None:
        old = self._own
        index = self._free_index(now)
        if lost is not None and old is not None:
            new = str(self._block_at(index)) if index is not None else None
            self._events.append(Renumbered(str(old.block), new, lost.owner, lost.time))
        if index is not None:
            self._exhausted = False
            self._take(index, now)
            return
        if old is not None:
            self._own = None
            self._publish = ClaimUpdate(None)
            self._persist_due = True
        if not self._exhausted:
            self._exhausted = True
            self.stats["exhausted"] += 1
            self._events.append(PrefixExhausted(str(self.prefix)))

    def _confirm_restored(self, now: float) -> None:
        """Stamp a restored claim again once it meets a claim on its block, or at sync."""
        own, until = self._own, self._provisional_until
        assert own is not None and until is not None
        met = bool(self._by_index.get(own.index))
        if not met and not self._synced and now < until:
            return
        self._provisional_until = None
        if met or self._clock.last > own.time:  # a holder to yield to, or our clock was behind
            self._take(own.index, now)

    def _take(self, index: int, now: float) -> None:
        time = self._clock.tick(now + self.wall_offset)
        known = [self._claims[o].time for o in self._by_index.get(index, ())]
        if known and max(known) >= time:  # our clock is behind a claim on this block
            time = max(known).successor()
        self._own = Claim(self.node, self.node_id, self._block_at(index), index, time)
        self._publish = ClaimUpdate(self._own.to_value())
        self._claimed_at = now
        self._persist_due = True
        address = self._own.block[FIRST_HOST_OFFSET]
        self._events.append(BlockClaimed(str(self._own.block), str(address), time))
