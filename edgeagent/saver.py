"""The state writer of a running agent: saves off the main loop, coalesced, retried.

How it works. :meth:`StateSaver.save` records *the latest value* of one file (a whole
document: every state file is rewritten whole) and returns at once with a
``concurrent.futures.Future`` that completes when that value, or a later one of the same
file, is durably on disk. One worker thread (``state-saver``) writes with
:func:`edgeagent.persist.atomic_write` (temp file, fsync, rename, fsync of the directory), so
no fsync runs on the asyncio main loop. Values saved while a write is in progress replace
each other: the file ends with the newest value, and nothing in between is lost because each
value is the whole state.

A write that fails with ``OSError`` (ENOSPC, EIO, EROFS, EACCES, ...) leaves the old file in
place (atomic_write removes its temp file) and is retried with exponential backoff
(:data:`RETRY_INITIAL_S` doubling to :data:`RETRY_MAX_S`); the value is kept until it is
written or a newer one replaces it, and its futures stay pending: a save never fails on a
disk error, it waits. The first failure of a file logs a warning naming the file and the
error; while it keeps failing at most one warning per :data:`WARN_INTERVAL_S` (with the
number of failures since), and one info line when it is written again. :meth:`status` is
what ``edgeagent status`` shows (pending and failing files, errors so far).

Memory and disk never disagree where a saved value is a precondition of an action: the
caller acts only when the future completes (the addresses feature publishes a claim only
after ``ipam.json`` holds it; a keyring change is answered only once saved). The few saves
that precede everything at start (the bumped incarnation before the first datagram) are
synchronous, before the driver starts, and a failure there is one line
(:func:`save_at_start`), never a traceback.

:meth:`close` flushes what it can within a timeout and logs an error naming each file it
could not write (those futures fail with :class:`SaveAbandoned`).
"""

from __future__ import annotations

import concurrent.futures
import errno
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .logs import fields
from .persist import atomic_write, json_bytes

log = logging.getLogger("edgeagent.saver")

RETRY_INITIAL_S = 0.5  # first retry after a failed write
RETRY_MAX_S = 30.0  # backoff cap: a full disk is retried twice a minute
WARN_INTERVAL_S = 60.0  # at most one warning per failing file per minute
CLOSE_TIMEOUT_S = 5.0  # how long shutdown waits for pending saves

Writer = Callable[[Path, bytes, int], None]


class SaveAbandoned(RuntimeError):
    """The saver was closed before this value could be written."""


@dataclass(slots=True)
class _Pending:
    """The newest unsaved value of one file and who waits for it."""

    data: bytes
    mode: int
    waiters: list[concurrent.futures.Future[None]] = field(default_factory=list)
    gen: int = 0  # raised by every save: a write of an older gen leaves the entry pending
    due: float = 0.0  # monotonic time of the next attempt
    failures: int = 0  # consecutive failures of this file
    backoff: float = 0.0
    warned_at: float = float("-inf")
    unwarned: int = 0  # failures since the last warning
    error: str = ""


@dataclass(frozen=True, slots=True)
class SaverStatus:
    """What ``edgeagent status`` shows about state saves."""

    pending: int  # files with a value not yet on disk
    failing: dict[str, str]  # file name -> last error, for files whose last write failed
    errors: int  # failed writes since start
    saves: int  # successful writes since start

    def status(self) -> dict[str, Any]:
        return {
            "saves_pending": self.pending,
            "saves_failing": dict(self.failing),
            "save_errors": self.errors,
        }


def describe(exc: OSError) -> str:
    """``No space left on device (ENOSPC)``: the reason and the errno name."""
    name = errno.errorcode.get(exc.errno or 0)
    reason = exc.strerror or str(exc)
    return f"{reason} ({name})" if name else reason


