"""Gossip thread -> main loop: the latest view plus a bounded queue of events.

How it works. The gossip thread calls :meth:`UpdateBridge.put` after every input that
produced events (and every second with none). ``put`` replaces the one held view with the
newer one, appends the events to a queue of at most :data:`MAX_QUEUED_EVENTS`, and wakes the
main loop with ``call_soon_threadsafe`` only if no wake-up is pending; so however long the
main loop stalls, what waits for it is one view and a bounded queue, not one callback (and
one whole view) per gossip input. On the main loop :meth:`_drain` hands everything queued to
``deliver(events, view)`` in one call.

When the queue is full the *oldest* events are dropped (the newest say the most about now)
and counted; the next delivery starts with one :class:`EventsDropped` saying how many, and
a warning is logged once per overflow (rate-limited). What a listener does with it: the
view it gets alongside is complete (every member with its state and incarnation), so
membership needs nothing more; replicated state is re-read from the core
(``host.member_states(key)``), as the addresses feature does. Events of a kept type
(:data:`KEPT`: a name conflict, which the core reports once per address) go to a small
queue of their own and are not pushed out by churn.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from gossip.events import NameConflict

from .logs import fields

log = logging.getLogger("edgeagent")

MAX_QUEUED_EVENTS = 4096  # events waiting for a stalled main loop (each a few hundred bytes)
MAX_KEPT_EVENTS = 64  # kept events (name conflicts) waiting, beside the queue
WARN_INTERVAL_S = 60.0  # at most one overflow warning per minute
KEPT: tuple[type, ...] = (NameConflict,)

V = TypeVar("V")


@dataclass(frozen=True, slots=True)
class EventsDropped:
    """``count`` events were dropped before this delivery: the main loop had stalled.

    Listeners resynchronise from the view delivered with it, or from the core."""

    count: int


class UpdateBridge(Generic[V]):
    """Latest view and bounded events, from any thread to ``loop``'s ``deliver``."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        deliver: Callable[[tuple[Any, ...], V], None],
        *,
        max_events: int | None = None,
        max_kept: int = MAX_KEPT_EVENTS,
        warn_interval: float = WARN_INTERVAL_S,
    ) -> None:
        self._loop = loop
        self._deliver = deliver
        self.max_events = MAX_QUEUED_EVENTS if max_events is None else max_events
        self._events: collections.deque[Any] = collections.deque()
        self._kept: collections.deque[Any] = collections.deque()
        self._max_kept = max_kept
        self._warn_interval = warn_interval
        self._lock = threading.Lock()
        self._view: V | None = None
        self._scheduled = False
        self._dropped_since = 0  # dropped since the last delivery
        self.dropped = 0  # dropped since start
        self.high_water = 0  # most events ever waiting at once
        self._warned_at = float("-inf")

    @property
    def queued(self) -> int:
        """Events waiting for the main loop."""
        with self._lock:
            return len(self._events) + len(self._kept)

    def put(self, events: tuple[Any, ...], view: V) -> int:
        """Queue ``events`` and replace the view (any thread); return how many were dropped."""
        dropped = 0
        with self._lock:
            self._view = view
            for event in events:
                queue, limit = (
                    (self._kept, self._max_kept)
                    if isinstance(event, KEPT)
                    else (self._events, self.max_events)
                )
                queue.append(event)
                if len(queue) > limit:
                    queue.popleft()
                    dropped += 1
            self.high_water = max(self.high_water, len(self._events) + len(self._kept))
            self._dropped_since += dropped
            self.dropped += dropped
            wake = not self._scheduled
            self._scheduled = True
            warn = dropped and time.monotonic() - self._warned_at >= self._warn_interval
            if warn:
                self._warned_at = time.monotonic()
        if warn:
            log.warning(
                "the main loop is not keeping up with gossip events: dropping the oldest "
                "(features resynchronise from the latest view)",
                extra=fields(queued=self.max_events, dropped=self.dropped),
            )
        if wake:
            try:
                self._loop.call_soon_threadsafe(self._drain)
            except RuntimeError:  # the main loop is closed: we are shutting down
                pass
        return dropped

    def _drain(self) -> None:
        """On the main loop: deliver everything queued and the latest view, in one call."""
        with self._lock:
            view, self._view = self._view, None
            events = tuple(self._kept) + tuple(self._events)
            self._kept.clear()
            self._events.clear()
            dropped, self._dropped_since = self._dropped_since, 0
            self._scheduled = False
        if view is None:
            return
        if dropped:
            events = (EventsDropped(dropped), *events)
        self._deliver(events, view)
