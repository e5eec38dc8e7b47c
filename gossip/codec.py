"""Wire codec: messages <-> msgpack bytes, with a bounded, total decoder.

Wire format (plaintext; the core seals it with the keyring, AAD = cluster name)::

    datagram = version byte (PROTOCOL_VERSION) |
               msgpack array [sender str, epoch int, counter int, to int, message, ...]
    frame    = version byte (PROTOCOL_VERSION) | one msgpack message (a PushPull)
    message  = msgpack array [type_code, field, ...]   (positional, compact)

A datagram's first four elements are its :class:`DatagramHeader`: the sender's
name, its boot epoch (0..2**63-1), the datagram's counter in that epoch
(0..2**64-1) and the destination's tag (:func:`destination_tag` of the name of
the member it is sent to, 0..2**32-1). The receiver drops a datagram whose tag
is not its own (a capture re-addressed to another member) and checks the rest
with its anti-replay window (``replay.py``). The fields share the message
array, so the header costs only themselves: the name's length + 1, 1 to 9
bytes each for epoch and counter, 5 for the tag (about 25 bytes for a
16-character name). Version 1 (no header) is refused as an unknown version,
a counted decode error.

Type codes and fields, in order (``addr`` is ``[host str, port int]``)::

    1 Ping          seq, target, source, source_addr
    2 Ack           seq, source
    3 Nack          seq, source
    4 PingReq       seq, target, target_addr, source, source_addr, nack bool
    5 Alive         name, incarnation, addr, meta bin[, sig bin]
    6 Suspect       name, incarnation, sender
    7 Dead          name, incarnation, sender
    8 StateUpdate   owner, version, key, value, deleted bool[, sig bin]
    9 UserBroadcast origin, seq, payload bin
   10 PushPull      source, join bool, reply bool,
                    [[name, addr, incarnation, state int, meta bin[, sig bin]], ...],
                    [[owner, [[key, version, value, deleted bool[, sig bin]], ...]], ...],
                    epoch (the source's boot epoch)
                    [, summary, want]          (both or neither; nil when absent)

    summary = [members_hash bin16, states_hash bin16,
               nil | [[name, incarnation, state int], ...],
               nil | [[owner, max_version, digest bin8], ...]]
    want    = [[name, ...], [[owner, [[key, version, entry_hash bin4], ...]], ...]]

A PushPull of seven fields is a full-state exchange; with a summary or a want it
is a digest exchange (``digest.py``). State entries are encoded and decoded in
one place each (``_wire_entry`` / ``_entry``): a field appended there travels
in push-pulls; ``StateUpdate`` is its own message (code 8).

``sig`` (the owner's signature, ``gossip/signing.py``; on an Alive or a member
record, the member's signature over its identity) is appended only when
present, so a cluster that does not sign sends exactly the bytes it sent
before signing existed; the decoder takes both lengths.

PushPull travels only in stream frames (it is far larger than a datagram); the
stream layer of the daemon puts a challenge and a small sealed header (kind,
body length) in front of the sealed frame (edgeagent/streams.py).

The decoder faces the network, so it is bounded and total: it returns messages
or raises :class:`~gossip.errors.DecodeError`, nothing else. msgpack itself is
run with length limits (no string, array or map can be larger than any valid
message needs, extension types are refused), then every field is checked
exactly: types by identity (``True`` is not an integer), sequence numbers
within uint64, incarnations and state versions within ``MAX_COUNTER``
(2**63-1, leaving headroom so that incrementing never leaves the range: see
``counter_step``), ports within 0..65535, names, hosts and keys non-empty and
short, replicated values shallow and small in packed bytes *and* in the memory
they decode to (``value_memory``). The limits are below; each says why.
A push-pull frame is not unpacked whole: ``decode_push_pull`` walks it and
unpacks one member record or state entry at a time, each after its packed
length was checked, and cuts state maps at the receiver's memory budgets
(``entry_cost``, the state store's cost model), so decoding a frame at the
limit costs about its result, not many times its size.

The encoder checks the same rules, so ``decode(encode(x)) == x`` for every
message it accepts. Local misuse raises:

- :class:`ValueError` for a malformed message: wrong type, out-of-range number,
  empty or over-long name/host/key, value nested too deep or with a non-str
  map key, a NaN, a PushPull in a datagram, a tombstone carrying a value;
- :class:`~gossip.errors.BroadcastTooLarge` for content that is well formed but
  too big: meta, payload or a replicated value over its limit, too many
  messages, members or entries, or an encoded datagram over the input bound.
"""

from __future__ import annotations

import math
import sys
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import msgpack

from .errors import BroadcastTooLarge, DecodeError
from .messages import (
    Ack,
    Address,
    Alive,
    Dead,
    MemberRecord,
    MemberState,
    MemberSummary,
    Message,
    Nack,
    OwnerSummary,
    Ping,
    PingReq,
    PushPull,
    StateEntry,
    StateUpdate,
    StateValue,
    Summary,
    Suspect,
    UserBroadcast,
    Want,
)

PROTOCOL_VERSION = 2  # 2: datagrams carry a DatagramHeader (anti-replay)

# Type codes (first element of every message array).
PING = 1
ACK = 2
NACK = 3
PING_REQ = 4
ALIVE = 5
SUSPECT = 6
DEAD = 7
STATE_UPDATE = 8
USER_BROADCAST = 9
PUSH_PULL = 10

