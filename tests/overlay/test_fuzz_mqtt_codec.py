"""Fuzz the MQTT decoder: only MqttDecodeError escapes, the buffer stays under the packet
limit, and whatever it accepts the encoder writes back to the same packet.

A seeded loop builds valid streams (a CONNECT at level 4 or 5, then packets of every type
both ways, rich in properties) and derives inputs from them: bit flips, byte edits,
truncations, splices, repeated slices, random bytes inserted, and plain random bytes. Each
input goes to a fresh decoder (a broker's, `level=None`, or one at a fixed level without
the CONNECT) in random chunks. The total is counted and asserted, so the test fails if the
loop silently runs fewer inputs; the reasons seen and packets decoded are asserted too, so
it fails if the mutations stop reaching the packet decoders.
"""

from __future__ import annotations

import random

from overlay.mqtt.codec import Decoder, MqttDecodeError, encode
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

REQUIRED_INPUTS = 100_000
STREAMS = 500  # valid streams to mutate, built once
LIMITS = Limits(
    max_packet_bytes=600,
    max_topic_bytes=64,
    max_topic_levels=8,
    max_subscriptions_per_packet=8,
    max_user_properties=4,
)

RICH = Properties(
    payload_format_indicator=1,
    message_expiry_interval=60,
    content_type="text/plain",
    response_topic="r/t",
    correlation_data=b"\x01\x02",
    subscription_identifiers=(3, 300),
    topic_alias=2,
    user_properties=(("k", "v"), ("ä", "ß")),
)
SAMPLES: list[Packet] = [
    Connack(
        True,
        Reason.SUCCESS,
        Properties(
            session_expiry_interval=10,
            receive_maximum=5,
            maximum_qos=1,
            assigned_client_identifier="x",
            reason_string="ok",
            server_keep_alive=30,
        ),
    ),
    Connack(False, Reason.NOT_AUTHORIZED),
    Publish("a/b", b"hello", 0),
    Publish("sensors/\u00e9/t", b"\x00" * 20, 1, True, True, 7, RICH),
    Publish("x", b"", 2, packet_id=65535, properties=Properties(user_properties=(("a", "b"),))),
    Puback(7),
    Puback(8, PacketType.PUBREC, Reason.NO_MATCHING_SUBSCRIBERS, Properties(reason_string="none")),
    Puback(8, PacketType.PUBREL),
    Puback(8, PacketType.PUBCOMP, Reason.PACKET_ID_NOT_FOUND),
    Subscribe(
        9,
        (Subscription("a/+/c", 1, True, True, 2), Subscription("$share/g/#", 2)),
        Properties(subscription_identifiers=(5,), user_properties=(("s", "1"),)),
    ),
    Suback(9, (0, 1, 2, 0x80, 0x87)),
    Unsubscribe(10, ("a/+/c", "#")),
    Unsuback(10, (0, 0x11)),
    Subscribe(11, tuple(Subscription(f"f/{i}") for i in range(8))),  # at the limit
    Publish("u", b"", 0, properties=Properties(user_properties=(("k", "v"),) * 4)),  # at it
    Pingreq(),
    Pingresp(),
    Disconnect(Reason.DISCONNECT_WITH_WILL, Properties(session_expiry_interval=0)),
    Auth(0x18, Properties(authentication_method="SCRAM", authentication_data=b"abc")),
]


def connect(level: int, rng: random.Random) -> Connect:
    will = Will(
        "w/t",
        b"gone",
        rng.randrange(3),
        rng.random() < 0.5,
        Properties(will_delay_interval=5, content_type="c") if level == MQTT5 else Properties(),
    )
    props = Properties(
        session_expiry_interval=100,
        receive_maximum=10,
        maximum_packet_size=600,
        topic_alias_maximum=4,
        request_problem_information=0,
        authentication_method="m",
        user_properties=(("u", "p"),),
    )
    return Connect(
        "client-1",
        level,
        rng.random() < 0.5,
        30,
        "user",
        b"pass",
        will if rng.random() < 0.7 else None,
        props if level == MQTT5 else Properties(),
    )


