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

Each owner's map is bounded twice: by ``max_bytes`` (msgpack size of its
entries, tombstones included) and by ``max_memory``, the Python objects its
entries occupy here (:func:`entry_memory`: packed bytes do not bound memory, a
1 KB entry can decode to 64 KB). Every remote map together is bounded by
``max_total_memory``. A local change over budget raises, a remote one is
rejected and counted.

Signatures: with a ``sign`` function (``signing.py`` has the scheme) every
local entry is signed when it is stamped, and the signature is stored with it
so push-pulls carry it; remote entries keep the signature they came with.
Whether a remote entry is authentic is the core's decision, made before it
reaches :meth:`StateStore.apply` / :meth:`StateStore.merge`; :meth:`StateStore.is_newer`
lets it verify only entries that would apply. A signature counts in the
entry's size.

Ranges: versions stay within ``codec.MAX_COUNTER``; stamping saturates there
(a local change then raises :class:`CounterExhausted`). A remote entry whose
version is more than ``codec.MAX_COUNTER_STEP`` above the highest we hold for
its owner (for ourselves: above our counter) is forged and refused, counted in
``out_of_range``: one record must not spend the owner's version range.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Callable, Iterable

import msgpack

from .codec import ENTRY_HASH_BYTES, MAX_COUNTER, MAX_COUNTER_STEP, OWNER_DIGEST_BYTES, value_memory
from .errors import BroadcastTooLarge, CounterExhausted
from .messages import StateEntry, StateUpdate, StateValue

# Memory of one stored entry besides its key and value: the slotted StateEntry
# (72 bytes on CPython 3.11+), its version int (32) and its slots in the map's
# three dicts (entries, sizes, memories: ~50 each with their size ints). Rounded up.
ENTRY_OVERHEAD = 256


def entry_memory(key: str, value: StateValue, sig: bytes = b"") -> int:
    """Bytes of Python objects one stored entry occupies (the memory budgets count this)."""
    signature = sys.getsizeof(sig) if sig else 0
    return ENTRY_OVERHEAD + sys.getsizeof(key) + value_memory(value) + signature


def entry_size(key: str, version: int, value: StateValue, deleted: bool, sig: bytes = b"") -> int:
    """Bytes one entry counts against its owner's budget (its msgpack size, signature included)."""
    fields: list[object] = [key, version, value, deleted]
    if sig:
        fields.append(sig)
    packed: bytes = msgpack.packb(fields, use_bin_type=True)
    return len(packed)


# sign(key, version, value, deleted) -> the owner's signature over that entry.
EntrySigner = Callable[[str, int, StateValue, bool], bytes]
def entry_hash(entry: StateEntry) -> bytes:
    """A short hash of one entry as it travels (digest push-pulls compare it)."""
    packed: bytes = msgpack.packb([entry.key, entry.version, entry.value, entry.deleted], use_bin_type=True)
    return hashlib.blake2b(packed, digest_size=ENTRY_HASH_BYTES).digest()


def _same(a: StateEntry, b: StateEntry) -> bool:
    """Equal as they travel (a tuple and a list with the same items are the same)."""
    return a.deleted == b.deleted and msgpack.packb(a.value, use_bin_type=True) == msgpack.packb(
        b.value, use_bin_type=True
    )


class _OwnerMap:
    __slots__ = ("entries", "sizes", "memories", "total", "memory", "max_version", "digest")

    def __init__(self) -> None:
        self.entries: dict[str, StateEntry] = {}
        self.sizes: dict[str, int] = {}
        self.memories: dict[str, int] = {}
        self.total = 0
        self.memory = 0
        self.max_version = 0
        self.digest: bytes | None = None  # hash of the (key, version) pairs; None: recompute

    def put(self, entry: StateEntry, size: int, memory: int) -> int:
        """Store ``entry``; return the change in memory."""
        self.total += size - self.sizes.get(entry.key, 0)
        grown = memory - self.memories.get(entry.key, 0)
        self.memory += grown
        self.entries[entry.key] = entry
        self.sizes[entry.key] = size
        self.memories[entry.key] = memory
        self.digest = None
        if entry.version > self.max_version:
            self.max_version = entry.version
        return grown