# --- Limits -----------------------------------------------------------------
MAX_META_BYTES = 512  # memberlist MetaMaxSize; GossipConfig.max_meta_bytes may only lower it
# Largest UDP payload (RFC 768 length field); nothing bigger can be a datagram.
MAX_DATAGRAM_INPUT_BYTES = 65_535
# A 1400-byte datagram holds at most ~280 of the smallest messages (5 bytes);
# 1024 leaves headroom and keeps the array header at 3 bytes (msgpack array16).
MAX_MESSAGES_PER_DATAGRAM = 1024
# Version byte + worst-case array header (array16: 0xdc + 2-byte length).
DATAGRAM_HEADER_BYTES = 1 + 3
# Worst-case DatagramHeader fields: a maximal sender (str8) and two uint64.
MAX_UINT64 = 2**64 - 1  # sequence numbers: msgpack's unsigned maximum (they wrap)
# Incarnations and state versions only grow, by one per refutation, metadata or
# state change, so an honest one stays far below this. Decoding refuses larger
# ones, and local arithmetic saturates here (``counter_step``): a member never
# announces a number its peers would refuse. int64's maximum, so the numbers
# also fit a signed 64-bit field (JSON, Go) when persisted or exported.
MAX_COUNTER = 2**63 - 1
# How far ahead of what a receiver holds one record may move an incarnation or
# a state version (``members.can_change``, ``state_store``). Honest numbers move
# by one per event; a forged record must not spend the range in one step.
MAX_COUNTER_STEP = 2**32
MIN_INT64 = -(2**63)  # msgpack's signed range, for integers inside replicated values
MAX_PORT = 65_535
# Member names: room for a hostname, UUID or MAC-based id; memberlist sets no limit,
# but a hostile name must not fill a datagram.
MAX_NAME_BYTES = 128
# IPv6 text (45) + "%" + interface name (IFNAMSIZ 16) fits; a DNS name must be short.
MAX_HOST_BYTES = 64
MAX_KEY_BYTES = 128  # replicated-state keys and map keys inside values
# Worst-case DatagramHeader fields: a maximal sender (str8 header + name), two uint64, a uint32.
MAX_SENDER_HEADER_BYTES = (2 + MAX_NAME_BYTES) + 9 + 9 + 5
MAX_TAG = 2**32 - 1
_HEADER_FIELDS = 4
# A user broadcast must fit one 1400-byte sealed datagram with a maximal origin and sender:
# 1400 - 29 (keyring) - 4 (header) - 153 (DatagramHeader) - 144 (type, origin, seq,
# headers) = 1070.
MAX_PAYLOAD_BYTES = 1024
# One str/bin inside a replicated value: never more than a node's whole map
# budget (GossipConfig.max_state_bytes default 4096).
MAX_VALUE_BYTES = 4096
MAX_VALUE_DEPTH = 8  # nested lists/maps inside one replicated value
MAX_CONTAINER_ITEMS = 1024  # items of one list/map inside a replicated value
# Memory one decoded replicated value may become (``value_memory``: the sum of
# sys.getsizeof over its objects). Packed bytes do not bound it: ``[[]]*1000``
# packs to ~1 KB and decodes to ~64 KB. 48 KiB is 12x MAX_VALUE_BYTES: room for
# a maximal string in UCS-4 (16 KiB), or ~900 short strings in one list; a
# list of MAX_CONTAINER_ITEMS empty containers (~64 KB) is over it.
MAX_VALUE_MEMORY = 48 * 1024
# Push-pull: one record per member; well above GossipConfig.max_members (10 000).
MAX_PUSHPULL_MEMBERS = 65_535
MAX_PUSHPULL_OWNERS = 65_535  # one replicated map per member
# Entries of one owner's map: a 4096-byte map holds at most ~680 minimal entries.
MAX_STATE_ENTRIES = 1024
# An owner's signature on one state entry: 64 bytes for ECDSA P-256 as raw r||s
# (the daemon's encoding), 72 leaves room for the DER form of the same signature.
MAX_SIG_BYTES = 72

HASH_BYTES = 16  # a digest push-pull's members / states hash (blake2b)
OWNER_DIGEST_BYTES = 8  # one owner's map hash in a digest push-pull
ENTRY_HASH_BYTES = 4  # one entry's hash in a Want (tells an equal version with another value)

# A frame's bytes besides its member records and state maps: version byte,
# message array header, type code, source (str8 header + MAX_NAME_BYTES), two
# bools, the two list headers (array32: 5 bytes each) and the epoch (uint64).
FRAME_HEADER_BYTES = 1 + 1 + 1 + (2 + MAX_NAME_BYTES) + 2 + 5 + 5 + 9

_DATAGRAM_UNPACK_LIMITS: dict[str, int] = {
    "max_str_len": MAX_VALUE_BYTES,
    "max_bin_len": MAX_VALUE_BYTES,
    "max_array_len": max(_HEADER_FIELDS + MAX_MESSAGES_PER_DATAGRAM, MAX_CONTAINER_ITEMS),
    "max_map_len": MAX_CONTAINER_ITEMS,
    "max_ext_len": 0,
}
_FRAME_UNPACK_LIMITS: dict[str, int] = {
    **_DATAGRAM_UNPACK_LIMITS,
    "max_array_len": max(MAX_PUSHPULL_MEMBERS, MAX_PUSHPULL_OWNERS, MAX_CONTAINER_ITEMS),
}


@dataclass(frozen=True, slots=True)
class DatagramHeader:
    """Who sealed a datagram, in which life (boot epoch), its number in that life, and for whom."""

    sender: str
    epoch: int  # 0..MAX_COUNTER, higher on every start of the sender
    counter: int  # 0..MAX_UINT64, one per datagram within an epoch
    to: int  # destination_tag() of the member it is addressed to


def destination_tag(name: str) -> int:
    """The 32-bit tag of a member name a datagram is addressed to (CRC-32 of its UTF-8).

    Not a secret and not collision-proof: it only has to tell members apart so that a
    captured datagram cannot be re-addressed to another one (two names sharing a tag,
    about 1 in 4 billion per pair, lose that between themselves only).
    """
    return zlib.crc32(name.encode())