def stream(rng: random.Random) -> tuple[int, bool, bytes]:
    """(level, starts with CONNECT, bytes) of a valid stream."""
    level = rng.choice((MQTT311, MQTT5))
    pool = [p for p in SAMPLES if level == MQTT5 or not isinstance(p, Auth)]
    body = b"".join(encode(p, level) for p in rng.sample(pool, rng.randrange(1, 6)))
    if rng.random() < 0.7:
        return level, True, encode(connect(level, rng), level) + body
    return level, False, body


def mutate(data: bytes, other: bytes, rng: random.Random) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randrange(1, 4)):
        choice = rng.randrange(7)
        if choice == 0 and out:  # bit flip
            i = rng.randrange(len(out))
            out[i] ^= 1 << rng.randrange(8)
        elif choice == 1 and out:  # byte edit
            out[rng.randrange(len(out))] = rng.choice((0, 0x7F, 0x80, 0xFF, rng.randrange(256)))
        elif choice == 2:  # truncation
            del out[rng.randrange(len(out) + 1) :]
        elif choice == 3:  # splice
            out = out[: rng.randrange(len(out) + 1)] + other[rng.randrange(len(other) + 1) :]
        elif choice == 4:  # repeat a slice
            a = rng.randrange(len(out) + 1)
            b = rng.randrange(a, len(out) + 1)
            out[b:b] = out[a:b] * rng.randrange(1, 4)
        elif choice == 5:  # random bytes inserted
            at = rng.randrange(len(out) + 1)
            out[at:at] = rng.randbytes(rng.randrange(1, 8))
        else:
            out = bytearray(rng.randbytes(rng.randrange(0, 60)))
    return bytes(out)


def run_one(
    data: bytes, level: int | None, rng: random.Random
) -> tuple[list[Packet], Reason | None, int | None]:
    """(packets, the reason it stopped or None, the level the decoder ended at)."""
    decoder = Decoder(level, LIMITS)
    got: list[Packet] = []
    pos = 0
    try:
        while pos < len(data):
            step = rng.choice((1, 2, 3, 7, 64, len(data)))
            got += decoder.feed(data[pos : pos + step])
            pos += step
            assert decoder.buffered < LIMITS.max_packet_bytes
    except MqttDecodeError as exc:
        assert isinstance(exc.reason, Reason)
        return got + list(exc.packets), exc.reason, decoder.level
    return got, None, decoder.level


def reencodes(packet: Packet, level: int) -> bool:
    if isinstance(packet, Connect):
        return Decoder(None, LIMITS).feed(encode(packet, packet.protocol_level)) == [packet]
    return Decoder(level, LIMITS).feed(encode(packet, level)) == [packet]


def test_fuzz_feed_is_total_bounded_and_consistent_with_encode() -> None:
    rng = random.Random(20261202)
    streams = [stream(rng) for _ in range(STREAMS)]
    reasons: dict[Reason, int] = {}
    checked: set[tuple[int, Packet]] = set()
    decoded = inputs = 0
    while inputs < REQUIRED_INPUTS:
        level, has_connect, base = rng.choice(streams)
        data = mutate(base, rng.choice(streams)[2], rng) if rng.random() < 0.9 else base
        got, reason, learned = run_one(data, None if has_connect else level, rng)
        inputs += 1
        if reason is not None:
            reasons[reason] = reasons.get(reason, 0) + 1
        for packet in got:
            assert learned is not None
            if (learned, packet) not in checked:
                assert reencodes(packet, learned), packet
                checked.add((learned, packet))
            decoded += 1
    assert inputs >= REQUIRED_INPUTS
    assert decoded > REQUIRED_INPUTS  # valid packets before and between the damage
    for reason in (
        Reason.MALFORMED_PACKET,
        Reason.PROTOCOL_ERROR,
        Reason.PACKET_TOO_LARGE,
        Reason.UNSUPPORTED_PROTOCOL_VERSION,
        Reason.TOPIC_NAME_INVALID,
        Reason.TOPIC_FILTER_INVALID,
        Reason.QUOTA_EXCEEDED,
    ):
        assert reasons.get(reason, 0) > 0, reason
