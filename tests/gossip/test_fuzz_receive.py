"""Fuzz the core's network inputs: nothing escapes, and bad input changes nothing.

Hypothesis draws a seed and a raw blob per example; each example feeds a batch
of inputs to a live member: the blob itself (sealed and unsealed), and
mutations (bit flips, byte changes, truncation, insertion, deletion, splices of
two inputs) of valid plaintext datagrams and push-pull frames, sealed with the
right key so they reach the decoder, plus some unsealed or resealed under
another cluster name. After every input: no exception, the member table is
internally consistent, and an input that was counted as undecodable left the
member list exactly as it was. The total fed is asserted >= 100,000.

The corpus includes inputs at the range limits (incarnations and versions at
and just past ``MAX_COUNTER``, jumps just past ``MAX_COUNTER_STEP``, values
over the memory limit), packed raw so the encoder's checks do not stop them;
after every input our incarnation and state version stay within range.
"""

from __future__ import annotations

import itertools
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
    DatagramHeader,
    destination_tag,
    encode_datagram,
    encode_frame,
)
from gossip.config import lan
from gossip.core import Membership
from gossip.messages import (
    Ack,
    Alive,
    Dead,
    MemberRecord,
    MemberState,
    Nack,
    Ping,
    PingReq,
    PushPull,
    StateEntry,
    StateUpdate,
    Suspect,
    UserBroadcast,
)
from testbed.sim import TEST_AAD as AAD
from testbed.sim import make_keyring

BATCH = 240  # inputs per hypothesis example
EXAMPLES = 440  # 440 x (240 + 2) > 100,000
MIN_FED = 100_000
ME = destination_tag("me")  # the tag of datagrams addressed to the core under test
PEERS = [(f"p{i}", (f"10.0.1.{i}", 7946)) for i in range(6)]


def corpus() -> tuple[list[Callable[[int], bytes]], list[bytes]]:
    """Valid plaintext datagrams (made with a given header counter, so each is fresh to the
    anti-replay window) and frames to mutate."""
    p0, a0 = PEERS[0]
    p1, a1 = PEERS[1]
    datagrams = [
        [Ping(1, "me", p0, a0)],
        [Ack(1, p0), Nack(2, p1)],
        [PingReq(3, p1, a1, p0, a0, True)],
        [Alive(p0, 2, a0, b"meta"), Suspect(p1, 1, p0), Dead(p1, 1, p0)],
        [Suspect("me", 0, p0), Dead("me", 3, p1)],
        [Alive("newcomer", 1, ("10.0.2.1", 7946), b"")],
        [StateUpdate(p0, 1, "svc", {"port": 5683, "tags": ["a", "b"]}), StateUpdate(p1, 2, "k", None, True)],
        [UserBroadcast(p0, 7, b"hello"), Dead(p0, 9, p0)],
    ]
    frames = [
        PushPull(p0, True, False,
                 tuple(MemberRecord(n, a, 1, MemberState(i % 4), b"m") for i, (n, a) in enumerate(PEERS)),
                 ((p0, (StateEntry("k", 1, [1, 2.5, "x"]), StateEntry("d", 2, None, True))),)),
        PushPull(p1, False, False, (MemberRecord("me", ("10.0.0.1", 7946), 5, MemberState.DEAD, b""),), ()),
    ]
    top, jump = MAX_COUNTER, MAX_COUNTER_STEP + 1
    raw_datagrams = [  # past what the encoder allows: packed directly
        [[6, "me", 2**64 - 1, p0], [7, p1, top + 1, p0]],
        [[6, "me", top, p0], [5, "me", jump, ["10.0.0.9", 1], b""], [7, p0, jump + 1, p1]],
        [[8, "me", top, "zz", None, False], [8, p0, jump + 1, "k", 1, False]],
        [[8, p0, 3, "k0", [[]] * 1000, False], [8, p1, 4, "k1", [[]] * 300, False]],
        [[5, p0, top, ["10.0.0.9", 1], b""], [6, p1, top - 1, p0]],
    ]

    def encoded(msgs: list[Any]) -> Callable[[int], bytes]:
        return lambda n: encode_datagram(msgs, DatagramHeader(p0, 1, n, ME))

    def packed(items: list[Any]) -> Callable[[int], bytes]:
        return lambda n: bytes((PROTOCOL_VERSION,)) + msgpack.packb([p0, 1, n, ME, *items], use_bin_type=True)

    builders = [encoded(d) for d in datagrams] + [packed(d) for d in raw_datagrams]
    return builders, [encode_frame(f) for f in frames]


