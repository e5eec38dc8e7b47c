"""MQTT across the mesh, sans-IO: who is interested in what, where a message goes, once.

Theory of operation
-------------------
**Interest.** Each agent publishes, in its replicated state under :data:`INTEREST_KEY`, the
topic filters its local clients subscribe to (plain) and its share-group memberships
(``(group, filter)`` pairs), as one compact value (:func:`interest_value`). The value is
bounded: more than :data:`MAX_FILTERS` plain filters (or :data:`MAX_SHARES` pairs) are
aggregated into covering filters (``a/b/c`` and ``a/b/d`` become ``a/b/#``; see
:func:`aggregate`). Aggregation only ever widens interest: an agent may receive a message
none of its clients wants (its broker then delivers to nobody) but never misses one.
:func:`parse_interest` is the total decoder for a peer's value (None: malformed, counted by
the caller, the peer treated as interested in nothing).

**Routing a local publish** (:meth:`MeshRouter.plan`). Every other agent with a plain filter
matching the topic gets the message once (:attr:`Plan.plain`). For each share group with a
member filter matching the topic, across the whole mesh, exactly one agent is chosen
(:attr:`Plan.shares`): this agent when it has a member of the group (locality first), else
the candidate agent this router has sent least to recently (least loaded; ties broken by the
injected rng). The chosen agent delivers to one of its local members; the others do not
deliver to theirs. So a group spanning nodes gets each message exactly once mesh-wide, and
plain subscribers each get it once. The local broker is told which groups are its own
(``share_here``).

**Envelopes** (:class:`Envelope`, :func:`encode_envelope`, :func:`decode_envelope`). A routed
message carries its origin agent, a per-origin sequence number, a hop count, the topic,
payload, QoS, retain flag, the MQTT 5 properties that survive a hop (:data:`_PROPS`),
whether the receiver delivers to plain subscribers, and which share groups are the
receiver's to serve. Origin + sequence number are remembered (:class:`Seen`, bounded LRU)
so a duplicate (a retry after a lost reply) is acknowledged but not delivered twice; a hop
count above :data:`MAX_HOPS` is dropped (routing is one hop, origin to destination: nothing
is forwarded again, so no loop can form). The decoder is bounded and total: only
:class:`MeshDecodeError` escapes.

**Retained messages.** A retained publish is sent to every agent (not only to interested
ones) with its stamp, and applied last-writer-wins by that stamp (the origin's hybrid logical
clock reading and its name, so two writes never tie). Agents that missed some (a partition,
a restart) catch up by anti-entropy: each publishes :func:`retained_digest` of its retained
store under :data:`RETAINED_KEY`; an agent whose digest differs from a peer's asks that
peer for its retained items (:func:`encode_retained_items`, bounded) and merges them.
"""

from __future__ import annotations

import hashlib
import random
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack

from overlay.mqtt.packets import NO_PROPERTIES, Properties
from overlay.mqtt.topics import filter_matches, valid_filter, valid_topic_name

INTEREST_KEY = "mqi"  # replicated-state key: this agent's subscribers' filters
RETAINED_KEY = "mqr"  # replicated-state key: digest of this agent's retained store
MAX_FILTERS = 32  # plain filters in one interest value (more are aggregated)
MAX_SHARES = 16  # (group, filter) pairs in one interest value (more: one filter per group)
MAX_GROUPS = 32  # share groups announced by one agent
MAX_FILTER_BYTES = 256  # one filter in an interest value
MAX_GROUP_BYTES = 64
MAX_TOPIC_LEVELS = 32
MAX_HOPS = 2
MAX_ENVELOPE_BYTES = 256 * 1024 + 4096  # the local endpoint's packet limit and headroom
MAX_RETAINED_ITEMS = 1024  # in one anti-entropy reply
MAX_LOAD_NODES = 4096
_PROPS = (
    "payload_format_indicator", "message_expiry_interval", "content_type", "response_topic",
    "correlation_data", "user_properties",
)  # fmt: skip