class _TooLarge(ValueError):
    """Internal: a size limit was exceeded (BroadcastTooLarge on encode)."""


def _fail(what: str) -> NoReturn:
    raise ValueError(what)


# --- Field checks, shared by encoder and decoder ------------------------------


def _uint(value: object, what: str) -> int:
    if type(value) is not int or not 0 <= value <= MAX_UINT64:
        _fail(f"{what} must be an int in 0..2**64-1")
    return value


def _counter(value: object, what: str) -> int:
    if type(value) is not int or not 0 <= value <= MAX_COUNTER:
        _fail(f"{what} must be an int in 0..2**63-1")
    return value


def counter_step(value: int) -> int:
    """``value + 1``, saturating at :data:`MAX_COUNTER` (the most peers accept)."""
    return value + 1 if value < MAX_COUNTER else MAX_COUNTER


def value_memory(value: object) -> int:
    """Bytes of Python objects a replicated value occupies once decoded.

    The cost model is ``sys.getsizeof`` summed over every object of the value
    (containers, their items and map keys); ``None`` and booleans are
    singletons and cost nothing but their slot. Iterative, so any depth is safe.
    """
    total = 0
    stack = [value]
    while stack:
        item = stack.pop()
        if item is None or type(item) is bool:
            continue
        total += sys.getsizeof(item)
        if type(item) is list:
            stack.extend(item)
        elif type(item) is dict:
            stack.extend(item.keys())
            stack.extend(item.values())
    return total


def _bool(value: object, what: str) -> bool:
    if type(value) is not bool:
        _fail(f"{what} must be a bool")
    return value


def _text(value: object, what: str, limit: int) -> str:
    if type(value) is not str or not value:
        _fail(f"{what} must be a non-empty str")
    if len(value) > limit or len(value.encode()) > limit:
        _fail(f"{what} longer than {limit} bytes")
    return value


def _blob(value: object, what: str, limit: int) -> bytes:
    if type(value) is not bytes:
        _fail(f"{what} must be bytes")
    if len(value) > limit:
        raise _TooLarge(f"{what} longer than {limit} bytes")
    return value


def _addr(value: object, what: str) -> Address:
    if not (type(value) is tuple or type(value) is list) or len(value) != 2:
        _fail(f"{what} must be a (host, port) pair")
    host: object = value[0]
    port: object = value[1]
    if type(port) is not int or not 0 <= port <= MAX_PORT:
        _fail(f"{what} port must be an int in 0..65535")
    return (_text(host, f"{what} host", MAX_HOST_BYTES), port)


def _value(value: object) -> StateValue:
    """Check one replicated value, its memory included (returned unchanged)."""
    checked = _value_shape(value)
    if type(checked) is list or type(checked) is dict:
        memory = value_memory(checked)
        if memory > MAX_VALUE_MEMORY:
            raise _TooLarge(f"value would take {memory} bytes of memory; at most {MAX_VALUE_MEMORY}")
    return checked


def _value_shape(value: object, depth: int = 0) -> StateValue:
    """Check one replicated value's types, depth and sizes."""
    if value is None or type(value) is bool:
        return value
    if type(value) is int:
        if not MIN_INT64 <= value <= MAX_UINT64:
            _fail("integer in value outside msgpack's range")
        return value
    if type(value) is float:
        if math.isnan(value):
            _fail("NaN in value (it is not equal to itself, so changes could not be detected)")
        return value
    if type(value) is str:
        if len(value.encode()) > MAX_VALUE_BYTES:
            raise _TooLarge(f"string in value longer than {MAX_VALUE_BYTES} bytes")
        return value
    if type(value) is bytes:
        return _blob(value, "bytes in value", MAX_VALUE_BYTES)
    if type(value) is list or type(value) is dict:
        if depth >= MAX_VALUE_DEPTH:
            _fail(f"value nested deeper than {MAX_VALUE_DEPTH}")
        if len(value) > MAX_CONTAINER_ITEMS:
            raise _TooLarge(f"container in value has more than {MAX_CONTAINER_ITEMS} items")
        if type(value) is list:
            for item in value:
                _value_shape(item, depth + 1)
        elif type(value) is dict:
            for key, item in value.items():
                if type(key) is not str or len(key.encode()) > MAX_KEY_BYTES:
                    _fail(f"map key in value must be a str of at most {MAX_KEY_BYTES} bytes")
                _value_shape(item, depth + 1)
        return value
    _fail(f"type {type(value).__name__} not allowed in a replicated value")


def _tombstone(deleted: object, value: object) -> bool:
    flag = _bool(deleted, "deleted")
    if flag and value is not None:
        _fail("a tombstone (deleted=True) must carry value None")
    return flag


# --- Encoding -----------------------------------------------------------------


def _wire_addr(addr: object, what: str) -> list[object]:
    if type(addr) is not tuple:
        _fail(f"{what} must be a tuple (host, port)")
    host, port = _addr(addr, what)
    return [host, port]


def _wire_record(rec: object) -> list[object]:
    if type(rec) is not MemberRecord:
        _fail("push-pull members must be MemberRecord")
    if type(rec.state) is not MemberState:
        _fail("MemberRecord.state must be a MemberState")
    return _signed(
        [
            _text(rec.name, "member name", MAX_NAME_BYTES),
            _wire_addr(rec.addr, "member addr"),
            _counter(rec.incarnation, "incarnation"),
            int(rec.state),
            _blob(rec.meta, "meta", MAX_META_BYTES),
        ],
        rec.sig,
    )


