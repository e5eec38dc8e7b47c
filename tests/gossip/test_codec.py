"""Codec: round trips, size accounting, and every rejection rule of the decoder."""

from __future__ import annotations

import math
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gossip import codec
from gossip.codec import (
    DATAGRAM_HEADER_BYTES,
    MAX_CONTAINER_ITEMS,
    MAX_COUNTER,
    MAX_DATAGRAM_INPUT_BYTES,
    MAX_HOST_BYTES,
    MAX_KEY_BYTES,
    MAX_MESSAGES_PER_DATAGRAM,
    MAX_NAME_BYTES,
    MAX_PAYLOAD_BYTES,
    MAX_PUSHPULL_MEMBERS,
    MAX_SENDER_HEADER_BYTES,
    MAX_SIG_BYTES,
    MAX_STATE_ENTRIES,
    MAX_UINT64,
    MAX_VALUE_BYTES,
    MAX_VALUE_DEPTH,
    MAX_VALUE_MEMORY,
    PROTOCOL_VERSION,
    DatagramHeader,
    decode_datagram,
    decode_frame,
    encode_datagram,
    encode_frame,
    encoded_size,
    value_memory,
)
from gossip.config import MAX_DATAGRAM_BYTES, MAX_META_BYTES
from gossip.errors import BroadcastTooLarge, DecodeError
from gossip.keyring import OVERHEAD, Keyring
from gossip.messages import (
    Ack,
    Alive,
    Dead,
    MemberRecord,
    MemberState,
    Message,
    Nack,
    Ping,
    PingReq,
    PushPull,
    StateEntry,
    StateUpdate,
    Suspect,
    UserBroadcast,
)

FRAME_MAX = 8 * 1024 * 1024

# --- Strategies over valid messages (shared with test_fuzz_codec) ---------------

names = st.text(min_size=1, max_size=MAX_NAME_BYTES // 4)  # <= 4 UTF-8 bytes per char
hosts = st.text(min_size=1, max_size=MAX_HOST_BYTES // 4)
keys = st.text(min_size=1, max_size=MAX_KEY_BYTES // 4)
uint64 = st.integers(min_value=0, max_value=2**64 - 1)
counters = st.integers(min_value=0, max_value=MAX_COUNTER)  # incarnations, state versions
addrs = st.tuples(hosts, st.integers(min_value=0, max_value=65_535))
metas = st.binary(max_size=MAX_META_BYTES)
# A member's signature of its Alive (absent, or any length the codec admits).
sigs = st.just(b"") | st.binary(min_size=1, max_size=MAX_SIG_BYTES)


def value_depth(value: Any) -> int:
    """Container nesting of a replicated value (a scalar is 0)."""
    if isinstance(value, list):
        return 1 + max((value_depth(v) for v in value), default=0)
    if isinstance(value, dict):
        return 1 + max((value_depth(v) for v in value.values()), default=0)
    return 0


scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=16)
    | st.binary(max_size=16)
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=MAX_KEY_BYTES // 4), inner, max_size=4)
    ),
    max_leaves=12,
).filter(lambda v: value_depth(v) <= MAX_VALUE_DEPTH)


@st.composite
def state_updates(draw: st.DrawFn) -> StateUpdate:
    deleted = draw(st.booleans())
    value = None if deleted else draw(values)
    return StateUpdate(draw(names), draw(counters), draw(keys), value, deleted)


@st.composite
def state_entries(draw: st.DrawFn) -> StateEntry:
    deleted = draw(st.booleans())
    value = None if deleted else draw(values)
    return StateEntry(draw(keys), draw(counters), value, deleted)