class StateSaver:
    """Writes state files on a worker thread; latest value per file, retried on OSError."""

    def __init__(
        self,
        *,
        write: Writer = atomic_write,
        retry_initial: float = RETRY_INITIAL_S,
        retry_max: float = RETRY_MAX_S,
        warn_interval: float = WARN_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._write = write
        self._retry_initial = retry_initial
        self._retry_max = retry_max
        self._warn_interval = warn_interval
        self._clock = clock
        self._cond = threading.Condition()
        self._pending: dict[Path, _Pending] = {}
        self._writing: Path | None = None
        self._failing: dict[str, str] = {}
        self._errors = 0
        self._saves = 0
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="state-saver", daemon=True)
        self._thread.start()

    # -- any thread --------------------------------------------------------------------------

    def save(
        self, path: str | os.PathLike[str], data: bytes, mode: int = 0o600
    ) -> concurrent.futures.Future[None]:
        """Queue ``data`` as the new content of ``path``; the future completes once it (or a
        newer value) is on disk. After :meth:`close` it fails with :class:`SaveAbandoned`."""
        future: concurrent.futures.Future[None] = concurrent.futures.Future()
        target = Path(path)
        with self._cond:
            if self._closed:
                future.set_exception(SaveAbandoned(f"{target}: not saved: the agent is stopping"))
                return future
            entry = self._pending.get(target)
            if entry is None:
                self._pending[target] = _Pending(data, mode, [future], due=self._clock())
            else:  # replace the value, keep the retry schedule (a full disk stays full)
                entry.data, entry.mode, entry.gen = data, mode, entry.gen + 1
                entry.waiters.append(future)
            self._cond.notify()
        return future

    def save_json(
        self, path: str | os.PathLike[str], obj: Any, mode: int = 0o600
    ) -> concurrent.futures.Future[None]:
        """:meth:`save` of ``obj`` as :func:`edgeagent.persist.save_json` writes it."""
        return self.save(path, json_bytes(obj), mode)

    def status(self) -> SaverStatus:
        with self._cond:
            return SaverStatus(len(self._pending), dict(self._failing), self._errors, self._saves)

    def flush(self, timeout: float) -> bool:
        """Wait until nothing is pending (True) or ``timeout`` passes (False)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._pending or self._writing is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                for entry in self._pending.values():
                    entry.due = min(entry.due, self._clock())  # retry now: we are waiting
                self._cond.notify_all()
                self._cond.wait(min(left, 0.1))
            return True

    def close(self, timeout: float = CLOSE_TIMEOUT_S) -> bool:
        """Flush for up to ``timeout``, then stop; True if everything was written."""
        flushed = self.flush(timeout)
        with self._cond:
            self._closed = True
            left = list(self._pending.items())
            self._pending.clear()
            self._cond.notify_all()
        for path, entry in left:
            log.error(
                f"state file {path} not saved before exit: {entry.error or 'still pending'}; "
                "it keeps its previous content",
                extra=fields(path=str(path), error=entry.error),
            )
            for waiter in entry.waiters:
                if not waiter.done():
                    waiter.set_exception(SaveAbandoned(f"{path}: not saved: {entry.error}"))
        self._thread.join(timeout=max(1.0, timeout))
        return flushed and not left

    # -- the worker thread -------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                entry = self._next_job()
                if entry is None:
                    return
                path, job = entry
                data, mode, gen, waiters = job.data, job.mode, job.gen, job.waiters
                job.waiters = []
                self._writing = path
            try:
                self._write(path, data, mode)
            except OSError as exc:
                self._failed(path, gen, waiters, exc)
            else:
                self._written(path, gen, waiters)

    def _next_job(self) -> tuple[Path, _Pending] | None:
        """The next file due, waiting as needed (it stays pending until written); None: closed."""
        while True:
            if self._closed:
                return None
            now = self._clock()
            due = [(entry.due, str(path), path) for path, entry in self._pending.items()]
            if due:
                when, _, path = min(due)
                if when <= now:
                    return path, self._pending[path]
                self._cond.wait(min(when - now, 1.0))
            else:
                self._cond.wait()

    def _written(
        self, path: Path, gen: int, waiters: list[concurrent.futures.Future[None]]
    ) -> None:
        with self._cond:
            self._writing = None
            self._saves += 1
            entry = self._pending.get(path)
            recovered = entry.failures if entry is not None else 0
            if entry is not None and entry.gen == gen:
                del self._pending[path]  # nothing newer arrived meanwhile
                waiters = waiters + entry.waiters
            elif entry is not None:  # a newer value is due now: the disk works again
                entry.failures, entry.backoff, entry.due = 0, 0.0, self._clock()
            self._failing.pop(str(path), None)
            self._cond.notify_all()
        if recovered:  # before the waiters hear of it: they may look for this line
            log.info(
                f"state file {path} saved after {recovered} failed attempts",
                extra=fields(path=str(path)),
            )
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _failed(
        self, path: Path, gen: int, waiters: list[concurrent.futures.Future[None]], exc: OSError
    ) -> None:
        now = self._clock()
        error = describe(exc)
        with self._cond:
            self._writing = None
            self._errors += 1
            entry = self._pending.get(path)
            if entry is not None:  # the waiters wait for the entry's value (this one or newer)
                entry.waiters = waiters + entry.waiters
                waiters = []
                entry.failures += 1
                entry.unwarned += 1
                entry.error = error
                entry.backoff = min(self._retry_max, max(self._retry_initial, entry.backoff * 2))
                entry.due = now + entry.backoff
                self._failing[str(path)] = error
                warn = now - entry.warned_at >= self._warn_interval
                if warn:
                    entry.warned_at, failures, entry.unwarned = now, entry.unwarned, 0
            else:  # closed meanwhile
                warn = False
            self._cond.notify_all()
        for waiter in waiters:
            if not waiter.done():
                waiter.set_exception(SaveAbandoned(f"{path}: not saved: {error}"))
        if warn:
            log.warning(
                f"cannot save state file {path}: {error}; kept in memory, retrying "
                f"(backoff up to {self._retry_max:g} s)",
                extra=fields(path=str(path), error=error, failures=failures),
            )


def save_at_start(state_dir: Path, save: Callable[[], Any]) -> Any:
    """Run a synchronous save of the start (before anything is announced); a failure is one
    ConfigError line naming the state dir and the error, never a traceback."""
    try:
        return save()
    except OSError as exc:
        what = Path(exc.filename).name if exc.filename else "the agent's state"
        raise ConfigError(
            f"{state_dir}: cannot save {what}: {describe(exc)}; "
            "free space on that filesystem or use another --state-dir"
        ) from None
