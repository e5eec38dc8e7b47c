"""Digest push-pull: compare summaries first, then send only what the other side lacks.

A full-state push-pull (memberlist) carries every member record and every
replicated map both ways, every interval, although two members of a settled
cluster hold the same thing. A digest exchange sends two hashes instead, and
the records and entries behind them only where the hashes differ. At most two
request/reply pairs (two connections), A starting, B answering::

    periodic  A -> B   Summary: the members hash and the states hash, no lists
              B -> A   hashes equal: an empty reply. Else B's lists for the part
                       that differs (members: name, incarnation, state; owners:
                       top version and a hash of the map)
              A -> B   only if lists came: what B lacks by them, and a Want of
                       what A lacks (member names; per owner A's (key, version,
                       entry hash) list)
              B -> A   what A wanted
    join      A -> B   A's record and map, and A's Summary with lists (small: a
                       joiner knows little)
              B -> A   what A lacks by A's lists, and a Want of what B lacks
              A -> B   only if B wanted something: that, and an empty Want
              B -> A   (empty)

Which side lacks what is decided by the same rules the merge applies
(``members.can_change``; state: a newer version, or for the owner itself the
same version with another value, see ``StateStore.missing_from``), so what is
sent is what the receiver would take. A gap (an entry below the owner's top
version missed) makes the map hashes differ although the top versions agree:
the Want's key list finds it. Everything here is pure: it reads the table and
the store, the core sends.
"""

from __future__ import annotations

import hashlib
from collections.abc import Container, Iterable

import msgpack

from .codec import HASH_BYTES
from .members import MemberTable, Node, can_change
from .messages import MemberSummary, OwnerSummary, StateEntry, Summary
from .state_store import StateStore

States = list[tuple[str, tuple[StateEntry, ...]]]


def member_summaries(table: MemberTable) -> tuple[MemberSummary, ...]:
    """Every member we hold (us included) as (name, incarnation, state), by name."""
    nodes = sorted(table.by_name.values(), key=lambda n: n.name)
    return tuple(MemberSummary(n.name, n.incarnation, n.state) for n in nodes)


def owner_summaries(store: StateStore) -> tuple[OwnerSummary, ...]:
    """Every non-empty map as (owner, top version, map hash), by owner."""
    return tuple(OwnerSummary(o, store.max_version(o), store.digest(o)) for o in sorted(store.owners()))


def _hash(items: Iterable[tuple[object, ...]]) -> bytes:
    packed: bytes = msgpack.packb([list(i) for i in items], use_bin_type=True)
    return hashlib.blake2b(packed, digest_size=HASH_BYTES).digest()


def summary(table: MemberTable, store: StateStore, with_members: bool, with_owners: bool) -> Summary:
    """Our Summary: both hashes, and the lists asked for."""
    members = member_summaries(table)
    owners = owner_summaries(store)
    return Summary(
        _hash((m.name, m.incarnation, int(m.state)) for m in members),
        _hash((o.owner, o.max_version, o.digest) for o in owners),
        members if with_members else None,
        owners if with_owners else None,
    )


def records_lacking(table: MemberTable, peer: Iterable[MemberSummary]) -> list[Node]:
    """Members whose record we hold would change the peer's (or it has none)."""
    theirs = {m.name: m for m in peer}
    out: list[Node] = []
    for node in table.by_name.values():
        m = theirs.get(node.name)
        if m is None or can_change(m.state, m.incarnation, node.state, node.incarnation):
            out.append(node)
    return out


def members_wanted(table: MemberTable, peer: Iterable[MemberSummary], skip: Container[str]) -> tuple[str, ...]:
    """Names whose record the peer holds would change ours (or we have none); ``skip`` never."""
    out: list[str] = []
    me = table.me.name
    for m in peer:
        if m.name == me or m.name in skip:
            continue
        node = table.by_name.get(m.name)
        if node is None or can_change(node.state, node.incarnation, m.state, m.incarnation):
            out.append(m.name)
    return tuple(out)


def entries_lacking(store: StateStore, peer: Iterable[OwnerSummary], peer_name: str) -> States:
    """Per owner, our entries above the peer's top version (its whole map if it has none).

    The peer's own map, when it differs and we are not behind on it, goes whole:
    the peer restarted, and ``reconcile_own`` there must see every key of its
    earlier life (to tombstone those it no longer has), not only the newest.
    """
    theirs = {o.owner: o for o in peer}
    out: States = []
    for owner in store.owners():
        o = theirs.get(owner)
        if o is None:
            entries = store.entries(owner)
        elif o.max_version == store.max_version(owner) and o.digest == store.digest(owner):
            continue
        elif owner == peer_name and store.max_version(owner) >= o.max_version:
            entries = store.entries(owner)
        else:
            entries = store.newer_than(owner, o.max_version)
        if entries:
            out.append((owner, entries))
    return out


def owners_wanted(
    store: StateStore, peer: Iterable[OwnerSummary], local: str
) -> tuple[tuple[str, tuple[tuple[str, int, bytes], ...]], ...]:
    """Owners the peer may hold more of than we do, with what we hold of each.

    Wanted: a higher top version, or the same top version with another hash (a
    gap on one side). Our own map whenever it differs: the peer may hold an
    earlier life's entries, which ``reconcile_own`` must see.
    """
    out: list[tuple[str, tuple[tuple[str, int, bytes], ...]]] = []
    for o in peer:
        mine = store.max_version(o.owner)
        differs = o.digest != store.digest(o.owner)
        if o.max_version > mine or (differs and (o.max_version == mine or o.owner == local)):
            out.append((o.owner, store.held(o.owner)))
    return tuple(out)


def entries_wanted(store: StateStore, owners: Iterable[tuple[str, Iterable[tuple[str, int, bytes]]]]) -> States:
    """For a peer's Want: per owner, the entries it lacks."""
    out: States = []
    for owner, held in owners:
        entries = store.missing_from(owner, held)
        if entries:
            out.append((owner, entries))
    return out
