"""Broadcast queue: what to piggyback next, each update sent a bounded number of times.

memberlist's ``TransmitLimitedQueue`` (queue.go) with explicit priority classes.
Every queued update remembers how often it has been sent. ``take`` fills a
byte budget greedily in the order

    (priority ascending, transmits ascending, newest first)

so urgent classes go first, and within a class the least-spread updates go
first (the epidemic needs them most), newest breaking ties. Items that do not
fit the remaining budget are skipped, not stopped at. A taken item's count goes
up; at ``retransmit_limit`` it is retired (memberlist: RetransmitMult *
ceil(log10(N + 1)) sends reach every member with high probability).

A push with the same ``key`` as a queued item replaces it: a newer Alive for a
member makes the older Suspect pointless (memberlist's NamedBroadcast
invalidation). Beyond ``max_items`` the item that would be sent last -- lowest
class, then most transmitted, then oldest -- is dropped and counted.

A repeat of a queued update pushed with ``feedback`` heard from another member
counts as one send (``heard``; not memberlist, which counts only its own sends). The
core asks for it only for news of a start: the Alive of a member new to us and the
first value of a new member's key (core.START_NEWS_S), what a site-wide restart
floods. It is the rumour-mongering feedback of Demers et al. Early in an epidemic
repeats are rare and an update goes out the full ``retransmit_limit`` times; once
most members hold it, every member hears it back from several and stops sooner.
Without it, the updates of
a site-wide restart were still being re-sent for a second after every member
held them (issue 13). An update is still sent at least ``MIN_SENT`` times by
each member that queued it; what fewer sends leave unreached (the epidemic's
residue) the core repairs by asking (core.UNKNOWN_SENDER_GRACE) and push-pull.

Each item also remembers members known to hold it (not memberlist): the
member it is about and the one we heard it from (``push(known=...)``), any
member that sent us the same update again (``heard``), and every member we
sent it to. A ``take`` for member ``to`` skips what ``to`` holds, and an item
held by every other member (``peers``) is retired unsent: after a site-wide
restart the sends no longer go to members that told us the news themselves.

Items live in buckets keyed by (priority, transmits): a sorted list of
insertion ids plus a count of item sizes. A ``take`` sorts only the few bucket
keys, skips a bucket whose smallest item cannot fit, and scans a bucket only
until the budget is spent, so it never re-sorts the whole queue.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

from .messages import Message

PRIORITY_MEMBERSHIP = 0  # Alive / Suspect / Dead: failure detection depends on them
PRIORITY_STATE = 1  # StateUpdate: replicated per-node maps (services, address claims)
PRIORITY_USER = 2  # UserBroadcast: application payloads, first to yield
MIN_SENT = 2  # own sends before repeats heard may retire an item (see heard)
MAX_KNOWN = 128  # members remembered per item as holding it (beyond: no early retirement)


def retransmit_limit(mult: int, n: int) -> int:
    """Sends per update for ``n`` members: ``mult * ceil(log10(n + 1))`` (memberlist util.go).

    Computed exactly in integers: ceil(log10(n + 1)) is the number of decimal
    digits of ``n`` (0 for n = 0, as in memberlist).
    """
    if n < 0:
        raise ValueError("member count cannot be negative")
    return mult * (len(str(n)) if n > 0 else 0)


@dataclass(slots=True)
class _Item:
    ident: int  # insertion order: higher is newer
    msg: Message
    key: Hashable | None
    priority: int
    size: int
    transmits: int = 0  # sends plus repeats heard (heard)
    sent: int = 0  # our own sends
    feedback: bool = False  # repeats heard count as sends (heard)
    known: set[str] = field(default_factory=set)  # members known to hold it (bounded)


@dataclass(slots=True)
class _Bucket:
    """The items of one (priority, transmits) tier."""

    ids: list[int] = field(default_factory=list)  # ascending: oldest first
    sizes: dict[int, int] = field(default_factory=dict)  # size -> items of that size

    def add(self, item: _Item) -> None:
        if not self.ids or self.ids[-1] < item.ident:
            self.ids.append(item.ident)
        else:
            bisect.insort(self.ids, item.ident)
        self.sizes[item.size] = self.sizes.get(item.size, 0) + 1

    def discard_size(self, size: int) -> None:
        left = self.sizes[size] - 1
        if left:
            self.sizes[size] = left
        else:
            del self.sizes[size]


class BroadcastQueue:
    """A bounded, prioritised, transmit-limited queue of piggyback updates."""

    def __init__(self, max_items: int) -> None:
        if max_items < 1:
            raise ValueError("max_items must be at least 1")
        self.max_items = max_items
        self.dropped = 0  # items evicted because the queue was full
        self.retired_known = 0  # items retired early: every other member was known to hold them
        self.retired_heard = 0  # items retired early: sends and repeats heard reached the limit
        self._items: dict[int, _Item] = {}
        self._by_key: dict[Hashable, int] = {}
        self._buckets: dict[tuple[int, int], _Bucket] = {}
        self._next_id = 0

    def __len__(self) -> int:
        return len(self._items)

    def push(
        self,
        msg: Message,
        *,
        key: Hashable | None,
        priority: int,
        size: int,
        known: tuple[str, ...] = (),
        feedback: bool = False,
    ) -> None:
        """Queue ``msg`` (``size`` bytes on the wire), replacing any item with the same ``key``.

        ``key=None`` never supersedes anything. Lower ``priority`` is sent first
        (see the ``PRIORITY_*`` constants).
        """
        if size < 0:
            raise ValueError("size cannot be negative")
        if key is not None:
            old = self._by_key.get(key)
            if old is not None:
                self._remove(self._items[old])
            self._by_key[key] = self._next_id
        item = _Item(self._next_id, msg, key, priority, size, known=set(known[:MAX_KNOWN]), feedback=feedback)
        self._next_id += 1
        self._items[item.ident] = item
        self._file(item)
        while len(self._items) > self.max_items:
            worst = self._buckets[max(self._buckets)]
            self._remove(self._items[worst.ids[0]])
            self.dropped += 1

    def heard(self, key: Hashable, msg: Message, name: str) -> None:
        """Member ``name`` sent us ``msg``: if that is the update queued under ``key``, it holds it."""
        ident = self._by_key.get(key)
        if ident is not None:
            item = self._items[ident]
            if item.msg == msg:
                if len(item.known) < MAX_KNOWN:
                    item.known.add(name)
                if item.feedback:
                    self._unfile(item)  # a repeat heard counts as a send (see the module's doc)
                    item.transmits += 1
                    self._file(item)

    def take(
        self,
        budget_bytes: int,
        retransmit_limit: int,
        to: str | None = None,
        peers: int = 0,
        live: Callable[[str], bool] | None = None,
    ) -> list[Message]:
        """Pick messages whose sizes fit ``budget_bytes``, most valuable first, for member ``to``.

        Each picked item counts one more transmit and is retired once it has
        been sent ``retransmit_limit`` times (at least once, as in memberlist).
        An item ``to`` is known to hold is not sent to it; an item known to be
        held by ``peers`` members (all the others; ``live`` tells a current member
        from one gone since) is retired unsent.
        """
        items = self._items
        remaining = budget_bytes
        picked: list[_Item] = []
        for tier in sorted(self._buckets):
            bucket = self._buckets[tier]
            smallest = min(bucket.sizes)
            if smallest > remaining:
                continue
            ids = bucket.ids
            for index in range(len(ids) - 1, -1, -1):  # newest first
                item = items[ids[index]]
                known = item.known
                if item.transmits > item.sent and item.sent and _spent(item, retransmit_limit):
                    del ids[index]  # sent, and heard again often enough: spread
                    bucket.discard_size(item.size)
                    self._forget(item)
                    self.retired_heard += 1
                    continue
                if peers and len(known) >= peers and (live is None or sum(map(live, known)) >= peers):
                    del ids[index]  # every other member holds it: done
                    bucket.discard_size(item.size)
                    self._forget(item)
                    self.retired_known += 1
                    continue
                if to is not None and to in known:
                    continue
                if item.size <= remaining:
                    picked.append(item)
                    remaining -= item.size
                    del ids[index]  # behind the downward scan: indices stay valid
                    bucket.discard_size(item.size)
                    if remaining < smallest:
                        break
            if not ids:
                del self._buckets[tier]
        # Re-file survivors one tier up, oldest first so most land by a plain append.
        for item in sorted(picked, key=_ident):
            item.transmits += 1
            item.sent += 1
            if to is not None and len(item.known) < MAX_KNOWN:
                item.known.add(to)
            if _spent(item, retransmit_limit):
                self._forget(item)
            else:
                self._file(item)
        return [item.msg for item in picked]

    def reset(self) -> None:
        """Forget every queued item (not counted as dropped)."""
        self._items.clear()
        self._by_key.clear()
        self._buckets.clear()

    def _file(self, item: _Item) -> None:
        tier = (item.priority, item.transmits)
        bucket = self._buckets.get(tier)
        if bucket is None:
            bucket = self._buckets[tier] = _Bucket()
        bucket.add(item)

    def _unfile(self, item: _Item) -> None:
        tier = (item.priority, item.transmits)
        bucket = self._buckets[tier]
        del bucket.ids[bisect.bisect_left(bucket.ids, item.ident)]
        bucket.discard_size(item.size)
        if not bucket.ids:
            del self._buckets[tier]

    def _remove(self, item: _Item) -> None:
        self._unfile(item)
        self._forget(item)

    def _forget(self, item: _Item) -> None:
        """Drop ``item`` from the indexes other than its bucket."""
        del self._items[item.ident]
        if item.key is not None and self._by_key.get(item.key) == item.ident:
            del self._by_key[item.key]


def _spent(item: _Item, limit: int) -> bool:
    """Sends plus repeats heard reached ``limit``, and we sent it ourselves at least
    MIN_SENT times (fewer if the limit is lower; always at least once)."""
    return item.transmits >= limit and item.sent >= max(1, min(MIN_SENT, limit))


def _ident(item: _Item) -> int:
    return item.ident