class MeshDecodeError(ValueError):
    """A peer's envelope or retained list is malformed; the only error the decoders raise."""


# --- interest -----------------------------------------------------------------------------


def _covers(wide: str, narrow: str) -> bool:
    """Whether every topic ``narrow`` matches is also matched by ``wide`` (both valid filters)."""
    w, n = wide.split("/"), narrow.split("/")
    if narrow.startswith("$") != wide.startswith("$") and w[0] in ("+", "#"):
        return False
    for i, level in enumerate(w):
        if level == "#":
            return True
        if i >= len(n) or n[i] == "#" or (level != "+" and level != n[i]):
            return False
    return len(w) == len(n)


def _minimal(filters: Iterable[str]) -> list[str]:
    """The filters not covered by another one, sorted (so values are stable)."""
    unique = sorted(set(filters))
    return [f for f in unique if not any(g != f and _covers(g, f) for g in unique)]


def _prefix(a: Sequence[str], b: Sequence[str]) -> list[str]:
    common: list[str] = []
    for x, y in zip(a, b, strict=False):
        if x != y or x in ("+", "#"):
            break
        common.append(x)
    return common


def aggregate(filters: Iterable[str], limit: int) -> list[str]:
    """At most ``limit`` filters covering all of ``filters``.

    The one exception: topics starting with ``$`` are not matched by ``#`` (MQTT 4.7.2), so
    when nothing short of ``#`` covers the rest, each ``$`` root keeps its own ``$X/#``.
    """
    found = _minimal(filters)
    while len(found) > limit:
        split = [f.split("/") for f in found]
        best: list[str] = []
        for i in range(len(split) - 1):  # sorted: the longest common prefix is a neighbour's
            common = _prefix(split[i], split[i + 1])
            if len(common) > len(best):
                best = common
        if not best:  # nothing shared: one filter for all, and one per $-topic root
            roots = sorted({f"{s[0]}/#" for s in split if s[0].startswith("$")})
            return ["#", *roots]
        wide = "/".join([*best, "#"])
        found = _minimal([wide, *found])
    return found


@dataclass(frozen=True, slots=True)
class Interest:
    """One agent's interest: plain filters and (group, filter) share memberships."""

    plain: tuple[str, ...] = ()
    shares: tuple[tuple[str, str], ...] = ()
    durable: tuple[str, ...] = ()  # plain filters of sessions that outlive their connection

    def wants(self, topic: str) -> bool:
        return any(filter_matches(f, topic) for f in self.plain)

    def keeps(self, topic: str) -> bool:
        """Whether a persistent session there wants ``topic`` (worth spooling while away)."""
        return any(filter_matches(f, topic) for f in self.durable)

    def groups_for(self, topic: str) -> set[str]:
        return {g for g, f in self.shares if filter_matches(f, topic)}


NO_INTEREST = Interest()


def interest_value(
    plain: Iterable[str], shares: Iterable[tuple[str, str]], durable: Iterable[str] = ()
) -> Any:
    """The replicated value for this agent's interest; None when it has none (delete the key).

    Share groups beyond :data:`MAX_GROUPS` (sorted by name) are left out: their members here
    are served by local publishes only (the caller counts them: :func:`groups_left_out`).
    ``durable``: the plain filters of persistent sessions (key ``d``, aggregated like the
    rest), what a sender spools for this agent while it is away.
    """
    flat = aggregate(plain, MAX_FILTERS)
    kept_filters = aggregate(durable, MAX_FILTERS)
    by_group: dict[str, list[str]] = {}
    for group, topic_filter in shares:
        by_group.setdefault(group, []).append(topic_filter)
    kept = sorted(by_group)[:MAX_GROUPS]
    pairs = sorted((g, f) for g in kept for f in aggregate(by_group[g], 4))
    if len(pairs) > MAX_SHARES:  # many groups: one covering filter each
        pairs = sorted((g, f) for g in kept for f in aggregate(by_group[g], 1))
    if not flat and not pairs:
        return None
    value: dict[str, Any] = {"v": 1, "f": flat, "s": [list(p) for p in pairs]}
    if kept_filters:
        value["d"] = kept_filters
    return value


