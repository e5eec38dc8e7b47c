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
- ``PushPull``: full-state anti-entropy exchange, carried on a stream.
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
    name: str
    incarnation: int
    addr: Address
    meta: bytes


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

    ``deleted`` marks a tombstone; ``value`` is then None.
    """

    owner: str
    version: int
    key: str
    value: StateValue
    deleted: bool = False


@dataclass(frozen=True, slots=True)
class UserBroadcast:
    origin: str
    seq: int  # per-origin counter; (origin, seq) deduplicates
    payload: bytes


@dataclass(frozen=True, slots=True)
class MemberRecord:
    """One member as carried in a push-pull."""

    name: str
    addr: Address
    incarnation: int
    state: MemberState
    meta: bytes


@dataclass(frozen=True, slots=True)
class StateEntry:
    """One key of a node's replicated map as carried in a push-pull."""

    key: str
    version: int
    value: StateValue
    deleted: bool = False


@dataclass(frozen=True, slots=True)
class PushPull:
    """Full state: every member we know and every replicated map we hold.

    ``join`` is set on the request a joining node sends; ``reply`` on the answer.
    ``epoch`` is the source's boot epoch: streams are fresh (the daemon's challenge), so the
    receiver takes it as the source's current one (``replay.ReplayGuard.sync``).
    """

    source: str
    join: bool
    reply: bool
    members: tuple[MemberRecord, ...]
    states: tuple[tuple[str, tuple[StateEntry, ...]], ...]  # (owner, entries)
    epoch: int = 0


Message = Ping | Ack | Nack | PingReq | Alive | Suspect | Dead | StateUpdate | UserBroadcast | PushPull
