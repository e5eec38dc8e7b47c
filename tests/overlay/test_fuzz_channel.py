"""Fuzz the channel decoder: nothing escapes receive_data, only ChannelError the send side,
and memory stays bounded.

A seeded loop builds valid conversations (what a real peer sends: HELLO, OPEN, DATA,
WINDOW, RESET, PING, PONG, GOAWAY, unknown types) and derives inputs from them: bit flips,
byte edits, truncations, splices of two conversations, duplicated or dropped frames, frames
with random fields behind a valid HELLO, and plain random bytes. Each input is fed to a fresh
connection in random chunks, interleaved with random application calls, and after every
call the buffers are checked against their bounds. The total is counted and asserted, so
the test fails if the loop silently runs fewer inputs.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Callable

from overlay.channel import (
    HEADER_SIZE,
    ChannelConfig,
    ChannelError,
    Connection,
    DataReceived,
    Event,
    FrameType,
    StreamOpened,
    encode_frame,
)

REQUIRED_INPUTS = 100_000
CONFIG = ChannelConfig(max_streams=16, max_output_bytes=64 * 1024)


def conversation(rng: random.Random) -> bytes:
    """What a well-behaved client sends (built with a real Connection, so it is valid)."""
    peer = Connection(client=True, now=0.0)
    peer.receive_data(Connection(client=False, now=0.0, config=CONFIG).data_to_send(), 0.0)
    for _ in range(rng.randrange(0, 5)):
        if not peer.can_open:
            break
        sid = peer.open_stream(rng.randbytes(rng.randrange(0, 40)), end=rng.random() < 0.3)
        if peer.send_window(sid):
            size = 70_000 if rng.random() < 0.005 else rng.randrange(0, 200)
            peer.send_data(sid, rng.randbytes(size), end=rng.random() < 0.5)
        if rng.random() < 0.2:
            peer.reset_stream(sid)
    if rng.random() < 0.3:
        peer.ping(0.0)
    wire = peer.data_to_send()
    extras = [
        encode_frame(FrameType.WINDOW, 0, 0, struct.pack("!I", rng.randrange(1, 1000))),
        encode_frame(FrameType.PONG, 0, 0, rng.randbytes(8)),
        encode_frame(FrameType.PING, 0, 0, rng.randbytes(8)),
        encode_frame(FrameType.GOAWAY, 0, 0, struct.pack("!II", rng.randrange(4), 0) + b"bye"),
        encode_frame(rng.randrange(8, 256), rng.randrange(256), rng.randrange(9), b"ext"),
    ]
    return wire + b"".join(rng.sample(extras, rng.randrange(0, 3)))


def random_frame(rng: random.Random) -> bytes:
    kind = rng.choice([*range(8), rng.randrange(256)])
    stream = rng.choice([0, 1, 2, 3, 5, 7, 2**31 - 1, 2**31, 2**32 - 1, rng.randrange(2**32)])
    body = rng.choice(
        [
            b"",
            rng.randbytes(4),
            rng.randbytes(8),
            rng.randbytes(17),
            rng.randbytes(rng.randrange(64)),
        ]
    )
    return encode_frame(kind, rng.randrange(256), stream, body)


def mutate(base: bytes, other: bytes, rng: random.Random) -> bytes:
    data = bytearray(base)
    if rng.random() < 0.002:  # past the windows: 17 full frames on one stream (rare: big)
        flood = encode_frame(FrameType.DATA, 0, 1, bytes(16_384)) * rng.randrange(15, 18)
        return base[: HEADER_SIZE + 17] + encode_frame(FrameType.OPEN, 0, 1) + flood
    choice = rng.randrange(8)
    if choice == 0 and data:  # bit flips
        for _ in range(rng.randrange(1, 4)):
            at = rng.randrange(len(data))
            data[at] ^= 1 << rng.randrange(8)
    elif choice == 1 and data:  # byte edits, biased to the headers' fields
        for _ in range(rng.randrange(1, 4)):
            data[rng.randrange(len(data))] = rng.choice(
                [0, 1, 0x7F, 0x80, 0xFF, rng.randrange(256)]
            )
    elif choice == 2:  # truncation
        del data[rng.randrange(len(data) + 1) :]
    elif choice == 3:  # splice
        data = data[: rng.randrange(len(data) + 1)] + other[rng.randrange(len(other) + 1) :]
    elif choice == 4:  # repeat a slice (duplicated frames, replays)
        a = rng.randrange(len(data) + 1)
        b = rng.randrange(a, len(data) + 1)
        data[b:b] = data[a:b] * rng.randrange(1, 4)
    elif choice == 5:  # random frames after the HELLO
        cut = HEADER_SIZE + 17
        data = data[:cut] + b"".join(random_frame(rng) for _ in range(rng.randrange(1, 6)))
    elif choice == 6:  # plain random bytes
        data = bytearray(rng.randbytes(rng.randrange(0, 80)))
    else:  # a random frame inserted anywhere
        at = rng.randrange(len(data) + 1)
        data[at:at] = random_frame(rng)
    return bytes(data)


def app_call(conn: Connection, delivered: dict[int, int], rng: random.Random, now: float) -> None:
    """One random application call; only ChannelError may come out."""
    calls: list[Callable[[], object]] = [
        lambda: conn.open_stream(rng.randbytes(rng.randrange(8)), end=rng.random() < 0.5),
        lambda: conn.send_data(
            rng.choice([*delivered, 1, 2, 4]),
            rng.randbytes(rng.randrange(50)),
            end=rng.random() < 0.5,
        ),
        lambda: conn.reset_stream(rng.choice([*delivered, 2, 3])),
        lambda: conn.ping(now),
        lambda: conn.handle_timeout(now + rng.choice([0.0, 11.0, 100.0])),
        lambda: conn.close(rng.choice([0, 1]), "fuzz"),
        lambda: conn.acknowledge(rng.choice([*delivered, 1]), rng.randrange(0, 100)),
    ]
    try:
        rng.choice(calls)()
    except ChannelError:
        pass


def feed(conn: Connection, data: bytes, rng: random.Random) -> None:
    delivered: dict[int, int] = {}
    at, now = 0, 0.0
    while at < len(data):
        step = rng.choice([1, 7, HEADER_SIZE, 64, len(data)])
        chunk = data[at : at + step]
        at += len(chunk)
        now += 0.01
        conn.data_to_send()
        fed = len(conn._in) + len(chunk)  # what this call may parse
        events: list[Event] = conn.receive_data(chunk, now)  # must never raise
        out = conn.data_to_send()
        assert len(out) <= fed + 600, (len(out), fed)
        assert len(conn._in) < HEADER_SIZE + CONFIG.max_frame
        assert len(conn._streams) <= 2 * CONFIG.max_streams
        payload = sum(len(e.data) for e in events if isinstance(e, StreamOpened | DataReceived))
        assert payload <= fed
        for e in events:
            if isinstance(e, DataReceived):
                delivered[e.stream_id] = delivered.get(e.stream_id, 0) + len(e.data)
        if rng.random() < 0.2:
            app_call(conn, delivered, rng, now)


def test_fuzz_receive_data_is_total_and_bounded() -> None:
    rng = random.Random(20261202)
    corpus = [conversation(rng) for _ in range(300)]
    clean = Connection(client=False, now=0.0, config=CONFIG)
    for wire in corpus[:50]:  # the unmutated conversations are valid
        clean = Connection(client=False, now=0.0, config=CONFIG)
        clean.receive_data(wire, 0.0)
        assert clean.stats["violations"] == 0, wire[:80]
    inputs = violations = accepted = flow = 0
    while inputs < REQUIRED_INPUTS:
        data = mutate(rng.choice(corpus), rng.choice(corpus), rng)
        conn = Connection(client=False, now=0.0, config=CONFIG)
        feed(conn, data, rng)
        inputs += 1
        violations += conn.stats["violations"] > 0
        accepted += conn.stats["frames_in"] > 1 and not conn.terminated
        flow += conn.stats["flow_control_violations"]
    assert inputs >= REQUIRED_INPUTS
    # Both paths were exercised a lot: inputs cut off as violations, and inputs taken in.
    assert violations > 20_000 and accepted > 20_000, (violations, accepted)
    assert flow > 10  # data past a window was seen and refused