datagram_messages: st.SearchStrategy[Message] = st.one_of(
    st.builds(Ping, uint64, names, names, addrs),
    st.builds(Ack, uint64, names),
    st.builds(Nack, uint64, names),
    st.builds(PingReq, uint64, names, addrs, names, addrs, st.booleans()),
    st.builds(Alive, names, counters, addrs, metas, sigs),
    st.builds(Suspect, names, counters, names),
    st.builds(Dead, names, counters, names),
    state_updates(),
    st.builds(UserBroadcast, names, uint64, st.binary(max_size=MAX_PAYLOAD_BYTES)),
)

member_records = st.builds(MemberRecord, names, addrs, counters, st.sampled_from(MemberState), metas, sigs)
push_pulls = st.builds(
    PushPull,
    names,
    st.booleans(),
    st.booleans(),
    st.lists(member_records, max_size=6).map(tuple),
    st.lists(st.tuples(names, st.lists(state_entries(), max_size=4).map(tuple)), max_size=4).map(
        tuple
    ),
    epoch=st.integers(0, MAX_COUNTER),
)


# --- Helpers ---------------------------------------------------------------------


HDR = DatagramHeader("peer", 3, 7, 99)
RAW_HDR: list[Any] = ["peer", 3, 7, 99]


def raw_datagram(*msgs: Any, header: list[Any] | None = None) -> bytes:
    """A datagram built from raw wire arrays, bypassing the encoder's checks."""
    items = (RAW_HDR if header is None else header) + list(msgs)
    return bytes((PROTOCOL_VERSION,)) + msgpack.packb(items, use_bin_type=True)


def round_trip(msgs: list[Message]) -> list[Message]:
    header, decoded = decode_datagram(encode_datagram(msgs, HDR))
    assert header == HDR
    return decoded


def raw_frame(msg: Any) -> bytes:
    return bytes((PROTOCOL_VERSION,)) + msgpack.packb(msg, use_bin_type=True)


def alive_raw(**over: Any) -> list[Any]:
    fields = {"name": "n", "inc": 1, "addr": ["10.0.0.1", 7946], "meta": b""}
    fields.update(over)
    return [codec.ALIVE, fields["name"], fields["inc"], fields["addr"], fields["meta"]]


def update_raw(value: Any, deleted: Any = False) -> list[Any]:
    return [codec.STATE_UPDATE, "owner", 1, "key", value, deleted]


def nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


def push_pull_raw(members: list[Any] | None = None, states: list[Any] | None = None) -> list[Any]:
    return [codec.PUSH_PULL, "src", False, True, members or [], states or [], 0]


# --- Round trips -------------------------------------------------------------------


@given(st.lists(datagram_messages, min_size=1, max_size=8))
@settings(max_examples=300, deadline=None)
def test_every_datagram_message_round_trips(msgs: list[Message]) -> None:
    assert round_trip(msgs) == msgs


@given(push_pulls)
@settings(max_examples=200, deadline=None)
def test_push_pull_round_trips_through_a_frame(msg: PushPull) -> None:
    decoded = decode_frame(encode_frame(msg), FRAME_MAX)
    assert decoded == msg
    assert type(decoded.members) is tuple
    assert all(type(entries) is tuple for _, entries in decoded.states)


def test_decoded_member_state_and_addresses_have_the_dataclass_types() -> None:
    rec = MemberRecord("m", ("::1", 1), 0, MemberState.LEFT, b"x")
    decoded = decode_frame(encode_frame(PushPull("s", True, False, (rec,), ())), FRAME_MAX)
    assert type(decoded.members[0].state) is MemberState
    assert type(decoded.members[0].addr) is tuple
    (alive,) = round_trip([Alive("n", 1, ("h", 2), b"")])
    assert isinstance(alive, Alive) and type(alive.addr) is tuple


