"""Gossip timing and limits, with memberlist's presets.

Every constant names where it comes from. The presets are the ones HashiCorp's
memberlist ships (``DefaultLANConfig``, ``DefaultWANConfig``, ``DefaultLocalConfig``
in config.go); a few settings memberlist leaves to Serf (reconnect, reaping) take
Serf's defaults, shortened where our healing target needs it, and say so.

A setting travels in a straight line: firmware profile TOML -> resolved daemon
config -> ``GossipConfig`` -> core. Nothing here reads files or the environment.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

# Hard wire limits (not presets): every datagram, crypto included, fits here.
MAX_DATAGRAM_BYTES = 1400  # memberlist UDPBufferSize default; safe under a 1500 MTU
MAX_META_BYTES = 512  # memberlist MetaMaxSize


@dataclass(frozen=True, slots=True)
class GossipConfig:
    """Immutable gossip settings. Build one with :func:`lan`, :func:`wan`, :func:`local`."""

    cluster_name: str = "edgeagent"
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
    max_members: int = 10_000
    max_broadcast_queue: int = 1024  # pending piggyback updates kept; oldest/lowest dropped beyond
    max_user_broadcast_queue: int = 256  # separate budget for user broadcasts
    max_state_bytes: int = 4096  # packed size of one node's replicated key/value map
    max_stream_bytes: int = 8 * 1024 * 1024  # one push-pull frame

    def with_overrides(self, **changes: Any) -> GossipConfig:
        """Return a copy with some fields replaced (unknown names raise TypeError)."""
        return replace(self, **changes)


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
        raise ValueError(f"unknown gossip preset {name!r}; expected one of {sorted(PRESETS)}") from None
    return factory(**overrides)
