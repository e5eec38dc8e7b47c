"""Record format of the uplink store-and-forward spool (sans-IO; file IO is edgeagent/spool.py).

A spool segment is a sequence of records, each::

    magic   2 bytes  b"\\xe5\\x70"
    length  u32 BE   length of the body (<= MAX_BODY)
    crc     u32 BE   crc32 of magic + length + body
    body    length bytes:
        seq      u64 BE   position in the spool (strictly increasing, never reused)
        expires  f64 BE   wall-clock expiry (unix seconds); 0 = never
        flags    u8       bit 0 = retain; other bits must be 0
        tlen     u16 BE   topic length, then the topic (UTF-8)
        payload  the rest

:func:`scan` reads a whole segment and never raises: a record whose magic, length, checksum
or body is bad is *corrupt*; the scanner then looks for the next offset where a valid record
starts (resync) and counts the bytes skipped. A record that runs past the end of the buffer
with no valid record after it is the *torn tail* of a write cut by a crash: ``valid_end`` says
where the file should be truncated. :func:`decode_body` raises only :class:`SpoolFormatError`.

The ack pointer (which record was delivered last) is a 24-byte file: magic b"EAK1", the
segment number u64, the seq u64, crc32 of those 20 bytes.
"""

from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass, field

MAGIC = b"\xe5\x70"
_HEADER = struct.Struct(">2sII")
HEADER_LEN = _HEADER.size
_BODY_FIXED = struct.Struct(">QdBH")
MAX_BODY = 16 * 1024 * 1024
MAX_TOPIC = 65535
_ACK = struct.Struct(">4sQQ")
_ACK_MAGIC = b"EAK1"
ACK_LEN = _ACK.size + 4


class SpoolFormatError(ValueError):
    """A record body or ack pointer that does not decode (the only error this module raises)."""


@dataclass(frozen=True, slots=True)
class SpoolRecord:
    """One spooled QoS 1 message."""

    seq: int
    topic: str
    payload: bytes
    retain: bool = False
    expires: float = 0.0

    def expired(self, now: float) -> bool:
        """True if the record has a TTL and ``now`` is past it."""
        return self.expires > 0.0 and now >= self.expires


@dataclass(slots=True)
class ScanResult:
    """What :func:`scan` found in one segment."""

    records: list[SpoolRecord] = field(default_factory=list)
    valid_end: int = 0  # truncate the segment here (end of the last valid record)
    corrupt: int = 0  # corrupt regions skipped (each a resync)
    corrupt_bytes: int = 0  # bytes inside valid_end that belonged to no valid record
    torn_tail: bool = False  # bytes after valid_end (a record cut by a crash)


def encode_record(rec: SpoolRecord) -> bytes:
    """The bytes of one record; ValueError if the record cannot be represented."""
    topic = rec.topic.encode("utf-8")
    if len(topic) > MAX_TOPIC:
        raise ValueError("spool: topic longer than 65535 bytes")
    if not 0 <= rec.seq < 2**64 or not math.isfinite(rec.expires) or rec.expires < 0:
        raise ValueError("spool: seq or expiry out of range")
    body = _BODY_FIXED.pack(rec.seq, rec.expires, 1 if rec.retain else 0, len(topic))
    body += topic + rec.payload
    if len(body) > MAX_BODY:
        raise ValueError(f"spool: record larger than {MAX_BODY} bytes")
    head = MAGIC + struct.pack(">I", len(body))
    crc = zlib.crc32(body, zlib.crc32(head))
    return head + struct.pack(">I", crc) + body


def decode_body(body: bytes) -> SpoolRecord:
    """Decode a record body (already checksummed); raises only SpoolFormatError."""
    if len(body) < _BODY_FIXED.size:
        raise SpoolFormatError("spool record body too short")
    seq, expires, flags, tlen = _BODY_FIXED.unpack_from(body)
    if flags & ~1:
        raise SpoolFormatError("spool record has unknown flags")
    if not math.isfinite(expires) or expires < 0:
        raise SpoolFormatError("spool record expiry out of range")
    end = _BODY_FIXED.size + tlen
    if end > len(body):
        raise SpoolFormatError("spool record topic runs past the body")
    try:
        topic = body[_BODY_FIXED.size : end].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SpoolFormatError("spool record topic is not UTF-8") from exc
    return SpoolRecord(seq, topic, bytes(body[end:]), bool(flags & 1), expires)


def _record_at(buf: bytes, pos: int) -> tuple[SpoolRecord | None, int]:
    """(record, end) for a record starting at ``pos``; record None if none is valid there."""
    if len(buf) - pos < HEADER_LEN:
        return None, pos
    magic, length, crc = _HEADER.unpack_from(buf, pos)
    if magic != MAGIC or length > MAX_BODY:
        return None, pos
    end = pos + HEADER_LEN + length
    if end > len(buf):
        return None, pos
    head = bytes(buf[pos : pos + 6])
    body = bytes(buf[pos + HEADER_LEN : end])
    if zlib.crc32(body, zlib.crc32(head)) != crc:
        return None, pos
    try:
        return decode_body(body), end
    except SpoolFormatError:
        return None, pos


def _resync(buf: bytes, start: int) -> int:
    """Offset of the next valid record at or after ``start``, or -1."""
    data = buf
    pos = data.find(MAGIC, start)
    while pos >= 0:
        rec, _end = _record_at(data, pos)
        if rec is not None:
            return pos
        pos = data.find(MAGIC, pos + 1)
    return -1


def scan(buf: bytes | memoryview, last_seq: int = -1) -> ScanResult:
    """Every valid record of a segment, in order; total (never raises).

    A record whose seq is not above the previous one (``last_seq`` to start) is treated as
    corrupt: seqs only grow, so an old record resurfacing can never be delivered out of order.
    """
    out = ScanResult()
    buf = bytes(buf)
    pos = 0
    while pos < len(buf):
        rec, end = _record_at(buf, pos)
        if rec is not None and rec.seq > last_seq:
            out.records.append(rec)
            last_seq = rec.seq
            pos = out.valid_end = end
            continue
        nxt = _resync(buf, pos + 1)
        if nxt < 0:
            out.torn_tail = True  # nothing valid after pos: a cut write (or garbage) to truncate
            break
        out.corrupt += 1
        out.corrupt_bytes += nxt - pos
        pos = nxt
    return out


def encode_ack(segment: int, seq: int) -> bytes:
    """The ack pointer: every record with seq <= ``seq`` was delivered."""
    raw = _ACK.pack(_ACK_MAGIC, segment, seq)
    return raw + struct.pack(">I", zlib.crc32(raw))


def decode_ack(data: bytes) -> tuple[int, int]:
    """(segment, seq) from an ack pointer file; raises only SpoolFormatError."""
    if len(data) != ACK_LEN:
        raise SpoolFormatError("spool ack pointer has the wrong length")
    raw = data[: _ACK.size]
    (crc,) = struct.unpack(">I", data[_ACK.size :])
    if zlib.crc32(raw) != crc:
        raise SpoolFormatError("spool ack pointer checksum mismatch")
    magic, segment, seq = _ACK.unpack(raw)
    if magic != _ACK_MAGIC:
        raise SpoolFormatError("spool ack pointer has the wrong magic")
    return segment, seq
