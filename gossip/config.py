"""Gossip timing and limits, with memberlist's presets.

Every constant names where it comes from. The presets are the ones HashiCorp's
memberlist ships (``DefaultLANConfig``, ``DefaultWANConfig``, ``DefaultLocalConfig``
in config.go); a few settings memberlist leaves to Serf (reconnect, reaping) take
Serf's defaults, shortened where our healing target needs it, and say so.

A setting travels in a straight line: firmware profile TOML -> resolved daemon
config -> ``GossipConfig`` -> core. Nothing here reads files or the environment.

This module is the one home of every gossip default: the daemon's config
(``edgeagent.config``) and driver import them from here.

Invariants. ``GossipConfig`` checks itself when built (``__post_init__``), so
neither the daemon nor a simulator can hold an invalid one; a broken rule
raises :class:`InvalidConfig` naming the field:

* durations (``*_interval``, ``*_timeout``, ``*_time``, ``*_ttl``) are finite
  numbers > 0, and ``probe_timeout < probe_interval`` (an ack must be able to
  arrive before the next probe; memberlist assumes the same);
* counts, multipliers and sizes are integers >= 1 (``suspicion_max_timeout_mult``
  multiplies the minimum suspicion timeout, so >= 1 keeps max >= min);
* ``max_datagram_bytes`` is within ``MIN_DATAGRAM_BYTES..MAX_UDP_PAYLOAD``;
  ``max_meta_bytes`` and ``max_members`` stay within what the codec decodes
  (``codec.MAX_META_BYTES``, ``codec.MAX_PUSHPULL_MEMBERS``);
* ``lifeguard`` is a bool and ``cluster_name`` a string.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import Any

from .codec import MAX_META_BYTES, MAX_PUSHPULL_MEMBERS
from .errors import LocalError

# Hard wire limits (not presets): every datagram, crypto included, fits here.
MAX_DATAGRAM_BYTES = 1400  # memberlist UDPBufferSize default; safe under a 1500 MTU
MAX_STREAM_BYTES = 8 * 1024 * 1024  # one push-pull frame (memberlist net.go maxPushStateBytes: 20 MiB)
MAX_UDP_PAYLOAD = 65507  # IPv4 UDP payload limit (RFC 791 total length minus headers)
MIN_DATAGRAM_BYTES = 508  # RFC 791: every host accepts 576-byte datagrams; minus 60 IP + 8 UDP
DEFAULT_CLUSTER_NAME = "edgeagent"  # the AEAD associated data; agents talk only within one
# Bounds against a hostile or oversized cluster (the daemon's [limits] table sets these three).
DEFAULT_MAX_MEMBERS = 10_000
DEFAULT_MAX_BROADCAST_QUEUE = 1024  # pending piggyback updates kept; oldest/lowest dropped beyond
DEFAULT_MAX_STATE_BYTES = 4096  # packed size of one node's replicated key/value map
# Memory (Python objects, state_store.entry_memory) one node's map may take here:
# 16x the packed budget, room for ~200 small entries; packed bytes alone let a
# 1 KB entry become 64 KB.
DEFAULT_MAX_STATE_MEMORY = 64 * 1024
# Memory every other node's map together may take: 10 000 members (max_members)
# with ~3 KiB of state each; beyond it new remote entries are refused (counted).
DEFAULT_MAX_TOTAL_STATE_MEMORY = 32 * 1024 * 1024


class InvalidConfig(LocalError, ValueError):
    """A :class:`GossipConfig` field breaks one of its invariants (see the module docstring).

    ``field`` is the offending field, ``value`` its value and ``expected`` what it
    must be; ``expected`` may name other fields as ``{field_name}`` placeholders,
    listed in ``others``. :meth:`describe` renders the line with field names
    spelled by the caller (the daemon says ``gossip.probe_interval``).
    """

    def __init__(
        self, field: str, expected: str, value: object, others: tuple[str, ...] = ()
    ) -> None:
        self.field = field
        self.expected = expected
        self.value = value
        self.others = others
        super().__init__(self.describe())

    def describe(self, name: Callable[[str], str] = str) -> str:
        """``FIELD: expected ..., got VALUE``, each field name passed through ``name``."""
        expected = self.expected.format_map({o: name(o) for o in self.others})
        value = f"{self.value:g}" if isinstance(self.value, float) else repr(self.value)
        return f"{name(self.field)}: expected {expected}, got {value}"


@dataclass(frozen=True, slots=True)
class GossipConfig:
    """Immutable gossip settings. Build one with :func:`lan`, :func:`wan`, :func:`local`."""

    cluster_name: str = DEFAULT_CLUSTER_NAME
    # Failure detection (SWIM section 4, memberlist state.go)
    probe_interval: float = 1.0  # memberlist LAN ProbeInterval
    probe_timeout: float = 0.5  # memberlist LAN ProbeTimeout
    indirect_checks: int = 3  # memberlist IndirectChecks (k)
    # Lifeguard (memberlist awareness.go, suspicion.go)
    awareness_max_multiplier: int = 8  # memberlist AwarenessMaxMultiplier
    suspicion_mult: int = 4  # memberlist LAN SuspicionMult
    suspicion_max_timeout_mult: int = 6  # memberlist SuspicionMaxTimeoutMult
    lifeguard: bool = True  # False: fixed timeouts, no LHM/nack/buddy (for comparison)
    # Dissemination (memberlist queue.go)
    retransmit_mult: int = 4  # memberlist LAN RetransmitMult
    gossip_interval: float = 0.2  # memberlist LAN GossipInterval
    gossip_nodes: int = 3  # memberlist LAN GossipNodes
    gossip_to_the_dead_time: float = 30.0  # memberlist LAN GossipToTheDeadTime
    # Anti-entropy
    push_pull_interval: float = 30.0  # memberlist LAN PushPullInterval (scaled up for N > 32)
    # Serf's ReconnectInterval is 30 s; 10 s keeps a healed partition within our 60 s target.
    reconnect_interval: float = 10.0
    # Forget dead / left members after this long (Serf ReconnectTimeout / TombstoneTimeout: 24 h).
    dead_member_ttl: float = 24 * 3600.0
    # Limits (bounded against a hostile or oversized cluster)
    max_datagram_bytes: int = MAX_DATAGRAM_BYTES
    max_meta_bytes: int = MAX_META_BYTES
    max_members: int = DEFAULT_MAX_MEMBERS
    max_broadcast_queue: int = DEFAULT_MAX_BROADCAST_QUEUE
    max_user_broadcast_queue: int = 256  # separate budget for user broadcasts
    max_state_bytes: int = DEFAULT_MAX_STATE_BYTES
    max_stream_bytes: int = MAX_STREAM_BYTES
    max_state_memory: int = DEFAULT_MAX_STATE_MEMORY
    max_total_state_memory: int = DEFAULT_MAX_TOTAL_STATE_MEMORY

    def __post_init__(self) -> None:
        """Check every invariant; raise :class:`InvalidConfig` on the first broken one."""
        for f in fields(self):
            _check_field(f.name, getattr(self, f.name), str(f.type))
        if not self.probe_timeout < self.probe_interval:
            raise InvalidConfig(
                "probe_timeout",
                f"less than {{probe_interval}} ({self.probe_interval:g} s)",
                self.probe_timeout,
                ("probe_interval",),
            )
        _check_range(
            "max_datagram_bytes", self.max_datagram_bytes, MIN_DATAGRAM_BYTES, MAX_UDP_PAYLOAD
        )
        _check_range("max_meta_bytes", self.max_meta_bytes, 1, MAX_META_BYTES)
        _check_range("max_members", self.max_members, 1, MAX_PUSHPULL_MEMBERS)

    def with_overrides(self, **changes: Any) -> GossipConfig:
        """Return a copy with some fields replaced (unknown names raise TypeError)."""
        return replace(self, **changes)


def _check_field(name: str, value: object, kind: str) -> None:
    """The per-field rules, by the field's annotation (a string under postponed annotations)."""
    if kind == "str":
        if not isinstance(value, str):
            raise InvalidConfig(name, "a string", value)
    elif kind == "bool":
        if not isinstance(value, bool):
            raise InvalidConfig(name, "true or false", value)
    elif kind == "int":
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InvalidConfig(name, "an integer >= 1", value)
    elif (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise InvalidConfig(name, "a positive number of seconds", value)


def _check_range(name: str, value: int, low: int, high: int) -> None:
    if not low <= value <= high:
        raise InvalidConfig(name, f"{low}..{high}", value)


def lan(**overrides: Any) -> GossipConfig:
    """memberlist DefaultLANConfig: a local network, probe 1 s, timeout 500 ms."""
    return GossipConfig(**overrides)


def wan(**overrides: Any) -> GossipConfig:
    """memberlist DefaultWANConfig: higher latency and loss."""
    base: dict[str, Any] = dict(
        probe_interval=5.0,  # memberlist WAN ProbeInterval
        probe_timeout=3.0,  # memberlist WAN ProbeTimeout
        suspicion_mult=6,  # memberlist WAN SuspicionMult
        gossip_interval=0.5,  # memberlist WAN GossipInterval
        gossip_nodes=4,  # memberlist WAN GossipNodes
        gossip_to_the_dead_time=60.0,  # memberlist WAN GossipToTheDeadTime
        push_pull_interval=60.0,  # memberlist WAN PushPullInterval
        reconnect_interval=30.0,  # Serf ReconnectInterval
    )
    base.update(overrides)
    return GossipConfig(**base)


def local(**overrides: Any) -> GossipConfig:
    """memberlist DefaultLocalConfig: loopback / one host, fast timing."""
    base: dict[str, Any] = dict(
        probe_interval=1.0,  # memberlist Local ProbeInterval
        probe_timeout=0.2,  # memberlist Local ProbeTimeout
        suspicion_mult=3,  # memberlist Local SuspicionMult
        retransmit_mult=2,  # memberlist Local RetransmitMult
        gossip_interval=0.1,  # memberlist Local GossipInterval
        gossip_to_the_dead_time=15.0,  # memberlist Local GossipToTheDeadTime
        push_pull_interval=15.0,  # memberlist Local PushPullInterval
        reconnect_interval=5.0,
    )
    base.update(overrides)
    return GossipConfig(**base)


PRESETS = {"lan": lan, "wan": wan, "local": local}


def preset(name: str, **overrides: Any) -> GossipConfig:
    """Build a preset by name ("lan", "wan", "local")."""
    try:
        factory = PRESETS[name]
    except KeyError:
        raise ValueError(
            f"unknown gossip preset {name!r}; expected one of {sorted(PRESETS)}"
        ) from None
    return factory(**overrides)