def _wire_entry(entry: object) -> list[object]:
    if type(entry) is not StateEntry:
        _fail("push-pull state entries must be StateEntry")
    return _signed(
        [
            _text(entry.key, "state key", MAX_KEY_BYTES),
            _counter(entry.version, "version"),
            _value(entry.value),
            _tombstone(entry.deleted, entry.value),
        ],
        entry.sig,
    )


def _signed(fields: list[object], sig: object) -> list[object]:
    """``fields`` with the signature appended, when there is one."""
    if _blob(sig, "sig", MAX_SIG_BYTES):
        fields.append(sig)
    return fields


def _wire_states(states: object) -> list[object]:
    if type(states) is not tuple:
        _fail("PushPull.states must be a tuple")
    if len(states) > MAX_PUSHPULL_OWNERS:
        raise _TooLarge(f"push-pull with more than {MAX_PUSHPULL_OWNERS} owners")
    out: list[object] = []
    for pair in states:
        if type(pair) is not tuple or len(pair) != 2 or type(pair[1]) is not tuple:
            _fail("PushPull.states items must be (owner, tuple of StateEntry)")
        owner, entries = pair
        if len(entries) > MAX_STATE_ENTRIES:
            raise _TooLarge(f"push-pull owner with more than {MAX_STATE_ENTRIES} entries")
        out.append([_text(owner, "state owner", MAX_NAME_BYTES), [_wire_entry(e) for e in entries]])
    return out


def _to_wire(msg: Message) -> list[object]:
    """The positional array for one message, after checking every field."""
    match msg:
        case Ping():
            return [
                PING,
                _uint(msg.seq, "seq"),
                _text(msg.target, "target", MAX_NAME_BYTES),
                _text(msg.source, "source", MAX_NAME_BYTES),
                _wire_addr(msg.source_addr, "source_addr"),
            ]
        case Ack() | Nack():
            code = ACK if isinstance(msg, Ack) else NACK
            return [code, _uint(msg.seq, "seq"), _text(msg.source, "source", MAX_NAME_BYTES)]
        case PingReq():
            return [
                PING_REQ,
                _uint(msg.seq, "seq"),
                _text(msg.target, "target", MAX_NAME_BYTES),
                _wire_addr(msg.target_addr, "target_addr"),
                _text(msg.source, "source", MAX_NAME_BYTES),
                _wire_addr(msg.source_addr, "source_addr"),
                _bool(msg.nack, "nack"),
            ]
        case Alive():
            return _signed(
                [
                    ALIVE,
                    _text(msg.name, "name", MAX_NAME_BYTES),
                    _counter(msg.incarnation, "incarnation"),
                    _wire_addr(msg.addr, "addr"),
                    _blob(msg.meta, "meta", MAX_META_BYTES),
                ],
                msg.sig,
            )
        case Suspect() | Dead():
            return [
                SUSPECT if isinstance(msg, Suspect) else DEAD,
                _text(msg.name, "name", MAX_NAME_BYTES),
                _counter(msg.incarnation, "incarnation"),
                _text(msg.sender, "sender", MAX_NAME_BYTES),
            ]
        case StateUpdate():
            return _signed(
                [
                    STATE_UPDATE,
                    _text(msg.owner, "owner", MAX_NAME_BYTES),
                    _counter(msg.version, "version"),
                    _text(msg.key, "state key", MAX_KEY_BYTES),
                    _value(msg.value),
                    _tombstone(msg.deleted, msg.value),
                ],
                msg.sig,
            )
        case UserBroadcast():
            return [
                USER_BROADCAST,
                _text(msg.origin, "origin", MAX_NAME_BYTES),
                _uint(msg.seq, "seq"),
                _blob(msg.payload, "payload", MAX_PAYLOAD_BYTES),
            ]
        case PushPull():
            if type(msg.members) is not tuple:
                _fail("PushPull.members must be a tuple")
            if len(msg.members) > MAX_PUSHPULL_MEMBERS:
                raise _TooLarge(f"push-pull with more than {MAX_PUSHPULL_MEMBERS} members")
            wire = [
                PUSH_PULL,
                _text(msg.source, "source", MAX_NAME_BYTES),
                _bool(msg.join, "join"),
                _bool(msg.reply, "reply"),
                [_wire_record(r) for r in msg.members],
                _wire_states(msg.states),
                _counter(msg.epoch, "epoch"),
            ]
            if msg.summary is not None or msg.want is not None:
                wire.append(None if msg.summary is None else _wire_summary(msg.summary))
                wire.append(None if msg.want is None else _wire_want(msg.want))
            return wire
    _fail(f"not a gossip message: {type(msg).__name__}")


def _hash(value: object, size: int, what: str) -> bytes:
    if type(value) is not bytes or len(value) != size:
        _fail(f"{what} must be {size} bytes")
    return value


def _wire_summary(s: object) -> list[object]:
    if type(s) is not Summary:
        _fail("PushPull.summary must be a Summary")
    members: list[object] | None = None
    owners: list[object] | None = None
    if s.members is not None:
        if type(s.members) is not tuple or len(s.members) > MAX_PUSHPULL_MEMBERS:
            raise _TooLarge(f"summary of more than {MAX_PUSHPULL_MEMBERS} members")
        members = []
        for m in s.members:
            if type(m) is not MemberSummary or type(m.state) is not MemberState:
                _fail("summary members must be MemberSummary")
            members.append([_text(m.name, "member name", MAX_NAME_BYTES), _counter(m.incarnation, "incarnation"),
                            int(m.state)])
    if s.owners is not None:
        if type(s.owners) is not tuple or len(s.owners) > MAX_PUSHPULL_OWNERS:
            raise _TooLarge(f"summary of more than {MAX_PUSHPULL_OWNERS} owners")
        owners = []
        for o in s.owners:
            if type(o) is not OwnerSummary:
                _fail("summary owners must be OwnerSummary")
            owners.append([_text(o.owner, "state owner", MAX_NAME_BYTES), _counter(o.max_version, "version"),
                           _hash(o.digest, OWNER_DIGEST_BYTES, "owner digest")])
    return [_hash(s.members_hash, HASH_BYTES, "members hash"), _hash(s.states_hash, HASH_BYTES, "states hash"),
            members, owners]


