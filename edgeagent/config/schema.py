"""The shape of the agent's configuration: its values, its keys and every default, once.

A default that a lower layer uses lives there and is imported here: gossip
timing, wire sizes, the cluster name and the three limits come from
:mod:`gossip.config`, the dead-block quarantine from :mod:`overlay.ipam`.
The rest (ports, addresses, the overlay prefix, paths) is the daemon's own and
is written only here. The mesh DNS port stays here rather than in
:mod:`overlay.dns`, so that reading the config does not import dnspython when
mesh DNS is off.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from gossip.config import (
    DEFAULT_CLUSTER_NAME,
    DEFAULT_MAX_BROADCAST_QUEUE,
    DEFAULT_MAX_MEMBERS,
    DEFAULT_MAX_STATE_BYTES,
    GossipConfig,
)
from overlay.catalog import Instance
from overlay.ipam import DEFAULT_QUARANTINE_S

from ..logs import FORMATTERS, LEVELS

DEFAULT_GOSSIP_PORT = 7946  # memberlist's default bind port; UDP and TCP share it
# The enrollment (join token) TLS port: the gossip port + this, unless set. Serf and
# memberlist use only 7946; 7947 is free beside it on every shipped image.
ENROLL_PORT_OFFSET = 1
# The agent-to-agent channel (mutual TLS; CoAP now, MQTT next): the gossip port + this. Not +1:
# the enrollment listener already takes gossip + 1 on an issuer, and the two cannot share a
# listener cleanly (enrollment authenticates only the server, the channel both ends).
CHANNEL_PORT_OFFSET = 2
DEFAULT_COAP_HOST = "0.0.0.0"  # the CoAP listener for local clients (--coap)
DEFAULT_COAP_PORT = 5683  # RFC 7252's coap port
DEFAULT_MQTT_HOST = "0.0.0.0"  # the MQTT listener for local clients ([mqtt] listen, --mqtt)
DEFAULT_MQTT_PORT = 1883  # IANA's mqtt port, as mosquitto
DEFAULT_DNS_PORT = 5354  # mesh DNS default: unprivileged, beside mDNS's 5353
DEFAULT_METRICS_PORT = 9464  # the OpenTelemetry Prometheus exporter's default port
DEFAULT_OVERLAY_PREFIX = "10.99.0.0/16"
DEFAULT_BLOCK_PREFIXLEN = 28  # 16 addresses per node
DEFAULT_DEAD_QUARANTINE_S = DEFAULT_QUARANTINE_S
DEFAULT_BIND_HOST = "0.0.0.0"
DEFAULT_LOCAL_HOST = "127.0.0.1"  # metrics and mesh DNS listen here unless told otherwise
DEFAULT_CLUSTER = DEFAULT_CLUSTER_NAME
DEFAULT_PRESET = "lan"  # memberlist DefaultLANConfig
DEFAULT_PROFILE = "generic-x86_64"  # the fallback firmware profile
DEFAULT_LOG_FORMAT = "text"
DEFAULT_LOG_LEVEL = "info"
ROOT_STATE_DIR = Path("/var/lib/edgeagent")
STATE_DIR_DEFAULT_TEXT = (  # for --help; machine.default_state_dir is the rule
    f"{ROOT_STATE_DIR} as root, else $XDG_STATE_HOME/edgeagent or ~/.local/state/edgeagent"
)
DEVICE_MODEL_PATH = Path("/proc/device-tree/model")
MEMINFO_PATH = Path("/proc/meminfo")
MAX_NAME_CHARS = 128  # node and cluster names travel in every alive message

LOG_FORMATS = tuple(FORMATTERS)  # written once, in edgeagent.logs
LOG_LEVELS = tuple(LEVELS)

# Keys of the TOML file, and of its [overlay] table.
FILE_KEYS = (
    "name", "bind", "advertise", "join", "cluster", "key_file", "state_dir", "profile",
    "enroll_port", "log_format", "log_level", "metrics", "dns", "coap", "mdns", "gossip", "limits", "features", "overlay",
    "service", "services", "mqtt", "policy", "uplink",
)  # fmt: skip
OVERLAY_KEYS = ("prefix", "block_prefixlen", "dead_quarantine_s")
SERVICE_KEYS = ("name", "uri", "weight", "tags")  # one [[service]] table
SERVICES_KEYS = ("site", "mdns_import", "mdns_export")  # the [services] table
MQTT_KEYS = (  # the [mqtt] table (all but listen: config/mqtt_extra.py)
    "listen", "tls_listen", "tls_cert", "tls_key", "tls_ca", "attach", "attach_topics",
    "attach_tls_ca", "attach_tls_cert", "attach_tls_key", "attach_username", "attach_password",
)  # fmt: skip
POLICY_KEYS = ("trusted_keys", "url", "ca", "interval", "report_url")  # the [policy] table
UPLINK_KEYS = (  # the [uplink] table (config/uplink.py)
    "brokers", "topics", "site", "tls", "ca_file", "cert_file", "key_file", "username",
    "password", "client_id", "primary_retry_s", "spool_max_bytes", "ttl_s", "standby_s",
    "standby_max", "probe_s",
)  # fmt: skip
MAX_TRUSTED_KEYS = 16
DEFAULT_POLICY_INTERVAL_S = 60.0
MAX_URL_CHARS = 2048
# The port plain mDNS clients are told to use for an exported mesh service when the agent
# has no CoAP listener setting of its own: CoAP's registered port (RFC 7252).
DEFAULT_COAP_PORT = 5683

# GossipConfig fields that are set elsewhere in the schema, so there is one place for each.
GOSSIP_FIELDS_ELSEWHERE = {
    "cluster_name": "cluster",
    "max_members": "limits.max_members",
    "max_broadcast_queue": "limits.max_broadcast_queue",
    "max_state_bytes": "limits.max_state_bytes",
}

HostPort = tuple[str, int]


def default_enroll_port(gossip_port: int) -> int:
    """The enrollment port when none is set: beside the gossip port (0 stays 0: any)."""
    if gossip_port == 0 or gossip_port + ENROLL_PORT_OFFSET > 65535:
        return 0
    return gossip_port + ENROLL_PORT_OFFSET


def default_channel_port(gossip_port: int) -> int:
    """The channel's port beside the gossip port (0: no port can be derived, no listener)."""
    if gossip_port == 0 or gossip_port + CHANNEL_PORT_OFFSET > 65535:
        return 0
    return gossip_port + CHANNEL_PORT_OFFSET