class StateStore:
    """Every owner's map as known here, the local owner's included."""

    __slots__ = (
        "_local", "_max_bytes", "_max_memory", "_max_total_memory", "_maps", "_version",
        "_sign", "remote_memory", "rejected", "out_of_range",
    )

    def __init__(
        self,
        local_owner: str,
        max_bytes: int,
        version: int = 0,
        *,
        max_memory: int = 64 * 1024,
        max_total_memory: int = 32 * 1024 * 1024,
        sign: EntrySigner | None = None,
    ) -> None:
        self._local = local_owner
        self._sign = sign
        self._max_bytes = max_bytes
        self._max_memory = max_memory
        self._max_total_memory = max_total_memory
        self._maps: dict[str, _OwnerMap] = {local_owner: _OwnerMap()}
        self._version = min(version, MAX_COUNTER)
        self.remote_memory = 0  # entry_memory of every remote map together
        self.rejected = 0  # remote entries or maps refused for being over budget
        self.out_of_range = 0  # remote entries refused for a forged version jump

    @property
    def version(self) -> int:
        """The local owner's Lamport counter (the version of its latest change)."""
        return self._version

    # --- local changes ---------------------------------------------------------

    def set_local(self, key: str, value: StateValue) -> StateUpdate:
        """Set a local key; raise :class:`BroadcastTooLarge` if the map would exceed the budget."""
        return self._stamp(key, value, deleted=False)

    def unchanged(self, key: str, value: StateValue) -> bool:
        """Whether our live ``key`` already holds ``value`` as it travels (setting it is a no-op)."""
        current = self._maps[self._local].entries.get(key)
        return current is not None and not current.deleted and _same(current, StateEntry(key, 0, value))

    def local_update(self, key: str) -> StateUpdate | None:
        """Our current entry for ``key`` as an update (same version), or None."""
        current = self._maps[self._local].entries.get(key)
        if current is None:
            return None
        return StateUpdate(self._local, current.version, key, current.value, current.deleted, current.sig)

    def delete_local(self, key: str) -> StateUpdate | None:
        """Delete a local key (tombstone); None if there was nothing to delete."""
        current = self._maps[self._local].entries.get(key)
        if current is None or current.deleted:
            return None
        return self._stamp(key, None, deleted=True)

    def _stamp(self, key: str, value: StateValue, deleted: bool, force: bool = False) -> StateUpdate:
        if self._version >= MAX_COUNTER:
            raise CounterExhausted("state version at its maximum")
        version = self._version + 1
        sig = self._sign(key, version, value, deleted) if self._sign is not None else b""
        size = entry_size(key, version, value, deleted, sig)
        memory = entry_memory(key, value, sig)
        own = self._maps[self._local]
        if not force:
            if own.total - own.sizes.get(key, 0) + size > self._max_bytes:
                raise BroadcastTooLarge(f"replicated state would exceed {self._max_bytes} bytes")
            if own.memory - own.memories.get(key, 0) + memory > self._max_memory:
                raise BroadcastTooLarge(f"replicated state would exceed {self._max_memory} bytes of memory")
        self._version = version
        own.put(StateEntry(key, version, value, deleted, sig), size, memory)
        return StateUpdate(self._local, version, key, value, deleted, sig)

    def reconcile_own(self, remote: Iterable[StateEntry]) -> list[StateUpdate]:
        """Entries about *us* seen in the cluster; return the updates that correct them.

        A version above our counter means we restarted: jump the counter past
        it and re-stamp our whole map. Any other entry that disagrees with
        ours (a key we no longer have, or an older life's value) is re-stamped
        too, as a tombstone if we do not have the key. Entries equal to ours,
        or older than ours, need nothing. An entry more than MAX_COUNTER_STEP
        above our counter is forged and ignored (counted). Never raises: it
        runs on network input.
        """
        try:
            return self._reconcile(list(remote))
        except CounterExhausted:
            self.rejected += 1  # unreachable without ~2**31 forged jumps; refuse, stay up
            return []

    def _reconcile(self, remote: list[StateEntry]) -> list[StateUpdate]:
        plausible = [e for e in remote if e.version - self._version <= MAX_COUNTER_STEP]
        self.out_of_range += len(remote) - len(plausible)
        remote = plausible
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
        entry = StateEntry(update.key, update.version, update.value, update.deleted, update.sig)
        return self._apply(update.owner, entry)

    def is_newer(self, owner: str, key: str, version: int) -> bool:
        """Whether a remote entry at ``version`` is newer than the one held (it may then apply)."""
        if owner == self._local:
            return False
        current = self.get(owner, key)
        return current is None or current.version < version

    def merge(self, owner: str, entries: Iterable[StateEntry]) -> list[StateEntry]:
        """Merge a remote owner's whole map (push-pull); return the entries that applied.

        A map whose total size is over budget is rejected whole (counted).
        """
        entries = list(entries)
        total = 0
        for e in entries:
            total += entry_size(e.key, e.version, e.value, e.deleted, e.sig)
            if total > self._max_bytes:
                self.rejected += 1
                return []
        return [e for e in entries if self._apply(owner, e)]

    def _apply(self, owner: str, entry: StateEntry) -> bool:
        if owner == self._local:
            return False
        owned = self._maps.get(owner)
        current = owned.entries.get(entry.key) if owned is not None else None
        if current is not None and current.version >= entry.version:
            return False
        if entry.version - (owned.max_version if owned is not None else 0) > MAX_COUNTER_STEP:
            self.out_of_range += 1
            return False
        size = entry_size(entry.key, entry.version, entry.value, entry.deleted, entry.sig)
        memory = entry_memory(entry.key, entry.value, entry.sig)
        if owned is None:
            old_size = old_memory = total = held = 0
        else:
            old_size, old_memory = owned.sizes.get(entry.key, 0), owned.memories.get(entry.key, 0)
            total, held = owned.total, owned.memory
        if (
            total - old_size + size > self._max_bytes
            or held - old_memory + memory > self._max_memory
            or self.remote_memory - old_memory + memory > self._max_total_memory
        ):
            self.rejected += 1
            return False
        if owned is None:
            owned = self._maps[owner] = _OwnerMap()
        self.remote_memory += owned.put(entry, size, memory)
        return True

    # --- reading ---------------------------------------------------------------

    def values(self, owner: str) -> dict[str, StateValue]:
        """``owner``'s live keys and values (tombstones left out)."""
        owned = self._maps.get(owner)
        if owned is None:
            return {}
        return {k: e.value for k, e in owned.entries.items() if not e.deleted}

    def get(self, owner: str, key: str) -> StateEntry | None:
        """``owner``'s entry for ``key`` (a tombstone included), or None."""
        owned = self._maps.get(owner)
        return owned.entries.get(key) if owned is not None else None

    def entries(self, owner: str) -> tuple[StateEntry, ...]:
        """``owner``'s entries, tombstones included."""
        owned = self._maps.get(owner)
        return tuple(owned.entries.values()) if owned is not None else ()

    def max_version(self, owner: str) -> int:
        """Highest version known for ``owner`` (0 if none)."""
        owned = self._maps.get(owner)
        return owned.max_version if owned is not None else 0

    def owners(self) -> list[str]:
        """Every owner with a non-empty map."""
        return [owner for owner, m in self._maps.items() if m.entries]

    def digest(self, owner: str) -> bytes:
        """A hash over ``owner``'s entries (digest push-pulls compare it); cached until a change."""
        owned = self._maps.get(owner)
        if owned is None:
            return bytes(OWNER_DIGEST_BYTES)
        if owned.digest is None:
            h = hashlib.blake2b(digest_size=OWNER_DIGEST_BYTES)
            for key in sorted(owned.entries):
                h.update(entry_hash(owned.entries[key]))
            owned.digest = h.digest()
        return owned.digest

    def held(self, owner: str) -> tuple[tuple[str, int, bytes], ...]:
        """``owner``'s entries as (key, version, entry_hash), for a digest push-pull's Want."""
        owned = self._maps.get(owner)
        if owned is None:
            return ()
        return tuple((e.key, e.version, entry_hash(e)) for e in owned.entries.values())

    def newer_than(self, owner: str, version: int) -> tuple[StateEntry, ...]:
        """``owner``'s entries above ``version``."""
        owned = self._maps.get(owner)
        if owned is None or owned.max_version <= version:
            return ()
        return tuple(e for e in owned.entries.values() if e.version > version)

    def missing_from(self, owner: str, held: Iterable[tuple[str, int, bytes]]) -> tuple[StateEntry, ...]:
        """``owner``'s entries a peer holding ``held`` lacks: newer, or as new but different.

        An entry as new but different matters to the owner only (an earlier
        life's value at the same version: ``reconcile_own`` re-stamps it).
        """
        owned = self._maps.get(owner)
        if owned is None:
            return ()
        have = {key: (version, h) for key, version, h in held}
        out: list[StateEntry] = []
        for e in owned.entries.values():
            theirs = have.get(e.key)
            if theirs is None or theirs[0] < e.version or (theirs[0] == e.version and theirs[1] != entry_hash(e)):
                out.append(e)
        return tuple(out)

    def snapshot(self) -> tuple[tuple[str, tuple[StateEntry, ...]], ...]:
        """Every non-empty map, for a push-pull."""
        return tuple((owner, tuple(m.entries.values())) for owner, m in self._maps.items() if m.entries)

    def forget(self, owner: str) -> None:
        """Drop a (reaped) owner's map."""
        if owner != self._local:
            owned = self._maps.pop(owner, None)
            if owned is not None:
                self.remote_memory -= owned.memory
