"""The core's timers: one frozen value type per kind, on one heap.

How it works: the core schedules a timer value at a deadline; the heap orders
entries by ``(deadline, insertion number)`` so equal deadlines fire in the
order they were armed and timer values are never compared. When a timer fires
the core dispatches on its type. A timer carries what it was armed for (a probe
sequence number, the suspicion object, the state-change time of a death); if
the state has moved on since, the handler sees the mismatch and ignores it
(foca: timers are data, tagged so a stale one is ignored). Nothing is ever
cancelled.
"""

from __future__ import annotations

import heapq
import itertools
import math
from dataclasses import dataclass

from .members import Node
from .suspicion import Suspicion


@dataclass(frozen=True, slots=True)
class ProbeTick:
    """Every ``probe_interval``: probe the next member."""


@dataclass(frozen=True, slots=True)
class ProbeTimeout:
    """The direct ping of probe ``seq`` got no ack in time: ask others (PingReq)."""

    seq: int


@dataclass(frozen=True, slots=True)
class ProbeEnd:
    """The probe interval of probe ``seq`` is over: no ack means Suspect."""

    seq: int


@dataclass(frozen=True, slots=True)
class RelayTimeout:
    """Our ping ``seq`` relayed for a PingReq: nack the origin if still unanswered."""

    seq: int


@dataclass(frozen=True, slots=True)
class GossipTick:
    """Every ``gossip_interval``: send the broadcast queue to a few members."""


@dataclass(frozen=True, slots=True)
class PushPullTick:
    """Every scaled, jittered ``push_pull_interval``: full state exchange."""


@dataclass(frozen=True, slots=True)
class ReconnectTick:
    """Every ``reconnect_interval``: push-pull with a dead member or the seeds."""


@dataclass(frozen=True, slots=True)
class SettleTick:
    """Once, ``JOIN_SETTLE_GOSSIP_INTERVALS`` gossip intervals after our join exchange: one
    push-pull with a random member."""


@dataclass(frozen=True, slots=True)
class SuspicionTimeout:
    """``suspicion`` of ``node`` may have expired: declare it DEAD."""

    node: Node
    suspicion: Suspicion


@dataclass(frozen=True, slots=True)
class Recheck:
    """Buddy re-check of ``node`` under ``suspicion``: one last direct ping."""

    node: Node
    suspicion: Suspicion


@dataclass(frozen=True, slots=True)
class Reap:
    """``node`` went DEAD or LEFT at ``stamp``; forget it if it still is."""

    node: Node
    stamp: float


Timer = (
    ProbeTick
    | ProbeTimeout
    | ProbeEnd
    | RelayTimeout
    | GossipTick
    | PushPullTick
    | ReconnectTick
    | SettleTick
    | SuspicionTimeout
    | Recheck
    | Reap
)


class TimerHeap:
    """Pending timers by deadline; equal deadlines in the order armed."""

    __slots__ = ("_heap", "_order")

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Timer]] = []
        self._order = itertools.count()

    def schedule(self, deadline: float, timer: Timer) -> None:
        heapq.heappush(self._heap, (deadline, next(self._order), timer))

    def next_deadline(self) -> float | None:
        """The earliest pending deadline (possibly of a timer that turns out stale)."""
        return self._heap[0][0] if self._heap else None

    def pop_due(self, now: float) -> tuple[float, Timer] | None:
        """The earliest timer due at or before ``now`` with its deadline, or None."""
        heap = self._heap
        if not heap or heap[0][0] > now:
            return None
        deadline, _, timer = heapq.heappop(heap)
        return deadline, timer


def next_tick(deadline: float, interval: float, now: float) -> float:
    """A ticker's next deadline after the one at ``deadline`` fired at ``now``.

    A ticker drops the ticks it missed (Go time.Ticker).
    """
    nxt = deadline + interval
    if nxt <= now:
        nxt += math.ceil((now - nxt) / interval + 1e-9) * interval
    return nxt