def groups_left_out(shares: Iterable[tuple[str, str]]) -> int:
    """How many share groups :func:`interest_value` cannot announce."""
    return max(0, len({g for g, _ in shares}) - MAX_GROUPS)


def parse_interest(value: object) -> Interest | None:
    """A peer's interest value, checked; None when malformed (total: never raises)."""
    if not isinstance(value, dict) or value.get("v") != 1:
        return None
    plain, shares, durable = value.get("f", []), value.get("s", []), value.get("d", [])
    if not all(isinstance(x, list) for x in (plain, shares, durable)):
        return None
    if len(plain) > 2 * MAX_FILTERS or len(shares) > 2 * max(MAX_SHARES, MAX_GROUPS):
        return None
    if len(durable) > 2 * MAX_FILTERS:
        return None
    for f in (*plain, *durable):
        if not _ok_filter(f):
            return None
    pairs: list[tuple[str, str]] = []
    for pair in shares:
        if not (isinstance(pair, list) and len(pair) == 2 and _ok_group(pair[0])):
            return None
        if not _ok_filter(pair[1]):
            return None
        pairs.append((pair[0], pair[1]))
    return Interest(tuple(plain), tuple(pairs), tuple(durable))


def _ok_filter(f: object) -> bool:
    return (
        isinstance(f, str)
        and len(f.encode("utf-8", "surrogatepass")) <= MAX_FILTER_BYTES
        and valid_filter(f, MAX_TOPIC_LEVELS)
    )


def _ok_group(g: object) -> bool:
    return (
        isinstance(g, str)
        and 0 < len(g.encode("utf-8", "surrogatepass")) <= MAX_GROUP_BYTES
        and not any(c in g for c in "+#/\0")
    )


# --- envelopes ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Envelope:
    """A message routed from its origin agent to one destination agent."""

    origin: str
    seq: int
    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    plain: bool = True  # deliver to the destination's plain subscribers
    groups: tuple[str, ...] = ()  # share groups the destination serves for this message
    stamp: tuple[int, int, str] | None = None  # retained: (hlc wall ms, hlc counter, origin)
    hop: int = 1
    client_id: str | None = None  # the publishing client, for no_local
    properties: Properties = NO_PROPERTIES


def _props_out(props: Properties) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in _PROPS:
        value = getattr(props, name)
        if name == "user_properties":
            if value:
                out["u"] = [list(p) for p in value]
        elif value is not None:
            out[name] = value
    return out


def encode_envelope(env: Envelope) -> bytes:
    doc = [
        1, env.origin, env.seq, env.hop, env.topic, env.payload, env.qos, env.retain,
        env.plain, list(env.groups), list(env.stamp) if env.stamp else None, env.client_id,
        _props_out(env.properties),
    ]  # fmt: skip
    return msgpack.packb(doc, use_bin_type=True)  # type: ignore[no-any-return]


MAX_BATCH = 256  # envelopes in one channel request
MAX_ROUTE_CACHE = 4096  # topics whose routes MeshRouter keeps
MAX_BATCH_BYTES = 1 << 20  # the channel's message limit


def encode_batch(envelopes: Sequence[bytes]) -> bytes:
    """Encoded envelopes in order, for one channel request: u16 count, then u32 length + bytes."""
    if len(envelopes) > MAX_BATCH:
        raise ValueError("too many envelopes for one batch")
    parts = [len(envelopes).to_bytes(2, "big")]
    for env in envelopes:
        parts += [len(env).to_bytes(4, "big"), env]
    return b"".join(parts)


