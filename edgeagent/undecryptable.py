"""Input that fails to decrypt: one rate-limited warning per source, and counts for status.

How it works. The gossip driver tells :class:`UndecryptableLog` about every datagram or
push-pull stream the core could not open (its ``decrypt_errors`` counter grew while handling
it), with the address it came from. The first failure from a source logs one warning naming
the source and the likely cause (a peer holding another cluster's key, or another cluster
name); further failures from that source within :data:`WARN_INTERVAL_S` are only counted,
and its next warning says how many were suppressed. Sources live in a bounded LRU
(:data:`MAX_SOURCES`) and at most :data:`MAX_WARNINGS_PER_INTERVAL` warnings are logged per
interval over all sources, so a flood from spoofed addresses cannot flood the log.

Runs on the gossip thread (the driver's clock, ``now``); :meth:`UndecryptableLog.report` is
the immutable summary each :class:`~edgeagent.driver.View` carries, which ``edgeagent
status`` shows.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from gossip.messages import Address

from .logs import fields
from .netaddr import format_addr

log = logging.getLogger("edgeagent.undecryptable")

WARN_INTERVAL_S = 60.0  # at most one warning per source per minute
MAX_WARNINGS_PER_INTERVAL = 10  # over all sources: spoofed sources cannot flood the log
MAX_SOURCES = 1024  # sources remembered (least recently seen forgotten first)
DATAGRAM = "datagram"
STREAM = "stream"
CAUSE = (
    "it probably holds another cluster's key (or another cluster name): "
    "enroll it with `edgeagent join TOKEN`, or give both the same keyring"
)


@dataclass(frozen=True, slots=True)
class UndecryptableReport:
    """Totals since start, and the last source (``last_at`` on the gossip loop's clock)."""

    datagrams: int = 0
    streams: int = 0
    last_source: Address | None = None
    last_at: float | None = None

    def status(self, now: float) -> dict[str, Any]:
        """The ``edgeagent status`` fields (``now`` on the same clock as ``last_at``)."""
        return {
            "undecryptable_datagrams": self.datagrams,
            "undecryptable_streams": self.streams,
            "undecryptable_last_source": (
                format_addr(self.last_source) if self.last_source is not None else None
            ),
            "undecryptable_last_s_ago": (
                round(now - self.last_at, 1) if self.last_at is not None else None
            ),
        }


NOTHING_UNDECRYPTABLE = UndecryptableReport()


@dataclass(slots=True)
class _Source:
    warned_at: float
    suppressed: int = 0


class UndecryptableLog:
    """Counts undecryptable input and logs the rate-limited warnings (gossip thread only)."""

    def __init__(
        self,
        interval: float = WARN_INTERVAL_S,
        max_warnings: int = MAX_WARNINGS_PER_INTERVAL,
        max_sources: int = MAX_SOURCES,
    ) -> None:
        self._interval = interval
        self._max_warnings = max_warnings
        self._max_sources = max_sources
        self._sources: OrderedDict[str, _Source] = OrderedDict()
        self._window_start = float("-inf")
        self._window_warnings = 0
        self._report = UndecryptableReport()

    def record(self, src: Address, kind: str, now: float) -> None:
        """One input of ``kind`` (:data:`DATAGRAM` or :data:`STREAM`) from ``src`` failed to decrypt."""
        r = self._report
        self._report = UndecryptableReport(
            r.datagrams + (kind == DATAGRAM), r.streams + (kind == STREAM), src, now
        )
        key = src[0]  # per host: a peer's ephemeral stream ports are one source
        source = self._sources.get(key)
        if source is not None:
            self._sources.move_to_end(key)
            if now - source.warned_at < self._interval:
                source.suppressed += 1
                return
        if now - self._window_start >= self._interval:
            self._window_start, self._window_warnings = now, 0
        if self._window_warnings >= self._max_warnings:
            if source is not None:
                source.suppressed += 1
            return
        self._window_warnings += 1
        suppressed = source.suppressed if source is not None else 0
        self._sources[key] = _Source(warned_at=now)
        if len(self._sources) > self._max_sources:
            self._sources.popitem(last=False)
        log.warning(
            f"cannot decrypt a {kind} from {format_addr(src)}: {CAUSE}",
            extra=fields(source=format_addr(src), kind=kind, suppressed=suppressed),
        )

    def report(self) -> UndecryptableReport:
        """The summary so far (immutable: safe to hand to another thread)."""
        return self._report
