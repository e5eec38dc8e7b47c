"""The broker's timers as data, on one heap (the gossip core's pattern, `gossip/timers.py`).

Each timer names what it was armed for (a connection by its id and serial, a session by its
client id and generation); when it fires the broker checks that the thing still is in the
state the timer was armed for and ignores it otherwise. Stale timers are never cancelled in
place: `TimerHeap.compact` drops them when the heap holds many more timers than live ones,
so a client that reconnects in a loop cannot grow the heap without bound.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Hashable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ConnectDeadline:
    """A transport must send CONNECT by now."""

    conn: Hashable
    serial: int


@dataclass(frozen=True, slots=True)
class KeepAliveCheck:
    """Check whether a connection has been silent for 1.5 x its keep alive."""

    conn: Hashable
    serial: int


@dataclass(frozen=True, slots=True)
class WillDue:
    """A deferred will (MQTT 5 will delay interval) is due."""

    client_id: str
    generation: int


@dataclass(frozen=True, slots=True)
class SessionExpiry:
    """A disconnected session's expiry interval has passed."""

    client_id: str
    generation: int


Timer = ConnectDeadline | KeepAliveCheck | WillDue | SessionExpiry


class TimerHeap:
    """Timers by due time; ties keep the order they were armed in."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Timer]] = []
        self._seq = 0

    def __len__(self) -> int:
        return len(self._heap)

    def push(self, when: float, timer: Timer) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (when, self._seq, timer))

    def pop_due(self, now: float) -> list[Timer]:
        due: list[Timer] = []
        while self._heap and self._heap[0][0] <= now:
            due.append(heapq.heappop(self._heap)[2])
        return due

    def next_deadline(self) -> float | None:
        return self._heap[0][0] if self._heap else None

    def compact(self, live: Callable[[Timer], bool]) -> None:
        """Keep only the timers ``live`` says still matter."""
        self._heap = [entry for entry in self._heap if live(entry[2])]
        heapq.heapify(self._heap)
