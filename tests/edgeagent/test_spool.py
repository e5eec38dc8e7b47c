"""The uplink spool on disk: order, restart, kill -9, torn tails, corrupt records, bounds,
TTL, drained segments freed, and few fsyncs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from edgeagent.spool import ACK_FILE, Spool


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def drain(spool: Spool, batch: int = 7) -> list[bytes]:
    out: list[bytes] = []
    while recs := spool.peek(batch):
        out.extend(r.payload for r in recs)
        spool.ack(recs[-1].seq)
    return out


def fill(spool: Spool, n: int, start: int = 0) -> list[bytes]:
    msgs = [f"m{i:06d}".encode() for i in range(start, start + n)]
    for m in msgs:
        assert spool.append("up/t", m) is not None
    return msgs


def test_drains_in_order_and_frees_segments(tmp_path: Path) -> None:
    sp = Spool(tmp_path, max_bytes=256 * 1024)
    msgs = fill(sp, 2000)
    assert len(list(tmp_path.glob("seg-*.log"))) > 1
    assert sp.pending == 2000
    assert drain(sp) == msgs
    assert sp.pending == 0
    assert len(list(tmp_path.glob("seg-*.log"))) == 1  # only the one being written is left
    assert sp.stats.delivered == 2000


def test_appends_while_draining_keep_order(tmp_path: Path) -> None:
    sp = Spool(tmp_path, max_bytes=64 * 1024)
    msgs = fill(sp, 100)
    got: list[bytes] = []
    for i in range(50):
        recs = sp.peek(3)
        got.extend(r.payload for r in recs)
        sp.ack(recs[-1].seq)
        msgs += fill(sp, 1, start=100 + i)
    got += drain(sp)
    assert got == msgs


def test_survives_restart_with_ack_pointer(tmp_path: Path) -> None:
    sp = Spool(tmp_path, max_bytes=64 * 1024)
    msgs = fill(sp, 500)
    got = []
    for _ in range(20):
        recs = sp.peek(10)
        got += [r.payload for r in recs]
        sp.ack(recs[-1].seq)
    sp.close()
    sp2 = Spool(tmp_path, max_bytes=64 * 1024)
    assert sp2.pending == 300
    assert got + drain(sp2) == msgs
    sp2.append("up/t", b"after")
    assert sp2.peek(5)[0].seq == 500  # seqs are never reused


def test_torn_tail_is_truncated_and_counted(tmp_path: Path) -> None:
    sp = Spool(tmp_path)
    msgs = fill(sp, 10)
    sp.close()
    seg = sorted(tmp_path.glob("seg-*.log"))[-1]
    size = seg.stat().st_size
    with open(seg, "r+b") as f:
        f.truncate(size - 3)  # the last record cut mid-write
    sp2 = Spool(tmp_path)
    assert sp2.stats.torn_tails == 1
    assert seg.stat().st_size < size - 3
    assert drain(sp2) == msgs[:9]
    sp2.append("up/t", b"new")  # appended after the truncation point, so readable
    assert [r.payload for r in sp2.peek(5)] == [b"new"]


def test_corrupt_record_is_skipped_and_counted(tmp_path: Path) -> None:
    sp = Spool(tmp_path)
    msgs = fill(sp, 10)
    sp.close()
    seg = sorted(tmp_path.glob("seg-*.log"))[-1]
    data = bytearray(seg.read_bytes())
    rec_len = len(data) // 10
    data[rec_len * 4 + 15] ^= 0xFF  # inside record 4
    seg.write_bytes(bytes(data))
    sp2 = Spool(tmp_path)
    assert sp2.stats.corrupt == 1
    assert drain(sp2) == msgs[:4] + msgs[5:]


def test_bad_ack_pointer_redelivers_rather_than_loses(tmp_path: Path) -> None:
    sp = Spool(tmp_path)
    msgs = fill(sp, 5)
    sp.ack(sp.peek(2)[-1].seq)
    sp.close()
    (tmp_path / ACK_FILE).write_bytes(b"garbage")
    sp2 = Spool(tmp_path)
    assert sp2.stats.corrupt_ack == 1
    assert drain(sp2) == msgs


def test_full_spool_drops_oldest_and_counts(tmp_path: Path) -> None:
    sp = Spool(tmp_path, max_bytes=16 * 1024)
    msgs = fill(sp, 3000)
    assert sp.total_bytes <= 16 * 1024
    got = drain(sp)
    assert sp.stats.dropped_full > 0
    assert len(got) + sp.stats.dropped_full == 3000
    assert got == msgs[-len(got) :]  # the newest survive, in order


def test_ttl_expired_records_are_skipped_and_counted(tmp_path: Path) -> None:
    wall = Clock()
    sp = Spool(tmp_path, wall=wall)
    sp.append("up/t", b"old", ttl=10)
    sp.append("up/t", b"keep")
    sp.append("up/t", b"old2", ttl=10)
    sp.append("up/t", b"keep2", ttl=100)
    wall.t += 50
    assert drain(sp) == [b"keep", b"keep2"]
    assert sp.stats.dropped_expired == 2
    assert sp.pending == 0


def test_too_large_is_refused(tmp_path: Path) -> None:
    sp = Spool(tmp_path, max_bytes=16 * 1024)
    assert sp.append("up/t", b"x" * 5000) is None
    assert sp.stats.too_large == 1


def test_group_commit_bounds_fsyncs(tmp_path: Path) -> None:
    mono = Clock()
    sp = Spool(tmp_path, max_bytes=1024 * 1024, sync_interval=0.5, mono=mono)
    for i in range(1000):
        sp.append("up/t", b"x")
        if i % 100 == 0:
            mono.t += 0.1
    # 1000 appends over 1 s of virtual time: at most 2 windows' worth, not one per append.
    assert 1 <= sp.stats.fsyncs <= 3


CHILD = """
import sys
from edgeagent.spool import Spool
sp = Spool(sys.argv[1], max_bytes=1 << 20, sync_interval=3600)
i = 0
while True:
    sp.append("up/t", b"m%06d" % i)
    if i == 200:
        print("ready", flush=True)
    i += 1
"""


def test_kill_9_while_appending_loses_nothing_written(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(tmp_path)], stdout=subprocess.PIPE, env=env
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline() == b"ready\n"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    sp = Spool(tmp_path, max_bytes=1 << 20)
    got = drain(sp, batch=100)
    assert len(got) > 200
    assert got == [b"m%06d" % i for i in range(len(got))]  # a prefix, in order, no hole
    assert sp.stats.corrupt == 0