def decode_batch(data: bytes) -> list[Envelope]:
    """A batch from a peer, in order. Total: only MeshDecodeError escapes."""
    _need(2 <= len(data) <= MAX_BATCH_BYTES, "batch size")
    count, pos, found = int.from_bytes(data[:2], "big"), 2, []
    _need(count <= MAX_BATCH, "batch count")
    for _ in range(count):
        _need(pos + 4 <= len(data), "truncated batch")
        size = int.from_bytes(data[pos : pos + 4], "big")
        pos += 4
        _need(pos + size <= len(data), "truncated envelope")
        found.append(decode_envelope(data[pos : pos + size]))
        pos += size
    _need(pos == len(data), "bytes after the batch")
    return found


def _unpack(data: bytes, max_len: int) -> Any:
    if len(data) > MAX_ENVELOPE_BYTES:
        raise MeshDecodeError("too long")
    try:
        return msgpack.unpackb(
            data, raw=False, strict_map_key=True, max_array_len=max_len, max_map_len=16,
            max_str_len=MAX_ENVELOPE_BYTES, max_bin_len=MAX_ENVELOPE_BYTES,
        )  # fmt: skip
    except Exception as exc:  # msgpack raises many kinds: all are the peer's fault
        raise MeshDecodeError(f"not msgpack: {type(exc).__name__}") from None


def _need(ok: bool, what: str) -> None:
    if not ok:
        raise MeshDecodeError(what)


def decode_envelope(data: bytes) -> Envelope:
    doc = _unpack(data, 64)
    _need(isinstance(doc, list) and len(doc) == 13 and doc[0] == 1, "not an envelope")
    _, origin, seq, hop, topic, payload, qos, retain, plain, groups, stamp, client, props = doc
    _need(isinstance(origin, str) and 0 < len(origin) <= 256, "origin")
    _need(type(seq) is int and 0 <= seq < 2**63, "seq")
    _need(type(hop) is int and 0 <= hop <= 255, "hop")
    _need(isinstance(topic, str) and valid_topic_name(topic, MAX_TOPIC_LEVELS), "topic")
    _need(isinstance(payload, bytes), "payload")
    _need(qos in (0, 1, 2) and type(qos) is int, "qos")
    _need(isinstance(retain, bool) and isinstance(plain, bool), "flags")
    _need(isinstance(groups, list) and all(_ok_group(g) for g in groups), "groups")
    _need(client is None or (isinstance(client, str) and len(client) <= 256), "client id")
    return Envelope(
        origin, seq, topic, payload, qos, retain, plain, tuple(groups), _stamp(stamp), hop,
        client, _props_in(props),
    )  # fmt: skip


def _stamp(value: object) -> tuple[int, int, str] | None:
    if value is None:
        return None
    _need(isinstance(value, list) and len(value) == 3, "stamp")
    assert isinstance(value, list)
    wall, counter, origin = value
    _need(type(wall) is int and 0 <= wall < 2**63, "stamp wall")
    _need(type(counter) is int and 0 <= counter < 2**32, "stamp counter")
    _need(isinstance(origin, str) and len(origin) <= 256, "stamp origin")
    return (wall, counter, origin)


def _props_in(value: object) -> Properties:
    _need(isinstance(value, dict), "properties")
    assert isinstance(value, dict)
    kw: dict[str, Any] = {}
    for key, item in value.items():
        if key == "u":
            _need(isinstance(item, list) and len(item) <= 32, "user properties")
            pairs = []
            for pair in item:
                ok = isinstance(pair, list) and len(pair) == 2
                _need(ok and all(isinstance(x, str) for x in pair), "user property")
                pairs.append((pair[0], pair[1]))
            kw["user_properties"] = tuple(pairs)
        elif key in ("payload_format_indicator", "message_expiry_interval"):
            _need(type(item) is int and 0 <= item < 2**32, key)
            kw[key] = item
        elif key in ("content_type", "response_topic"):
            _need(isinstance(item, str) and len(item) <= 65535, key)
            kw[key] = item
        elif key == "correlation_data":
            _need(isinstance(item, bytes) and len(item) <= 65535, key)
            kw[key] = item
        else:
            raise MeshDecodeError(f"unknown property {key!r}")
    return Properties(**kw) if kw else NO_PROPERTIES


