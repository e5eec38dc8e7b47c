"""Replicated per-node key/value maps, versioned per owner.

How it works: every node owns one small map. Each change the owner makes bumps
its own Lamport counter and is stamped with it, so an entry is
``(key, version, value, deleted)``. Everyone else keeps, per owner and per key,
the entry with the highest version; deletions are tombstones (kept, so an old
value carried by a stale push-pull cannot come back). Gossip carries single
entries (``StateUpdate``); push-pull carries whole maps (``StateEntry`` lists);
both merge with the same newest-version-wins rule, so the maps converge
whatever the order of arrival.

Restart: an owner that restarts may come back with a counter below what the
cluster remembers. When it sees an entry about itself with a version above its
counter, it jumps the counter past it and re-asserts its current map (each key
re-stamped, tombstones for keys it no longer has) so its present view wins.

Each owner's map is bounded by ``max_bytes`` (msgpack size of its entries,
tombstones included); a local change over budget raises, a remote one is
rejected and counted.
"""

from __future__ import annotations

from collections.abc import Iterable

import msgpack

from .errors import BroadcastTooLarge
from .messages import StateEntry, StateUpdate, StateValue


def entry_size(key: str, version: int, value: StateValue, deleted: bool) -> int:
    """Bytes one entry counts against its owner's budget (its msgpack size)."""
    packed: bytes = msgpack.packb([key, version, value, deleted], use_bin_type=True)
    return len(packed)


def _same(a: StateEntry, b: StateEntry) -> bool:
    """Equal as they travel (a tuple and a list with the same items are the same)."""
    return a.deleted == b.deleted and msgpack.packb(a.value, use_bin_type=True) == msgpack.packb(
        b.value, use_bin_type=True
    )


class _OwnerMap:
    __slots__ = ("entries", "sizes", "total", "max_version")

    def __init__(self) -> None:
        self.entries: dict[str, StateEntry] = {}
        self.sizes: dict[str, int] = {}
        self.total = 0
        self.max_version = 0

    def put(self, entry: StateEntry, size: int) -> None:
        self.total += size - self.sizes.get(entry.key, 0)
        self.entries[entry.key] = entry
        self.sizes[entry.key] = size
        if entry.version > self.max_version:
            self.max_version = entry.version