def _wire_want(w: object) -> list[object]:
    if type(w) is not Want or type(w.members) is not tuple or type(w.owners) is not tuple:
        _fail("PushPull.want must be a Want of tuples")
    if len(w.members) > MAX_PUSHPULL_MEMBERS or len(w.owners) > MAX_PUSHPULL_OWNERS:
        raise _TooLarge("want list too long")
    owners: list[object] = []
    for pair in w.owners:
        if type(pair) is not tuple or len(pair) != 2 or type(pair[1]) is not tuple:
            _fail("Want.owners items must be (owner, tuple of (key, version))")
        if len(pair[1]) > MAX_STATE_ENTRIES:
            raise _TooLarge(f"want of more than {MAX_STATE_ENTRIES} keys of one owner")
        keys: list[object] = []
        for kv in pair[1]:
            if type(kv) is not tuple or len(kv) != 3:
                _fail("Want keys must be (key, version, entry hash) triples")
            keys.append([_text(kv[0], "state key", MAX_KEY_BYTES), _counter(kv[1], "version"),
                         _hash(kv[2], ENTRY_HASH_BYTES, "entry hash")])
        owners.append([_text(pair[0], "state owner", MAX_NAME_BYTES), keys])
    return [[_text(n, "member name", MAX_NAME_BYTES) for n in w.members], owners]


def _packb(obj: object) -> bytes:
    packed: bytes = msgpack.packb(obj, use_bin_type=True)
    return packed


def _encoding(fn: Callable[[], bytes]) -> bytes:
    """Run an encoder, turning internal size failures into BroadcastTooLarge."""
    try:
        return fn()
    except _TooLarge as exc:
        raise BroadcastTooLarge(str(exc)) from None


def encoded_size(msg: Message) -> int:
    """Bytes ``msg`` adds inside a datagram's message array.

    Pack a datagram with ``DATAGRAM_HEADER_BYTES + header_size(header) +
    sum(encoded_size(m)) + keyring.OVERHEAD <= max_datagram_bytes``. Raises like :func:`encode_datagram`.
    """
    return len(_encoding(lambda: _packb(_to_wire(msg))))


def record_size(rec: MemberRecord) -> int:
    """Bytes one member record adds inside a push-pull frame (raises like :func:`encode_frame`)."""
    return len(_encoding(lambda: _packb(_wire_record(rec))))


def owner_states_size(owner: str, entries: tuple[StateEntry, ...]) -> int:
    """Bytes one owner's state map adds inside a push-pull frame (raises like :func:`encode_frame`)."""
    return len(_encoding(lambda: _packb(_wire_states(((owner, entries),))))) - 1  # minus its list header


def _wire_header(header: object) -> list[object]:
    if type(header) is not DatagramHeader:
        _fail("a datagram needs a DatagramHeader")
    return [
        _text(header.sender, "sender", MAX_NAME_BYTES),
        _counter(header.epoch, "epoch"),
        _uint(header.counter, "counter"),
        _tag(header.to),
    ]


def _tag(value: object) -> int:
    if type(value) is not int or not 0 <= value <= MAX_TAG:
        _fail("destination tag must be an int in 0..2**32-1")
    return value


def header_size(header: DatagramHeader) -> int:
    """Bytes ``header``'s fields add to a datagram (raises ValueError if it is malformed)."""
    return sum(len(_packb(field)) for field in _wire_header(header))


def encode_datagram(msgs: Sequence[Message], header: DatagramHeader) -> bytes:
    """Encode 1..MAX_MESSAGES_PER_DATAGRAM messages (no PushPull) as one plaintext datagram."""

    def build() -> bytes:
        if not msgs:
            _fail("a datagram needs at least one message")
        if len(msgs) > MAX_MESSAGES_PER_DATAGRAM:
            raise _TooLarge(f"more than {MAX_MESSAGES_PER_DATAGRAM} messages in one datagram")
        if any(type(m) is PushPull for m in msgs):
            _fail("PushPull travels in stream frames, not datagrams")
        items = _wire_header(header) + [_to_wire(m) for m in msgs]
        data = bytes((PROTOCOL_VERSION,)) + _packb(items)
        if len(data) > MAX_DATAGRAM_INPUT_BYTES:
            raise _TooLarge(f"datagram larger than {MAX_DATAGRAM_INPUT_BYTES} bytes")
        return data

    return _encoding(build)


def encode_frame(msg: PushPull) -> bytes:
    """Encode one PushPull as a plaintext stream frame (no length prefix)."""

    def build() -> bytes:
        if type(msg) is not PushPull:
            _fail("stream frames carry only PushPull")
        return bytes((PROTOCOL_VERSION,)) + _packb(_to_wire(msg))

    return _encoding(build)


# --- Decoding -----------------------------------------------------------------


def _reject_ext(code: int, data: bytes) -> NoReturn:
    raise ValueError(f"msgpack extension type {code} not allowed")


def _unpack(data: bytes, limits: dict[str, int]) -> Any:
    if len(data) < 2:
        raise DecodeError("input too short")
    if data[0] != PROTOCOL_VERSION:
        raise DecodeError(f"unknown protocol version {data[0]}")
    try:
        return msgpack.unpackb(
            data[1:],
            raw=False,
            strict_map_key=True,
            use_list=True,
            ext_hook=_reject_ext,
            **limits,
        )
    except Exception as exc:  # msgpack raises a grab-bag (ValueError, StackError, ...)
        raise DecodeError(f"malformed msgpack: {exc}") from None


