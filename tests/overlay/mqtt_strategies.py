"""Hypothesis strategies for MQTT packets (valid ones: what the encoder must accept), and
`level4_view`, what a packet becomes after a trip through level 4."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from hypothesis import strategies as st

from overlay.mqtt.codec import REASONS
from overlay.mqtt.packets import (
    MQTT5,
    MQTT311,
    NO_PROPERTIES,
    Auth,
    Connack,
    Connect,
    Disconnect,
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
from overlay.mqtt.properties import SPECS, WILL

TEXT = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=12
)
LEVEL_TEXT = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00+#/"), max_size=6
)
TOPIC_NAMES = st.lists(LEVEL_TEXT, min_size=1, max_size=4).map("/".join).filter(bool)
BINARY = st.binary(max_size=16)
PACKET_IDS = st.integers(1, 0xFFFF)
ACK_KINDS = (PacketType.PUBACK, PacketType.PUBREC, PacketType.PUBREL, PacketType.PUBCOMP)


@st.composite
def topic_filters(draw: st.DrawFn) -> str:
    levels = draw(st.lists(st.one_of(LEVEL_TEXT, st.just("+")), min_size=1, max_size=4))
    if draw(st.booleans()):
        levels.append("#")
    text = "/".join(levels)
    if not text:
        text = "#"
    if draw(st.integers(0, 4)) == 0:
        group = draw(LEVEL_TEXT.filter(bool))
        text = f"$share/{group}/{text}"
    return text


def _value(kind: str, low: int, high: int, field: str) -> st.SearchStrategy[Any]:
    if field == "response_topic":
        return TOPIC_NAMES
    return {
        "string": TEXT,
        "binary": BINARY,
        "pair": st.tuples(TEXT, TEXT),
    }.get(kind, st.integers(low, high))


def properties(packet: int) -> st.SearchStrategy[Properties]:
    """Any properties valid in `packet` (a PacketType or WILL), from the codec's own table
    of which property goes where (the table itself is checked against the spec in
    test_mqtt_codec.py)."""
    optional: dict[str, st.SearchStrategy[Any]] = {}
    for spec in SPECS:
        if packet not in spec.packets:
            continue
        value = _value(spec.kind, spec.low, spec.high, spec.field)
        if spec.field == "user_properties":
            optional[spec.field] = st.lists(value, max_size=3).map(tuple)
        elif spec.field == "subscription_identifiers":
            most = 3 if packet == PacketType.PUBLISH else 1
            optional[spec.field] = st.lists(value, min_size=1, max_size=most).map(tuple)
        else:
            optional[spec.field] = value
    dicts = st.fixed_dictionaries({}, optional=optional)
    return st.one_of(st.just(NO_PROPERTIES), dicts.map(lambda d: Properties(**d)))


@st.composite
def connects(draw: st.DrawFn, level: int) -> Connect:
    will = None
    if draw(st.booleans()):
        will = Will(
            draw(TOPIC_NAMES),
            draw(BINARY),
            draw(st.integers(0, 2)),
            draw(st.booleans()),
            draw(properties(WILL)),
        )
    props = draw(properties(PacketType.CONNECT))
    if props.authentication_data is not None and props.authentication_method is None:
        props = replace(props, authentication_method="m")
    username = draw(st.none() | TEXT)
    password = draw(st.none() | BINARY) if username is not None or level == MQTT5 else None
    return Connect(
        draw(TEXT),
        level,
        draw(st.booleans()),
        draw(st.integers(0, 0xFFFF)),
        username,
        password,
        will,
        props,
    )


@st.composite
def connacks(draw: st.DrawFn) -> Connack:
    reason = draw(st.sampled_from(sorted(REASONS[PacketType.CONNACK])))
    present = draw(st.booleans()) and reason < 0x80
    return Connack(present, reason, draw(properties(PacketType.CONNACK)))


@st.composite
def publishes(draw: st.DrawFn) -> Publish:
    qos = draw(st.integers(0, 2))
    return Publish(
        draw(TOPIC_NAMES),
        draw(st.binary(max_size=64)),
        qos,
        draw(st.booleans()),
        draw(st.booleans()) and qos > 0,
        draw(PACKET_IDS) if qos else None,
        draw(properties(PacketType.PUBLISH)),
    )


@st.composite
def acks(draw: st.DrawFn) -> Puback:
    kind = draw(st.sampled_from(ACK_KINDS))
    return Puback(
        draw(PACKET_IDS), kind, draw(st.sampled_from(sorted(REASONS[kind]))), draw(properties(kind))
    )


@st.composite
def subscriptions(draw: st.DrawFn) -> Subscription:
    topic_filter = draw(topic_filters())
    no_local = draw(st.booleans()) and not topic_filter.startswith("$share/")
    return Subscription(
        topic_filter,
        draw(st.integers(0, 2)),
        no_local,
        draw(st.booleans()),
        draw(st.integers(0, 2)),
    )


def _reasons(kind: PacketType, min_size: int = 0) -> st.SearchStrategy[tuple[int, ...]]:
    codes = st.sampled_from(sorted(REASONS[kind]))
    return st.lists(codes, min_size=min_size, max_size=4).map(tuple)


def packets(level: int) -> st.SearchStrategy[Packet]:
    """Every packet type valid at `level` (AUTH only at 5)."""
    choices: list[st.SearchStrategy[Any]] = [
        connects(level),
        connacks(),
        publishes(),
        acks(),
        st.builds(
            Subscribe,
            PACKET_IDS,
            st.lists(subscriptions(), min_size=1, max_size=4).map(tuple),
            properties(PacketType.SUBSCRIBE),
        ),
        st.builds(
            Suback, PACKET_IDS, _reasons(PacketType.SUBACK, 1), properties(PacketType.SUBACK)
        ),
        st.builds(
            Unsubscribe,
            PACKET_IDS,
            st.lists(topic_filters(), min_size=1, max_size=4).map(tuple),
            properties(PacketType.UNSUBSCRIBE),
        ),
        st.builds(
            Unsuback, PACKET_IDS, _reasons(PacketType.UNSUBACK), properties(PacketType.UNSUBACK)
        ),
        st.just(Pingreq()),
        st.just(Pingresp()),
        st.builds(
            Disconnect,
            st.sampled_from(sorted(REASONS[PacketType.DISCONNECT])),
            properties(PacketType.DISCONNECT),
        ),
    ]
    if level == MQTT5:
        choices.append(
            st.builds(
                Auth, st.sampled_from(sorted(REASONS[PacketType.AUTH])), properties(PacketType.AUTH)
            )
        )
    return st.one_of(choices)


# Level-4 CONNACK return code of each MQTT 5 reason (3.1.1 section 3.2.2.3; the rest: 3).
V4_CONNACK_CODE = {0x00: 0, 0x84: 1, 0x85: 2, 0x88: 3, 0x86: 4, 0x87: 5, 0x8A: 5, 0x8C: 5}
V4_CONNACK_REASON = {
    0: Reason.SUCCESS,
    1: Reason.UNSUPPORTED_PROTOCOL_VERSION,
    2: Reason.CLIENT_ID_NOT_VALID,
    3: Reason.SERVER_UNAVAILABLE,
    4: Reason.BAD_USERNAME_OR_PASSWORD,
    5: Reason.NOT_AUTHORIZED,
}


def level4_view(packet: Packet) -> Packet:
    """`packet` as a level-4 peer decodes it: no properties, no v5-only fields, reasons
    mapped to what level 4 can say."""
    match packet:
        case Connect(will=will):
            will = None if will is None else replace(will, properties=NO_PROPERTIES)
            return replace(packet, protocol_level=MQTT311, will=will, properties=NO_PROPERTIES)
        case Connack(reason=reason):
            code = V4_CONNACK_CODE.get(reason, 3)
            return Connack(packet.session_present, V4_CONNACK_REASON[code])
        case Publish() | Unsubscribe():
            return replace(packet, properties=NO_PROPERTIES)
        case Puback(packet_id=packet_id, kind=kind):
            return Puback(packet_id, kind)
        case Subscribe(subscriptions=subs):
            plain = tuple(Subscription(s.topic_filter, s.qos) for s in subs)
            return Subscribe(packet.packet_id, plain)
        case Suback(reasons=reasons):
            return Suback(packet.packet_id, tuple(min(code, 0x80) for code in reasons))
        case Unsuback(packet_id=packet_id):
            return Unsuback(packet_id)
        case Disconnect():
            return Disconnect()
    return packet
