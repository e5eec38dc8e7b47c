"""Store-and-forward spool for the MQTT uplink: QoS 1 messages kept on disk while no cloud
broker is reachable, drained in order on reconnect.

Layout (``<state dir>/uplink-spool/``)::

    seg-0000000000000001.log   records (format: overlay/spool_format.py), append only
    seg-0000000000000002.log   ...
    ack                        the ack pointer: every record with seq <= it was delivered

Bounds: the total size of the segment files stays under ``max_bytes`` (default 16 MiB); when
an append would pass it the *oldest whole segment* is deleted and its undelivered records are
counted in ``dropped_full`` (segments are ``max_bytes / 8``, so at most an eighth of the spool
goes at once). A record has an expiry (``ttl``); expired records are skipped when draining and
counted in ``dropped_expired``. A record larger than a segment is refused (``too_large``).

Durability (SD-card wear): appends are plain ``write`` calls (in the page cache at once, so a
``kill -9`` of the agent loses nothing); the segment is fsynced at most once per
``sync_interval`` (group commit, default 0.5 s) by :meth:`Spool.sync_if_due`, called on every
append and ack and by the owner's timer, and by :meth:`Spool.close`. A *power cut* can lose
at most the appends of the last unsynced window. The ack pointer is written with
``persist.atomic_write`` at most once per window too, so a crash can re-deliver at most the
last window's acked records (QoS 1 is at-least-once anyway); it never skips a record.

Never corrupted: every record is checksummed; on open each segment is scanned
(:func:`overlay.spool_format.scan`), a torn tail is truncated (``torn_tails``), a corrupt
record is skipped (``corrupt``); a bad ack pointer is ignored (``corrupt_ack``) and the spool
re-delivers from its start rather than lose anything. Drained segments are deleted whole.

All methods block (file IO, fsync): the async owner calls them with ``asyncio.to_thread``;
a lock makes the object safe to share between threads.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from overlay.spool_format import (
    HEADER_LEN,
    SpoolFormatError,
    SpoolRecord,
    decode_ack,
    encode_ack,
    encode_record,
    scan,
)

from .persist import atomic_write, fsync_dir

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 16 * 1024 * 1024
DEFAULT_SYNC_INTERVAL = 0.5
MIN_SEGMENT_BYTES = 4096
ACK_FILE = "ack"


@dataclass(slots=True)
class _Segment:
    number: int
    size: int = 0
    count: int = 0
    first_seq: int = -1
    last_seq: int = -1

    @property
    def path_name(self) -> str:
        return f"seg-{self.number:016d}.log"

    def undelivered(self, acked: int) -> int:
        """Records in this segment above ``acked`` (seqs in a segment are consecutive)."""
        if self.count == 0 or acked >= self.last_seq:
            return 0
        return min(self.count, self.last_seq - max(acked, self.first_seq - 1))


@dataclass(slots=True)
class SpoolStats:
    appended: int = 0
    delivered: int = 0
    dropped_full: int = 0
    dropped_expired: int = 0
    too_large: int = 0
    corrupt: int = 0
    torn_tails: int = 0
    corrupt_ack: int = 0
    fsyncs: int = 0


class Spool:
    """An on-disk FIFO of :class:`SpoolRecord`; see the module docstring."""

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        sync_interval: float = DEFAULT_SYNC_INTERVAL,
        wall: Callable[[], float] = time.time,
        mono: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_bytes < 2 * MIN_SEGMENT_BYTES:
            raise ValueError(f"spool max_bytes must be at least {2 * MIN_SEGMENT_BYTES}")
        self.dir = Path(directory)
        self.max_bytes = max_bytes
        self.segment_bytes = max(MIN_SEGMENT_BYTES, max_bytes // 8)
        self.sync_interval = sync_interval
        self._wall = wall
        self._mono = mono
        self.stats = SpoolStats()
        self._lock = threading.Lock()
        self._segments: deque[_Segment] = deque()
        self._acked = -1
        self._next_seq = 0
        self._fd = -1
        self._data_dirty = False
        self._ack_dirty = False
        self._last_sync = mono()
        # Read cursor: records loaded from segment _read_seg up to byte _read_off, not yet acked.
        self._pending: deque[SpoolRecord] = deque()
        self._read_seg = -1
        self._read_off = 0
        self._open()

    # -- recovery ----------------------------------------------------------------------------

    def _open(self) -> None:
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._acked = self._load_ack()
        last_seq = -1
        numbers = sorted(
            int(p.name[4:-4]) for p in self.dir.glob("seg-*.log") if p.name[4:-4].isdigit()
        )
        for number in numbers:
            seg = self._recover_segment(number, last_seq)
            last_seq = max(last_seq, seg.last_seq)
            self._segments.append(seg)
        self._next_seq = max(last_seq, self._acked) + 1
        self._free_drained()
        if not self._segments:
            self._segments.append(_Segment(self._new_number()))
        self._open_writer()

    def _load_ack(self) -> int:
        try:
            data = (self.dir / ACK_FILE).read_bytes()
        except FileNotFoundError:
            return -1
        try:
            return decode_ack(data)[1] - 1
        except SpoolFormatError as exc:
            self.stats.corrupt_ack += 1
            log.warning("uplink spool: %s; re-delivering from the start of the spool", exc)
            return -1

    def _recover_segment(self, number: int, last_seq: int) -> _Segment:
        seg = _Segment(number)
        path = self.dir / seg.path_name
        data = path.read_bytes()
        res = scan(data, last_seq)
        self.stats.corrupt += res.corrupt
        if res.corrupt:
            log.warning("uplink spool: %s: skipped %d corrupt record(s)", path, res.corrupt)
        if res.torn_tail:
            self.stats.torn_tails += 1
            log.warning(
                "uplink spool: %s: truncated a torn tail of %d bytes",
                path,
                len(data) - res.valid_end,
            )
            with open(path, "r+b") as f:
                f.truncate(res.valid_end)
                os.fsync(f.fileno())
        seg.size = res.valid_end
        seg.count = len(res.records)
        if res.records:
            seg.first_seq = res.records[0].seq
            seg.last_seq = res.records[-1].seq
        return seg

    def _new_number(self) -> int:
        return (self._segments[-1].number + 1) if self._segments else 1

    def _open_writer(self) -> None:
        path = self.dir / self._segments[-1].path_name
        existed = path.exists()
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        if not existed:
            fsync_dir(self.dir)  # the new segment's name survives a power cut

    # -- writing -----------------------------------------------------------------------------

    def append(
        self, topic: str, payload: bytes, *, retain: bool = False, ttl: float | None = None
    ) -> int | None:
        """Spool one message; its seq, or None if it is larger than a segment (counted)."""
        with self._lock:
            expires = self._wall() + ttl if ttl else 0.0
            rec = SpoolRecord(self._next_seq, topic, payload, retain, expires)
            data = encode_record(rec)
            if len(data) > self.segment_bytes:
                self.stats.too_large += 1
                return None
            cur = self._segments[-1]
            if cur.size and cur.size + len(data) > self.segment_bytes:
                cur = self._rotate()
            self._make_room(len(data))
            os.write(self._fd, data)
            self._next_seq += 1
            cur.size += len(data)
            cur.count += 1
            if cur.first_seq < 0:
                cur.first_seq = rec.seq
            cur.last_seq = rec.seq
            self.stats.appended += 1
            self._data_dirty = True
            self._sync_if_due_locked()
            return rec.seq

    def _rotate(self) -> _Segment:
        self._fsync_data()
        os.close(self._fd)
        seg = _Segment(self._new_number())
        self._segments.append(seg)
        self._open_writer()
        return seg

    def _make_room(self, need: int) -> None:
        """Delete the oldest segments until ``need`` more bytes fit under max_bytes."""
        while len(self._segments) > 1 and self.total_bytes + need > self.max_bytes:
            old = self._segments.popleft()
            lost = old.undelivered(self._acked)
            self.stats.dropped_full += lost
            log.warning("uplink spool full: dropped %d oldest undelivered message(s)", lost)
            self._acked = max(self._acked, old.last_seq)
            self._ack_dirty = True
            (self.dir / old.path_name).unlink(missing_ok=True)
            if self._read_seg == old.number:
                self._pending.clear()
                self._read_seg, self._read_off = -1, 0
            while self._pending and self._pending[0].seq <= self._acked:
                self._pending.popleft()

    # -- draining ----------------------------------------------------------------------------

    def peek(self, limit: int) -> list[SpoolRecord]:
        """Up to ``limit`` oldest undelivered, unexpired records, in order (the same ones until
        acked). Expired records at the head are dropped (counted) on the way."""
        with self._lock:
            now = self._wall()
            out: list[SpoolRecord] = []
            i = 0
            while len(out) < limit:
                if i >= len(self._pending) and not self._load_more():
                    break
                rec = self._pending[i]
                if rec.expired(now):
                    self.stats.dropped_expired += 1
                    del self._pending[i]
                    if not out:
                        self._acked, self._ack_dirty = rec.seq, True
                    continue
                out.append(rec)
                i += 1
            return out

    def _load_more(self) -> bool:
        """Read the next records after the cursor into _pending; False if there are none."""
        for seg in self._segments:
            if seg.number < self._read_seg or seg.last_seq <= self._acked:
                continue
            if seg.number != self._read_seg:
                self._read_seg, self._read_off = seg.number, 0
            if self._read_off >= seg.size:
                continue
            with open(self.dir / seg.path_name, "rb") as f:
                f.seek(self._read_off)
                data = f.read(seg.size - self._read_off)
            self._read_off += len(data)
            last = self._pending[-1].seq if self._pending else self._acked
            found = [r for r in scan(data, last).records if r.seq > self._acked]
            self._pending.extend(found)
            if found:
                return True
        return False

    def ack(self, seq: int) -> None:
        """Every record with seq <= ``seq`` was delivered: forget them, free drained segments."""
        with self._lock:
            if seq <= self._acked:
                return
            while self._pending and self._pending[0].seq <= seq:
                self._pending.popleft()
                self.stats.delivered += 1
            self._acked = min(seq, self._next_seq - 1)
            self._ack_dirty = True
            self._free_drained()
            self._sync_if_due_locked()

    def _free_drained(self) -> None:
        """Delete every segment but the one being written whose records are all acked."""
        while len(self._segments) > 1 and self._segments[0].last_seq <= self._acked:
            old = self._segments.popleft()
            (self.dir / old.path_name).unlink(missing_ok=True)

    # -- durability --------------------------------------------------------------------------

    def sync_if_due(self) -> None:
        """fsync what was written and persist the ack pointer if the window has passed."""
        with self._lock:
            self._sync_if_due_locked()

    def _sync_if_due_locked(self) -> None:
        if (self._data_dirty or self._ack_dirty) and (
            self._mono() - self._last_sync >= self.sync_interval
        ):
            self._sync_locked()

    def sync(self) -> None:
        """fsync now (shutdown, tests)."""
        with self._lock:
            self._sync_locked()

    def _sync_locked(self) -> None:
        self._fsync_data()
        if self._ack_dirty:
            seg = self._segments[0].number if self._segments else 0
            # The file holds the next seq to deliver (acked + 1), so "nothing acked" is 0.
            atomic_write(self.dir / ACK_FILE, encode_ack(seg, self._acked + 1))
            self._ack_dirty = False
            self.stats.fsyncs += 1
        self._last_sync = self._mono()

    def _fsync_data(self) -> None:
        if self._data_dirty and self._fd >= 0:
            os.fsync(self._fd)
            self._data_dirty = False
            self.stats.fsyncs += 1

    def close(self) -> None:
        """Sync and close the writer."""
        with self._lock:
            if self._fd < 0:
                return
            self._sync_locked()
            os.close(self._fd)
            self._fd = -1

    # -- introspection -----------------------------------------------------------------------

    @property
    def total_bytes(self) -> int:
        """Bytes in the segment files."""
        return sum(s.size for s in self._segments)

    @property
    def pending(self) -> int:
        """Undelivered records (expired ones not yet skipped included)."""
        return sum(s.undelivered(self._acked) for s in self._segments)

    def status(self) -> dict[str, int]:
        """Counters and sizes for ``edgeagent status``."""
        with self._lock:
            out = {k: getattr(self.stats, k) for k in self.stats.__slots__}
            out.update(pending=self.pending, bytes=self.total_bytes, segments=len(self._segments))
            return out


__all__ = ["DEFAULT_MAX_BYTES", "HEADER_LEN", "Spool", "SpoolRecord", "SpoolStats"]