def gossip_key(field_name: str) -> str:
    """Where a GossipConfig field is set in the file: ``gossip.X``, ``limits.X`` or ``cluster``."""
    return GOSSIP_FIELDS_ELSEWHERE.get(field_name, f"gossip.{field_name}")


# [mqtt] beyond listen (read and checked by config/mqtt_extra.py).


@dataclass(frozen=True, slots=True)
class MqttTls:
    listen: HostPort
    cert: Path
    key: Path
    ca: Path | None = None  # set: client certificates required, verified against it


@dataclass(frozen=True, slots=True)
class AttachTopic:
    topic_filter: str
    direction: str  # "in" (attached broker -> agent), "out" (agent -> attached), "both"
    qos: int = 0

    @property
    def inbound(self) -> bool:
        return self.direction in ("in", "both")

    @property
    def outbound(self) -> bool:
        return self.direction in ("out", "both")


@dataclass(frozen=True, slots=True)
class MqttAttach:
    broker: HostPort
    topics: tuple[AttachTopic, ...]
    tls_ca: Path | None = None  # set: TLS to the attached broker, verified against this CA
    tls_cert: Path | None = None  # a client certificate for it (with tls_key)
    tls_key: Path | None = None
    username: str | None = None
    password: str | None = None


# [uplink] (read and checked by config/uplink.py; used by features/uplink.py).


@dataclass(frozen=True, slots=True)
class UplinkTopic:
    """One mapping, mosquitto bridge style: ``FILTER out|in|both QOS [LOCAL REMOTE]``.

    The local filter is ``local_prefix + pattern``, the cloud's ``remote_prefix + pattern``;
    a topic crossing swaps the one prefix for the other.
    """

    pattern: str
    direction: str  # "out" (mesh -> cloud), "in" (cloud -> mesh), "both"
    qos: int = 0
    local_prefix: str = ""
    remote_prefix: str = ""

    @property
    def outbound(self) -> bool:
        return self.direction in ("out", "both")

    @property
    def inbound(self) -> bool:
        return self.direction in ("in", "both")

    @property
    def local_filter(self) -> str:
        return self.local_prefix + self.pattern

    @property
    def remote_filter(self) -> str:
        return self.remote_prefix + self.pattern


