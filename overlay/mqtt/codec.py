"""MQTT 3.1.1 (level 4) and MQTT 5 control packets to and from bytes, sans-IO.

`Decoder(level, limits).feed(data)` takes the bytes read from a connection and returns the
complete packets in them; a partial packet is kept until the rest arrives. `encode(packet,
level)` returns one packet's bytes. Both directions decode (a broker reads CONNECT,
PUBLISH, SUBSCRIBE ...; the agent's own client and the tests read CONNACK, SUBACK ...).

Bounded and total:

- the fixed header is checked as soon as its bytes are in: type and flags (section 2.1.3;
  PUBLISH QoS 3 or DUP at QoS 0, reserved bits, AUTH at level 4), the remaining length
  (a variable byte integer of at most 4 bytes, shortest form), and the whole packet's
  size against `limits.max_packet_bytes` (it counts the fixed header too, as MQTT 5's
  Maximum Packet Size does). So the decoder never holds more than one packet short of a
  byte, whatever the peer claims;
- a body is read by `wire.Reader`, which checks every length before it reads;
- the only exception is `MqttDecodeError`, carrying the MQTT 5 reason code to answer with
  and the packets decoded before the bad one. After it the decoder is spent: every later
  `feed` raises the same reason (the connection must close, [MQTT-4.13.1-1]).

The protocol level: a broker's decoder starts with `level=None` and learns it from the
first packet, which must be a CONNECT ([MQTT-3.1.0-1]); a second CONNECT is a protocol
error ([MQTT-3.1.0-2]). `Decoder.level` is set as soon as the CONNECT's level byte is read
and valid, so a CONNECT that is bad later is answered in its own level's format. MQTT 3.1
(`MQIsdp`, level 3) and unknown levels raise UNSUPPORTED_PROTOCOL_VERSION with `level`
still None: answer with a level-4 CONNACK (return code 1, which 3.1 clients read too).

Level 4 has no reason codes or properties. Decoded level-4 packets carry `Properties()`
and the MQTT 5 reason that matches the return code; encoding at level 4 drops properties
and v5-only fields, and maps reasons: CONNACK to return codes 0..5 (`CONNACK_V4`), SUBACK
failures to 0x80.

What is left to the broker: choices that depend on the session, not the packet (client id
rules, topic aliases against Topic Alias Maximum, subscription identifiers a client must
not send, QoS against Maximum QoS, packet ids in use).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from overlay.mqtt.packets import (
    MQTT5,
    MQTT311,
    NO_PROPERTIES,
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
from overlay.mqtt.properties import WILL, read_properties, write_properties
from overlay.mqtt.wire import (
    MqttDecodeError,
    MqttEncodeError,
    Reader,
    Writer,
    check_range,
    malformed,
    parse_varint,
    protocol_error,
    varint_bytes,
)

__all__ = [
    "CONNACK_V4",
    "Decoder",
    "MqttDecodeError",
    "MqttEncodeError",
    "check_topic_filter",
    "check_topic_name",
    "encode",
]

PROTOCOL_NAME = b"MQTT"
MQTT31_NAME = b"MQIsdp"
SHARE_PREFIX = "$share/"
LEVELS = (MQTT311, MQTT5)

# Fixed-header flags every type but PUBLISH must carry (section 2.1.3).
_FLAGS = {t: 0 for t in PacketType}
_FLAGS.update({PacketType.PUBREL: 2, PacketType.SUBSCRIBE: 2, PacketType.UNSUBSCRIBE: 2})

# Level-4 CONNACK return codes (3.1.1 section 3.2.2.3) and the MQTT 5 reason each maps to.
CONNACK_V4: dict[int, int] = {
    0: Reason.SUCCESS,
    1: Reason.UNSUPPORTED_PROTOCOL_VERSION,
    2: Reason.CLIENT_ID_NOT_VALID,
    3: Reason.SERVER_UNAVAILABLE,
    4: Reason.BAD_USERNAME_OR_PASSWORD,
    5: Reason.NOT_AUTHORIZED,
}
_CONNACK_TO_V4 = {reason: code for code, reason in CONNACK_V4.items()}
# MQTT 5 reasons with no level-4 code of their own: Banned (0x8A) and Bad authentication
# method (0x8C) are "not authorized"; every other refusal is "server unavailable".
_CONNACK_TO_V4.update({0x8A: 5, 0x8C: 5})
SUBACK_V4 = frozenset({0, 1, 2, 0x80})

# The reason codes MQTT 5 allows in each packet (section 2.4 and each packet's section).
_ACK_REASONS = frozenset({0x00, 0x10, 0x80, 0x83, 0x87, 0x90, 0x91, 0x97, 0x99})
_REL_REASONS = frozenset({0x00, 0x92})
REASONS: dict[PacketType, frozenset[int]] = {
    PacketType.CONNACK: frozenset(
        {0x00, *range(0x80, 0x8B), 0x8C, 0x90, 0x95, 0x97, *range(0x99, 0x9E), 0x9F}
    ),
    PacketType.PUBACK: _ACK_REASONS,
    PacketType.PUBREC: _ACK_REASONS,
    PacketType.PUBREL: _REL_REASONS,
    PacketType.PUBCOMP: _REL_REASONS,
    PacketType.SUBACK: frozenset({0, 1, 2, 0x80, 0x83, 0x87, 0x8F, 0x91, 0x97, 0x9E, 0xA1, 0xA2}),
    PacketType.UNSUBACK: frozenset({0x00, 0x11, 0x80, 0x83, 0x87, 0x8F, 0x91}),
    PacketType.DISCONNECT: frozenset(
        {0x00, 0x04, *range(0x80, 0x84), 0x87, 0x89, 0x8B, *range(0x8D, 0xA3)}
    ),
    PacketType.AUTH: frozenset({0x00, 0x18, 0x19}),
}


# --- topics -------------------------------------------------------------------------------


def _topic_limits(topic: str, limits: Limits | None) -> str | None:
    if limits is None:
        return None
    size = len(topic.encode("utf-8", "surrogatepass"))
    if size > limits.max_topic_bytes:
        return f"{size} bytes, at most {limits.max_topic_bytes}"
    if topic.count("/") >= limits.max_topic_levels:
        return f"more than {limits.max_topic_levels} levels"
    return None


def check_topic_name(topic: str, limits: Limits | None = None) -> str | None:
    """None if `topic` may be published to, else why not (section 4.7: at least one
    character, no wildcards; and within `limits` if given)."""
    if not topic:
        return "empty topic name"
    if "+" in topic or "#" in topic:
        return f"wildcard in topic name {topic[:64]!r}"
    return _topic_limits(topic, limits)


def check_topic_filter(topic_filter: str, limits: Limits | None = None) -> str | None:
    """None if `topic_filter` may be subscribed to, else why not: `#` only as the last level
    and alone in it, `+` alone in its level; `$share/GROUP/FILTER` needs a group without
    wildcards or `/` and a valid filter (MQTT 5 section 4.8.2, taken at level 4 too)."""
    if not topic_filter:
        return "empty topic filter"
    rest = topic_filter
    if topic_filter.startswith(SHARE_PREFIX):
        group, sep, rest = topic_filter[len(SHARE_PREFIX) :].partition("/")
        if not group or "+" in group or "#" in group:
            return f"bad share name in {topic_filter[:64]!r}"
        if not sep or not rest:
            return f"shared subscription without a filter: {topic_filter[:64]!r}"
    levels = rest.split("/")
    for i, level in enumerate(levels):
        if ("#" in level and (level != "#" or i != len(levels) - 1)) or (
            "+" in level and level != "+"
        ):
            return f"misplaced wildcard in topic filter {topic_filter[:64]!r}"
    return _topic_limits(topic_filter, limits)


# --- decoding -----------------------------------------------------------------------------


class Decoder:
    """One connection's incoming byte stream to packets (see the module docstring)."""

    def __init__(self, level: int | None, limits: Limits) -> None:
        if level is not None and level not in LEVELS:
            raise ValueError(f"protocol level {level}: 4 or 5")
        self.level = level
        self.limits = limits
        self._learn = level is None
        self._buf = bytearray()
        self._error: MqttDecodeError | None = None

    @property
    def buffered(self) -> int:
        """Bytes held for a packet not complete yet (less than `max_packet_bytes`)."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[Packet]:
        """The packets completed by `data`, in order; raises only `MqttDecodeError`."""
        if self._error is not None:
            raise MqttDecodeError(self._error.reason, self._error.message)
        buf = self._buf
        buf += data
        packets: list[Packet] = []
        pos = 0
        try:
            while True:
                header = self._header(buf, pos)
                if header is None:
                    break
                first, size, start = header
                if pos + size > len(buf):
                    break
                packets.append(self._packet(first, bytes(buf[start : pos + size])))
                pos += size
        except MqttDecodeError as exc:
            self._error = exc
            buf.clear()
            raise MqttDecodeError(exc.reason, exc.message, tuple(packets)) from None
        del buf[:pos]
        return packets

    def _header(self, buf: bytearray, pos: int) -> tuple[int, int, int] | None:
        """(first byte, whole packet size, body offset) once the fixed header is in."""
        if pos >= len(buf):
            return None
        first = buf[pos]
        self._check_first(first)
        parsed = parse_varint(buf, pos + 1)
        if parsed is None:
            return None
        length, used = parsed
        size = 1 + used + length
        if size > self.limits.max_packet_bytes:
            raise MqttDecodeError(
                Reason.PACKET_TOO_LARGE, f"{size} bytes, at most {self.limits.max_packet_bytes}"
            )
        return first, size, pos + 1 + used

    def _check_first(self, first: int) -> None:
        kind, flags = first >> 4, first & 0x0F
        if self.level is None or (self._learn and kind == PacketType.CONNECT):
            if kind != PacketType.CONNECT:
                raise protocol_error(f"first packet is type {kind}, not CONNECT")
            if self.level is not None:
                raise protocol_error("second CONNECT")
        if kind == 0 or (kind == PacketType.AUTH and self.level == MQTT311):
            raise malformed(f"reserved packet type {kind}")
        if kind == PacketType.PUBLISH:
            qos = (flags >> 1) & 3
            if qos == 3:
                raise malformed("PUBLISH with QoS 3")
            if qos == 0 and flags & 0b1000:
                raise malformed("PUBLISH with DUP at QoS 0")
        elif flags != _FLAGS[PacketType(kind)]:
            raise malformed(f"{PacketType(kind).name} with fixed-header flags 0b{flags:04b}")

    def _packet(self, first: int, body: bytes) -> Packet:
        kind = PacketType(first >> 4)
        if kind == PacketType.CONNECT:
            return self._connect(body)
        assert self.level is not None  # _check_first lets only CONNECT through before
        r = Reader(body)
        if kind == PacketType.PUBLISH:
            return _publish(r, first & 0x0F, self.level, self.limits)
        if kind in (PacketType.PINGREQ, PacketType.PINGRESP):
            r.done(kind.name)
            return Pingreq() if kind == PacketType.PINGREQ else Pingresp()
        return _DECODERS[kind](r, kind, self.level, self.limits)

    def _connect(self, body: bytes) -> Connect:
        r = Reader(body)
        name = r.binary("protocol name")
        level = r.u8("protocol level")
        if name == MQTT31_NAME or (name == PROTOCOL_NAME and level not in LEVELS):
            raise MqttDecodeError(
                Reason.UNSUPPORTED_PROTOCOL_VERSION,
                f"protocol {name.decode('ascii', 'replace')} level {level}: 4 or 5 only",
            )
        if name != PROTOCOL_NAME:
            raise malformed(f"protocol name {name[:16]!r}, not MQTT")
        if self._learn:
            self.level = level
        elif level != self.level:
            raise protocol_error(f"CONNECT at level {level} on a level-{self.level} decoder")
        return _connect_body(r, level, self.limits)


def _packet_id(r: Reader) -> int:
    packet_id = r.u16("packet identifier")
    if not packet_id:
        raise protocol_error("packet identifier 0")
    return packet_id


def _reason(r: Reader, kind: PacketType) -> int:
    reason = r.u8("reason code")
    if reason not in REASONS[kind]:
        raise malformed(f"reason code 0x{reason:02x} not valid in {kind.name}")
    return reason


def _topic(topic: str, limits: Limits, reason: Reason = Reason.TOPIC_NAME_INVALID) -> None:
    problem = check_topic_name(topic, limits)
    if problem is not None:
        raise MqttDecodeError(reason, problem)


def _response_topic(props: Properties, limits: Limits) -> None:
    if props.response_topic is not None:
        _topic(props.response_topic, limits, Reason.PROTOCOL_ERROR)


def _connect_body(r: Reader, level: int, limits: Limits) -> Connect:
    flags = r.u8("connect flags")
    will_flag, will_qos = bool(flags & 0x04), (flags >> 3) & 3
    if flags & 0x01:
        raise malformed("CONNECT reserved flag set")
    if will_qos == 3 or (not will_flag and flags & 0x38):
        raise malformed(f"CONNECT will flags 0b{flags:08b}")
    if level == MQTT311 and flags & 0x40 and not flags & 0x80:
        raise malformed("password without user name at level 4")
    keep_alive = r.u16("keep alive")
    props = read_properties(r, PacketType.CONNECT, limits) if level == MQTT5 else NO_PROPERTIES
    if props.authentication_data is not None and props.authentication_method is None:
        raise protocol_error("authentication data without a method")
    client_id = r.string("client identifier")
    will = None
    if will_flag:
        will_props = read_properties(r, WILL, limits) if level == MQTT5 else NO_PROPERTIES
        _response_topic(will_props, limits)
        topic = r.string("will topic")
        _topic(topic, limits)
        payload = r.binary("will payload")
        will = Will(topic, payload, will_qos, bool(flags & 0x20), will_props)
    username = r.string("user name") if flags & 0x80 else None
    password = r.binary("password") if flags & 0x40 else None
    r.done("CONNECT")
    return Connect(
        client_id, level, bool(flags & 0x02), keep_alive, username, password, will, props
    )


def _publish(r: Reader, flags: int, level: int, limits: Limits) -> Publish:
    qos = (flags >> 1) & 3
    topic = r.string("topic name")
    packet_id = _packet_id(r) if qos else None
    props = read_properties(r, PacketType.PUBLISH, limits) if level == MQTT5 else NO_PROPERTIES
    if not topic and props.topic_alias is None:  # an alias may stand for it (3.3.2.3.4)
        raise protocol_error("PUBLISH without a topic name or topic alias")
    if topic:
        _topic(topic, limits)
    _response_topic(props, limits)
    return Publish(topic, r.rest(), qos, bool(flags & 1), bool(flags & 8), packet_id, props)


def _connack(r: Reader, kind: PacketType, level: int, limits: Limits) -> Connack:
    flags = r.u8("acknowledge flags")
    if flags & 0xFE:
        raise malformed(f"CONNACK flags 0b{flags:08b}")
    if level == MQTT311:
        code = r.u8("return code")
        if code not in CONNACK_V4:
            raise malformed(f"CONNACK return code {code}")
        reason, props = CONNACK_V4[code], NO_PROPERTIES
    else:
        reason = _reason(r, kind)
        props = read_properties(r, kind, limits)
    r.done("CONNACK")
    if flags and reason >= 0x80:
        raise protocol_error("session present on a refused CONNACK")
    return Connack(bool(flags), reason, props)


def _ack(r: Reader, kind: PacketType, level: int, limits: Limits) -> Puback:
    packet_id = _packet_id(r)
    reason: int = Reason.SUCCESS
    props = NO_PROPERTIES
    if level == MQTT5 and r.remaining:  # reason and properties may be left out (3.4.2.1)
        reason = _reason(r, kind)
        if r.remaining:
            props = read_properties(r, kind, limits)
    r.done(kind.name)
    return Puback(packet_id, kind, reason, props)


def _subscription(r: Reader, level: int, limits: Limits) -> Subscription:
    topic_filter = r.string("topic filter")
    problem = check_topic_filter(topic_filter, limits)
    if problem is not None:
        raise MqttDecodeError(Reason.TOPIC_FILTER_INVALID, problem)
    options = r.u8("subscription options")
    qos = options & 3
    if qos == 3 or options & (0xFC if level == MQTT311 else 0xC0):
        raise malformed(f"subscription options 0b{options:08b}")
    retain_handling = (options >> 4) & 3
    if retain_handling == 3:
        raise protocol_error("retain handling 3")
    no_local = bool(options & 0x04)
    if no_local and topic_filter.startswith(SHARE_PREFIX):
        raise protocol_error("no local on a shared subscription")
    return Subscription(topic_filter, qos, no_local, bool(options & 0x08), retain_handling)


def _too_many(count: int, limits: Limits) -> None:
    if count >= limits.max_subscriptions_per_packet:
        raise MqttDecodeError(
            Reason.QUOTA_EXCEEDED, f"more than {limits.max_subscriptions_per_packet} filters"
        )


def _subscribe(r: Reader, kind: PacketType, level: int, limits: Limits) -> Subscribe:
    packet_id = _packet_id(r)
    props = read_properties(r, kind, limits) if level == MQTT5 else NO_PROPERTIES
    subscriptions: list[Subscription] = []
    while r.remaining:
        _too_many(len(subscriptions), limits)
        subscriptions.append(_subscription(r, level, limits))
    if not subscriptions:
        raise protocol_error("SUBSCRIBE without a topic filter")
    return Subscribe(packet_id, tuple(subscriptions), props)


def _unsubscribe(r: Reader, kind: PacketType, level: int, limits: Limits) -> Unsubscribe:
    packet_id = _packet_id(r)
    props = read_properties(r, kind, limits) if level == MQTT5 else NO_PROPERTIES
    filters: list[str] = []
    while r.remaining:
        _too_many(len(filters), limits)
        topic_filter = r.string("topic filter")
        problem = check_topic_filter(topic_filter, limits)
        if problem is not None:
            raise MqttDecodeError(Reason.TOPIC_FILTER_INVALID, problem)
        filters.append(topic_filter)
    if not filters:
        raise protocol_error("UNSUBSCRIBE without a topic filter")
    return Unsubscribe(packet_id, tuple(filters), props)


def _suback(r: Reader, kind: PacketType, level: int, limits: Limits) -> Suback:
    packet_id = _packet_id(r)
    props = read_properties(r, kind, limits) if level == MQTT5 else NO_PROPERTIES
    allowed = SUBACK_V4 if level == MQTT311 else REASONS[kind]
    reasons = tuple(r.rest())
    bad = [code for code in reasons if code not in allowed]
    if bad:
        raise malformed(f"SUBACK return code 0x{bad[0]:02x}")
    return Suback(packet_id, reasons, props)


def _unsuback(r: Reader, kind: PacketType, level: int, limits: Limits) -> Unsuback:
    packet_id = _packet_id(r)
    if level == MQTT311:
        r.done(kind.name)
        return Unsuback(packet_id)
    props = read_properties(r, kind, limits)
    reasons = tuple(r.rest())
    bad = [code for code in reasons if code not in REASONS[kind]]
    if bad:
        raise malformed(f"UNSUBACK reason code 0x{bad[0]:02x}")
    return Unsuback(packet_id, reasons, props)


def _disconnect_or_auth(r: Reader, kind: PacketType, level: int, limits: Limits) -> Packet:
    reason: int = Reason.SUCCESS
    props = NO_PROPERTIES
    if level == MQTT5 and r.remaining:  # both may be left out (3.14.2.1, 3.15.2.1)
        reason = _reason(r, kind)
        if r.remaining:
            props = read_properties(r, kind, limits)
    r.done(kind.name)
    if kind == PacketType.AUTH:
        return Auth(reason, props)
    return Disconnect(reason, props)


_DECODERS: dict[PacketType, Callable[[Reader, PacketType, int, Limits], Packet]] = {
    PacketType.CONNACK: _connack,
    PacketType.PUBACK: _ack,
    PacketType.PUBREC: _ack,
    PacketType.PUBREL: _ack,
    PacketType.PUBCOMP: _ack,
    PacketType.SUBSCRIBE: _subscribe,
    PacketType.SUBACK: _suback,
    PacketType.UNSUBSCRIBE: _unsubscribe,
    PacketType.UNSUBACK: _unsuback,
    PacketType.DISCONNECT: _disconnect_or_auth,
    PacketType.AUTH: _disconnect_or_auth,
}


# --- encoding -----------------------------------------------------------------------------


def encode(packet: Packet, level: int) -> bytes:
    """The bytes of `packet` at protocol `level` (4 or 5). Raises `MqttEncodeError` for a
    packet MQTT forbids, so whatever it returns `Decoder` reads back (at level 4 without
    what level 4 cannot say)."""
    if level not in LEVELS:
        raise MqttEncodeError(f"protocol level {level}: 4 or 5")
    first, w = _ENCODERS[type(packet)](packet, level)
    body = bytes(w.buf)
    return bytes((first,)) + varint_bytes(len(body), "remaining length") + body


def _id(w: Writer, packet_id: int | None) -> None:
    if packet_id is None:
        raise MqttEncodeError("packet identifier missing")
    w.u16(check_range(packet_id, 1, 0xFFFF, "packet identifier"), "packet identifier")


def _props(w: Writer, props: Properties, packet: int, level: int) -> None:
    if level == MQTT5:
        write_properties(w, props, packet)


def _name(topic: str) -> None:
    problem = check_topic_name(topic)
    if problem is not None:
        raise MqttEncodeError(problem)


def _filter(topic_filter: str) -> None:
    problem = check_topic_filter(topic_filter)
    if problem is not None:
        raise MqttEncodeError(problem)


def _reason_byte(reason: int, kind: PacketType) -> int:
    if reason not in REASONS[kind]:
        raise MqttEncodeError(f"reason code {reason!r} not valid in {kind.name}")
    return int(reason)


def _enc_connect(p: Connect, level: int) -> tuple[int, Writer]:
    if p.protocol_level != level:
        raise MqttEncodeError(f"CONNECT says level {p.protocol_level}, encoding at {level}")
    if level == MQTT311 and p.password is not None and p.username is None:
        raise MqttEncodeError("password without user name at level 4")
    if p.properties.authentication_data is not None and p.properties.authentication_method is None:
        raise MqttEncodeError("authentication data without a method")
    flags = (0x80 if p.username is not None else 0) | (0x40 if p.password is not None else 0)
    flags |= 0x02 if p.clean_start else 0
    if p.will is not None:
        flags |= 0x04 | check_range(p.will.qos, 0, 2, "will QoS") << 3
        flags |= 0x20 if p.will.retain else 0
    w = Writer()
    w.binary(PROTOCOL_NAME, "protocol name")
    w.u8(level, "protocol level")
    w.u8(flags, "connect flags")
    w.u16(p.keep_alive, "keep alive")
    _props(w, p.properties, PacketType.CONNECT, level)
    w.string(p.client_id, "client identifier")
    if p.will is not None:
        _props(w, p.will.properties, WILL, level)
        if level == MQTT5 and p.will.properties.response_topic is not None:
            _name(p.will.properties.response_topic)
        _name(p.will.topic)
        w.string(p.will.topic, "will topic")
        w.binary(p.will.payload, "will payload")
    if p.username is not None:
        w.string(p.username, "user name")
    if p.password is not None:
        w.binary(p.password, "password")
    return PacketType.CONNECT << 4, w


def _enc_connack(p: Connack, level: int) -> tuple[int, Writer]:
    reason = _reason_byte(p.reason, PacketType.CONNACK)
    if p.session_present and reason >= 0x80:
        raise MqttEncodeError("session present on a refused CONNACK")
    w = Writer()
    w.u8(1 if p.session_present else 0, "acknowledge flags")
    if level == MQTT311:
        w.u8(_CONNACK_TO_V4.get(reason, 3), "return code")
    else:
        w.u8(reason, "reason code")
        write_properties(w, p.properties, PacketType.CONNACK)
    return PacketType.CONNACK << 4, w


def _enc_publish(p: Publish, level: int) -> tuple[int, Writer]:
    qos = check_range(p.qos, 0, 2, "QoS")
    if (p.packet_id is None) != (qos == 0):
        raise MqttEncodeError(f"packet identifier {p.packet_id!r} at QoS {qos}")
    if p.dup and not qos:
        raise MqttEncodeError("DUP at QoS 0")
    if p.topic or level == MQTT311 or p.properties.topic_alias is None:
        _name(p.topic)
    if level == MQTT5 and p.properties.response_topic is not None:
        _name(p.properties.response_topic)
    w = Writer()
    w.string(p.topic, "topic name")
    if qos:
        _id(w, p.packet_id)
    _props(w, p.properties, PacketType.PUBLISH, level)
    w.raw(p.payload)
    flags = (8 if p.dup else 0) | qos << 1 | (1 if p.retain else 0)
    return PacketType.PUBLISH << 4 | flags, w


def _reason_and_props(w: Writer, reason: int, props: Properties, kind: PacketType) -> None:
    """MQTT 5's short forms: nothing for success without properties, else the reason and
    the properties only if there are any."""
    code = _reason_byte(reason, kind)
    if props != NO_PROPERTIES:
        w.u8(code, "reason code")
        write_properties(w, props, kind)
    elif code:
        w.u8(code, "reason code")


def _enc_ack(p: Puback, level: int) -> tuple[int, Writer]:
    kind = PacketType(p.kind)
    if kind not in (PacketType.PUBACK, PacketType.PUBREC, PacketType.PUBREL, PacketType.PUBCOMP):
        raise MqttEncodeError(f"Puback of kind {kind.name}")
    w = Writer()
    _id(w, p.packet_id)
    if level == MQTT5:
        _reason_and_props(w, p.reason, p.properties, kind)
    return kind << 4 | _FLAGS[kind], w


def _enc_subscribe(p: Subscribe, level: int) -> tuple[int, Writer]:
    if not p.subscriptions:
        raise MqttEncodeError("SUBSCRIBE without a topic filter")
    w = Writer()
    _id(w, p.packet_id)
    _props(w, p.properties, PacketType.SUBSCRIBE, level)
    for sub in p.subscriptions:
        _filter(sub.topic_filter)
        options = check_range(sub.qos, 0, 2, "QoS")
        if level == MQTT5:
            if sub.no_local and sub.topic_filter.startswith(SHARE_PREFIX):
                raise MqttEncodeError("no local on a shared subscription")
            options |= check_range(sub.retain_handling, 0, 2, "retain handling") << 4
            options |= (4 if sub.no_local else 0) | (8 if sub.retain_as_published else 0)
        w.string(sub.topic_filter, "topic filter")
        w.u8(options, "subscription options")
    return PacketType.SUBSCRIBE << 4 | 2, w


def _enc_suback(p: Suback, level: int) -> tuple[int, Writer]:
    w = Writer()
    _id(w, p.packet_id)
    _props(w, p.properties, PacketType.SUBACK, level)
    for reason in p.reasons:
        code = _reason_byte(reason, PacketType.SUBACK)
        w.u8(min(code, 0x80) if level == MQTT311 else code, "reason code")
    return PacketType.SUBACK << 4, w


def _enc_unsubscribe(p: Unsubscribe, level: int) -> tuple[int, Writer]:
    if not p.topic_filters:
        raise MqttEncodeError("UNSUBSCRIBE without a topic filter")
    w = Writer()
    _id(w, p.packet_id)
    _props(w, p.properties, PacketType.UNSUBSCRIBE, level)
    for topic_filter in p.topic_filters:
        _filter(topic_filter)
        w.string(topic_filter, "topic filter")
    return PacketType.UNSUBSCRIBE << 4 | 2, w


def _enc_unsuback(p: Unsuback, level: int) -> tuple[int, Writer]:
    w = Writer()
    _id(w, p.packet_id)
    if level == MQTT5:
        write_properties(w, p.properties, PacketType.UNSUBACK)
        for reason in p.reasons:
            w.u8(_reason_byte(reason, PacketType.UNSUBACK), "reason code")
    return PacketType.UNSUBACK << 4, w


def _enc_ping(p: Pingreq | Pingresp, level: int) -> tuple[int, Writer]:
    kind = PacketType.PINGREQ if isinstance(p, Pingreq) else PacketType.PINGRESP
    return kind << 4, Writer()


def _enc_disconnect(p: Disconnect, level: int) -> tuple[int, Writer]:
    w = Writer()
    if level == MQTT5:
        _reason_and_props(w, p.reason, p.properties, PacketType.DISCONNECT)
    return PacketType.DISCONNECT << 4, w


def _enc_auth(p: Auth, level: int) -> tuple[int, Writer]:
    if level == MQTT311:
        raise MqttEncodeError("AUTH does not exist at level 4")
    w = Writer()
    _reason_and_props(w, p.reason, p.properties, PacketType.AUTH)
    return PacketType.AUTH << 4, w


_ENCODERS: dict[type, Callable[[Any, int], tuple[int, Writer]]] = {
    Connect: _enc_connect,
    Connack: _enc_connack,
    Publish: _enc_publish,
    Puback: _enc_ack,
    Subscribe: _enc_subscribe,
    Suback: _enc_suback,
    Unsubscribe: _enc_unsubscribe,
    Unsuback: _enc_unsuback,
    Pingreq: _enc_ping,
    Pingresp: _enc_ping,
    Disconnect: _enc_disconnect,
    Auth: _enc_auth,
}
