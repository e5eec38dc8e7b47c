"""Lifeguard's dynamic suspicion timeout (memberlist suspicion.go).

How it works: when we suspect a member we start a timer between ``min`` and
``max``. Each *independent* confirmation (a Suspect from a sender we have not
counted yet) shortens it along a logarithmic curve, reaching ``min`` after
``k`` confirmations::

    timeout(c) = max(min, max - (max - min) * log(c + 1) / log(k + 1))

measured from the start of the suspicion. ``min`` grows with the cluster:
``suspicion_mult * max(1, log10(max(1, n))) * probe_interval``, and
``max = suspicion_max_timeout_mult * min``. With ``k < 1`` no confirmations are
expected and the timeout is ``min`` from the start (classic SWIM).

The object is pure data: the core owns the timer heap and re-arms it at
:attr:`Suspicion.deadline` whenever :meth:`Suspicion.confirm` returns True.
"""

from __future__ import annotations

import math

# memberlist floors the computed timeout to whole milliseconds.
_MS = 1000.0


def suspicion_timeout(mult: int, n: int, interval: float) -> float:
    """The minimum suspicion timeout for a cluster of ``n`` (memberlist suspicionTimeout)."""
    node_scale = max(1.0, math.log10(max(1.0, float(n))))
    # memberlist rounds the scaled interval to milliseconds as well.
    return math.floor(mult * node_scale * interval * _MS) / _MS


def remaining_suspicion_time(n: int, k: int, elapsed: float, min_timeout: float, max_timeout: float) -> float:
    """Time left after ``n`` confirmations of ``k`` expected, ``elapsed`` into the suspicion.

    May be negative (the suspicion is overdue). memberlist remainingSuspicionTime.
    """
    frac = math.log(n + 1.0) / math.log(k + 1.0)
    raw = max_timeout - frac * (max_timeout - min_timeout)
    timeout = math.floor(_MS * raw) / _MS
    if timeout < min_timeout:
        timeout = min_timeout
    return timeout - elapsed


class Suspicion:
    """One member's suspicion: who has confirmed it and when it expires."""

    __slots__ = ("k", "min_timeout", "max_timeout", "start", "n", "deadline", "rechecked", "_confirmations")

    def __init__(self, sender: str, k: int, min_timeout: float, max_timeout: float, now: float) -> None:
        self.k = k
        self.min_timeout = min_timeout
        self.max_timeout = max_timeout
        self.start = now
        self.n = 0  # independent confirmations so far
        # The sender that started the suspicion is not a confirmation.
        self._confirmations = {sender}
        self.deadline = now + (max_timeout if k >= 1 else min_timeout)
        self.rechecked = False  # the core's last direct ping before expiry was sent

    def confirm(self, sender: str, now: float) -> bool:
        """Count ``sender``'s confirmation; True if it was new (the deadline may have moved).

        Once ``k`` confirmations are in, later ones are ignored (memberlist).
        """
        if self.n >= self.k or sender in self._confirmations:
            return False
        self._confirmations.add(sender)
        self.n += 1
        remaining = remaining_suspicion_time(self.n, self.k, now - self.start, self.min_timeout, self.max_timeout)
        self.deadline = now + max(0.0, remaining)
        return True
