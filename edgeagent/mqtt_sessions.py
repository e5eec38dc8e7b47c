"""Persistent MQTT sessions on disk: ``STATE_DIR/mqtt-sessions``, kept across restart and kill -9.

How it works (the format and what a session keeps: :mod:`overlay.mqtt.persist`):

- **Load** at start, before the listener opens: every saved session comes back offline,
  with its subscriptions (so the mesh interest is published again) and its queued QoS 1/2
  messages. A damaged file is logged in one line, renamed ``mqtt-sessions.bad`` and the
  agent starts without those sessions.
- **Save** when the broker's ``persist_version`` or ``subscriptions_version`` moved: the whole
  snapshot as one value for the state writer (``host.saver``: atomic write, fsync, rename,
  on its thread, retried with backoff on a full disk), at most every
  :data:`SAVE_INTERVAL_S`, or after :data:`DURABLE_DELAY_S` when someone waits on
  :meth:`SessionStore.durable`. Never one fsync per message: every message accepted during
  one interval shares the one write. And at stop. The snapshot is the whole state each time
  (bounded by the broker's session and queue bounds), not a log.
- **Durable acknowledgement**: the mesh answers a peer's batch that put QoS 1/2 messages into
  persistent sessions only after :meth:`durable` (the next save holding them) returned, so
  the sending agent keeps retrying a batch this agent could lose to kill -9 (a save not done
  within :data:`DURABLE_TIMEOUT_S` refuses the batch: the sender counts it lost).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import time
from collections.abc import Callable
from pathlib import Path

from overlay.mqtt import persist
from overlay.mqtt.broker import Broker

from .host import FeatureHost
from .logs import fields

log = FeatureHost.logger("mqtt")
FILE = "mqtt-sessions"
SAVE_INTERVAL_S = 1.0
DURABLE_DELAY_S = 0.02  # gather the batches arriving together into one write
DURABLE_TIMEOUT_S = 4.0  # under the mesh sender's request timeout (5 s)
Writer = Callable[[Path, bytes], "concurrent.futures.Future[None]"]


class SessionStore:
    """The broker's persistent sessions in ``state_dir`` (see the module docstring)."""

    def __init__(self, state_dir: Path, broker: Broker, write: Writer) -> None:
        self.path = Path(state_dir) / FILE
        self.broker = broker
        self.write = write  # host.saver.save
        self.saved = (-1, -1)  # (persist_version, subscriptions_version) last written
        self.stats = {
            "sessions_restored": 0, "session_saves": 0, "session_save_errors": 0,
            "session_messages_not_saved": 0,  # in the last save: over persist.MAX_SAVED_BYTES
        }  # fmt: skip
        self._next: asyncio.Future[None] | None = None  # done at the next save (durable_future)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def load(self) -> int:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return 0
        except OSError as exc:
            log.warning(
                "mqtt: cannot read saved sessions",
                extra=fields(path=str(self.path), error=str(exc)),
            )
            return 0
        try:
            count = persist.load(self.broker, data, asyncio.get_running_loop().time())
        except persist.PersistDecodeError as exc:
            log.warning(
                "mqtt: saved sessions damaged, set aside",
                extra=fields(path=str(self.path), error=str(exc)),
            )
            with contextlib.suppress(OSError):
                self.path.replace(self.path.with_name(FILE + ".bad"))
            return 0
        self.stats["sessions_restored"] = count
        self.saved = self._versions()
        log.info("mqtt: sessions restored", extra=fields(sessions=count))
        return count

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._loop())

    def _versions(self) -> tuple[int, int]:
        return (self.broker.persist_version, self.broker.subscriptions_version)

    def durable_future(self) -> asyncio.Future[None]:
        """Done once what the broker holds now is on disk (the next save); OSError if that
        save fails or is not done within :data:`DURABLE_TIMEOUT_S`. Callers until that save
        share one future (one timer a save, not one a message); do not cancel it."""
        future = self._next
        if future is None or future.done():
            loop = asyncio.get_running_loop()
            future = self._next = loop.create_future()
            loop.call_later(DURABLE_TIMEOUT_S, _time_out, future)
        self._wake.set()
        return future

    async def durable(self) -> None:
        """Return once what the broker holds now is on disk (the next save)."""
        await asyncio.shield(self.durable_future())

    async def _loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), SAVE_INTERVAL_S)
            if self._wake.is_set():
                await asyncio.sleep(DURABLE_DELAY_S)
                self._wake.clear()
            await self.save()

    async def save(self) -> None:
        waiting, self._next = self._next, None
        versions = self._versions()
        try:
            if versions != self.saved:
                data, skipped = persist.dump(self.broker, asyncio.get_running_loop().time())
                self.stats["session_messages_not_saved"] = skipped
                started = time.monotonic()
                await asyncio.wrap_future(self.write(self.path, data))
                self.saved = versions
                self.stats["session_saves"] += 1
                if time.monotonic() - started > 1.0:
                    log.warning("mqtt: saving sessions is slow", extra=fields(bytes=len(data)))
        except Exception as exc:
            self.stats["session_save_errors"] += 1
            log.warning(
                "mqtt: cannot save sessions", extra=fields(path=str(self.path), error=str(exc))
            )
            if waiting is not None and not waiting.done():
                waiting.set_exception(OSError(f"sessions not saved: {exc}"))
            return
        if waiting is not None and not waiting.done():
            waiting.set_result(None)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
        with contextlib.suppress(TimeoutError):  # the state writer's close flushes it later
            await asyncio.wait_for(self.save(), DURABLE_TIMEOUT_S)


def _time_out(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_exception(OSError("sessions not saved in time"))