def mutate(rng: random.Random, data: bytes, other: bytes) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(6)
        if op == 0 and buf:  # flip a bit
            i = rng.randrange(len(buf))
            buf[i] ^= 1 << rng.randrange(8)
        elif op == 1 and buf:  # set a byte to an interesting value
            buf[rng.randrange(len(buf))] = rng.choice([0x00, 0x7F, 0x80, 0xC0, 0xC1, 0xDC, 0xDD, 0xFF, rng.randrange(256)])
        elif op == 2 and buf:  # truncate
            del buf[rng.randrange(len(buf)):]
        elif op == 3:  # insert random bytes
            i = rng.randrange(len(buf) + 1)
            buf[i:i] = rng.randbytes(rng.randint(1, 8))
        elif op == 4 and buf:  # delete a run
            i = rng.randrange(len(buf))
            del buf[i:i + rng.randint(1, 8)]
        else:  # splice with another input
            i, j = rng.randrange(len(buf) + 1), rng.randrange(len(other) + 1)
            buf = buf[:i] + other[j:]
    return bytes(buf)


def table_is_consistent(core: Membership) -> None:
    members = core.members()
    names = [m.name for m in members]
    assert len(names) == len(set(names))
    me = core.local_member
    assert me.name == "me" and me.state == MemberState.ALIVE
    assert 0 <= me.incarnation <= MAX_COUNTER and 0 <= core._store.version <= MAX_COUNTER
    table = core._table
    assert table.unverified == sum(not n.verified for n in table.others)
    assert table.unverified <= max(1, core.config.max_members // 2)
    assert core.num_alive == sum(m.state == MemberState.ALIVE for m in members)
    assert 0 <= core.health_score < core.config.awareness_max_multiplier
    # the core's private index (random picks) agrees with its table
    nodes = core._table.others
    assert sorted(n.name for n in nodes) == sorted(set(names) - {"me"})
    assert all(nodes[i].index == i for i in range(len(nodes)))


def test_fuzzed_datagrams_and_frames_never_escape_and_bad_ones_change_nothing() -> None:
    rng0 = random.Random(0)
    ring = make_keyring(rng0)
    # A small member limit keeps the table (and each snapshot) small while mutated
    # Alives keep inventing members, and exercises the limit.
    config = lan(max_members=48)
    core = Membership("me", ("10.0.0.1", 7946), config, random.Random(1), 0.0, keyring=make_keyring(random.Random(1)))
    hello = encode_datagram([Alive(n, 1, a, b"") for n, a in PEERS], DatagramHeader(PEERS[0][0], 1, 0, ME))
    core.receive(ring.encrypt(hello, AAD), PEERS[0][1], 0.0)
    datagrams, frames = corpus()
    inputs: list[bytes | Callable[[int], bytes]] = [*datagrams, *frames]
    counters = itertools.count(1)

    def build(item: bytes | Callable[[int], bytes]) -> bytes:
        return item if isinstance(item, bytes) else item(next(counters))
    clock = {"now": 0.0, "fed": 0}

    def feed(data: bytes, stream: bool) -> None:
        before = core.members()
        errors = core.stats.decode_errors + core.stats.decrypt_errors
        if stream:
            core.handle_stream(data, PEERS[1][1], clock["now"])
        else:
            core.receive(data, PEERS[0][1], clock["now"])
        clock["fed"] += 1
        if core.stats.decode_errors + core.stats.decrypt_errors > errors:
            assert core.members() == before

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(seed=st.integers(0, 2**32 - 1), blob=st.binary(max_size=1500))
    def batch(seed: int, blob: bytes) -> None:
        rng = random.Random(seed)
        feed(blob, stream=bool(seed & 1))
        feed(ring.encrypt(blob, AAD), stream=bool(seed & 2))
        for _ in range(BATCH):
            pick = rng.choice(inputs)
            base = build(pick)
            data = mutate(rng, base, build(rng.choice(inputs)))
            roll = rng.random()
            if roll < 0.85:
                data = ring.encrypt(data, AAD)
            elif roll < 0.92:
                data = ring.encrypt(data, b"another-cluster")
            elif roll < 0.96:
                data = ring.encrypt(base, AAD)[: rng.randrange(40)] + data  # sealed prefix, garbage after
            feed(data, stream=isinstance(pick, bytes) and rng.random() < 0.8)
        clock["now"] += 0.25
        core.handle_timeout(clock["now"])
        core.datagrams_to_send()
        core.streams_to_send()
        while core.next_event() is not None:
            pass
        table_is_consistent(core)

    batch()
    assert clock["fed"] >= MIN_FED
    assert core.stats.decode_errors > 0 and core.stats.decrypt_errors > 0