class StateStore:
    """Every owner's map as known here, the local owner's included."""

    __slots__ = ("_local", "_max_bytes", "_maps", "_version", "rejected")

    def __init__(self, local_owner: str, max_bytes: int, version: int = 0) -> None:
        self._local = local_owner
        self._max_bytes = max_bytes
        self._maps: dict[str, _OwnerMap] = {local_owner: _OwnerMap()}
        self._version = version
        self.rejected = 0  # remote entries or maps refused for being over budget

    @property
    def version(self) -> int:
        """The local owner's Lamport counter (the version of its latest change)."""
        return self._version

    # --- local changes ---------------------------------------------------------

    def set_local(self, key: str, value: StateValue) -> StateUpdate:
        """Set a local key; raise :class:`BroadcastTooLarge` if the map would exceed the budget."""
        return self._stamp(key, value, deleted=False)

    def delete_local(self, key: str) -> StateUpdate | None:
        """Delete a local key (tombstone); None if there was nothing to delete."""
        current = self._maps[self._local].entries.get(key)
        if current is None or current.deleted:
            return None
        return self._stamp(key, None, deleted=True)

    def _stamp(self, key: str, value: StateValue, deleted: bool, force: bool = False) -> StateUpdate:
        version = self._version + 1
        size = entry_size(key, version, value, deleted)
        own = self._maps[self._local]
        if not force and own.total - own.sizes.get(key, 0) + size > self._max_bytes:
            raise BroadcastTooLarge(f"replicated state would exceed {self._max_bytes} bytes")
        self._version = version
        own.put(StateEntry(key, version, value, deleted), size)
        return StateUpdate(self._local, version, key, value, deleted)

    def reconcile_own(self, remote: Iterable[StateEntry]) -> list[StateUpdate]:
        """Entries about *us* seen in the cluster; return the updates that correct them.

        A version above our counter means we restarted: jump the counter past
        it and re-stamp our whole map. Any other entry that disagrees with
        ours (a key we no longer have, or an older life's value) is re-stamped
        too, as a tombstone if we do not have the key. Entries equal to ours,
        or older than ours, need nothing. Never raises: it runs on network input.
        """
        remote = list(remote)
        own = self._maps[self._local]
        updates: list[StateUpdate] = []
        done: set[str] = set()
        top = max((e.version for e in remote), default=0)
        if top > self._version:
            self._version = top
            # Re-stamping can only grow an entry by a few version bytes: allowed.
            for mine in list(own.entries.values()):
                updates.append(self._stamp(mine.key, mine.value, mine.deleted, force=True))
                done.add(mine.key)
        for entry in remote:
            if entry.key in done:
                continue
            done.add(entry.key)
            current = own.entries.get(entry.key)
            if current is None:
                if entry.deleted:
                    continue
                try:
                    updates.append(self._stamp(entry.key, None, deleted=True))
                except BroadcastTooLarge:
                    self.rejected += 1
            elif current.version < entry.version or (
                current.version == entry.version and not _same(current, entry)
            ):
                updates.append(self._stamp(current.key, current.value, current.deleted, force=True))
        return updates

    # --- remote changes --------------------------------------------------------

    def apply(self, update: StateUpdate) -> bool:
        """Merge one remote entry; True if it was newer and now applies."""
        return self._apply(update.owner, StateEntry(update.key, update.version, update.value, update.deleted))

    def merge(self, owner: str, entries: Iterable[StateEntry]) -> list[StateEntry]:
        """Merge a remote owner's whole map (push-pull); return the entries that applied.

        A map whose total size is over budget is rejected whole (counted).
        """
        sized = [(e, entry_size(e.key, e.version, e.value, e.deleted)) for e in entries]
        if sum(size for _, size in sized) > self._max_bytes:
            self.rejected += 1
            return []
        return [e for e, size in sized if self._apply(owner, e, size)]

    def _apply(self, owner: str, entry: StateEntry, size: int | None = None) -> bool:
        if owner == self._local:
            return False
        owned = self._maps.get(owner)
        if owned is None:
            owned = self._maps[owner] = _OwnerMap()
        current = owned.entries.get(entry.key)
        if current is not None and current.version >= entry.version:
            return False
        if size is None:
            size = entry_size(entry.key, entry.version, entry.value, entry.deleted)
        if owned.total - owned.sizes.get(entry.key, 0) + size > self._max_bytes:
            self.rejected += 1
            return False
        owned.put(entry, size)
        return True

    # --- reading ---------------------------------------------------------------

    def values(self, owner: str) -> dict[str, StateValue]:
        """``owner``'s live keys and values (tombstones left out)."""
        owned = self._maps.get(owner)
        if owned is None:
            return {}
        return {k: e.value for k, e in owned.entries.items() if not e.deleted}

    def entries(self, owner: str) -> tuple[StateEntry, ...]:
        """``owner``'s entries, tombstones included."""
        owned = self._maps.get(owner)
        return tuple(owned.entries.values()) if owned is not None else ()

    def max_version(self, owner: str) -> int:
        """Highest version known for ``owner`` (0 if none)."""
        owned = self._maps.get(owner)
        return owned.max_version if owned is not None else 0

    def snapshot(self) -> tuple[tuple[str, tuple[StateEntry, ...]], ...]:
        """Every non-empty map, for a push-pull."""
        return tuple((owner, tuple(m.entries.values())) for owner, m in self._maps.items() if m.entries)

    def forget(self, owner: str) -> None:
        """Drop a (reaped) owner's map."""
        if owner != self._local:
            self._maps.pop(owner, None)