def _fields(raw: object, count: int) -> list[Any]:
    if type(raw) is not list or len(raw) != count:
        _fail(f"array must have {count} elements")
    return raw


def _record(raw: object) -> MemberRecord:
    (name, addr, incarnation, state, meta), sig = _fields_sig(raw, 5)
    if type(state) is not int or state not in _MEMBER_STATES:
        _fail("unknown member state")
    return MemberRecord(
        name=_text(name, "member name", MAX_NAME_BYTES),
        addr=_addr(addr, "member addr"),
        incarnation=_counter(incarnation, "incarnation"),
        state=MemberState(state),
        meta=_blob(meta, "meta", MAX_META_BYTES),
        sig=sig,
    )


_MEMBER_STATES = frozenset(int(s) for s in MemberState)


def _fields_sig(raw: object, count: int) -> tuple[list[Any], bytes]:
    """``count`` fields, optionally followed by a signature (b"" when absent)."""
    if type(raw) is list and len(raw) == count + 1:
        return raw[:count], _blob(raw[count], "sig", MAX_SIG_BYTES)
    return _fields(raw, count), b""


def _entry(raw: object) -> StateEntry:
    (key, version, value, deleted), sig = _fields_sig(raw, 4)
    return StateEntry(
        key=_text(key, "state key", MAX_KEY_BYTES),
        version=_counter(version, "version"),
        value=_value(value),
        deleted=_tombstone(deleted, value),
        sig=sig,
    )


def _owner_states(raw: object) -> tuple[str, tuple[StateEntry, ...]]:
    owner, entries = _fields(raw, 2)
    if type(entries) is not list or len(entries) > MAX_STATE_ENTRIES:
        _fail(f"owner entries must be a list of at most {MAX_STATE_ENTRIES}")
    return (_text(owner, "state owner", MAX_NAME_BYTES), tuple(_entry(e) for e in entries))


def _from_wire(raw: object) -> Message:
    if type(raw) is not list or not raw:
        _fail("message must be a non-empty array")
    code = raw[0]
    if type(code) is not int:
        _fail("type code must be an int")
    if code == PING:
        _, seq, target, source, addr = _fields(raw, 5)
        return Ping(
            seq=_uint(seq, "seq"),
            target=_text(target, "target", MAX_NAME_BYTES),
            source=_text(source, "source", MAX_NAME_BYTES),
            source_addr=_addr(addr, "source_addr"),
        )
    if code == ACK or code == NACK:
        _, seq, source = _fields(raw, 3)
        cls = Ack if code == ACK else Nack
        return cls(seq=_uint(seq, "seq"), source=_text(source, "source", MAX_NAME_BYTES))
    if code == PING_REQ:
        _, seq, target, target_addr, source, source_addr, nack = _fields(raw, 7)
        return PingReq(
            seq=_uint(seq, "seq"),
            target=_text(target, "target", MAX_NAME_BYTES),
            target_addr=_addr(target_addr, "target_addr"),
            source=_text(source, "source", MAX_NAME_BYTES),
            source_addr=_addr(source_addr, "source_addr"),
            nack=_bool(nack, "nack"),
        )
    if code == ALIVE:
        (_, name, incarnation, addr, meta), sig = _fields_sig(raw, 5)
        return Alive(
            name=_text(name, "name", MAX_NAME_BYTES),
            incarnation=_counter(incarnation, "incarnation"),
            addr=_addr(addr, "addr"),
            meta=_blob(meta, "meta", MAX_META_BYTES),
            sig=sig,
        )
    if code == SUSPECT or code == DEAD:
        _, name, incarnation, sender = _fields(raw, 4)
        kind = Suspect if code == SUSPECT else Dead
        return kind(
            name=_text(name, "name", MAX_NAME_BYTES),
            incarnation=_counter(incarnation, "incarnation"),
            sender=_text(sender, "sender", MAX_NAME_BYTES),
        )
    if code == STATE_UPDATE:
        (_, owner, version, key, value, deleted), sig = _fields_sig(raw, 6)
        return StateUpdate(
            owner=_text(owner, "owner", MAX_NAME_BYTES),
            version=_counter(version, "version"),
            key=_text(key, "state key", MAX_KEY_BYTES),
            value=_value(value),
            deleted=_tombstone(deleted, value),
            sig=sig,
        )
    if code == USER_BROADCAST:
        _, origin, seq, payload = _fields(raw, 4)
        return UserBroadcast(
            origin=_text(origin, "origin", MAX_NAME_BYTES),
            seq=_uint(seq, "seq"),
            payload=_blob(payload, "payload", MAX_PAYLOAD_BYTES),
        )
    if code == PUSH_PULL:
        return _push_pull(raw)
    _fail(f"unknown message type {code}")


def _push_pull(raw: list[Any]) -> PushPull:
    if len(raw) == 9:
        summary, want = raw[7], raw[8]
        if summary is None and want is None:
            _fail("a digest push-pull needs a summary or a want")
        raw = raw[:7]
    else:
        summary = want = None
    _, source, join, reply, members, states, epoch = _fields(raw, 7)
    if type(members) is not list or len(members) > MAX_PUSHPULL_MEMBERS:
        _fail(f"members must be a list of at most {MAX_PUSHPULL_MEMBERS}")
    if type(states) is not list or len(states) > MAX_PUSHPULL_OWNERS:
        _fail(f"states must be a list of at most {MAX_PUSHPULL_OWNERS}")
    return PushPull(
        source=_text(source, "source", MAX_NAME_BYTES),
        join=_bool(join, "join"),
        reply=_bool(reply, "reply"),
        members=tuple(_record(m) for m in members),
        states=tuple(_owner_states(s) for s in states),
        summary=None if summary is None else _summary(summary),
        want=None if want is None else _want(want),
        epoch=_counter(epoch, "epoch"),
    )


