"""Rate limits against hostile input: per-sender budgets for bad datagrams, rate-limited warnings.

Why: a member holding the cluster key can send validly sealed datagrams that fail our checks
(forged members over the ceiling, counters out of range, state bombs, malformed key
rotations). At 4,000 a second the agent used a whole core, the kernel dropped 55% of its
datagrams, pings went unanswered for 2-3 s, and every node logged one warning per message.

How it works.

- :class:`SenderBudget` (gossip thread): every source host has a token bucket of
  :data:`BAD_BURST` tokens refilled at :data:`BAD_RATE` a second. A datagram that failed
  validation (the driver sees one of the core's refusal counters grow while handling it)
  costs its sender one token; a sender with no token left has its datagrams dropped unread
  (counted) until the bucket refills, so its flood costs a ``recvfrom`` each, not a decrypt,
  a decode and handling. Once limited, a sender is on probation: every datagram read from
  it costs a token, good or bad, until its bucket is full again (it stayed under
  :data:`BAD_RATE` for ``BAD_BURST / BAD_RATE`` s), so it is read at most ~:data:`BAD_RATE`
  a second however few of its datagrams fail (the insider fuzzer fails one in eight; before
  probation each token let ~8 through). Good datagrams from a sender that is not limited
  cost nothing: an honest member is never limited. A
  flood from many (spoofed) source hosts is bounded too: every bad datagram also costs one
  token of a shared bucket (:data:`TOTAL_BAD_RATE`, :data:`TOTAL_BAD_BURST`); while that one
  is empty, only senders that sent a good datagram within :data:`GOOD_MEMORY` are read, so
  pings and acks of the real members keep being answered. Senders live in a bounded LRU
  (:data:`MAX_SENDERS`).
- :class:`WarnLimiter`: at most one warning per key (a source, an origin) per interval and
  at most a few per interval over all keys; suppressed ones are counted and the next warning
  for that key says how many. :mod:`edgeagent.undecryptable` is the same idea, specialised
  for input that does not decrypt.

Sans-IO in spirit: every call takes ``now``; nothing here reads a clock.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from .logs import fields

BAD_BURST = 100  # bad datagrams a sender may send before it is limited
BAD_RATE = 10.0  # bad datagrams a second a limited sender gets read
TOTAL_BAD_BURST = 1000  # the same, over all senders (a spoofed-source flood)
TOTAL_BAD_RATE = 200.0
TAINT_S = BAD_BURST / BAD_RATE  # s a failure marks its sender (handled after the clean ones)
GOOD_MEMORY = 60.0  # s a sender that sent a good datagram stays trusted while the total is spent
MAX_SENDERS = 4096  # senders remembered (least recently seen forgotten first)
WARN_INTERVAL_S = 60.0  # one warning per key per minute
MAX_WARNINGS_PER_INTERVAL = 10  # over all keys


class _Bucket:
    __slots__ = ("tokens", "at")

    def __init__(self, tokens: float, now: float) -> None:
        self.tokens = tokens
        self.at = now

    def refill(self, rate: float, burst: float, now: float) -> float:
        if now > self.at:
            self.tokens = min(burst, self.tokens + (now - self.at) * rate)
            self.at = now
        return self.tokens


@dataclass(slots=True)
class _Sender:
    bucket: _Bucket
    good_at: float = float("-inf")
    bad_at: float = float("-inf")  # its last datagram that failed validation
    failed: int = 0  # bad datagrams since its last warning
    limited: bool = False  # out of tokens (the warning was given)


class WarnLimiter:
    """Warnings for hostile input: one per key per ``interval``, ``max_warnings`` over all keys."""

    def __init__(
        self,
        logger: logging.Logger | logging.LoggerAdapter[Any],
        interval: float = WARN_INTERVAL_S,
        max_warnings: int = MAX_WARNINGS_PER_INTERVAL,
        max_keys: int = MAX_SENDERS,
    ) -> None:
        self._log = logger
        self._interval = interval
        self._max_warnings = max_warnings
        self._max_keys = max_keys
        self._warned: OrderedDict[str, tuple[float, int]] = OrderedDict()  # key -> (at, suppressed)
        self._window = (float("-inf"), 0)  # (start, warnings in it)
        self.suppressed = 0  # total, since start

    def warn(self, key: str, now: float, message: str, **extra: Any) -> bool:
        """Log ``message`` for ``key`` unless that would be too often; whether it was logged."""
        seen = self._warned.get(key)
        if seen is not None:
            self._warned.move_to_end(key)
            if now - seen[0] < self._interval:
                self._suppress(key, seen)
                return False
        start, count = self._window
        if now - start >= self._interval:
            start, count = now, 0
        if count >= self._max_warnings:
            self._window = (start, count)
            self._suppress(key, seen or (float("-inf"), 0))
            return False
        self._window = (start, count + 1)
        suppressed = seen[1] if seen is not None else 0
        self._warned[key] = (now, 0)
        if len(self._warned) > self._max_keys:
            self._warned.popitem(last=False)
        self._log.warning(message, extra=fields(**extra, suppressed=suppressed))
        return True

    def _suppress(self, key: str, seen: tuple[float, int]) -> None:
        self.suppressed += 1
        self._warned[key] = (seen[0], seen[1] + 1)
        if len(self._warned) > self._max_keys:
            self._warned.popitem(last=False)


class SenderBudget:
    """Per-sender token buckets for datagrams that fail validation (gossip thread only)."""

    def __init__(
        self,
        warnings: WarnLimiter,
        rate: float = BAD_RATE,
        burst: int = BAD_BURST,
        total_rate: float = TOTAL_BAD_RATE,
        total_burst: int = TOTAL_BAD_BURST,
        max_senders: int = MAX_SENDERS,
    ) -> None:
        self._warnings = warnings
        self._rate, self._burst = rate, float(burst)
        self._total_rate, self._total_burst = total_rate, float(total_burst)
        self._total = _Bucket(float(total_burst), float("-inf"))
        self._max = max_senders
        self._senders: OrderedDict[str, _Sender] = OrderedDict()
        self.dropped = 0  # datagrams dropped unread
        self.limited = 0  # times a sender ran out of tokens

    def admit(self, host: str, now: float) -> bool:
        """Whether to read a datagram from ``host`` now (False: drop it unread, counted)."""
        sender = self._senders.get(host)
        if sender is not None and sender.limited:
            tokens = sender.bucket.refill(self._rate, self._burst, now)
            if tokens >= self._burst:  # it stayed under the rate for a whole burst: released
                sender.limited = False
            elif tokens < 1.0:
                self.dropped += 1
                return False
            else:  # on probation: every datagram read costs a token, good or bad
                sender.bucket.tokens -= 1.0
        if self._total.refill(self._total_rate, self._total_burst, now) < 1.0 and (
            sender is None or now - sender.good_at > GOOD_MEMORY
        ):
            self.dropped += 1
            return False
        return True

    def tainted(self, host: str, now: float) -> bool:
        """Whether ``host`` is limited or sent a datagram that failed validation within the
        last :data:`TAINT_S`: the driver handles its datagrams
        after those of clean senders, so a flood's backlog does not delay their pings."""
        sender = self._senders.get(host)
        return sender is not None and (sender.limited or now - sender.bad_at < TAINT_S)

    def shed(self) -> None:
        """A tainted sender's datagram, read but not handled (the backlog was full)."""
        self.dropped += 1

    def outcome(self, host: str, bad: bool, now: float) -> None:
        """A datagram from ``host`` was handled; ``bad``: it failed validation."""
        sender = self._senders.get(host)
        if sender is None:
            sender = self._senders[host] = _Sender(_Bucket(self._burst, now))
            if len(self._senders) > self._max:
                self._senders.popitem(last=False)
        else:
            self._senders.move_to_end(host)
        if not bad:
            sender.good_at = now
            return
        sender.failed += 1
        sender.bad_at = now
        self._total.refill(self._total_rate, self._total_burst, now)
        self._total.tokens -= 1.0
        if not sender.limited:  # (on probation, admit() charged this datagram already)
            bucket = sender.bucket
            bucket.refill(self._rate, self._burst, now)
            bucket.tokens -= 1.0
            if bucket.tokens >= 1.0:
                return
            sender.limited = True
            self.limited += 1
        logged = self._warnings.warn(  # once per interval while it goes on
            host,
            now,
            f"datagrams from {host} keep failing validation: read at most "
            f"{self._rate:g} a second from it, the rest dropped unread",
            source=host,
            failed=sender.failed,
        )
        if logged:
            sender.failed = 0


MEMBER_EVENT_LINES = 100  # member event lines (joined, reaped, ...) logged per interval


class LineBudget:
    """At most ``max_lines`` log lines of one kind per ``interval``; then one summary line.

    For info lines that hostile input can multiply (a phantom flood made one "member joined"
    and one "member reaped" line per forged name).
    """

    def __init__(self, max_lines: int = MEMBER_EVENT_LINES, interval: float = WARN_INTERVAL_S) -> None:
        self._max, self._interval = max_lines, interval
        self._start, self._count, self._suppressed = float("-inf"), 0, 0

    def allow(self, now: float, logger: logging.Logger | logging.LoggerAdapter[Any], what: str) -> bool:
        """Whether to log one more line; at a new interval, first say how many were left out."""
        if now - self._start >= self._interval:
            if self._suppressed:
                logger.warning(
                    f"{self._suppressed} {what} lines not logged in the last "
                    f"{self._interval:g} s (more than {self._max})",
                    extra=fields(suppressed=self._suppressed),
                )
            self._start, self._count, self._suppressed = now, 0, 0
        if self._count >= self._max:
            self._suppressed += 1
            return False
        self._count += 1
        return True
