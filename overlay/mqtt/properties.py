"""MQTT 5 properties (section 2.2.2): one table, read and written by the same rules.

Each property has an identifier, a data type, the packets it may appear in and, for some,
a range of values. Reading refuses what the spec calls a Malformed Packet (an identifier
unknown or not valid for the packet, a value cut short) or a Protocol Error (a property
twice, a value out of range, e.g. Receive Maximum 0); only User Property may repeat, and
Subscription Identifier in PUBLISH (a server forwarding a message that matched several
subscriptions). Writing refuses the same things with `MqttEncodeError`, so whatever the
encoder writes the decoder reads back.

`WILL` stands for the will properties inside CONNECT (a set of its own, section 3.1.3.2).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from overlay.mqtt.packets import NO_PROPERTIES, Limits, PacketType, Properties, Reason
from overlay.mqtt.wire import (
    MAX_U16,
    MAX_U32,
    MAX_VARINT,
    MqttDecodeError,
    MqttEncodeError,
    Reader,
    Writer,
    malformed,
    protocol_error,
)

WILL = 0  # PacketType has no 0: the will's properties

_C = PacketType.CONNECT
_CA = PacketType.CONNACK
_P = PacketType.PUBLISH
_ACKS = (PacketType.PUBACK, PacketType.PUBREC, PacketType.PUBREL, PacketType.PUBCOMP)
_S = PacketType.SUBSCRIBE
_D = PacketType.DISCONNECT
_A = PacketType.AUTH
_REASON_STRING_IN = (_CA, *_ACKS, PacketType.SUBACK, PacketType.UNSUBACK, _D, _A)
_EVERY: tuple[int, ...] = (_C, _CA, _P, WILL, *_ACKS, _S, PacketType.SUBACK)
_EVERY += (PacketType.UNSUBSCRIBE, PacketType.UNSUBACK, _D, _A)


@dataclass(frozen=True, slots=True)
class PropertySpec:
    ident: int
    field: str  # the attribute of `Properties`
    kind: str  # byte | u16 | u32 | varint | string | binary | pair
    packets: frozenset[int]
    low: int = 0
    high: int = MAX_U32


def _spec(
    ident: int,
    field: str,
    kind: str,
    packets: tuple[int, ...],
    low: int = 0,
    high: int | None = None,
) -> PropertySpec:
    top = {"byte": 1, "u16": MAX_U16, "varint": MAX_VARINT}.get(kind, MAX_U32)
    return PropertySpec(ident, field, kind, frozenset(packets), low, top if high is None else high)


# Section 2.2.2.2, in identifier order. Byte properties are all 0/1 except Maximum QoS
# (0/1 too: "2" is said by leaving it out).
SPECS: tuple[PropertySpec, ...] = (
    _spec(0x01, "payload_format_indicator", "byte", (_P, WILL)),
    _spec(0x02, "message_expiry_interval", "u32", (_P, WILL)),
    _spec(0x03, "content_type", "string", (_P, WILL)),
    _spec(0x08, "response_topic", "string", (_P, WILL)),
    _spec(0x09, "correlation_data", "binary", (_P, WILL)),
    _spec(0x0B, "subscription_identifiers", "varint", (_P, _S), low=1),
    _spec(0x11, "session_expiry_interval", "u32", (_C, _CA, _D)),
    _spec(0x12, "assigned_client_identifier", "string", (_CA,)),
    _spec(0x13, "server_keep_alive", "u16", (_CA,)),
    _spec(0x15, "authentication_method", "string", (_C, _CA, _A)),
    _spec(0x16, "authentication_data", "binary", (_C, _CA, _A)),
    _spec(0x17, "request_problem_information", "byte", (_C,)),
    _spec(0x18, "will_delay_interval", "u32", (WILL,)),
    _spec(0x19, "request_response_information", "byte", (_C,)),
    _spec(0x1A, "response_information", "string", (_CA,)),
    _spec(0x1C, "server_reference", "string", (_CA, _D)),
    _spec(0x1F, "reason_string", "string", _REASON_STRING_IN),
    _spec(0x21, "receive_maximum", "u16", (_C, _CA), low=1),
    _spec(0x22, "topic_alias_maximum", "u16", (_C, _CA)),
    _spec(0x23, "topic_alias", "u16", (_P,), low=1),
    _spec(0x24, "maximum_qos", "byte", (_CA,)),
    _spec(0x25, "retain_available", "byte", (_CA,)),
    _spec(0x26, "user_properties", "pair", _EVERY),
    _spec(0x27, "maximum_packet_size", "u32", (_C, _CA), low=1),
    _spec(0x28, "wildcard_subscription_available", "byte", (_CA,)),
    _spec(0x29, "subscription_identifier_available", "byte", (_CA,)),
    _spec(0x2A, "shared_subscription_available", "byte", (_CA,)),
)
BY_ID: dict[int, PropertySpec] = {spec.ident: spec for spec in SPECS}
_REPEATABLE = {"user_properties", "subscription_identifiers"}


def _packet_name(packet: int) -> str:
    return "will" if packet == WILL else PacketType(packet).name


def _read_value(block: Reader, spec: PropertySpec) -> Any:
    what = spec.field
    if spec.kind == "byte":
        value: Any = block.u8(what)
    elif spec.kind == "u16":
        value = block.u16(what)
    elif spec.kind == "u32":
        value = block.u32(what)
    elif spec.kind == "varint":
        value = block.varint(what)
    elif spec.kind == "string":
        return block.string(what)
    elif spec.kind == "binary":
        return block.binary(what)
    else:
        return (block.string(what), block.string(what))
    if not spec.low <= value <= spec.high:
        raise protocol_error(f"{what} {value} outside {spec.low}..{spec.high}")
    return value


def read_properties(r: Reader, packet: int, limits: Limits) -> Properties:
    """The property block at the reader (its length first), for `packet` (a PacketType or
    WILL)."""
    block = r.sub(r.varint("property length"), "properties")
    if not block.remaining:
        return NO_PROPERTIES
    values: dict[str, Any] = {}
    users: list[tuple[str, str]] = []
    sub_ids: list[int] = []
    while block.remaining:
        ident = block.varint("property identifier")
        spec = BY_ID.get(ident)
        if spec is None or packet not in spec.packets:
            raise malformed(f"property 0x{ident:02x} not valid in {_packet_name(packet)}")
        value = _read_value(block, spec)
        if spec.field == "user_properties":
            if len(users) >= limits.max_user_properties:
                raise MqttDecodeError(
                    Reason.QUOTA_EXCEEDED, f"more than {limits.max_user_properties} user properties"
                )
            users.append(value)
        elif spec.field == "subscription_identifiers":
            if sub_ids and packet != PacketType.PUBLISH:
                raise protocol_error("subscription identifier twice")
            sub_ids.append(value)
        elif spec.field in values:
            raise protocol_error(f"{spec.field} twice")
        else:
            values[spec.field] = value
    if sub_ids:
        values["subscription_identifiers"] = tuple(sub_ids)
    if users:
        values["user_properties"] = tuple(users)
    return Properties(**values)


def _write_value(block: Writer, spec: PropertySpec, value: Any) -> None:
    what = spec.field
    block.varint(spec.ident, what)
    if spec.kind == "string":
        block.string(value, what)
    elif spec.kind == "binary":
        block.binary(value, what)
    elif spec.kind == "pair":
        block.string(value[0], what)
        block.string(value[1], what)
    else:
        if isinstance(value, bool) or not isinstance(value, int):
            raise MqttEncodeError(f"{what}: {value!r} is not an int")
        if not spec.low <= value <= spec.high:
            raise MqttEncodeError(f"{what}: {value} outside {spec.low}..{spec.high}")
        getattr(block, "u8" if spec.kind == "byte" else spec.kind)(value, what)


def write_properties(w: Writer, props: Properties, packet: int) -> None:
    """Writes the property block (its length first) of `props` for `packet`."""
    if props is NO_PROPERTIES:
        w.u8(0, "property length")
        return
    block = Writer()
    for spec in SPECS:
        value = getattr(props, spec.field)
        if value is None or value == ():
            continue
        if packet not in spec.packets:
            raise MqttEncodeError(f"{spec.field} not valid in {_packet_name(packet)}")
        if spec.field not in _REPEATABLE:
            _write_value(block, spec, value)
            continue
        if spec.field == "subscription_identifiers" and packet != _P and len(value) > 1:
            raise MqttEncodeError(f"one subscription identifier in {_packet_name(packet)}")
        for item in value:
            _write_value(block, spec, item)
    w.varint(len(block.buf), "property length")
    w.raw(bytes(block.buf))
