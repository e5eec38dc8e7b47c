"""Fuzz the decoder: only DecodeError may escape, and whatever it accepts re-encodes.

Each hypothesis example draws valid messages and a seed; a seeded loop then
derives MUTATIONS_PER_EXAMPLE inputs from their encodings (bit flips,
truncations, splices, byte edits, random bytes, and msgpack-valid structures
with fields swapped for wrongly-typed or out-of-range values) and feeds each
to both ``decode_datagram`` and ``decode_frame``. The total is counted and
asserted, so the test fails if hypothesis silently runs fewer examples.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gossip.codec import (
    MAX_COUNTER,
    MAX_COUNTER_STEP,
    PROTOCOL_VERSION,
    decode_datagram,
    decode_frame,
    encode_datagram,
    encode_frame,
)
from gossip.errors import DecodeError
from gossip.messages import Message, PushPull
from tests.gossip.test_codec import HDR, datagram_messages, push_pulls

MUTATIONS_PER_EXAMPLE = 250
EXAMPLES = 420
REQUIRED_INPUTS = 100_000
FRAME_MAX = 1 << 20

# Values a wrongly-typed or out-of-range field may take.
ODD_VALUES: list[Any] = [
    None,
    True,
    False,
    0,
    -1,
    2**64 - 1,
    -(2**63),
    MAX_COUNTER,  # the incarnation / version ceiling, and just past it
    MAX_COUNTER + 1,
    MAX_COUNTER_STEP + 1,
    [[]] * 1000,  # ~1 KB packed, ~64 KB decoded: over MAX_VALUE_MEMORY
    [[[]]] * 300,
    65_536,
    1.5,
    float("nan"),
    float("inf"),
    "",
    "x" * 200,
    "\u00e9" * 70,
    b"",
    b"\x00" * 600,
    [],
    {},
    {"k": 1},
    {b"k": 1},
    ["h", 1],
    ["h", 1, 2],
    [[[[[[[[[[1]]]]]]]]]],
    list(range(20)),
]
# Bytes that start msgpack containers, strings, ext and reserved types.
MARKER_BYTES = bytes.fromhex(
    "00 7f 80 8f 90 9f a0 bf c0 c1 c2 c3 c4 c7 cf d3 d4 d9 db dc dd de df e0 ff"
)


def flip_bits(data: bytes, other: bytes, rng: random.Random) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        i = rng.randrange(len(buf))
        buf[i] ^= 1 << rng.randrange(8)
    return bytes(buf)


def truncate(data: bytes, other: bytes, rng: random.Random) -> bytes:
    return data[: rng.randrange(len(data))]


def splice(data: bytes, other: bytes, rng: random.Random) -> bytes:
    return data[: rng.randrange(len(data) + 1)] + other[rng.randrange(len(other) + 1) :]


def edit_bytes(data: bytes, other: bytes, rng: random.Random) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        i = rng.randrange(1, len(buf) + 1)  # keep the version byte mostly intact
        op = rng.randrange(3)
        byte = rng.choice(MARKER_BYTES) if rng.random() < 0.7 else rng.randrange(256)
        if op == 0:
            buf.insert(i, byte)
        elif op == 1 and i < len(buf):
            del buf[i]
        elif i < len(buf):
            buf[i] = byte
    return bytes(buf)


def random_bytes(data: bytes, other: bytes, rng: random.Random) -> bytes:
    body = rng.randbytes(rng.randrange(64))
    return bytes((PROTOCOL_VERSION,)) + body if rng.random() < 0.8 else body


def duplicate(data: bytes, other: bytes, rng: random.Random) -> bytes:
    return data + data[1:]


def mutate_tree(node: Any, rng: random.Random, depth: int = 0) -> Any:
    """Replace, drop or add one element somewhere in a decoded msgpack tree.

    Descends with high probability so that deep fields (a member's port, a
    value inside a replicated map) are hit as often as the top level.
    """
    if isinstance(node, dict) and node and rng.random() < 0.8:
        node = dict(node)
        key = rng.choice(list(node))
        node[key] = mutate_tree(node[key], rng, depth + 1)
        return node
    if isinstance(node, list) and node and (depth == 0 or rng.random() < 0.85):
        node = list(node)
        i = rng.randrange(len(node))
        choice = rng.random()
        if choice < 0.75:
            node[i] = mutate_tree(node[i], rng, depth + 1)
        elif choice < 0.85:
            del node[i]
        elif choice < 0.95:
            node.insert(i, rng.choice(ODD_VALUES))
        else:
            node[i] = rng.choice(ODD_VALUES)
        return node
    if isinstance(node, int) and not isinstance(node, bool) and rng.random() < 0.5:
        near_limits = [MAX_COUNTER - 1, MAX_COUNTER, MAX_COUNTER + 1, MAX_COUNTER_STEP, MAX_COUNTER_STEP + 1]
        shifted = rng.choice([node + 1, node - 1, -node - 1, 2**64 - 1, 2**63, 0, 1, 10, 11, *near_limits])
        return min(max(shifted, -(2**63)), 2**64 - 1)  # stay packable
    return rng.choice(ODD_VALUES)


def restructure(data: bytes, other: bytes, rng: random.Random) -> bytes:
    tree = msgpack.unpackb(data[1:], raw=False, strict_map_key=False)
    for _ in range(rng.randint(1, 3)):
        tree = mutate_tree(tree, rng)
    return data[:1] + msgpack.packb(tree, use_bin_type=True)


MUTATORS: list[Callable[[bytes, bytes, random.Random], bytes]] = [
    flip_bits,
    truncate,
    splice,
    edit_bytes,
    random_bytes,
    duplicate,
    restructure,
    restructure,
]


def check_datagram(data: bytes) -> None:
    try:
        header, msgs = decode_datagram(data)
    except DecodeError:
        return
    # Whatever the decoder accepts is a valid header and message list: it re-encodes identically.
    assert decode_datagram(encode_datagram(msgs, header)) == (header, msgs)


def check_frame(data: bytes) -> None:
    try:
        msg = decode_frame(data, FRAME_MAX)
    except DecodeError:
        return
    assert decode_frame(encode_frame(msg), FRAME_MAX) == msg


def test_decoders_raise_only_decode_error_on_100k_mutated_inputs() -> None:
    fed = 0

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(
        seed=st.integers(min_value=0, max_value=2**32 - 1),
        msgs=st.lists(datagram_messages, min_size=1, max_size=4),
        push_pull=push_pulls,
    )
    def fuzz(seed: int, msgs: list[Message], push_pull: PushPull) -> None:
        nonlocal fed
        rng = random.Random(seed)
        bases = [encode_datagram(msgs, HDR), encode_frame(push_pull)]
        for _ in range(MUTATIONS_PER_EXAMPLE):
            data, other = bases if rng.random() < 0.5 else bases[::-1]
            mutated = rng.choice(MUTATORS)(data, other, rng)
            check_datagram(mutated)
            check_frame(mutated)
            fed += 1

    fuzz()
    assert fed >= REQUIRED_INPUTS, f"only {fed} inputs were fed to the decoders"
