"""The spool record format: round trip, torn tails and corrupt records found, and a fuzzed
scanner that never raises (random bytes, truncation at every offset, bit flips)."""

from __future__ import annotations

import random

import pytest

from overlay.spool_format import (
    HEADER_LEN,
    SpoolFormatError,
    SpoolRecord,
    decode_ack,
    decode_body,
    encode_ack,
    encode_record,
    scan,
)


def records(n: int, rng: random.Random | None = None) -> list[SpoolRecord]:
    rng = rng or random.Random(1)
    return [
        SpoolRecord(
            seq=i,
            topic=f"site/dev{i}/t\u00e9",
            payload=rng.randbytes(rng.randrange(0, 40)),
            retain=bool(i % 3 == 0),
            expires=0.0 if i % 2 else 1000.0 + i,
        )
        for i in range(n)
    ]


def test_round_trip() -> None:
    recs = records(20)
    blob = b"".join(encode_record(r) for r in recs)
    res = scan(blob)
    assert res.records == recs
    assert res.valid_end == len(blob)
    assert (res.corrupt, res.torn_tail) == (0, False)


def test_truncation_at_every_offset_keeps_the_complete_prefix() -> None:
    recs = records(6)
    encoded = [encode_record(r) for r in recs]
    blob = b"".join(encoded)
    ends = [sum(len(e) for e in encoded[: i + 1]) for i in range(len(encoded))]
    for cut in range(len(blob) + 1):
        res = scan(blob[:cut])
        complete = [e for e in ends if e <= cut]
        assert res.records == recs[: len(complete)], cut
        assert res.valid_end == (complete[-1] if complete else 0)
        assert res.torn_tail == (cut != res.valid_end)


def test_corrupt_record_in_the_middle_is_skipped_and_counted() -> None:
    recs = records(5)
    encoded = [bytearray(encode_record(r)) for r in recs]
    encoded[2][HEADER_LEN + 3] ^= 0x40  # a bit flip in the body: the crc no longer matches
    res = scan(b"".join(encoded))
    assert [r.seq for r in res.records] == [0, 1, 3, 4]
    assert res.corrupt == 1
    assert res.corrupt_bytes == len(encoded[2])
    assert not res.torn_tail


def test_a_replayed_old_seq_is_not_delivered_again() -> None:
    recs = records(3)
    blob = b"".join(encode_record(r) for r in recs) + encode_record(recs[0])
    res = scan(blob)
    assert [r.seq for r in res.records] == [0, 1, 2]
    assert res.torn_tail  # the stale record after the valid end is cut off


def test_encode_refuses_what_it_cannot_represent() -> None:
    with pytest.raises(ValueError):
        encode_record(SpoolRecord(-1, "t", b""))
    with pytest.raises(ValueError):
        encode_record(SpoolRecord(0, "t" * 70000, b""))
    with pytest.raises(ValueError):
        encode_record(SpoolRecord(0, "t", b"", expires=float("nan")))


def test_decode_body_raises_only_its_error() -> None:
    rng = random.Random(7)
    raised = 0
    for _ in range(3000):
        body = rng.randbytes(rng.randrange(0, 40))
        try:
            decode_body(body)
        except SpoolFormatError:
            raised += 1
    assert raised > 0


def test_ack_round_trip_and_damage() -> None:
    blob = encode_ack(3, 12345)
    assert decode_ack(blob) == (3, 12345)
    for i in range(len(blob)):
        bad = bytearray(blob)
        bad[i] ^= 1
        with pytest.raises(SpoolFormatError):
            decode_ack(bytes(bad))
    with pytest.raises(SpoolFormatError):
        decode_ack(blob[:-1])


def test_fuzz_scanner_is_total_and_only_returns_valid_ascending_records() -> None:
    rng = random.Random(20261203)
    valid = b"".join(encode_record(r) for r in records(8, rng))
    inputs = 0
    found_records = 0
    corrupt_seen = 0
    for _ in range(4000):
        kind = rng.randrange(4)
        data = bytearray(valid)
        if kind == 0:
            data = bytearray(rng.randbytes(rng.randrange(0, 300)))
        elif kind == 1:
            for _ in range(rng.randrange(1, 6)):
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        elif kind == 2:
            at = rng.randrange(len(data))
            data[at:at] = rng.randbytes(rng.randrange(1, 20))
        else:
            a, b = sorted(rng.randrange(len(data)) for _ in range(2))
            data = data[:a] + data[b:] + data[a:b]
        res = scan(bytes(data))
        inputs += 1
        seqs = [r.seq for r in res.records]
        assert seqs == sorted(set(seqs))
        assert 0 <= res.valid_end <= len(data)
        assert res.torn_tail == (res.valid_end < len(data))
        # Whatever was accepted re-encodes to bytes present in the input.
        for r in res.records:
            assert encode_record(r) in bytes(data)
        found_records += len(res.records)
        corrupt_seen += res.corrupt
    assert inputs == 4000
    assert found_records > 1000 and corrupt_seen > 100
