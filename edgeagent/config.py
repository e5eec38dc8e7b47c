"""The agent's resolved configuration.

One immutable :class:`AgentConfig` is built once at start-up from
defaults < firmware profile < TOML file < command-line flags, then handed down.
Nothing below ``edgeagent/`` reads files or the environment.

(Loader to be implemented: ``load_config(args) -> AgentConfig``.)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from gossip.config import GossipConfig

DEFAULT_GOSSIP_PORT = 7946  # memberlist's default bind port; UDP and TCP share it
DEFAULT_DNS_PORT = 5354  # mesh DNS default: unprivileged, beside mDNS's 5353
DEFAULT_OVERLAY_PREFIX = "10.99.0.0/16"
DEFAULT_BLOCK_PREFIXLEN = 28
DEFAULT_DEAD_QUARANTINE_S = 600.0

HostPort = tuple[str, int]


@dataclass(frozen=True, slots=True)
class Limits:
    max_members: int = 10_000
    max_broadcast_queue: int = 1024
    max_state_bytes: int = 4096


@dataclass(frozen=True, slots=True)
class Features:
    mdns: bool = True
    metrics: bool = True
    dns: bool = True
    tun: bool = False


@dataclass(frozen=True, slots=True)
class AgentConfig:
    name: str  # node name; default: the hostname
    bind: HostPort  # gossip UDP+TCP bind; default ("0.0.0.0", DEFAULT_GOSSIP_PORT)
    advertise: HostPort | None  # address peers should use; None: derived from bind
    join: tuple[HostPort, ...]  # seeds
    profile: str  # firmware profile name actually used
    cluster: str  # cluster name (AEAD associated data)
    key_file: Path | None  # explicit cluster key file; None: <state_dir>/keyring
    state_dir: Path
    mdns: bool
    metrics: HostPort | None  # Prometheus text endpoint; None: off
    log_format: str  # "text" (key=value) | "json"
    log_level: str  # "debug" | "info" | "warning" | "error"
    gossip: GossipConfig
    dns: HostPort | None = None  # mesh DNS responder; None: off
    overlay_prefix: str = DEFAULT_OVERLAY_PREFIX
    block_prefixlen: int = DEFAULT_BLOCK_PREFIXLEN
    dead_quarantine_s: float = DEFAULT_DEAD_QUARANTINE_S
    limits: Limits = field(default_factory=Limits)
    features: Features = field(default_factory=Features)
    config_file: Path | None = None  # where the file layer came from, for messages
