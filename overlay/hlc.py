"""Hybrid logical clock (Kulkarni, Demirbas et al., "Logical Physical Clocks", 2014).

A timestamp is ``(wall_ms, counter)``: the largest physical time (milliseconds) this
node has seen, on its own clock or in any timestamp it received, plus a counter that
orders events within one millisecond. Timestamps compare as tuples. ``tick`` stamps a
local event (here: an address claim); ``observe`` merges a timestamp seen on the
network, so a claim made after seeing another claim always carries a later timestamp,
however far the two wall clocks disagree.

Clocks far behind, and forged clocks far ahead. A node whose clock starts in 1970 (a
Raspberry Pi with no RTC, on a site with no NTP) must be pulled forward, yet one peer with
its clock in the year 3000 must not drag every node's clock there. The clock keeps an
*offset*: how far its physical clock is known to be behind, learned only from trusted
readings (:meth:`HybridClock.restore`: this node's own saved clock, the CA holder's time at
enrollment) and from corroborated jumps; ``wall = physical + offset`` is what ``tick``
stamps and what bounds ``observe``:

- a timestamp at most :data:`MAX_DRIFT_MS` ahead of ``wall`` is merged (the HLC rule);
- one further ahead is not merged ("capped", counted in ``stats``); it is remembered per
  source, and once :data:`CORROBORATING_SOURCES` distinct sources are that far ahead the
  clock jumps to the smallest of their readings (counted as a jump): one forged or broken
  clock never moves ours, any number of honest peers ahead of a 1970 clock do. Two
  sources that agree on a forgery do move it: the documented limit.

The offset moves only by those two means, never by a merged reading, so no single source
can ratchet the bound forward a day per message.

``tick`` never overflows the counter: at :data:`MAX_COUNTER` it moves to the next
millisecond, so a peer sending a huge counter cannot make our claims undecodable.

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
# Distinct sources far ahead of us that move our clock (see the module doc).
CORROBORATING_SOURCES = 2
MAX_AHEAD_SOURCES = 64  # far-ahead readings remembered; forgotten all at once when full


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

    def successor(self) -> Timestamp:
        """The smallest timestamp later than this one."""
        if self.counter + 1 < MAX_COUNTER:
            return Timestamp(self.wall_ms, self.counter + 1)
        return Timestamp(self.wall_ms + 1, 0)


ZERO = Timestamp(0, 0)


class HybridClock:
    """The per-node HLC state: the last timestamp issued or observed, and the offset."""

    __slots__ = ("_last", "_offset_ms", "_ahead", "stats")

    def __init__(self, last: Timestamp = ZERO) -> None:
        self._last = last
        self._offset_ms = 0  # how far the physical clock is known to be behind
        self._ahead: dict[str, Timestamp] = {}  # source -> latest reading beyond the bound
        self.stats = {"capped": 0, "jumps": 0}

    @property
    def last(self) -> Timestamp:
        """The latest timestamp issued or observed (persist it to stay monotonic)."""
        return self._last

    @property
    def offset_ms(self) -> int:
        """How far the physical clock is known to be behind (0 when it is not)."""
        return self._offset_ms

    def wall_ms(self, now: float) -> int:
        """Physical time ``now`` (seconds) in milliseconds, corrected by the offset."""
        return _ms(now) + self._offset_ms

    def read(self, now: float) -> Timestamp:
        """The clock's reading without issuing a timestamp: what to save."""
        return max(self._last, Timestamp(self.wall_ms(now), 0))

    def tick(self, now: float) -> Timestamp:
        """Stamp a local event at physical time ``now`` (seconds)."""
        physical = self.wall_ms(now)
        if physical > self._last.wall_ms:
            self._last = Timestamp(physical, 0)
        else:
            self._last = self._last.successor()
        return self._last

    def restore(self, trusted: Timestamp, now: float) -> None:
        """Move forward to a trusted reading (our saved clock, the issuer's time), unbounded."""
        self._last = max(self._last, trusted)
        self._offset_ms = max(self._offset_ms, trusted.wall_ms - _ms(now))

    def observe(self, remote: Timestamp, now: float, source: str = "") -> bool:
        """Merge a timestamp received from the network, from ``source`` (its sender).

        Returns False when it was not merged: too far ahead, and not (yet) corroborated.
        """
        if remote.wall_ms <= self.wall_ms(now) + MAX_DRIFT_MS:
            self._last = max(self._last, remote)
            return True
        self.stats["capped"] += 1
        ahead = self._ahead
        if source not in ahead and len(ahead) >= MAX_AHEAD_SOURCES:
            ahead.clear()
        ahead[source] = max(remote, ahead.get(source, ZERO))
        if len(ahead) < CORROBORATING_SOURCES:
            return False
        target = sorted(ahead.values(), reverse=True)[CORROBORATING_SOURCES - 1]
        self.stats["jumps"] += 1
        self.restore(target, now)
        bound = self.wall_ms(now) + MAX_DRIFT_MS
        for name, seen in list(ahead.items()):
            if seen.wall_ms <= bound:
                self._last = max(self._last, seen)
                del ahead[name]
        return remote.wall_ms <= bound


def _ms(now: float) -> int:
    return max(0, int(now * 1000))