# --- routing ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Plan:
    """Where one local publish goes: agents for plain delivery, and each group's one agent."""

    plain: frozenset[str]
    shares: Mapping[str, str]  # group -> agent (may be this agent)

    def destinations(self, me: str) -> dict[str, tuple[bool, tuple[str, ...]]]:
        """agent -> (plain, groups it serves), this agent excluded."""
        out: dict[str, tuple[bool, tuple[str, ...]]] = {n: (True, ()) for n in self.plain}
        for group, node in sorted(self.shares.items()):
            if node != me:
                plain, groups = out.get(node, (False, ()))
                out[node] = (plain, (*groups, group))
        return out


class Seen:
    """(origin, seq) of envelopes already delivered here, the newest :attr:`size` of them."""

    def __init__(self, size: int = 8192) -> None:
        self.size = size
        self._seen: OrderedDict[tuple[str, int], None] = OrderedDict()

    def first_time(self, origin: str, seq: int) -> bool:
        key = (origin, seq)
        if key in self._seen:
            self._seen.move_to_end(key)
            return False
        self._seen[key] = None
        if len(self._seen) > self.size:
            self._seen.popitem(last=False)
        return True


@dataclass
class RouterStats:
    interest_malformed: int = 0
    duplicates: int = 0
    hop_limit: int = 0
    planned: int = 0


@dataclass
class MeshRouter:
    """Interest of every agent and the routing decisions; see the module docstring."""

    me: str
    rng: random.Random
    interest: dict[str, Interest] = field(default_factory=dict)
    stats: RouterStats = field(default_factory=RouterStats)
    seen: Seen = field(default_factory=Seen)
    _load: dict[str, float] = field(default_factory=dict)
    _seq: int = 0
    # Per topic: (plain destinations, share group -> candidate agents), valid while neither
    # the interest nor the reachable set changed (`_routes_for`); bounded by MAX_ROUTE_CACHE.
    _routes: dict[str, tuple[frozenset[str], dict[str, list[str]]]] = field(default_factory=dict)
    _routes_live: frozenset[str] | None = None

    def set_interest(self, node: str, value: object) -> None:
        """A peer's (or this agent's own) interest value changed; None removes it."""
        self._routes.clear()
        if value is None:
            self.interest.pop(node, None)
            return
        parsed = parse_interest(value)
        if parsed is None:
            self.stats.interest_malformed += 1
            parsed = NO_INTEREST
        self.interest[node] = parsed

    def remove(self, node: str) -> None:
        self._routes.clear()
        self.interest.pop(node, None)
        self._load.pop(node, None)

    def next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def start_seq(self, base: int) -> None:
        """Number this run's envelopes from ``base`` (the caller passes its hybrid clock in
        ms << 20): a restarted agent must not reuse the sequence numbers peers remember in
        :class:`Seen`, or they would drop its new messages as duplicates."""
        self._seq = max(self._seq, min(base, 2**62))

    def plan(self, topic: str, reachable: Iterable[str] | None = None) -> Plan:
        """Where a message accepted here on ``topic`` goes (``reachable``: live agents)."""
        self.stats.planned += 1
        live = frozenset(self.interest) if reachable is None else frozenset(reachable) | {self.me}
        plain, members = self._routes_for(topic, live)
        shares = {g: self._choose(nodes) for g, nodes in members.items()}
        return Plan(plain, shares)

    def _routes_for(
        self, topic: str, live: frozenset[str]
    ) -> tuple[frozenset[str], dict[str, list[str]]]:
        """Who wants ``topic`` among ``live`` agents, cached per topic (a burst on one topic
        matches every agent's filters once, not once per message)."""
        if live != self._routes_live or len(self._routes) >= MAX_ROUTE_CACHE:
            self._routes.clear()
            self._routes_live = live
        found = self._routes.get(topic)
        if found is not None:
            return found
        plain = frozenset(
            n for n, i in self.interest.items() if n != self.me and n in live and i.wants(topic)
        )
        members: dict[str, list[str]] = {}
        for node, interest in sorted(self.interest.items()):
            if node in live:
                for group in interest.groups_for(topic):
                    members.setdefault(group, []).append(node)
        self._routes[topic] = (plain, members)
        return plain, members

    def keeps(self, node: str, topic: str) -> bool:
        """Whether a persistent session on ``node`` wants ``topic`` (spool it while away)."""
        interest = self.interest.get(node)
        return interest is not None and interest.keeps(topic)

    def absent_keepers(self, topic: str, reachable: Iterable[str]) -> list[str]:
        """Agents not in ``reachable`` whose persistent sessions want ``topic``: a QoS 1/2
        message is spooled for them until they are back (departed or unreachable)."""
        live = set(reachable) | {self.me}
        return sorted(n for n, i in self.interest.items() if n not in live and i.keeps(topic))

    def _choose(self, nodes: list[str]) -> str:
        if self.me in nodes:
            return self.me
        least = min(self._load.get(n, 0.0) for n in nodes)
        best = [n for n in nodes if self._load.get(n, 0.0) == least]
        chosen = best[0] if len(best) == 1 else self.rng.choice(best)
        self.sent(chosen)
        return chosen

    def sent(self, node: str, weight: float = 1.0) -> None:
        """Count a message sent to ``node`` (the load the share choice balances)."""
        if len(self._load) >= MAX_LOAD_NODES and node not in self._load:
            self._load.clear()
        self._load[node] = self._load.get(node, 0.0) + weight

    def accept(self, env: Envelope) -> bool:
        """Whether an envelope that arrived here is delivered (not a duplicate, hops left)."""
        if env.hop > MAX_HOPS:
            self.stats.hop_limit += 1
            return False
        if not self.seen.first_time(env.origin, env.seq):
            self.stats.duplicates += 1
            return False
        return True


