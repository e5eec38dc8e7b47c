"""Limits on push-pull streams against hostile or broken peers, decided without IO.

How it works. The driver asks :class:`Admission` about every accepted connection before it reads
a byte, tells it when the connection's header authenticated, and releases it at the end. The
rules, with their numbers:

- At most :data:`MAX_INBOUND_PER_SOURCE` (4) connections from one source address at once: a
  member has at most a push-pull or two in flight to one peer.
- At most :data:`MAX_INBOUND_STREAMS` (32) connections at once. When all are taken, the newcomer
  is let in and the oldest connection still waiting for its header, from the source address that
  holds the most connections, is closed. So connections held idle (a peer without the key can do
  no more) never keep a member out: filling every slot takes as many source addresses as slots,
  and each slot lasts only the header timeout. Only when every slot is an authenticated stream
  is the newcomer refused.
- Request bodies in flight across all inbound streams: :data:`INBOUND_BUDGET_FRAMES` frames'
  worth (a :class:`edgeagent.streams.Budget`); a body that does not fit is refused, the peer
  retries at its next push-pull.
- At most :data:`MAX_OUTBOUND_STREAMS` (8) push-pulls of our own in flight; more fail at once
  (the core counts a failed push-pull and retries on its own schedule).
- The frame limit, :func:`frame_limit`, from the resolved gossip config: the largest push-pull
  a cluster within this node's member and state limits can produce, capped by
  ``max_stream_bytes`` (8 MiB).

Every drop is counted by the driver (``DriverStats``, exported as
``edgeagent_packets_dropped_total{reason}``) and logged through :class:`DropLog`: one warning
per reason per :data:`DROP_LOG_INTERVAL`, with the number suppressed since the last one.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

from gossip.codec import MAX_HOST_BYTES, MAX_META_BYTES, MAX_NAME_BYTES
from gossip.config import GossipConfig
from gossip.keyring import OVERHEAD

from .logs import fields

MAX_INBOUND_STREAMS = 32  # connections served at once (memberlist serves unbounded; we do not)
MAX_INBOUND_PER_SOURCE = 4  # connections from one address at once
MAX_OUTBOUND_STREAMS = 8  # our own push-pulls in flight: a join to a few seeds plus the periodic one
INBOUND_BUDGET_FRAMES = 4  # request bodies in flight, in frame limits (32 MiB at the 8 MiB cap)
DROP_LOG_INTERVAL = 60.0  # seconds between two warnings for one drop reason

# The msgpack size of the largest member record in a push-pull (gossip.codec layout):
# [name, [host, port], incarnation, state, meta] with array, str8, uint16, uint64, bin16 headers.
MEMBER_RECORD_BYTES = 1 + (2 + MAX_NAME_BYTES) + (1 + 2 + MAX_HOST_BYTES + 3) + 9 + 1 + (3 + MAX_META_BYTES)
# One owner's map in a push-pull: [owner, [entries...]] around at most max_state_bytes of entries.
OWNER_OVERHEAD_BYTES = 1 + (2 + MAX_NAME_BYTES) + 5
# The rest of a sealed frame: version byte, the PushPull's fields and array headers, the sealing.
FRAME_OVERHEAD_BYTES = 1 + 16 + (2 + MAX_NAME_BYTES) + OVERHEAD

DESCRIPTIONS = {
    "unauthenticated": "its header did not open with our cluster keys (another cluster's key?)",
    "header_timeout": "no whole header within the header timeout (idle or slowloris)",
    "oversized": "its header names a body above the frame limit",
    "over_budget": "the bytes-in-flight budget for inbound streams is full",
    "per_source": "too many connections from this address at once",
    "inbound_limit": "every inbound slot holds an authenticated stream",
    "evicted": "an unauthenticated connection gave its slot to a newer one",
    "outbound_limit": "too many of our own push-pulls in flight",
    "failed": "a short or late body, or the connection reset",
}


def frame_limit(config: GossipConfig) -> int:
    """The largest push-pull body accepted: what ``config``'s limits allow, capped."""
    per_member = MEMBER_RECORD_BYTES + OWNER_OVERHEAD_BYTES + config.max_state_bytes
    return min(config.max_stream_bytes, FRAME_OVERHEAD_BYTES + config.max_members * per_member)


def inbound_budget(limit: int) -> int:
    """Bytes of request bodies in flight across all inbound streams, for a frame limit."""
    return INBOUND_BUDGET_FRAMES * limit


@dataclass(frozen=True, slots=True)
class Decision:
    """What :meth:`Admission.admit` decided about one connection."""

    admitted: bool
    reason: str | None = None  # why it was refused (a DESCRIPTIONS key)
    evict: int | None = None  # the connection to close to make room for it
    evict_source: str | None = None  # its source address (for the log)


class Admission:
    """Which inbound connections are served: per-source and total caps, eviction of the idle."""

    def __init__(
        self, max_total: int = MAX_INBOUND_STREAMS, max_per_source: int = MAX_INBOUND_PER_SOURCE
    ) -> None:
        self.max_total = max_total
        self.max_per_source = max_per_source
        self._conns: dict[int, tuple[str, bool]] = {}  # id -> (source, authenticated), oldest first
        self._per_source: Counter[str] = Counter()

    def __len__(self) -> int:
        return len(self._conns)

    def admit(self, conn: int, source: str) -> Decision:
        """Decide about a new connection ``conn`` from ``source``; admitted ones are recorded."""
        if self._per_source[source] >= self.max_per_source:
            return Decision(False, "per_source")
        victim, victim_source = None, None
        if len(self._conns) >= self.max_total:
            victim = self._victim()
            if victim is None:
                return Decision(False, "inbound_limit")
            victim_source = self._conns[victim][0]
            self.release(victim)
        self._conns[conn] = (source, False)
        self._per_source[source] += 1
        return Decision(True, evict=victim, evict_source=victim_source)

    def authenticated(self, conn: int) -> None:
        """``conn``'s header opened: it is a member's stream and is never evicted."""
        if conn in self._conns:
            self._conns[conn] = (self._conns[conn][0], True)

    def release(self, conn: int) -> None:
        """``conn`` ended (or was evicted); idempotent."""
        entry = self._conns.pop(conn, None)
        if entry is not None:
            self._per_source[entry[0]] -= 1
            if self._per_source[entry[0]] <= 0:
                del self._per_source[entry[0]]

    def _victim(self) -> int | None:
        """The oldest unauthenticated connection of the source holding the most connections."""
        best: tuple[int, int] | None = None  # (held by its source, conn)
        for conn, (source, authenticated) in self._conns.items():
            if authenticated:
                continue
            held = self._per_source[source]
            if best is None or held > best[0]:
                best = (held, conn)
        return None if best is None else best[1]


class DropLog:
    """Warn about dropped streams at most once per reason per ``interval`` seconds."""

    def __init__(self, logger: logging.Logger, interval: float = DROP_LOG_INTERVAL) -> None:
        self._log = logger
        self._interval = interval
        self._last: dict[str, float] = {}
        self._suppressed: Counter[str] = Counter()

    def note(self, reason: str, source: str, now: float) -> bool:
        """Record one drop; return True if it was logged (False: counted as suppressed)."""
        last = self._last.get(reason)
        if last is not None and now - last < self._interval:
            self._suppressed[reason] += 1
            return False
        self._last[reason] = now
        suppressed = self._suppressed.pop(reason, 0)
        self._log.warning(
            "dropped a push-pull stream: %s",
            DESCRIPTIONS.get(reason, reason),
            extra=fields(reason=reason, source=source, suppressed=suppressed),
        )
        return True
