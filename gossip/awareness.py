"""Lifeguard's Local Health Multiplier (LHM): how much we distrust ourselves.

How it works (memberlist awareness.go): a small integer score in
``0 .. max_multiplier - 1``. Signs that *we* are the slow one raise it (a probe
that failed without the expected nacks from the relays, having to refute a
suspicion about ourselves); a successful probe lowers it. Timeouts we set are
stretched by ``score + 1``, so a node that is starved of CPU or network probes
more slowly and suspects others less eagerly, instead of spreading false
suspicions.
"""

from __future__ import annotations


class Awareness:
    """The health score and the timeout scaling it implies."""

    __slots__ = ("_max", "_score")

    def __init__(self, max_multiplier: int) -> None:
        if max_multiplier < 1:
            raise ValueError("max_multiplier must be >= 1")
        self._max = max_multiplier
        self._score = 0

    @property
    def score(self) -> int:
        """Current score, 0 (healthy) .. max_multiplier - 1."""
        return self._score

    def apply_delta(self, delta: int) -> None:
        """Add ``delta`` to the score, clamped to ``0 .. max_multiplier - 1``."""
        self._score = min(self._max - 1, max(0, self._score + delta))

    def scale(self, timeout: float) -> float:
        """``timeout`` stretched by the current health: ``timeout * (score + 1)``."""
        return timeout * (self._score + 1)