def test_limits_themselves_are_accepted() -> None:
    msgs: list[Message] = [
        Alive(
            "n" * MAX_NAME_BYTES, MAX_COUNTER, ("h" * MAX_HOST_BYTES, 65_535), b"m" * MAX_META_BYTES
        ),
        UserBroadcast("o", 0, b"p" * MAX_PAYLOAD_BYTES),
        StateUpdate("o", 1, "k" * MAX_KEY_BYTES, nested(MAX_VALUE_DEPTH)),
        StateUpdate("o", 1, "k", [None] * MAX_CONTAINER_ITEMS),
        StateUpdate("o", 1, "k", ["x" * 60] * 340),  # ~39 KiB of memory: under MAX_VALUE_MEMORY
        StateUpdate("o", 1, "k", "s" * MAX_VALUE_BYTES),
    ]
    assert round_trip(msgs) == msgs
    biggest = DatagramHeader("s" * MAX_NAME_BYTES, MAX_COUNTER, MAX_UINT64, 2**32 - 1)
    assert decode_datagram(encode_datagram(msgs, biggest)) == (biggest, msgs)
    assert codec.header_size(biggest) == MAX_SENDER_HEADER_BYTES


def test_a_full_datagram_of_the_maximum_message_count_round_trips() -> None:
    msgs: list[Message] = [Ack(i, "a") for i in range(MAX_MESSAGES_PER_DATAGRAM)]
    assert round_trip(msgs) == msgs


# --- Size accounting -----------------------------------------------------------------


@given(st.lists(datagram_messages, min_size=1, max_size=20))
@settings(max_examples=200, deadline=None)
def test_header_plus_sizes_plus_overhead_bounds_the_sealed_datagram(msgs: list[Message]) -> None:
    plain = encode_datagram(msgs, HDR)
    sealed = Keyring([bytes(32)]).encrypt(plain, b"cluster")
    fields = codec.header_size(HDR)
    assert len(sealed) <= DATAGRAM_HEADER_BYTES + fields + sum(encoded_size(m) for m in msgs) + OVERHEAD
    # Exact but for the array header (messages and the 4 header fields), 1 byte below 16 items.
    array = 1 if len(msgs) + 4 < 16 else 3
    assert len(plain) == 1 + array + fields + sum(encoded_size(m) for m in msgs)


def test_header_bound_holds_at_the_array16_boundary() -> None:
    msgs: list[Message] = [Nack(1, "b")] * MAX_MESSAGES_PER_DATAGRAM
    assert len(encode_datagram(msgs, HDR)) == (
        DATAGRAM_HEADER_BYTES + codec.header_size(HDR) + MAX_MESSAGES_PER_DATAGRAM * encoded_size(msgs[0])
    )


def test_largest_user_broadcast_fits_a_default_sealed_datagram() -> None:
    msg = UserBroadcast("o" * MAX_NAME_BYTES, 2**64 - 1, b"p" * MAX_PAYLOAD_BYTES)
    assert DATAGRAM_HEADER_BYTES + MAX_SENDER_HEADER_BYTES + encoded_size(msg) + OVERHEAD <= MAX_DATAGRAM_BYTES


# --- Decoder rejections ----------------------------------------------------------------

