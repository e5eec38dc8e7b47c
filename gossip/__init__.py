"""gossip: SWIM + Lifeguard membership and replicated per-node state, sans-IO.

Imports nothing from ``overlay`` or ``edgeagent``; no asyncio, sockets, threads,
clocks or global randomness inside. The entry point is :class:`Membership`.
"""

from .config import GossipConfig, lan, local, preset, wan
from .core import InvalidArgument, Membership
from .errors import (
    BroadcastTooLarge,
    CounterExhausted,
    DecodeError,
    DecryptError,
    GossipError,
    KeyringError,
    LocalError,
    RemoteError,
)
from .events import (
    Event,
    Member,
    MemberAlive,
    MemberFailed,
    MemberJoined,
    MemberLeft,
    MemberReaped,
    MemberSuspected,
    MemberUpdated,
    StateChanged,
    UserMessage,
)
from .keyring import Keyring
from .messages import Address, MemberState, StateValue
from .stats import Stats

__all__ = [
    "Address",
    "BroadcastTooLarge",
    "CounterExhausted",
    "DecodeError",
    "DecryptError",
    "Event",
    "GossipConfig",
    "GossipError",
    "InvalidArgument",
    "Keyring",
    "KeyringError",
    "LocalError",
    "Member",
    "MemberAlive",
    "MemberFailed",
    "MemberJoined",
    "MemberLeft",
    "MemberReaped",
    "MemberState",
    "MemberSuspected",
    "MemberUpdated",
    "Membership",
    "RemoteError",
    "StateChanged",
    "StateValue",
    "Stats",
    "UserMessage",
    "lan",
    "local",
    "preset",
    "wan",
]
