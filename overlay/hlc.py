"""Hybrid logical clock (Kulkarni, Demirbas et al., "Logical Physical Clocks", 2014).

A timestamp is ``(wall_ms, counter)``: the largest physical time (milliseconds) this
node has seen, on its own clock or in any timestamp it received, plus a counter that
orders events within one millisecond. Timestamps compare as tuples. ``tick`` stamps a
local event (here: an address claim); ``observe`` merges a timestamp seen on the
network, so a claim made after seeing another claim always carries a later timestamp,
however far the two wall clocks disagree. A node whose clock starts in 1970 (a
Raspberry Pi with no RTC before NTP) is pulled forward by the first claim it sees.

Sans-IO: physical time comes in as ``now`` (seconds); nothing reads a clock.
"""

from __future__ import annotations

from dataclasses import dataclass

# Counter bound: if a hostile peer sends an enormous counter we refuse it rather than
# carry it forever (the paper bounds the counter by the number of messages per ms).
MAX_COUNTER = 1 << 31
# Wall time bound: a timestamp more than this far ahead of our own clock is refused,
# so one peer with a clock set to the year 3000 cannot drag every claim forward
# (the paper's "epsilon" drift bound; a day covers any sane NTP error).
MAX_DRIFT_MS = 24 * 3600 * 1000


@dataclass(frozen=True, slots=True, order=True)
class Timestamp:
    """One HLC timestamp; compares by ``(wall_ms, counter)``."""

    wall_ms: int
    counter: int

    def to_value(self) -> list[int]:
        """The msgpack-able form carried in a claim."""
        return [self.wall_ms, self.counter]

    @classmethod
    def from_value(cls, value: object) -> Timestamp:
        """Parse :meth:`to_value`'s form; raises ValueError if it is not two small ints."""
        if (
            not isinstance(value, list | tuple)
            or len(value) != 2
            or not all(type(v) is int for v in value)
        ):
            raise ValueError("timestamp must be [wall_ms, counter]")
        wall_ms, counter = value
        if wall_ms < 0 or not 0 <= counter < MAX_COUNTER:
            raise ValueError("timestamp out of range")
        return cls(wall_ms, counter)


ZERO = Timestamp(0, 0)


class HybridClock:
    """The per-node HLC state: the last timestamp issued or observed."""

    __slots__ = ("_last",)

    def __init__(self, last: Timestamp = ZERO) -> None:
        self._last = last

    @property
    def last(self) -> Timestamp:
        """The latest timestamp issued or observed (persist it to stay monotonic)."""
        return self._last

    def tick(self, now: float) -> Timestamp:
        """Stamp a local event at physical time ``now`` (seconds)."""
        physical = _ms(now)
        if physical > self._last.wall_ms:
            self._last = Timestamp(physical, 0)
        else:
            self._last = Timestamp(self._last.wall_ms, self._last.counter + 1)
        return self._last

    def observe(self, remote: Timestamp, now: float) -> bool:
        """Merge a timestamp received from the network.

        Returns False (and ignores it) when it is implausibly far ahead of ``now``.
        """
        physical = _ms(now)
        if remote.wall_ms > physical + MAX_DRIFT_MS:
            return False
        if remote > self._last:
            self._last = remote
        return True


def _ms(now: float) -> int:
    return max(0, int(now * 1000))
