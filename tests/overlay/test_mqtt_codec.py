"""The MQTT codec: round trips at both levels, the specs' byte examples, one failing input
per validation rule, streaming, and the property table against the MQTT 5 spec."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from overlay.mqtt.codec import (
    Decoder,
    MqttDecodeError,
    MqttEncodeError,
    check_topic_filter,
    check_topic_name,
    encode,
)
from overlay.mqtt.packets import (
    MQTT5,
    MQTT311,
    Auth,
    Connack,
    Connect,
    Disconnect,
    Limits,
    Packet,
    PacketType,
    Pingreq,
    Pingresp,
    Properties,
    Puback,
    Publish,
    Reason,
    Suback,
    Subscribe,
    Subscription,
    Unsuback,
    Unsubscribe,
    Will,
)
from overlay.mqtt.properties import BY_ID, WILL
from overlay.mqtt.wire import parse_varint, varint_bytes
from tests.overlay.mqtt_strategies import V4_CONNACK_REASON, level4_view, packets

LIMITS = Limits()


def decode_all(data: bytes, level: int | None, limits: Limits = LIMITS) -> list[Packet]:
    return Decoder(level, limits).feed(data)


def decode_one(data: bytes, level: int | None, limits: Limits = LIMITS) -> Packet:
    [packet] = decode_all(data, level, limits)
    return packet


def frame(first: int, body: bytes) -> bytes:
    return bytes([first]) + varint_bytes(len(body), "test") + body


def s(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return len(raw).to_bytes(2, "big") + raw


def connect_body(level: int, flags: int = 0x02, props: bytes = b"\x00", rest: bytes = b"") -> bytes:
    body = s("MQTT") + bytes([level, flags]) + b"\x00\x3c"
    if level == MQTT5:
        body += props
    return body + s("id") + rest


def rejected(data: bytes, level: int | None, limits: Limits = LIMITS) -> Reason:
    with pytest.raises(MqttDecodeError) as info:
        Decoder(level, limits).feed(data)
    return info.value.reason


# --- round trips ----------------------------------------------------------------------------


@settings(max_examples=400, deadline=None)
@given(packets(MQTT5))
def test_every_packet_round_trips_at_level_5(packet: Packet) -> None:
    assert decode_one(encode(packet, MQTT5), MQTT5) == packet


@settings(max_examples=400, deadline=None)
@given(packets(MQTT311))
def test_every_packet_round_trips_at_level_4_without_what_level_4_cannot_say(
    packet: Packet,
) -> None:
    assert decode_one(encode(packet, MQTT311), MQTT311) == level4_view(packet)


@settings(max_examples=100, deadline=None)
@given(st.sampled_from([MQTT311, MQTT5]).flatmap(lambda lv: st.tuples(st.just(lv), packets(lv))))
def test_a_connect_teaches_a_broker_decoder_its_level(case: tuple[int, Packet]) -> None:
    level, packet = case
    decoder = Decoder(None, LIMITS)
    connect = Connect("c", level)
    assert decoder.feed(encode(connect, level)) == [connect]
    assert decoder.level == level
    if not isinstance(packet, Connect):
        expected = packet if level == MQTT5 else level4_view(packet)
        assert decoder.feed(encode(packet, level)) == [expected]


@settings(max_examples=60, deadline=None)
@given(
    st.lists(packets(MQTT5).filter(lambda p: not isinstance(p, Connect)), max_size=8),
    st.randoms(use_true_random=False),
)
def test_streaming_in_any_chunks_gives_the_same_packets(
    stream: list[Packet], rng: random.Random
) -> None:
    wire = b"".join(encode(p, MQTT5) for p in stream)
    one_byte, chunked = Decoder(MQTT5, LIMITS), Decoder(MQTT5, LIMITS)
    got: list[Packet] = []
    for i in range(len(wire)):
        got += one_byte.feed(wire[i : i + 1])
        assert one_byte.buffered < LIMITS.max_packet_bytes
    assert got == stream
    got, pos = [], 0
    while pos < len(wire):
        step = rng.randrange(1, 40)
        got += chunked.feed(wire[pos : pos + step])
        pos += step
    assert got == stream and chunked.buffered == 0


# --- byte vectors from the specs ------------------------------------------------------------

# MQTT 3.1.1 section 3.1.2.10: protocol name, level 4, flags 0xCE (user name, password, will
# QoS 1, will, clean session), keep alive 10; the payload (client id, will topic, will
# message, user name, password) is ours.
V311_CONNECT = bytes.fromhex(
    "10 24 0004 4d515454 04 ce 000a"
    " 0004 63696431  0003 612f62  0002 6279  0004 75736572  0003 707764"
)
# MQTT 5 section 3.1.2.11: the same variable header with properties: length 5, Session
# Expiry Interval (17) = 10.
V5_CONNECT = bytes.fromhex(
    "10 2b 0004 4d515454 05 ce 000a 05 11 0000000a"
    " 0004 63696431 00 0003 612f62 0002 6279 0004 75736572 0003 707764"
)


def test_the_3_1_1_connect_example_decodes_and_encodes_to_the_same_bytes() -> None:
    expected = Connect("cid1", MQTT311, True, 10, "user", b"pwd", Will("a/b", b"by", 1, False))
    assert decode_one(V311_CONNECT, None) == expected
    assert encode(expected, MQTT311) == V311_CONNECT


def test_the_v5_connect_example_with_session_expiry_decodes_and_encodes_the_same() -> None:
    expected = Connect(
        "cid1",
        MQTT5,
        True,
        10,
        "user",
        b"pwd",
        Will("a/b", b"by", 1, False),
        Properties(session_expiry_interval=10),
    )
    assert decode_one(V5_CONNECT, None) == expected
    assert encode(expected, MQTT5) == V5_CONNECT


def test_the_publish_example_of_3_1_1_section_3_3_2_3() -> None:
    wire = bytes.fromhex("32 07 0003 612f62 000a")
    assert decode_one(wire, MQTT311) == Publish("a/b", b"", 1, packet_id=10)
    assert encode(Publish("a/b", b"", 1, packet_id=10), MQTT311) == wire


@pytest.mark.parametrize(
    ("value", "wire"),
    [
        (0, "00"),
        (127, "7f"),
        (128, "8001"),
        (16_383, "ff7f"),
        (16_384, "808001"),
        (2_097_151, "ffff7f"),
        (2_097_152, "80808001"),
        (268_435_455, "ffffff7f"),
    ],
)
def test_variable_byte_integers_match_the_spec_table(value: int, wire: str) -> None:
    assert varint_bytes(value, "x").hex() == wire
    assert parse_varint(bytes.fromhex(wire), 0) == (value, len(wire) // 2)


def test_fixed_packets_have_their_fixed_bytes() -> None:
    assert encode(Pingreq(), MQTT311) == b"\xc0\x00"
    assert encode(Pingresp(), MQTT5) == b"\xd0\x00"
    assert encode(Disconnect(), MQTT5) == b"\xe0\x00"
    assert encode(Connack(), MQTT311) == b"\x20\x02\x00\x00"
    assert encode(Connack(), MQTT5) == b"\x20\x03\x00\x00\x00"
    assert encode(Puback(5), MQTT5) == b"\x40\x02\x00\x05"  # success, no properties: short
    assert encode(Puback(5, PacketType.PUBREL), MQTT311) == b"\x62\x02\x00\x05"
    assert encode(Suback(1, (0, 0x87)), MQTT311) == b"\x90\x04\x00\x01\x00\x80"


def test_the_property_table_matches_mqtt5_section_2_2_2_2() -> None:
    p, c, ca = PacketType.PUBLISH, PacketType.CONNECT, PacketType.CONNACK
    expected = {
        0x01: {p, WILL},
        0x02: {p, WILL},
        0x03: {p, WILL},
        0x08: {p, WILL},
        0x09: {p, WILL},
        0x0B: {p, PacketType.SUBSCRIBE},
        0x11: {c, ca, PacketType.DISCONNECT},
        0x12: {ca},
        0x13: {ca},
        0x15: {c, ca, PacketType.AUTH},
        0x16: {c, ca, PacketType.AUTH},
        0x17: {c},
        0x18: {WILL},
        0x19: {c},
        0x1A: {ca},
        0x1C: {ca, PacketType.DISCONNECT},
        0x1F: {
            ca,
            PacketType.PUBACK,
            PacketType.PUBREC,
            PacketType.PUBREL,
            PacketType.PUBCOMP,
            PacketType.SUBACK,
            PacketType.UNSUBACK,
            PacketType.DISCONNECT,
            PacketType.AUTH,
        },
        0x21: {c, ca},
        0x22: {c, ca},
        0x23: {p},
        0x24: {ca},
        0x25: {ca},
        0x26: {*PacketType, WILL} - {PacketType.PINGREQ, PacketType.PINGRESP},
        0x27: {c, ca},
        0x28: {ca},
        0x29: {ca},
        0x2A: {ca},
    }
    assert {ident: set(spec.packets) for ident, spec in BY_ID.items()} == expected


# --- the fixed header -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("wire", "level"),
    [
        (b"\x00\x00", MQTT5),  # type 0 is reserved
        (frame(0x36, s("a") + b"\x00\x01"), MQTT311),  # PUBLISH QoS 3
        (frame(0x38, s("a")), MQTT311),  # DUP at QoS 0
        (frame(0x80, b"\x00\x01" + s("a") + b"\x00"), MQTT311),  # SUBSCRIBE flags not 0b0010
        (frame(0xA0, b"\x00\x01" + s("a")), MQTT311),  # UNSUBSCRIBE flags not 0b0010
        (frame(0x60, b"\x00\x01"), MQTT311),  # PUBREL flags not 0b0010
        (frame(0x42, b"\x00\x01"), MQTT311),  # PUBACK flags not 0
        (b"\xc1\x00", MQTT311),  # PINGREQ flags not 0
        (b"\xf0\x00", MQTT311),  # AUTH does not exist at level 4
        (b"\x30\xff\xff\xff\xff\x01", MQTT5),  # remaining length of 5 bytes
        (b"\xc0\x80\x00", MQTT5),  # remaining length not in its shortest form
        (b"\xc0\x01\x00", MQTT311),  # PINGREQ with a body
        (b"\x40\x03\x00\x01\x00", MQTT311),  # level-4 PUBACK with a trailing byte
        (b"\xe0\x01\x00", MQTT311),  # level-4 DISCONNECT with a body
    ],
)
def test_fixed_header_violations_are_malformed(wire: bytes, level: int) -> None:
    assert rejected(wire, level) == Reason.MALFORMED_PACKET


def test_a_packet_over_the_limit_is_refused_from_its_header_alone() -> None:
    decoder = Decoder(MQTT5, Limits(max_packet_bytes=100))
    assert decoder.feed(frame(0x30, s("a") + bytes(92))[:50]) == []  # 97 bytes: fits
    with pytest.raises(MqttDecodeError) as info:
        Decoder(MQTT5, Limits(max_packet_bytes=100)).feed(b"\x30\xff\xff\xff\x7f")
    assert info.value.reason == Reason.PACKET_TOO_LARGE
    assert rejected(frame(0x30, s("a") + bytes(96)), MQTT5, Limits(max_packet_bytes=100)) == (
        Reason.PACKET_TOO_LARGE  # 99 bytes of body + 2 of header
    )


def test_after_an_error_the_decoder_is_spent_and_keeps_the_packets_before_it() -> None:
    decoder = Decoder(MQTT311, LIMITS)
    with pytest.raises(MqttDecodeError) as info:
        decoder.feed(b"\xc0\x00\xd0\x00\x00\x00")
    assert info.value.packets == (Pingreq(), Pingresp())
    with pytest.raises(MqttDecodeError) as again:
        decoder.feed(b"\xc0\x00")
    assert again.value.reason == Reason.MALFORMED_PACKET and again.value.packets == ()


# --- CONNECT and the protocol level --------------------------------------------------------


def test_a_broker_decoder_wants_connect_first_and_only_once() -> None:
    assert rejected(b"\xc0\x00", None) == Reason.PROTOCOL_ERROR
    connect = frame(0x10, connect_body(MQTT311))
    assert rejected(connect + connect, None) == Reason.PROTOCOL_ERROR


@pytest.mark.parametrize(
    "body",
    [
        s("MQIsdp") + b"\x03\x02\x00\x3c" + s("id"),  # MQTT 3.1
        s("MQTT") + b"\x03\x02\x00\x3c" + s("id"),
        s("MQTT") + b"\x06\x02\x00\x3c" + s("id"),
    ],
)
def test_mqtt_3_1_and_unknown_levels_are_unsupported_and_leave_the_level_unknown(
    body: bytes,
) -> None:
    decoder = Decoder(None, LIMITS)
    with pytest.raises(MqttDecodeError) as info:
        decoder.feed(frame(0x10, body))
    assert info.value.reason == Reason.UNSUPPORTED_PROTOCOL_VERSION
    assert decoder.level is None


def test_a_bad_connect_after_its_level_byte_leaves_the_level_to_answer_in() -> None:
    decoder = Decoder(None, LIMITS)
    with pytest.raises(MqttDecodeError):
        decoder.feed(frame(0x10, connect_body(MQTT5, props=b"\x02\x11\x00")))
    assert decoder.level == MQTT5


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (s("MQTX") + b"\x04\x02\x00\x3c" + s("id"), Reason.MALFORMED_PACKET),
        (connect_body(MQTT311, flags=0x03), Reason.MALFORMED_PACKET),  # reserved bit
        (connect_body(MQTT311, flags=0x0A), Reason.MALFORMED_PACKET),  # will QoS, no will
        (connect_body(MQTT311, flags=0x22), Reason.MALFORMED_PACKET),  # will retain, no will
        (connect_body(MQTT311, flags=0x1E, rest=s("t") + s("m")), Reason.MALFORMED_PACKET),
        (connect_body(MQTT311, flags=0x42, rest=s("pw")), Reason.MALFORMED_PACKET),
        (connect_body(MQTT311, flags=0x06, rest=s("a/#") + s("m")), Reason.TOPIC_NAME_INVALID),
        (connect_body(MQTT5, props=b"\x03\x16\x00\x00"), Reason.PROTOCOL_ERROR),  # data, no method
        (connect_body(MQTT5, props=b"\x03\x21\x00\x00"), Reason.PROTOCOL_ERROR),  # receive max 0
        (connect_body(MQTT5, props=b"\x02\x17\x02"), Reason.PROTOCOL_ERROR),  # problem info 2
        (connect_body(MQTT5, props=b"\x05\x27\x00\x00\x00\x00"), Reason.PROTOCOL_ERROR),
        (connect_body(MQTT5, props=b"\x02\x01\x00"), Reason.MALFORMED_PACKET),  # PUBLISH's
        (connect_body(MQTT311) + b"\x00", Reason.MALFORMED_PACKET),  # trailing byte
        (connect_body(MQTT311)[:-1], Reason.MALFORMED_PACKET),  # client id cut short
    ],
)
def test_connect_violations(body: bytes, reason: Reason) -> None:
    assert rejected(frame(0x10, body), None) == reason


def test_a_password_without_user_name_is_allowed_at_level_5_only() -> None:
    packet = decode_one(frame(0x10, connect_body(MQTT5, flags=0x42, rest=s("pw"))), None)
    assert isinstance(packet, Connect) and packet.password == b"pw" and packet.username is None
    with pytest.raises(MqttEncodeError):
        encode(Connect("id", MQTT311, password=b"pw"), MQTT311)


# --- strings and topics ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw", [b"a\x00b", b"\xc3\x28", b"\xed\xa0\x80", b"\xc0\xaf", b"\xf8\x88\x80\x80\x80", b"\xff"]
)
def test_ill_formed_utf8_and_nul_are_malformed(raw: bytes) -> None:
    body = s("MQTT") + b"\x04\x02\x00\x3c" + s(raw)
    assert rejected(frame(0x10, body), None) == Reason.MALFORMED_PACKET


def test_the_encoder_refuses_strings_mqtt_cannot_carry() -> None:
    for client_id in ["x" * 65_536, "a\x00", "\ud800"]:
        with pytest.raises(MqttEncodeError):
            encode(Connect(client_id, MQTT311), MQTT311)
    assert encode(Connect("x" * 65_535, MQTT311), MQTT311)


@pytest.mark.parametrize("topic", ["a/+", "a/#", "+", "#", "a+b"])
def test_a_publish_topic_with_a_wildcard_is_refused(topic: str) -> None:
    assert rejected(frame(0x30, s(topic)), MQTT311) == Reason.TOPIC_NAME_INVALID
    with pytest.raises(MqttEncodeError):
        encode(Publish(topic), MQTT5)


def test_an_empty_topic_needs_a_topic_alias_at_level_5() -> None:
    assert rejected(frame(0x30, s("") + b"\x00"), MQTT5) == Reason.PROTOCOL_ERROR
    assert rejected(frame(0x30, s("")), MQTT311) == Reason.PROTOCOL_ERROR
    aliased = Publish("", b"x", properties=Properties(topic_alias=3))
    assert decode_one(encode(aliased, MQTT5), MQTT5) == aliased
    assert rejected(frame(0x30, s("") + b"\x03\x23\x00\x00"), MQTT5) == Reason.PROTOCOL_ERROR


def test_topics_over_the_limits_are_refused() -> None:
    limits = Limits(max_topic_bytes=8, max_topic_levels=3)
    assert decode_one(frame(0x30, s("a/b/cdef")), MQTT311, limits) == Publish("a/b/cdef")
    assert rejected(frame(0x30, s("a/b/cdefg")), MQTT311, limits) == Reason.TOPIC_NAME_INVALID
    assert rejected(frame(0x30, s("a/b/c/d")), MQTT311, limits) == Reason.TOPIC_NAME_INVALID
    subscribe = frame(0x82, b"\x00\x01" + s("a/+/c/#") + b"\x00")
    assert rejected(subscribe, MQTT311, limits) == Reason.TOPIC_FILTER_INVALID


@pytest.mark.parametrize(
    "topic_filter",
    [
        "#",
        "+",
        "a/+/b",
        "a/#",
        "+/+",
        "/",
        "a//b",
        "$SYS/#",
        "$share/g/a/#",
        "$share/g/+",
        "$share/g//",
        "sport/tennis/+",
    ],
)
def test_well_formed_filters_are_accepted(topic_filter: str) -> None:
    assert check_topic_filter(topic_filter) is None
    wire = frame(0x82, b"\x00\x01" + s(topic_filter) + b"\x01")
    assert decode_one(wire, MQTT311) == Subscribe(1, (Subscription(topic_filter, 1),))


@pytest.mark.parametrize(
    "topic_filter",
    [
        "",
        "a#",
        "a/#/b",
        "#/",
        "a/b#",
        "a+/b",
        "+a",
        "a/++",
        "$share//a",
        "$share/g",
        "$share/g/",
        "$share/g+/a",
        "$share/g#/a",
        "$share/g/a#",
    ],
)
def test_malformed_filters_are_refused_in_subscribe_and_unsubscribe(topic_filter: str) -> None:
    assert check_topic_filter(topic_filter) is not None
    sub = frame(0x82, b"\x00\x01" + s(topic_filter) + b"\x00")
    unsub = frame(0xA2, b"\x00\x01" + s(topic_filter))
    assert rejected(sub, MQTT311) == Reason.TOPIC_FILTER_INVALID
    assert rejected(unsub, MQTT311) == Reason.TOPIC_FILTER_INVALID
    assert rejected(frame(0xA2, b"\x00\x01\x00" + s(topic_filter)), MQTT5) == (
        Reason.TOPIC_FILTER_INVALID
    )
    with pytest.raises(MqttEncodeError):
        encode(Subscribe(1, (Subscription(topic_filter),)), MQTT311)


def test_topic_name_check_and_filter_check_differ_on_wildcards() -> None:
    assert check_topic_name("a/b") is None and check_topic_filter("a/b") is None
    assert check_topic_name("a/+") is not None and check_topic_filter("a/+") is None
    assert check_topic_name("") is not None


# --- packet identifiers, SUBSCRIBE options ---------------------------------------------------


@pytest.mark.parametrize(
    "wire",
    [
        frame(0x32, s("a") + b"\x00\x00"),  # PUBLISH QoS 1
        frame(0x40, b"\x00\x00"),  # PUBACK
        frame(0x62, b"\x00\x00"),  # PUBREL
        frame(0x82, b"\x00\x00" + s("a") + b"\x00"),  # SUBSCRIBE
        frame(0x90, b"\x00\x00\x00"),  # SUBACK
        frame(0xA2, b"\x00\x00" + s("a")),  # UNSUBSCRIBE
        frame(0xB0, b"\x00\x00"),  # UNSUBACK
    ],
)
def test_packet_identifier_zero_is_a_protocol_error(wire: bytes) -> None:
    assert rejected(wire, MQTT311) == Reason.PROTOCOL_ERROR


@pytest.mark.parametrize(
    ("level", "options", "reason"),
    [
        (MQTT311, 0x03, Reason.MALFORMED_PACKET),  # QoS 3
        (MQTT311, 0x04, Reason.MALFORMED_PACKET),  # No Local bit is reserved at level 4
        (MQTT5, 0x03, Reason.MALFORMED_PACKET),
        (MQTT5, 0x40, Reason.MALFORMED_PACKET),  # reserved bit
        (MQTT5, 0x30, Reason.PROTOCOL_ERROR),  # retain handling 3
    ],
)
def test_subscription_option_violations(level: int, options: int, reason: Reason) -> None:
    props = b"\x00" if level == MQTT5 else b""
    wire = frame(0x82, b"\x00\x01" + props + s("a") + bytes([options]))
    assert rejected(wire, level) == reason


def test_no_local_on_a_shared_subscription_is_a_protocol_error() -> None:
    wire = frame(0x82, b"\x00\x01\x00" + s("$share/g/a") + b"\x04")
    assert rejected(wire, MQTT5) == Reason.PROTOCOL_ERROR
    with pytest.raises(MqttEncodeError):
        encode(Subscribe(1, (Subscription("$share/g/a", no_local=True),)), MQTT5)


def test_subscribe_and_unsubscribe_need_a_filter_and_respect_the_limit() -> None:
    assert rejected(frame(0x82, b"\x00\x01"), MQTT311) == Reason.PROTOCOL_ERROR
    assert rejected(frame(0xA2, b"\x00\x01\x00"), MQTT5) == Reason.PROTOCOL_ERROR
    limits = Limits(max_subscriptions_per_packet=2)
    two = b"\x00\x01" + (s("a") + b"\x00") * 2
    assert decode_one(frame(0x82, two), MQTT311, limits) == Subscribe(1, (Subscription("a"),) * 2)
    wire = frame(0x82, two + s("a") + b"\x00")
    assert rejected(wire, MQTT311, limits) == Reason.QUOTA_EXCEEDED
    assert rejected(frame(0xA2, b"\x00\x01" + s("a") * 3), MQTT311, limits) == (
        Reason.QUOTA_EXCEEDED
    )


# --- properties --------------------------------------------------------------------------------


def publish5(props: bytes) -> bytes:
    return frame(0x30, s("t") + varint_bytes(len(props), "test") + props + b"payload")


@pytest.mark.parametrize(
    ("props", "reason"),
    [
        (b"\x05\x00", Reason.MALFORMED_PACKET),  # unknown identifier
        (b"\x11\x00\x00\x00\x01", Reason.MALFORMED_PACKET),  # session expiry: not in PUBLISH
        (b"\x03\x00\x01a\x03\x00\x01b", Reason.PROTOCOL_ERROR),  # content type twice
        (b"\x01\x02", Reason.PROTOCOL_ERROR),  # payload format indicator 2
        (b"\x23\x00\x00", Reason.PROTOCOL_ERROR),  # topic alias 0
        (b"\x0b\x00", Reason.PROTOCOL_ERROR),  # subscription identifier 0
        (b"\x0b\xff\xff\xff\xff\x01", Reason.MALFORMED_PACKET),  # a 5-byte varint
        (b"\x08\x00\x03a/#", Reason.PROTOCOL_ERROR),  # response topic with a wildcard
        (b"\x26\x00\x01a", Reason.MALFORMED_PACKET),  # user property cut short
        (b"\x03\x00\x02\xc3\x28", Reason.MALFORMED_PACKET),  # ill-formed UTF-8 value
    ],
)
def test_property_violations_in_publish(props: bytes, reason: Reason) -> None:
    assert rejected(publish5(props), MQTT5) == reason


def test_a_property_block_longer_than_the_packet_is_malformed() -> None:
    assert rejected(frame(0x30, s("t") + b"\x09\x01\x00"), MQTT5) == Reason.MALFORMED_PACKET


def test_user_properties_and_publish_subscription_ids_may_repeat_others_not() -> None:
    packet = decode_one(publish5(b"\x26\x00\x01a\x00\x01b" * 2 + b"\x0b\x01\x0b\x02"), MQTT5)
    assert isinstance(packet, Publish) and packet.payload == b"payload"
    assert packet.properties.user_properties == (("a", "b"), ("a", "b"))
    assert packet.properties.subscription_identifiers == (1, 2)
    subscribe = frame(0x82, b"\x00\x01\x04\x0b\x01\x0b\x02" + s("a") + b"\x00")
    assert rejected(subscribe, MQTT5) == Reason.PROTOCOL_ERROR
    with pytest.raises(MqttEncodeError):
        encode(
            Subscribe(1, (Subscription("a"),), Properties(subscription_identifiers=(1, 2))), MQTT5
        )


def test_too_many_user_properties_exceed_the_quota() -> None:
    limits = Limits(max_user_properties=2)
    assert rejected(publish5(b"\x26\x00\x01a\x00\x01b" * 3), MQTT5, limits) == (
        Reason.QUOTA_EXCEEDED
    )


def test_the_encoder_refuses_a_property_the_packet_cannot_carry() -> None:
    with pytest.raises(MqttEncodeError):
        encode(Publish("t", properties=Properties(session_expiry_interval=1)), MQTT5)
    with pytest.raises(MqttEncodeError):
        encode(Connack(properties=Properties(receive_maximum=0)), MQTT5)
    # level 4 has no properties: they are dropped, not refused
    assert encode(Publish("t", properties=Properties(session_expiry_interval=1)), MQTT311)


# --- reason codes and level-4 return codes ----------------------------------------------------


@pytest.mark.parametrize("code", range(6))
def test_level_4_connack_return_codes_map_to_reasons_and_back(code: int) -> None:
    wire = bytes([0x20, 2, 0, code])
    packet = decode_one(wire, MQTT311)
    assert packet == Connack(False, V4_CONNACK_REASON[code])
    assert encode(packet, MQTT311) == wire


def test_level_4_connack_codes_for_refusals_level_4_has_no_code_for() -> None:
    assert encode(Connack(reason=Reason.SERVER_BUSY), MQTT311)[-1] == 3
    assert encode(Connack(reason=Reason.MALFORMED_PACKET), MQTT311)[-1] == 3
    assert encode(Connack(reason=0x8A), MQTT311)[-1] == 5  # banned


@pytest.mark.parametrize(
    ("wire", "level"),
    [
        (b"\x20\x02\x00\x06", MQTT311),  # return code 6 is reserved
        (b"\x20\x02\x02\x00", MQTT311),  # acknowledge flags reserved bit
        (b"\x20\x03\x00\x01\x00", MQTT5),  # 0x01 is no CONNACK reason
        (b"\x90\x03\x00\x01\x87", MQTT311),  # level-4 SUBACK failure is 0x80 only
        (b"\x90\x04\x00\x01\x00\x03", MQTT5),  # SUBACK 3
        (b"\x40\x03\x00\x01\x92", MQTT5),  # PUBACK cannot say packet id not found
        (b"\x62\x03\x00\x01\x10", MQTT5),  # PUBREL cannot say no matching subscribers
        (b"\xb0\x04\x00\x01\x00\x01", MQTT5),  # UNSUBACK 0x01
        (b"\xe0\x01\x01", MQTT5),  # DISCONNECT 0x01
        (b"\xf0\x01\x01", MQTT5),  # AUTH 0x01
    ],
)
def test_reason_codes_not_valid_for_the_packet_are_malformed(wire: bytes, level: int) -> None:
    assert rejected(wire, level) == Reason.MALFORMED_PACKET


def test_session_present_on_a_refusal_is_a_protocol_error() -> None:
    assert rejected(b"\x20\x02\x01\x05", MQTT311) == Reason.PROTOCOL_ERROR
    with pytest.raises(MqttEncodeError):
        encode(Connack(True, Reason.NOT_AUTHORIZED), MQTT5)


def test_level_5_short_forms_of_acks_disconnect_and_auth_decode() -> None:
    assert decode_one(b"\x50\x03\x00\x07\x10", MQTT5) == Puback(7, PacketType.PUBREC, 0x10)
    assert decode_one(b"\x40\x04\x00\x07\x00\x00", MQTT5) == Puback(7)
    assert decode_one(b"\xe0\x01\x04", MQTT5) == Disconnect(Reason.DISCONNECT_WITH_WILL)
    assert decode_one(b"\xf0\x00", MQTT5) == Auth()
    assert encode(Disconnect(Reason.DISCONNECT_WITH_WILL), MQTT5) == b"\xe0\x01\x04"


# --- encoder misuse ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("packet", "level"),
    [
        (Publish("t", qos=1), MQTT311),  # no packet id
        (Publish("t", packet_id=3), MQTT311),  # packet id at QoS 0
        (Publish("t", qos=1, packet_id=0), MQTT311),
        (Publish("t", dup=True), MQTT311),
        (Publish("t", qos=3, packet_id=1), MQTT311),
        (Publish("", properties=Properties(topic_alias=1)), MQTT311),  # no aliases at level 4
        (Auth(), MQTT311),
        (Connect("id", MQTT5), MQTT311),  # the packet's level is not the one asked
        (Connect("id", MQTT311, will=Will("w", b"", qos=3)), MQTT311),
        (Suback(1, (3,)), MQTT5),
        (Subscribe(1, ()), MQTT5),
        (Unsubscribe(1, ()), MQTT5),
        (Unsuback(1, (0x01,)), MQTT5),
        (Puback(1, PacketType.CONNECT), MQTT5),
        (Subscribe(1, (Subscription("a", retain_handling=3),)), MQTT5),
        (Pingreq(), 3),
    ],
)
def test_the_encoder_refuses_packets_mqtt_forbids(packet: Packet, level: int) -> None:
    with pytest.raises(MqttEncodeError):
        encode(packet, level)
