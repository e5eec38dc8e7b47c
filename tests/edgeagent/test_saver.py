"""The state writer: off the caller's thread, latest value per file, retried on disk errors."""

from __future__ import annotations

import errno
import logging
import os
import threading
from pathlib import Path

import pytest

from edgeagent import persist
from edgeagent.errors import ConfigError
from edgeagent.saver import SaveAbandoned, StateSaver, save_at_start

WAIT = 10.0  # generous: the machine is shared


class FlakyDisk:
    """atomic_write, but os.replace fails with ``errno`` the first ``failures`` times."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, failures: int, code: int = errno.ENOSPC):
        self.left = failures
        self.calls = 0
        self.threads: set[str] = set()
        real = os.replace

        def replace(src: object, dst: object) -> None:
            self.calls += 1
            self.threads.add(threading.current_thread().name)
            if self.left > 0:
                self.left -= 1
                raise OSError(code, os.strerror(code))
            real(src, dst)  # type: ignore[arg-type]

        monkeypatch.setattr(persist.os, "replace", replace)


def fast_saver() -> StateSaver:
    return StateSaver(retry_initial=0.01, retry_max=0.05, warn_interval=3600.0)


def test_save_is_written_off_the_calling_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    disk = FlakyDisk(monkeypatch, failures=0)
    saver = fast_saver()
    try:
        saver.save(tmp_path / "a.json", b"one").result(WAIT)
        assert (tmp_path / "a.json").read_bytes() == b"one"
        assert disk.threads == {"state-saver"}
        assert saver.status().pending == 0 and saver.status().saves == 1
    finally:
        saver.close()


def test_enospc_is_retried_warned_once_and_no_update_is_lost(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    disk = FlakyDisk(monkeypatch, failures=3)
    target = tmp_path / "ipam.json"
    target.write_bytes(b"old")
    saver = fast_saver()
    try:
        with caplog.at_level(logging.INFO, logger="edgeagent.saver"):
            first = saver.save(target, b"v1")
            later = [saver.save(target, f"v{i}".encode()) for i in range(2, 6)]
            for future in [first, *later]:
                future.result(WAIT)  # every caller learns its value (or a newer one) is on disk
        assert target.read_bytes() == b"v5"  # the latest value, never an older one
        assert disk.calls >= 4 and disk.left == 0
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1  # rate-limited: one per file per interval
        assert str(target) in warnings[0].getMessage()
        assert "No space left on device (ENOSPC)" in warnings[0].getMessage()
        assert any("saved after 3 failed attempts" in r.getMessage() for r in caplog.records)
        status = saver.status()
        assert (status.pending, status.errors, status.failing) == (0, 3, {})
        assert [p.name for p in tmp_path.iterdir()] == ["ipam.json"]  # no temp files left
    finally:
        saver.close()


def test_failing_file_is_shown_in_status_and_the_old_content_stays(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    FlakyDisk(monkeypatch, failures=10**6, code=errno.EIO)
    target = tmp_path / "identity.json"
    target.write_bytes(b"old")
    saver = fast_saver()
    future = saver.save(target, b"new")
    try:
        with pytest.raises(TimeoutError):
            future.result(0.3)  # a disk error never fails a save: it waits
        status = saver.status()
        assert status.pending == 1 and status.errors >= 2
        assert status.failing == {str(target): "Input/output error (EIO)"}
        assert status.status()["saves_failing"] == {str(target): "Input/output error (EIO)"}
        assert target.read_bytes() == b"old"
    finally:
        assert saver.close(timeout=0.2) is False
    with pytest.raises(SaveAbandoned):
        future.result(0)
    with pytest.raises(SaveAbandoned):
        saver.save(target, b"after close").result(0)


def test_one_failing_file_does_not_hold_up_another(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = persist.atomic_write
    bad = tmp_path / "ro" / "x.json"

    def write(path: Path, data: bytes, mode: int) -> None:
        if path == bad:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        real(path, data, mode)

    saver = StateSaver(write=write, retry_initial=0.01, retry_max=0.05)
    try:
        saver.save(bad, b"never")
        saver.save(tmp_path / "ok.json", b"fine").result(WAIT)
        assert (tmp_path / "ok.json").read_bytes() == b"fine"
        assert list(saver.status().failing) == [str(bad)]
    finally:
        saver.close(timeout=0.1)


def test_close_flushes_what_it_can(tmp_path: Path) -> None:
    saver = fast_saver()
    futures = [saver.save(tmp_path / f"f{i}", str(i).encode()) for i in range(20)]
    assert saver.close() is True
    assert all(f.done() and f.exception() is None for f in futures)
    assert sorted(p.read_text() for p in tmp_path.iterdir()) == sorted(str(i) for i in range(20))


def test_a_failed_save_at_start_is_one_line(tmp_path: Path) -> None:
    def full() -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "identity.json"))

    with pytest.raises(ConfigError) as info:
        save_at_start(tmp_path, full)
    message = str(info.value)
    assert message.startswith(f"{tmp_path}: cannot save identity.json: ")
    assert "No space left on device (ENOSPC)" in message and "\n" not in message


def test_atomic_write_names_the_target_in_its_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    FlakyDisk(monkeypatch, failures=1, code=errno.ENOSPC)
    with pytest.raises(OSError) as info:
        persist.atomic_write(tmp_path / "ipam.json", b"x")
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(tmp_path / "ipam.json")
    assert list(tmp_path.iterdir()) == []  # the temporary file was removed