def _list(raw: object, limit: int, what: str) -> list[Any]:
    if type(raw) is not list or len(raw) > limit:
        _fail(f"{what} must be a list of at most {limit}")
    return raw


def _member_summary(raw: object) -> MemberSummary:
    name, incarnation, state = _fields(raw, 3)
    if type(state) is not int or state not in _MEMBER_STATES:
        _fail("unknown member state")
    return MemberSummary(_text(name, "member name", MAX_NAME_BYTES), _counter(incarnation, "incarnation"),
                         MemberState(state))


def _owner_summary(raw: object) -> OwnerSummary:
    owner, version, digest = _fields(raw, 3)
    return OwnerSummary(_text(owner, "state owner", MAX_NAME_BYTES), _counter(version, "version"),
                        _hash(digest, OWNER_DIGEST_BYTES, "owner digest"))


def _summary(raw: object) -> Summary:
    members_hash, states_hash, members, owners = _fields(raw, 4)
    return Summary(
        _hash(members_hash, HASH_BYTES, "members hash"),
        _hash(states_hash, HASH_BYTES, "states hash"),
        None if members is None else tuple(
            _member_summary(m) for m in _list(members, MAX_PUSHPULL_MEMBERS, "summary members")),
        None if owners is None else tuple(
            _owner_summary(o) for o in _list(owners, MAX_PUSHPULL_OWNERS, "summary owners")),
    )


def _key_version(raw: object) -> tuple[str, int, bytes]:
    key, version, h = _fields(raw, 3)
    return (_text(key, "state key", MAX_KEY_BYTES), _counter(version, "version"),
            _hash(h, ENTRY_HASH_BYTES, "entry hash"))


def _want(raw: object) -> Want:
    members, owners = _fields(raw, 2)
    names = tuple(_text(n, "member name", MAX_NAME_BYTES) for n in _list(members, MAX_PUSHPULL_MEMBERS, "want"))
    pairs: list[tuple[str, tuple[tuple[str, int, bytes], ...]]] = []
    for item in _list(owners, MAX_PUSHPULL_OWNERS, "want owners"):
        owner, keys = _fields(item, 2)
        pairs.append((_text(owner, "state owner", MAX_NAME_BYTES),
                      tuple(_key_version(k) for k in _list(keys, MAX_STATE_ENTRIES, "want keys"))))
    return Want(names, tuple(pairs))


def decode_datagram(data: bytes) -> tuple[DatagramHeader, list[Message]]:
    """Decode a plaintext datagram: its header and messages; raise :class:`DecodeError`."""
    if len(data) > MAX_DATAGRAM_INPUT_BYTES:
        raise DecodeError(f"datagram larger than {MAX_DATAGRAM_INPUT_BYTES} bytes")
    raw = _unpack(data, _DATAGRAM_UNPACK_LIMITS)
    if type(raw) is not list or not _HEADER_FIELDS < len(raw) <= _HEADER_FIELDS + MAX_MESSAGES_PER_DATAGRAM:
        raise DecodeError(f"datagram must hold a header and 1..{MAX_MESSAGES_PER_DATAGRAM} messages")
    try:
        header = DatagramHeader(
            sender=_text(raw[0], "sender", MAX_NAME_BYTES),
            epoch=_counter(raw[1], "epoch"),
            counter=_uint(raw[2], "counter"),
            to=_tag(raw[3]),
        )
        msgs = [_from_wire(item) for item in raw[_HEADER_FIELDS:]]
    except ValueError as exc:
        raise DecodeError(str(exc)) from None
    if any(type(m) is PushPull for m in msgs):
        raise DecodeError("PushPull is not allowed in a datagram")
    return header, msgs


def decode_frame(data: bytes, max_bytes: int) -> PushPull:
    """Decode a plaintext stream frame of at most ``max_bytes``; raise :class:`DecodeError`.

    No state budget: :func:`decode_push_pull` with budgets is what a receiver uses.
    """
    return decode_push_pull(data, max_bytes)[0]


def decode_push_pull(
    data: bytes,
    max_bytes: int,
    max_owner_memory: int | None = None,
    max_state_memory: int | None = None,
) -> tuple[PushPull, int]:
    """Decode a plaintext push-pull frame one member record and one state entry at a time.

    Returns the PushPull and how many owners' maps were cut or left out for the budgets:
    an owner's entries stop where they would cost (``entry_cost``) more than
    ``max_owner_memory``, and every map stops where the frame's entries together would
    cost more than ``max_state_memory``; the rest is skipped undecoded. Each record and
    entry is unpacked on its own after its packed length was checked
    (``MAX_RECORD_WIRE_BYTES``, ``MAX_ENTRY_WIRE_BYTES``), so decoding never holds much
    more than the result plus one entry: unpacking the frame whole once made 8 MiB of
    empty lists 540 MB of Python objects before any check ran.
    """
    if len(data) > max_bytes:
        raise DecodeError(f"frame larger than {max_bytes} bytes")
    if len(data) < 2:
        raise DecodeError("input too short")
    if data[0] != PROTOCOL_VERSION:
        raise DecodeError(f"unknown protocol version {data[0]}")
    reader = _FrameReader(memoryview(data)[1:])
    try:
        return reader.push_pull(max_owner_memory, max_state_memory)
    except DecodeError:
        raise
    except ValueError as exc:  # our own checks (_fail, _TooLarge)
        raise DecodeError(str(exc)) from None
    except Exception as exc:  # msgpack raises a grab-bag (OutOfData, StackError, ...)
        raise DecodeError(f"malformed msgpack: {exc}") from None


