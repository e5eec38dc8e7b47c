"""The SWIM / Lifeguard messages, as frozen value objects.

One class per wire message. ``codec.py`` turns a list of these into one
datagram (a "compound" packet: the primary message plus piggybacked
broadcasts) or one stream frame, and back.

Names and fields follow memberlist (net.go) where it has an equivalent:

- ``Ping`` / ``Ack`` / ``Nack`` / ``PingReq`` : failure detection (SWIM 4.1-4.3,
  Lifeguard nack).
- ``Alive`` / ``Suspect`` / ``Dead``: membership updates, disseminated by
  piggybacking. A ``Dead`` whose ``sender`` is the member itself means a
  graceful leave (memberlist's convention); receivers record LEFT.
- ``StateUpdate``: one key of a node's replicated key/value map.
- ``UserBroadcast``: an application payload spread to every member once.
- ``PushPull``: anti-entropy exchange, carried on a stream: full state, or a
  digest (``Summary``) first and then only what the other side lacks
  (``Want`` asks for it); ``gossip/digest.py`` has the rules.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

Address = tuple[str, int]

# Values allowed in replicated state: what msgpack carries, bounded by the codec.
StateValue = None | bool | int | float | str | bytes | list["StateValue"] | dict[str, "StateValue"]


class MemberState(IntEnum):
    """Membership states. Order matters only for display."""

    ALIVE = 0
    SUSPECT = 1
    DEAD = 2
    LEFT = 3


@dataclass(frozen=True, slots=True)
class Ping:
    seq: int
    target: str  # name the sender expects to answer; a mismatch is ignored (memberlist)
    source: str
    source_addr: Address


@dataclass(frozen=True, slots=True)
class Ack:
    seq: int
    source: str


@dataclass(frozen=True, slots=True)
class Nack:
    """Lifeguard: a relay tells the origin it got no ack from the target in time."""

    seq: int
    source: str


@dataclass(frozen=True, slots=True)
class PingReq:
    seq: int
    target: str
    target_addr: Address
    source: str
    source_addr: Address
    nack: bool  # the origin wants a Nack if the target does not answer


@dataclass(frozen=True, slots=True)
class Alive:
    """``sig``: the member's signature over ``signing.canonical_alive`` (empty when the
    cluster does not sign)."""

    name: str
    incarnation: int
    addr: Address
    meta: bytes
    sig: bytes = b""


@dataclass(frozen=True, slots=True)
class Suspect:
    name: str
    incarnation: int
    sender: str  # who suspects (independent confirmations count distinct senders)


@dataclass(frozen=True, slots=True)
class Dead:
    name: str
    incarnation: int
    sender: str  # == name for a graceful leave


@dataclass(frozen=True, slots=True)
class StateUpdate:
    """One key of ``owner``'s replicated map at ``version`` (per-owner Lamport counter).

    ``deleted`` marks a tombstone; ``value`` is then None. ``sig`` is the owner's
    signature over ``signing.canonical_entry`` (empty when the cluster does not sign).
    """

    owner: str
    version: int
    key: str
    value: StateValue
    deleted: bool = False
    sig: bytes = b""


@dataclass(frozen=True, slots=True)
class UserBroadcast:
    origin: str
    seq: int  # per-origin counter; (origin, seq) deduplicates
    payload: bytes


@dataclass(frozen=True, slots=True)
class MemberRecord:
    """One member as carried in a push-pull (``sig``: the member's Alive signature, see Alive)."""

    name: str
    addr: Address
    incarnation: int
    state: MemberState
    meta: bytes
    sig: bytes = b""


@dataclass(frozen=True, slots=True)
class StateEntry:
    """One key of a node's replicated map as carried in a push-pull (``sig``: see StateUpdate)."""

    key: str
    version: int
    value: StateValue
    deleted: bool = False
    sig: bytes = b""


@dataclass(frozen=True, slots=True)
class MemberSummary:
    """One member as a digest push-pull lists it: enough to tell who is behind."""

    name: str
    incarnation: int
    state: MemberState


@dataclass(frozen=True, slots=True)
class OwnerSummary:
    """One replicated map as a digest push-pull lists it.

    ``digest`` is ``digest.OWNER_DIGEST_BYTES`` of a hash over the map's
    (key, version) pairs, so a map with the same top version but a gap differs.
    """

    owner: str
    max_version: int
    digest: bytes


@dataclass(frozen=True, slots=True)
class Summary:
    """What one side holds: two hashes, and the lists behind them when asked for.

    ``members`` / ``owners`` are None when only the hash travels.
    """

    members_hash: bytes
    states_hash: bytes
    members: tuple[MemberSummary, ...] | None = None
    owners: tuple[OwnerSummary, ...] | None = None


@dataclass(frozen=True, slots=True)
class Want:
    """What one side asks the other for: member records by name, and per owner the
    (key, version, entry hash) it holds: send every entry newer, as new but
    different, or of a key not listed."""

    members: tuple[str, ...] = ()
    owners: tuple[tuple[str, tuple[tuple[str, int, bytes], ...]], ...] = ()


@dataclass(frozen=True, slots=True)
class PushPull:
    """Anti-entropy: member records and replicated maps, whole or only what the peer lacks.

    ``join`` is set on the request a joining node sends; ``reply`` on the answer.
    With ``summary`` and ``want`` both None it is a full-state exchange
    (memberlist); otherwise a digest exchange (``gossip/digest.py``).

    ``epoch`` is the source's boot epoch: streams are fresh (the daemon's challenge), so the
    receiver takes it as the source's current one (``replay.ReplayGuard.sync``).
    """

    source: str
    join: bool
    reply: bool
    members: tuple[MemberRecord, ...]
    states: tuple[tuple[str, tuple[StateEntry, ...]], ...]  # (owner, entries)
    summary: Summary | None = None
    want: Want | None = None
    epoch: int = 0


Message = Ping | Ack | Nack | PingReq | Alive | Suspect | Dead | StateUpdate | UserBroadcast | PushPull