@dataclass(frozen=True, slots=True)
class UplinkSettings:
    brokers: tuple[HostPort, ...]  # tried in order (mosquitto bridge: round_robin false)
    topics: tuple[UplinkTopic, ...]
    site: str = ""  # "": [services] site, else "default"
    tls: bool = False
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    username: str | None = None
    password: str | None = None
    client_id: str = ""  # "": edgeagent-uplink-NODE
    primary_retry_s: float = 30.0
    spool_max_bytes: int = 16 * 1024 * 1024
    ttl_s: float = 86400.0  # 0: spooled messages never expire
    standby_s: float = 30.0  # a candidate's memory of recent up-bound messages (takeover)
    standby_max: int = 10000
    probe_s: float = 30.0  # a non-holder checks it reaches the cloud this often


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds on what one agent tracks (also copied into the GossipConfig)."""

    max_members: int = DEFAULT_MAX_MEMBERS
    max_broadcast_queue: int = DEFAULT_MAX_BROADCAST_QUEUE
    max_state_bytes: int = DEFAULT_MAX_STATE_BYTES


@dataclass(frozen=True, slots=True)
class Features:
    """Optional subsystems; a feature that is off is never imported."""

    mdns: bool = True
    metrics: bool = True
    dns: bool = True


@dataclass(frozen=True, slots=True)
class AgentConfig:
    """Everything the daemon needs, resolved once at start-up. Build it with :func:`load_config`."""

    name: str  # node name; default: the hostname, made unique (see name_is_default)
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
    # CoAP listener for local clients (the mesh's ingress); None: off.
    coap: HostPort | None = (DEFAULT_COAP_HOST, DEFAULT_COAP_PORT)
    # True when --coap / the file's coap key named the address (a port in use is then fatal;
    # the default's is logged and CoAP stays off).
    coap_explicit: bool = False
    # MQTT listener for local clients (the agent is their broker); None: off. As coap_explicit:
    # a port named in --mqtt / [mqtt] listen that is taken is fatal, the default's is logged.
    mqtt: HostPort | None = (DEFAULT_MQTT_HOST, DEFAULT_MQTT_PORT)
    mqtt_explicit: bool = False
    # [mqtt] tls_listen / tls_cert / tls_key / tls_ca and attach / attach_topics
    # (config/mqtt_extra.py); None: no TLS listener / not attached.
    mqtt_tls: MqttTls | None = None
    mqtt_attach: MqttAttach | None = None
    overlay_prefix: str = DEFAULT_OVERLAY_PREFIX
    block_prefixlen: int = DEFAULT_BLOCK_PREFIXLEN
    dead_quarantine_s: float = DEFAULT_DEAD_QUARANTINE_S
    limits: Limits = field(default_factory=Limits)
    features: Features = field(default_factory=Features)
    config_file: Path | None = None  # where the file layer came from, for messages
    gossip_preset: str = DEFAULT_PRESET  # the preset the gossip timing started from
    # Lower layers' gossip keys that a higher layer's preset replaced, as
    # "gossip.KEY (SOURCE)"; the daemon logs them once at start.
    gossip_dropped: tuple[str, ...] = ()
    # No name configured: ``name`` is the hostname, and a new identity is named
    # ``HOSTNAME-XXXXXX`` from its node id (persist.default_node_name), once.
    name_is_default: bool = False
    # TCP port of the enrollment listener (only on a node holding the CA key); 0: any.
    # Default: the gossip port + ENROLL_PORT_OFFSET (0 when the gossip port is 0).
    enroll_port: int = 0
    # Where the cluster name was set ("--cluster", "FILE: cluster"); "" for the default, so a
    # state dir enrolled in a named cluster can tell a conflict from a default.
    cluster_source: str = ""
    # The file's [[service]] tables, checked (overlay.catalog.make_instance), in file order.
    services: tuple[Instance, ...] = ()
    # [services]: import _coap._udp devices seen on the LAN / export mesh services there
    # (both also need mdns on).
    services_mdns_import: bool = True
    services_mdns_export: bool = True
    # [services] site: this node's site, for the balancer's locality (same site first); it
    # is also the site tag of this node's instances that carry none. "": no site.
    services_site: str = ""
    # [policy] trusted_keys: the operators' Ed25519 public keys (raw 32 bytes each) whose
    # signed policy bundles this agent accepts; empty: the policy feature is off.
    policy_trusted_keys: tuple[bytes, ...] = ()
    # [policy] url / ca / interval / report_url: the cloud endpoint the agent polls for the
    # signed envelope (HTTPS, ETag), the CA file its certificate must chain to (None: the
    # system's), seconds between polls, and where the reported state is sent. "": none.
    policy_url: str = ""
    policy_ca: Path | None = None
    policy_interval_s: float = DEFAULT_POLICY_INTERVAL_S
    policy_report_url: str = ""
    # [uplink]: the MQTT uplink to cloud brokers (features/uplink.py); None: off.
    uplink: UplinkSettings | None = None

    @property
    def keyring_path(self) -> Path:
        """The keyring file: ``key_file`` if given, else ``<state_dir>/keyring``."""
        return self.key_file if self.key_file is not None else self.state_dir / "keyring"