# Packed bytes one member record or state entry may take (headers at their widest,
# plus slack for non-canonical headers): anything longer is refused before it is
# unpacked. A valid value packs to no more than its cost (every msgpack item takes
# at least as many bytes in memory as on the wire), hence MAX_VALUE_MEMORY.
_WIRE_SLACK = 16
MAX_RECORD_WIRE_BYTES = (
    1 + (2 + MAX_NAME_BYTES) + (1 + 2 + MAX_HOST_BYTES + 3) + 9 + 1 + (3 + MAX_META_BYTES) + (2 + MAX_SIG_BYTES)
    + _WIRE_SLACK
)
MAX_ENTRY_WIRE_BYTES = (
    1 + (3 + MAX_KEY_BYTES) + 9 + max(MAX_VALUE_MEMORY, MAX_VALUE_BYTES + 5) + 1 + (2 + MAX_SIG_BYTES) + _WIRE_SLACK
)
_SCALAR_WIRE_BYTES = 3 + MAX_NAME_BYTES + _WIRE_SLACK  # a type code, a bool or a name
# Cost of one stored entry besides its key and value: state_store.ENTRY_OVERHEAD.
ENTRY_MEMORY_OVERHEAD = 256


def entry_cost(key: str, value: StateValue) -> int:
    """What one state entry costs in the memory budgets (``state_store.entry_memory``)."""
    return ENTRY_MEMORY_OVERHEAD + sys.getsizeof(key) + value_memory(value)


class _FrameReader:
    """Walks one frame with a msgpack Unpacker: headers read, items skipped or unpacked alone."""

    def __init__(self, view: memoryview) -> None:
        self._view = view
        self._unpacker = msgpack.Unpacker(max_buffer_size=max(1, len(view)))
        self._unpacker.feed(view)

    def _header(self, limit: int, what: str) -> int:
        count = self._unpacker.read_array_header()
        if count > limit:
            _fail(f"{what} must be a list of at most {limit}")
        return int(count)

    def _item(self, limit: int, what: str, limits: dict[str, int] | None = None) -> Any:
        unpacker = self._unpacker
        start = unpacker.tell()
        unpacker.skip()
        end = unpacker.tell()
        if end - start > limit:
            _fail(f"{what} longer than {limit} bytes on the wire")
        return _unpack_item(self._view[start:end], limits)

    def push_pull(self, max_owner: int | None, max_total: int | None) -> tuple[PushPull, int]:
        fields = self._header(16, "message")
        if fields not in (7, 9) or self._item(_SCALAR_WIRE_BYTES, "type code") != PUSH_PULL:
            raise DecodeError("a stream frame must carry a PushPull")
        source = _text(self._item(_SCALAR_WIRE_BYTES, "source"), "source", MAX_NAME_BYTES)
        join = _bool(self._item(_SCALAR_WIRE_BYTES, "join"), "join")
        reply = _bool(self._item(_SCALAR_WIRE_BYTES, "reply"), "reply")
        count = self._header(MAX_PUSHPULL_MEMBERS, "members")
        members = tuple(_record(self._item(MAX_RECORD_WIRE_BYTES, "member record")) for _ in range(count))
        states, cut = self._states(max_owner, max_total)
        epoch = _counter(self._item(_SCALAR_WIRE_BYTES, "epoch"), "epoch")
        summary = want = None
        if fields == 9:  # a digest exchange (digest.py): lists of small tuples, bounded in count
            raw_summary = self._item(len(self._view), "summary", _FRAME_UNPACK_LIMITS)
            raw_want = self._item(len(self._view), "want", _FRAME_UNPACK_LIMITS)
            if raw_summary is None and raw_want is None:
                _fail("a digest push-pull needs a summary or a want")
            summary = None if raw_summary is None else _summary(raw_summary)
            want = None if raw_want is None else _want(raw_want)
        if self._unpacker.tell() != len(self._view):
            _fail("trailing bytes after the frame")
        return PushPull(source, join, reply, members, states, summary, want, epoch), cut

    def _states(
        self, max_owner: int | None, max_total: int | None
    ) -> tuple[tuple[tuple[str, tuple[StateEntry, ...]], ...], int]:
        owners: list[tuple[str, tuple[StateEntry, ...]]] = []
        total, cut, full = 0, 0, False
        for _ in range(self._header(MAX_PUSHPULL_OWNERS, "states")):
            if self._header(2, "owner map") != 2:
                _fail("array must have 2 elements")
            owner = _text(self._item(_SCALAR_WIRE_BYTES, "state owner"), "state owner", MAX_NAME_BYTES)
            entries: list[StateEntry] = []
            spent, stopped = 0, full
            for _ in range(self._header(MAX_STATE_ENTRIES, "owner entries")):
                if stopped:
                    self._unpacker.skip()
                    continue
                entry = _entry(self._item(MAX_ENTRY_WIRE_BYTES, "state entry"))
                cost = entry_cost(entry.key, entry.value)
                if max_owner is not None and spent + cost > max_owner:
                    stopped = True
                elif max_total is not None and total + cost > max_total:
                    stopped = full = True
                else:
                    spent += cost
                    total += cost
                    entries.append(entry)
            cut += stopped
            if entries or not stopped:
                owners.append((owner, tuple(entries)))
        return tuple(owners), cut


def _unpack_item(chunk: memoryview, limits: dict[str, int] | None = None) -> Any:
    return msgpack.unpackb(
        chunk,
        raw=False,
        strict_map_key=True,
        use_list=True,
        ext_hook=_reject_ext,
        **(limits if limits is not None else _DATAGRAM_UNPACK_LIMITS),
    )
