"""The retained message store: one message per topic, bounded, with last-writer-wins stamps.

A retained PUBLISH with a payload sets (or replaces) the topic's message; one with an empty
payload clears it (MQTT 5 section 3.3.1.3). Every value carries a ``stamp``: an opaque value
that only has to be comparable (the broker's `BrokerConfig.retain_stamp` makes one from
``now`` for local writes; the mesh layer passes its own, e.g. a hybrid-clock reading, with
`RetainedStore.merge`). A remote write applies only when its stamp is greater than the one
held, so replicas that exchange values in any order end with the same message. A clear is
kept as a tombstone (empty payload, its stamp) so a late, older set cannot bring the message
back; tombstones are bounded separately and the oldest is forgotten first.

Bounds: at most ``max_messages`` messages and ``max_bytes`` of topic + payload; a write that
would pass either is refused (the old value, if any, stays) and the caller counts it.
Matching a filter walks the store (at most ``max_messages``), only on SUBSCRIBE.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum
from typing import Any, Protocol

from overlay.mqtt.packets import NO_PROPERTIES, Properties
from overlay.mqtt.topics import filter_matches

ITEM_OVERHEAD = 64  # bytes charged per message besides topic and payload (the entry itself)


class Stamp(Protocol):
    """Anything ordered: a float, a tuple, a hybrid-clock reading."""

    def __lt__(self, other: Any, /) -> bool: ...


@dataclass(frozen=True, slots=True)
class RetainedItem:
    """A retained message, or a tombstone when ``payload`` is empty."""

    topic: str
    payload: bytes
    qos: int
    properties: Properties
    stamp: Stamp
    created: float  # `now` when stored here, for the message expiry interval

    def cost(self) -> int:
        return ITEM_OVERHEAD + len(self.topic.encode()) + len(self.payload)


class Outcome(Enum):
    SET = "set"
    CLEARED = "cleared"
    REFUSED = "refused"  # over a bound: nothing changed
    STALE = "stale"  # a remote write not newer than the value held


class RetainedStore:
    """Topic -> retained message, bounded in count and bytes, with tombstones for clears."""

    def __init__(self, max_messages: int, max_bytes: int, max_tombstones: int) -> None:
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.max_tombstones = max_tombstones
        self._items: dict[str, RetainedItem] = {}
        self._tombstones: OrderedDict[str, RetainedItem] = OrderedDict()
        self.bytes = 0
        self.version = 0  # bumped on every change of what `items` yields (digests are cached by it)

    def __len__(self) -> int:
        return len(self._items)

    def get(self, topic: str) -> RetainedItem | None:
        return self._items.get(topic)

    def put(
        self,
        topic: str,
        payload: bytes,
        qos: int,
        stamp: Stamp,
        now: float,
        properties: Properties = NO_PROPERTIES,
    ) -> Outcome:
        """A local write: always applies (the stamp is the newest), unless over a bound."""
        item = RetainedItem(topic, payload, qos, properties, stamp, now)
        return self._apply(item)

    def merge(
        self,
        topic: str,
        payload: bytes,
        qos: int,
        stamp: Stamp,
        now: float,
        properties: Properties = NO_PROPERTIES,
    ) -> Outcome:
        """A remote write: applies only when ``stamp`` is newer than the value or tombstone held."""
        held = self._items.get(topic) or self._tombstones.get(topic)
        if held is not None and not held.stamp < stamp:
            return Outcome.STALE
        return self._apply(RetainedItem(topic, payload, qos, properties, stamp, now))

    def _apply(self, item: RetainedItem) -> Outcome:
        old = self._items.get(item.topic)
        if not item.payload:
            if old is not None:
                del self._items[item.topic]
                self.bytes -= old.cost()
            self._tombstones.pop(item.topic, None)
            self._tombstones[item.topic] = item
            while len(self._tombstones) > self.max_tombstones:
                self._tombstones.popitem(last=False)
            self.version += 1
            return Outcome.CLEARED
        old_cost = old.cost() if old is not None else 0
        count = len(self._items) + (old is None)
        if count > self.max_messages or self.bytes - old_cost + item.cost() > self.max_bytes:
            return Outcome.REFUSED
        self._items[item.topic] = item
        self._tombstones.pop(item.topic, None)
        self.bytes += item.cost() - old_cost
        self.version += 1
        return Outcome.SET

    def expire(self, topic: str) -> None:
        """Drop a message whose expiry interval has passed (no tombstone: it was not cleared)."""
        old = self._items.pop(topic, None)
        if old is not None:
            self.bytes -= old.cost()
            self.version += 1

    def matching(self, topic_filter: str) -> list[RetainedItem]:
        """The messages a plain filter matches, in topic order (stable for tests)."""
        return sorted(
            (i for t, i in self._items.items() if filter_matches(topic_filter, t)),
            key=lambda i: i.topic,
        )

    def items(self) -> Iterator[RetainedItem]:
        """Every message, then every tombstone: what the mesh layer replicates."""
        yield from self._items.values()
        yield from self._tombstones.values()