REJECTED_DATAGRAMS: dict[str, bytes] = {
    "empty input": b"",
    "version byte only": bytes((PROTOCOL_VERSION,)),
    "version 0": b"\x00" + raw_datagram([codec.ACK, 1, "a"])[1:],
    "version 1 (no header)": b"\x01" + msgpack.packb([[codec.ACK, 1, "a"]]),
    "version 3": b"\x03" + raw_datagram([codec.ACK, 1, "a"])[1:],
    "no header": raw_datagram([codec.ACK, 1, "a"], header=[]),
    "header only": raw_datagram(),
    "empty sender in header": raw_datagram([codec.ACK, 1, "a"], header=["", 1, 1, 0]),
    "sender too long": raw_datagram([codec.ACK, 1, "a"], header=["s" * (MAX_NAME_BYTES + 1), 1, 1, 0]),
    "sender as bytes": raw_datagram([codec.ACK, 1, "a"], header=[b"s", 1, 1, 0]),
    "negative epoch": raw_datagram([codec.ACK, 1, "a"], header=["s", -1, 1, 0]),
    "epoch over 2**63-1": raw_datagram([codec.ACK, 1, "a"], header=["s", MAX_COUNTER + 1, 1, 0]),
    "bool epoch": raw_datagram([codec.ACK, 1, "a"], header=["s", True, 1, 0]),
    "negative counter": raw_datagram([codec.ACK, 1, "a"], header=["s", 1, -1, 0]),
    "float counter": raw_datagram([codec.ACK, 1, "a"], header=["s", 1, 1.0, 0]),
    "header as one array": raw_datagram([codec.ACK, 1, "a"], header=[["s", 1, 1, 0]]),
    "not an array": raw_frame({"a": 1}),
    "no messages": raw_datagram(header=["s", 1, 1]),
    "negative tag": raw_datagram([codec.ACK, 1, "a"], header=["s", 1, 1, -1]),
    "tag over 2**32-1": raw_datagram([codec.ACK, 1, "a"], header=["s", 1, 1, 2**32]),
    "tag as str": raw_datagram([codec.ACK, 1, "a"], header=["s", 1, 1, "a"]),
    "trailing bytes": raw_datagram([codec.ACK, 1, "a"]) + b"\x00",
    "truncated": raw_datagram([codec.ACK, 1, "abc"])[:-1],
    "invalid utf-8": bytes((PROTOCOL_VERSION,)) + b"\x91\x93\x02\x01\xa2\xff\xfe",
    "message not an array": raw_datagram(7),
    "empty message": raw_datagram([]),
    "unknown type 0": raw_datagram([0, 1, "a"]),
    "unknown type 11": raw_datagram([11, 1, "a"]),
    "negative type": raw_datagram([-2, 1, "a"]),
    "type code as bool": raw_datagram([True, 1, "a", "b", ["h", 1]]),
    "type code as str": raw_datagram(["2", 1, "a"]),
    "too few fields": raw_datagram([codec.ACK, 1]),
    "too many fields": raw_datagram([codec.ACK, 1, "a", "b"]),
    "bool seq": raw_datagram([codec.ACK, True, "a"]),
    "float seq": raw_datagram([codec.ACK, 1.0, "a"]),
    "negative seq": raw_datagram([codec.NACK, -1, "a"]),
    "str seq": raw_datagram([codec.ACK, "1", "a"]),
    "negative incarnation": raw_datagram([codec.SUSPECT, "n", -5, "s"]),
    "bool incarnation": raw_datagram([codec.DEAD, "n", False, "s"]),
    "negative version": raw_datagram([codec.STATE_UPDATE, "o", -1, "k", 1, False]),
    "empty name": raw_datagram(alive_raw(name="")),
    "name too long": raw_datagram(alive_raw(name="n" * (MAX_NAME_BYTES + 1))),
    "name too long in utf-8": raw_datagram(alive_raw(name="\u00e9" * (MAX_NAME_BYTES // 2 + 1))),
    "name as bytes": raw_datagram(alive_raw(name=b"n")),
    "empty sender": raw_datagram([codec.SUSPECT, "n", 1, ""]),
    "empty host": raw_datagram(alive_raw(addr=["", 1])),
    "host too long": raw_datagram(alive_raw(addr=["h" * (MAX_HOST_BYTES + 1), 1])),
    "port negative": raw_datagram(alive_raw(addr=["h", -1])),
    "port too big": raw_datagram(alive_raw(addr=["h", 65_536])),
    "port as bool": raw_datagram(alive_raw(addr=["h", True])),
    "addr with three parts": raw_datagram(alive_raw(addr=["h", 1, 2])),
    "addr as map": raw_datagram(alive_raw(addr={"h": 1})),
    "meta too long": raw_datagram(alive_raw(meta=b"m" * (MAX_META_BYTES + 1))),
    "meta as str": raw_datagram(alive_raw(meta="m")),
    "nack flag as int": raw_datagram([codec.PING_REQ, 1, "t", ["h", 1], "s", ["h", 2], 1]),
    "payload too long": raw_datagram(
        [codec.USER_BROADCAST, "o", 1, b"p" * (MAX_PAYLOAD_BYTES + 1)]
    ),
    "payload as str": raw_datagram([codec.USER_BROADCAST, "o", 1, "p"]),
    "empty state key": raw_datagram([codec.STATE_UPDATE, "o", 1, "", 1, False]),
    "state key too long": raw_datagram(
        [codec.STATE_UPDATE, "o", 1, "k" * (MAX_KEY_BYTES + 1), 1, False]
    ),
    "value nested too deep": raw_datagram(update_raw(nested(MAX_VALUE_DEPTH + 1))),
    "value map with bytes key": raw_datagram(update_raw({b"k": 1})),
    "value map with int key": raw_datagram(update_raw({1: 1})),
    "value map key too long": raw_datagram(update_raw({"k" * (MAX_KEY_BYTES + 1): 1})),
    "value list too long": raw_datagram(update_raw([0] * (MAX_CONTAINER_ITEMS + 1))),
    "value map too long": raw_datagram(
        update_raw({str(i): 0 for i in range(MAX_CONTAINER_ITEMS + 1)})
    ),
    "value string too long": raw_datagram(update_raw("s" * (MAX_VALUE_BYTES + 1))),
    "value NaN": raw_datagram(update_raw(math.nan)),
    "tombstone with a value": raw_datagram(update_raw(1, deleted=True)),
    "deleted flag as int": raw_datagram(update_raw(None, deleted=0)),
    "ext type": raw_datagram(update_raw(msgpack.ExtType(5, b"\x00"))),
    "empty ext type": raw_datagram(update_raw(msgpack.ExtType(5, b""))),
    "timestamp ext": raw_datagram(update_raw(msgpack.Timestamp(0))),
    "push-pull in a datagram": raw_datagram(push_pull_raw()),
    "too many messages": raw_datagram(*([[codec.ACK, 1, "a"]] * (MAX_MESSAGES_PER_DATAGRAM + 1))),
    "deeply nested msgpack": bytes((PROTOCOL_VERSION,)) + b"\x91" * 5000 + b"\xc0",
    "over 65535 bytes": raw_datagram(
        *([[codec.USER_BROADCAST, "o", 1, b"p" * MAX_PAYLOAD_BYTES]] * 64)
    ),
}


@pytest.mark.parametrize("data", REJECTED_DATAGRAMS.values(), ids=REJECTED_DATAGRAMS.keys())
def test_decoder_rejects_invalid_datagram_with_decode_error(data: bytes) -> None:
    with pytest.raises(DecodeError):
        decode_datagram(data)


def test_datagram_input_over_the_udp_maximum_is_rejected_before_parsing() -> None:
    assert len(REJECTED_DATAGRAMS["over 65535 bytes"]) > MAX_DATAGRAM_INPUT_BYTES
    with pytest.raises(DecodeError, match="larger than"):
        decode_datagram(REJECTED_DATAGRAMS["over 65535 bytes"])


def test_only_the_bad_message_kinds_differ_from_accepted_controls() -> None:
    # Controls: the rejection fixtures above are one field away from these.
    assert decode_datagram(raw_datagram(alive_raw()))[1] == [Alive("n", 1, ("10.0.0.1", 7946), b"")]
    assert decode_datagram(raw_datagram(update_raw(None, deleted=True)))[1] == [
        StateUpdate("owner", 1, "key", None, True)
    ]
    assert decode_datagram(raw_datagram(update_raw({"k": [1.5, None]})))[1] == [
        StateUpdate("owner", 1, "key", {"k": [1.5, None]})
    ]
    assert decode_datagram(raw_datagram([codec.ACK, 1, "a"], header=["s", MAX_COUNTER, MAX_UINT64, 0])) == (
        DatagramHeader("s", MAX_COUNTER, MAX_UINT64, 0),
        [Ack(1, "a")],
    )


def member_raw(state: Any = 0) -> list[Any]:
    return ["m", ["h", 1], 1, state, b""]


REJECTED_FRAMES: dict[str, bytes] = {
    "not a push-pull": raw_frame([codec.ACK, 1, "a"]),
    "an array of messages": raw_datagram(push_pull_raw()),
    "unknown member state": raw_frame(push_pull_raw(members=[member_raw(state=4)])),
    "member state as bool": raw_frame(push_pull_raw(members=[member_raw(state=False)])),
    "member record short": raw_frame(push_pull_raw(members=[member_raw()[:4]])),
    "join as int": raw_frame([codec.PUSH_PULL, "src", 0, True, [], [], 0]),
    "members as map": raw_frame([codec.PUSH_PULL, "src", False, True, {}, [], 0]),
    "no epoch (version 1 layout)": raw_frame([codec.PUSH_PULL, "src", False, True, [], []]),
    "negative epoch": raw_frame([codec.PUSH_PULL, "src", False, True, [], [], -1]),
    "epoch as bool": raw_frame([codec.PUSH_PULL, "src", False, True, [], [], True]),
    "states entry malformed": raw_frame(push_pull_raw(states=[["o", [["k", 1, 1]]]])),
    "too many members": raw_frame(
        push_pull_raw(members=[member_raw()] * (MAX_PUSHPULL_MEMBERS + 1))
    ),
    "too many entries for one owner": raw_frame(
        push_pull_raw(states=[["o", [["k", 1, 1, False]] * (MAX_STATE_ENTRIES + 1)]])
    ),
    "value list too long": raw_frame(
        push_pull_raw(states=[["o", [["k", 1, [0] * (MAX_CONTAINER_ITEMS + 1), False]]]])
    ),
    "value too deep": raw_frame(
        push_pull_raw(states=[["o", [["k", 1, nested(MAX_VALUE_DEPTH + 1), False]]]])
    ),
    "version 1": b"\x01" + raw_frame(push_pull_raw())[1:],
    "version 3": b"\x03" + raw_frame(push_pull_raw())[1:],
}


@pytest.mark.parametrize("data", REJECTED_FRAMES.values(), ids=REJECTED_FRAMES.keys())
def test_decoder_rejects_invalid_frame_with_decode_error(data: bytes) -> None:
    with pytest.raises(DecodeError):
        decode_frame(data, FRAME_MAX)


def test_frame_larger_than_max_bytes_is_rejected() -> None:
    frame = encode_frame(PushPull("s", False, False, (), ()))
    assert decode_frame(frame, len(frame)) == PushPull("s", False, False, (), ())
    with pytest.raises(DecodeError, match="larger than"):
        decode_frame(frame, len(frame) - 1)


# --- Encoder checks ---------------------------------------------------------------------

MALFORMED: dict[str, list[Any]] = {
    "bool seq": [Ack(True, "a")],
    "negative seq": [Ack(-1, "a")],
    "seq beyond uint64": [Nack(2**64, "a")],
    "incarnation beyond MAX_COUNTER": [Suspect("a", MAX_COUNTER + 1, "s")],
    "version beyond MAX_COUNTER": [StateUpdate("o", MAX_COUNTER + 1, "k", 1)],
    "empty source": [Ack(1, "")],
    "name too long": [Suspect("n" * (MAX_NAME_BYTES + 1), 1, "s")],
    "addr as list": [Alive("n", 1, ["h", 1], b"")],  # type: ignore[arg-type]
    "port out of range": [Ping(1, "t", "s", ("h", 70_000))],
    "host too long": [Ping(1, "t", "s", ("h" * (MAX_HOST_BYTES + 1), 1))],
    "nack as int": [PingReq(1, "t", ("h", 1), "s", ("h", 2), 1)],  # type: ignore[arg-type]
    "value too deep": [StateUpdate("o", 1, "k", nested(MAX_VALUE_DEPTH + 1))],
    "value with tuple": [StateUpdate("o", 1, "k", (1, 2))],  # type: ignore[arg-type]
    "value with int map key": [StateUpdate("o", 1, "k", {1: 2})],  # type: ignore[dict-item]
    "value NaN": [StateUpdate("o", 1, "k", math.nan)],
    "tombstone with value": [StateUpdate("o", 1, "k", 1, True)],
    "surrogate in name": [Ack(1, "\ud800")],
    "push-pull in datagram": [PushPull("s", False, False, (), ())],
    "not a message": ["ack"],
    "no messages": [],
}


@pytest.mark.parametrize("msgs", MALFORMED.values(), ids=MALFORMED.keys())
def test_encoder_raises_value_error_for_malformed_messages(msgs: list[Any]) -> None:
    with pytest.raises(ValueError):
        encode_datagram(msgs, HDR)


OVERSIZED: dict[str, list[Any]] = {
    "meta": [Alive("n", 1, ("h", 1), b"m" * (MAX_META_BYTES + 1))],
    "payload": [UserBroadcast("o", 1, b"p" * (MAX_PAYLOAD_BYTES + 1))],
    "value string": [StateUpdate("o", 1, "k", "s" * (MAX_VALUE_BYTES + 1))],
    "value list": [StateUpdate("o", 1, "k", [0] * (MAX_CONTAINER_ITEMS + 1))],
    "value memory": [StateUpdate("o", 1, "k", [[]] * MAX_CONTAINER_ITEMS)],  # ~1 KB packed
    "message count": [Ack(1, "a")] * (MAX_MESSAGES_PER_DATAGRAM + 1),
    "datagram bytes": [UserBroadcast("o", 1, b"p" * MAX_PAYLOAD_BYTES)] * 64,
}


@pytest.mark.parametrize("msgs", OVERSIZED.values(), ids=OVERSIZED.keys())
def test_encoder_raises_broadcast_too_large_for_oversized_content(msgs: list[Any]) -> None:
    with pytest.raises(BroadcastTooLarge):
        encode_datagram(msgs, HDR)


def test_value_memory_is_bounded_at_the_decoder() -> None:
    bomb = [[]] * MAX_CONTAINER_ITEMS  # ~3 KB packed, ~64 KB decoded
    assert value_memory(bomb) > MAX_VALUE_MEMORY
    raw = raw_datagram([8, "o", 1, "k", bomb, False])
    assert len(raw) < 1100
    with pytest.raises(DecodeError, match="memory"):
        decode_datagram(raw)
    deep_but_small = [[[[[]]]]] * 100
    assert value_memory(deep_but_small) < MAX_VALUE_MEMORY
    decode_datagram(raw_datagram([8, "o", 1, "k", deep_but_small, False]))


def test_encoded_size_applies_the_same_checks() -> None:
    with pytest.raises(BroadcastTooLarge):
        encoded_size(Alive("n", 1, ("h", 1), b"m" * (MAX_META_BYTES + 1)))
    with pytest.raises(ValueError):
        encoded_size(Ack(-1, "a"))


def test_encode_frame_checks_members_and_entries() -> None:
    too_many = (StateEntry("k", 1, None),) * (MAX_STATE_ENTRIES + 1)
    with pytest.raises(BroadcastTooLarge):
        encode_frame(PushPull("s", False, False, (), (("o", too_many),)))
    bad_state = MemberRecord("m", ("h", 1), 1, 1, b"")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        encode_frame(PushPull("s", False, False, (bad_state,), ()))
    with pytest.raises(ValueError):
        encode_frame(Ack(1, "a"))  # type: ignore[arg-type]
