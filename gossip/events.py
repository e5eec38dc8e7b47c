"""Events the core hands to its driver. Frozen, slotted value objects."""

from __future__ import annotations

from dataclasses import dataclass

from .messages import Address, MemberState, StateValue


@dataclass(frozen=True, slots=True)
class Member:
    """A snapshot of one member as this node sees it."""

    name: str
    addr: Address
    incarnation: int
    state: MemberState
    meta: bytes
    state_change: float  # `now` at the last state change, as seen locally


@dataclass(frozen=True, slots=True)
class MemberJoined:
    member: Member


@dataclass(frozen=True, slots=True)
class MemberUpdated:
    """Address or metadata changed (higher incarnation), or it came back alive."""

    member: Member


@dataclass(frozen=True, slots=True)
class MemberSuspected:
    member: Member


@dataclass(frozen=True, slots=True)
class MemberAlive:
    """A suspect refuted the suspicion (SUSPECT -> ALIVE)."""

    member: Member


@dataclass(frozen=True, slots=True)
class MemberFailed:
    """Declared DEAD."""

    member: Member


@dataclass(frozen=True, slots=True)
class MemberLeft:
    member: Member


@dataclass(frozen=True, slots=True)
class MemberReaped:
    """A dead or left member was forgotten after ``dead_member_ttl``."""

    member: Member


@dataclass(frozen=True, slots=True)
class NameConflict:
    """Another address claims our name: an Alive (or push-pull record) about us from ``addr``.

    memberlist's NotifyConflict. Emitted once per conflicting address; the core does not
    refute such an Alive (two live claimants would outbid each other for ever), so the
    application decides who gives the name up, from ``meta``.
    """

    name: str
    addr: Address
    incarnation: int
    meta: bytes


@dataclass(frozen=True, slots=True)
class StateChanged:
    """A key of ``owner``'s replicated map changed (``deleted`` for removal)."""

    owner: str
    key: str
    value: StateValue
    version: int
    deleted: bool


@dataclass(frozen=True, slots=True)
class UserMessage:
    origin: str
    payload: bytes


Event = (
    MemberJoined
    | MemberUpdated
    | MemberSuspected
    | MemberAlive
    | MemberFailed
    | MemberLeft
    | MemberReaped
    | NameConflict
    | StateChanged
    | UserMessage
)

# The events that carry a member's new state (all but MemberReaped, which removes it):
# what a feature mirroring member states (a catalog, an allocator) listens for.
MEMBER_STATE_EVENTS = (MemberJoined, MemberUpdated, MemberSuspected, MemberAlive, MemberFailed, MemberLeft)

__all__ = [
    "MEMBER_STATE_EVENTS",
    "Address",
    "Event",
    "Member",
    "MemberAlive",
    "MemberFailed",
    "MemberJoined",
    "MemberLeft",
    "MemberReaped",
    "MemberState",
    "MemberSuspected",
    "MemberUpdated",
    "NameConflict",
    "StateChanged",
    "UserMessage",
]