# --- retained anti-entropy ----------------------------------------------------------------

RetainedRow = tuple[str, bytes, int, tuple[int, int, str]]  # topic, payload, qos, stamp


def retained_digest(rows: Iterable[tuple[str, object]]) -> str:
    """A short digest of (topic, stamp) pairs: equal stores have equal digests."""
    h = hashlib.blake2b(digest_size=8)
    count = 0
    for topic, stamp in sorted(rows, key=lambda r: r[0]):
        h.update(msgpack.packb([topic, list(stamp) if isinstance(stamp, tuple) else stamp]))
        count += 1
    return f"{count}:{h.hexdigest()}"


def encode_retained_items(rows: Iterable[RetainedRow]) -> bytes:
    doc = [[t, p, q, list(s)] for t, p, q, s in list(rows)[:MAX_RETAINED_ITEMS]]
    return msgpack.packb(doc, use_bin_type=True)  # type: ignore[no-any-return]


def decode_retained_items(data: bytes) -> list[RetainedRow]:
    doc = _unpack(data, MAX_RETAINED_ITEMS)
    _need(isinstance(doc, list), "not a retained list")
    rows: list[RetainedRow] = []
    for row in doc:
        _need(isinstance(row, list) and len(row) == 4, "retained row")
        topic, payload, qos, stamp = row
        _need(isinstance(topic, str) and valid_topic_name(topic, MAX_TOPIC_LEVELS), "topic")
        _need(isinstance(payload, bytes) and qos in (0, 1, 2) and type(qos) is int, "row")
        parsed = _stamp(stamp)
        _need(parsed is not None, "retained row without a stamp")
        rows.append((topic, payload, qos, parsed))  # type: ignore[arg-type]
    return rows
