"""The agent's resolved configuration, and the loader that builds it.

One immutable :class:`AgentConfig` is built once at start-up by
:func:`load_config` from four layers, each overriding the one before::

    defaults  <  firmware profile  <  TOML file (-c)  <  command-line flags

Nothing below ``edgeagent/`` reads files or the environment: the gossip
settings leave here as a finished :class:`~gossip.config.GossipConfig`.

How the layers combine
----------------------
* Scalars (name, bind, cluster, ...): the highest layer that sets one wins.
  Lists are replaced, not merged: ``--join`` replaces the file's ``join``.
* Gossip timing: the highest layer that names a ``preset`` picks the base
  preset, and only the overrides from that layer and the layers above it
  apply (choosing ``--preset wan`` gives plain WAN timing, not WAN mixed with
  the profile's LAN tweaks). With no preset anywhere the profile's applies.
* ``[limits]`` feed both ``AgentConfig.limits`` and the matching
  ``GossipConfig`` fields (``max_members``, ``max_broadcast_queue``,
  ``max_state_bytes``); they are set only in ``[limits]``.
* Feature switches (mDNS, metrics, mesh DNS, tun): the profile's
  ``[features]`` give the defaults; the file's ``[features]`` and its
  top-level ``mdns`` / ``metrics`` / ``dns`` keys override them, then flags.
  ``metrics`` and ``dns`` take an address (``"HOST:PORT"``, which turns the
  feature on), ``true`` (on, at the default address) or ``false`` (off).
  ``AgentConfig.features`` reports the final switches.

TOML file schema (see ``edgeagent/example-config.toml`` for an annotated copy)
------------------------------------------------------------------------------
Top level::

    name = "node-1"                   # node name; default: the hostname
    bind = "0.0.0.0:7946"             # gossip UDP+TCP; port 0 picks one
    advertise = "192.0.2.10:7946"     # what peers dial; default: from bind
    join = ["192.0.2.11:7946"]        # seeds (a bare host means port 7946)
    cluster = "edgeagent"             # cluster name, the AEAD associated data
    key_file = "/etc/edgeagent/keyring"  # default: <state_dir>/keyring
    state_dir = "/var/lib/edgeagent"
    profile = "rpi-4"                 # default: detected from the device tree
    log_format = "text"               # "text" (key=value) | "json"
    log_level = "info"                # debug | info | warning | error
    metrics = "127.0.0.1:9464"        # or true / false
    dns = "127.0.0.1:5354"            # or true / false
    mdns = true

Tables::

    [gossip]    preset = "lan" | "wan" | "local", and any GossipConfig field
                except cluster_name (use ``cluster``) and the three limits
    [limits]    max_members, max_broadcast_queue, max_state_bytes
    [features]  mdns, metrics, dns, tun (booleans)
    [overlay]   prefix = "10.99.0.0/16", block_prefixlen = 28,
                dead_quarantine_s = 600

Relative paths in the file are relative to the file's directory. Unknown keys
are errors. Every error is one :class:`~edgeagent.errors.ConfigError` line
naming the file (or flag), the key and what was expected, e.g.
``/etc/edgeagent.toml: gossip.probe_interval: expected a positive number, got "fast"``.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import ipaddress
import os
import re
import socket
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gossip.config import PRESETS, GossipConfig
from gossip.config import preset as gossip_preset

from .errors import ConfigError

if TYPE_CHECKING:
    from .profiles import Profile

DEFAULT_GOSSIP_PORT = 7946  # memberlist's default bind port; UDP and TCP share it
DEFAULT_DNS_PORT = 5354  # mesh DNS default: unprivileged, beside mDNS's 5353
DEFAULT_METRICS_PORT = 9464  # the OpenTelemetry Prometheus exporter's default port
DEFAULT_OVERLAY_PREFIX = "10.99.0.0/16"
DEFAULT_BLOCK_PREFIXLEN = 28
DEFAULT_DEAD_QUARANTINE_S = 600.0
DEFAULT_BIND_HOST = "0.0.0.0"
DEFAULT_LOCAL_HOST = "127.0.0.1"  # metrics and mesh DNS listen here unless told otherwise
DEFAULT_CLUSTER = "edgeagent"
DEFAULT_PRESET = "lan"
DEFAULT_PROFILE = "generic-x86_64"
ROOT_STATE_DIR = Path("/var/lib/edgeagent")
DEVICE_MODEL_PATH = Path("/proc/device-tree/model")
MEMINFO_PATH = Path("/proc/meminfo")
MAX_NAME_CHARS = 128  # node and cluster names travel in every alive message
MAX_UDP_PAYLOAD = 65507  # IPv4 UDP payload limit (RFC 791 total length minus headers)
MIN_DATAGRAM_BYTES = (
    508  # RFC 791: every host accepts 576-byte datagrams; minus 60 IP + 8 UDP header
)

LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("debug", "info", "warning", "error")

HostPort = tuple[str, int]


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds on what one agent tracks (also copied into the GossipConfig)."""

    max_members: int = 10_000
    max_broadcast_queue: int = 1024
    max_state_bytes: int = 4096


@dataclass(frozen=True, slots=True)
class Features:
    """Optional subsystems; a feature that is off is never imported."""

    mdns: bool = True
    metrics: bool = True
    dns: bool = True
    tun: bool = False


@dataclass(frozen=True, slots=True)
class AgentConfig:
    """Everything the daemon needs, resolved once at start-up. Build it with :func:`load_config`."""

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
    gossip_preset: str = DEFAULT_PRESET  # the preset the gossip timing started from

    @property
    def keyring_path(self) -> Path:
        """The keyring file: ``key_file`` if given, else ``<state_dir>/keyring``."""
        return self.key_file if self.key_file is not None else self.state_dir / "keyring"


# --------------------------------------------------------------------------- flags


def add_agent_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``edgeagent run`` flags. Every flag defaults to None ("not given")."""
    if parser.epilog is None:
        parser.epilog = (
            "Settings come from built-in defaults < the firmware profile < the -c FILE < these flags. "
            "The file is TOML; an annotated example ships as edgeagent/example-config.toml."
        )
    add = parser.add_argument
    add(
        "-c",
        "--config",
        metavar="FILE",
        help="TOML config file (default: none; built-in defaults and the firmware profile)",
    )
    add("--name", help="node name, unique in the cluster (default: the hostname)")
    add(
        "--bind",
        metavar="HOST:PORT",
        help=f"gossip UDP+TCP address; port 0 picks one (default: {DEFAULT_BIND_HOST}:{DEFAULT_GOSSIP_PORT}; [::]:PORT for IPv6)",
    )
    add(
        "--advertise",
        metavar="HOST:PORT",
        help="address peers should dial (default: derived from --bind)",
    )
    add(
        "--join",
        metavar="HOST:PORT",
        action="append",
        help=f"seed to join; repeatable; a bare HOST means port {DEFAULT_GOSSIP_PORT} (default: none, peers come from mDNS)",
    )
    add(
        "--profile",
        metavar="NAME",
        help="firmware profile (default: detected from /proc/device-tree/model, else generic-x86_64; see 'edgeagent profiles')",
    )
    add(
        "--preset",
        choices=sorted(PRESETS),
        help="gossip timing preset, memberlist's (default: the profile's, lan in all shipped ones)",
    )
    add(
        "--cluster",
        metavar="NAME",
        help=f"cluster name; agents only talk within one (default: {DEFAULT_CLUSTER})",
    )
    add(
        "--key-file",
        metavar="FILE",
        help="cluster keyring file (default: STATE_DIR/keyring, generated on first start)",
    )
    add(
        "--state-dir",
        metavar="DIR",
        help="where identity, keys and state live (default: /var/lib/edgeagent as root, else $XDG_STATE_HOME/edgeagent or ~/.local/state/edgeagent)",
    )
    add(
        "--no-mdns",
        dest="mdns",
        action="store_false",
        default=None,
        help="do not advertise or browse _edgeagent._udp by mDNS (default: mDNS on in every shipped profile)",
    )
    add(
        "--metrics",
        metavar="HOST:PORT",
        help=f"serve Prometheus metrics at http://HOST:PORT/metrics, or 'off' (default: off, unless the profile turns it on at {DEFAULT_LOCAL_HOST}:{DEFAULT_METRICS_PORT})",
    )
    add(
        "--dns",
        metavar="HOST:PORT",
        help=f"serve mesh DNS (SERVICE.mesh, NODE.node.mesh) on HOST:PORT, or 'off' (default: off, unless the profile turns it on at {DEFAULT_LOCAL_HOST}:{DEFAULT_DNS_PORT})",
    )
    add(
        "--log-format",
        choices=LOG_FORMATS,
        help="log lines as key=value text or JSON (default: text)",
    )
    add("--log-level", choices=LOG_LEVELS, help="minimum level logged (default: info)")


# --------------------------------------------------------------------------- value checks


class _Invalid(ValueError):
    """A value failed a check; the caller adds where it came from."""

    def __init__(self, expected: str) -> None:
        super().__init__(expected)
        self.expected = expected


def show(value: object) -> str:
    """Render a bad value for an error line: strings quoted, TOML-style booleans."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        text = value if len(value) <= 60 else value[:57] + "..."
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "a list"
    return str(value)


_HOSTNAME_RE = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9_])?(\.[A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9_])?)*\.?$"
)
_HOSTPORT_RE = re.compile(r"^(?:\[(?P<v6>[^\]]*)\]|(?P<host>[^:\[\]]*))(?::(?P<port>[^:]*))?$")


def parse_hostport(
    text: object,
    *,
    default_port: int | None = None,
    empty_host: str | None = None,
    allow_port_zero: bool = False,
    ip_only: bool = False,
) -> HostPort:
    """Parse ``HOST:PORT``, ``[V6]:PORT``, ``:PORT`` (host ``empty_host``) or ``HOST`` (port ``default_port``).

    The host is an IP literal, or also a DNS name unless ``ip_only``; IPv6
    literals need brackets. Raises ValueError whose text says what was expected.
    """
    what = "HOST:PORT"
    if not isinstance(text, str):
        raise _Invalid(what)
    match = _HOSTPORT_RE.match(text.strip())
    if match is None:
        raise _Invalid(f"{what} (IPv6 as [ADDR]:PORT)" if text.count(":") > 1 else what)
    host = match["v6"] if match["v6"] is not None else match["host"]
    port_text = match["port"]
    if match["v6"] is not None:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise _Invalid(f"{what} with an IPv6 address in the brackets") from None
    elif host == "":
        if empty_host is None:
            raise _Invalid(f"{what} with a host")
        host = empty_host
    elif ip_only:
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise _Invalid(f"{what} with HOST an IP address") from None
    elif not _HOSTNAME_RE.match(host):
        raise _Invalid(f"{what} with HOST an IP address or host name")
    if port_text is None:
        if default_port is None:
            raise _Invalid(f"{what} with a port")
        return host, default_port
    if not port_text.isdigit():
        raise _Invalid(f"{what} with a numeric port")
    port = int(port_text)
    low = 0 if allow_port_zero else 1
    if not low <= port <= 65535:
        raise _Invalid(f"{what} with a port in {low}..65535")
    return host, port


def _check_name(value: object, what: str) -> str:
    if (
        not isinstance(value, str)
        or not value
        or len(value) > MAX_NAME_CHARS
        or any(ch.isspace() or not ch.isprintable() for ch in value)
    ):
        raise _Invalid(f"a {what} of 1..{MAX_NAME_CHARS} printable characters without spaces")
    return value


def _check_choice(value: object, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise _Invalid("one of " + ", ".join(choices))
    return value


def _check_bool(value: object) -> bool:
    if not isinstance(value, bool):
        raise _Invalid("true or false")
    return value


def _check_positive_int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _Invalid("a positive integer")
    return value


def _check_positive_number(value: object) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not value > 0
        or value != value
        or value == float("inf")
    ):
        raise _Invalid("a positive number")
    return float(value)


def _check_path(value: object, base: Path | None) -> Path:
    if not isinstance(value, str) or not value:
        raise _Invalid("a path")
    path = Path(value).expanduser()
    if not path.is_absolute():
        path = (base if base is not None else Path.cwd()) / path
    return path


def _gossip_checkers() -> dict[str, Callable[[object], Any]]:
    """One check per settable GossipConfig field, chosen from the field's default type."""
    checks: dict[str, Callable[[object], Any]] = {}
    defaults = GossipConfig()
    for f in dataclasses.fields(GossipConfig):
        if f.name in GOSSIP_FIELDS_ELSEWHERE:
            continue
        default = getattr(defaults, f.name)
        if isinstance(default, bool):
            checks[f.name] = _check_bool
        elif isinstance(default, int):
            checks[f.name] = _check_positive_int
        else:
            checks[f.name] = _check_positive_number
    return checks


# GossipConfig fields that are set elsewhere in the schema, so there is one place for each.
GOSSIP_FIELDS_ELSEWHERE = {
    "cluster_name": "cluster",
    "max_members": "limits.max_members",
    "max_broadcast_queue": "limits.max_broadcast_queue",
    "max_state_bytes": "limits.max_state_bytes",
}


# --------------------------------------------------------------------------- table reading


class TableReader:
    """Reads one parsed TOML document, turning every problem into a one-line ConfigError.

    ``source`` names the file in messages; keys are reported dotted (``gossip.probe_interval``).
    """

    def __init__(self, source: str, data: Mapping[str, Any]) -> None:
        self.source = source
        self.data = data

    def error(self, key: str, expected: str, value: object = dataclasses.MISSING) -> ConfigError:
        """A ConfigError ``SOURCE: KEY: expected ..., got ...``."""
        got = "" if value is dataclasses.MISSING else f", got {show(value)}"
        return ConfigError(f"{self.source}: {key}: expected {expected}{got}")

    def check_keys(
        self, table: Mapping[str, Any], allowed: Sequence[str], prefix: str = ""
    ) -> None:
        """Reject keys not in ``allowed``, suggesting the closest known key."""
        for key in table:
            if key in allowed:
                continue
            dotted = f"{prefix}{key}"
            if prefix == "gossip." and key in GOSSIP_FIELDS_ELSEWHERE:
                raise ConfigError(
                    f"{self.source}: {dotted}: set it as {GOSSIP_FIELDS_ELSEWHERE[key]}"
                )
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f' (did you mean "{close[0]}"?)' if close else ""
            raise ConfigError(
                f"{self.source}: {dotted}: unknown key{hint}; expected one of {', '.join(sorted(allowed))}"
            )

    def table(self, key: str) -> Mapping[str, Any]:
        """A sub-table (empty when absent)."""
        value = self.data.get(key, {})
        if not isinstance(value, dict):
            raise self.error(key, "a table", value)
        return value

    def get(
        self, table: Mapping[str, Any], key: str, check: Callable[[object], Any], prefix: str = ""
    ) -> Any:
        """``check(table[key])`` or None when absent; a failed check names the key."""
        if key not in table:
            return None
        try:
            return check(table[key])
        except _Invalid as exc:
            raise self.error(prefix + key, exc.expected, table[key]) from None

    def gossip(self, table: Mapping[str, Any]) -> tuple[str | None, dict[str, Any]]:
        """Read a ``[gossip]`` table: (preset or None, validated overrides)."""
        checks = _gossip_checkers()
        self.check_keys(table, ["preset", *checks], "gossip.")
        chosen = self.get(table, "preset", lambda v: _check_choice(v, sorted(PRESETS)), "gossip.")
        overrides = {
            key: self.get(table, key, check, "gossip.")
            for key, check in checks.items()
            if key in table
        }
        return chosen, overrides

    def limits(self, table: Mapping[str, Any]) -> dict[str, int]:
        """Read a ``[limits]`` table into Limits field overrides."""
        names = [f.name for f in dataclasses.fields(Limits)]
        self.check_keys(table, names, "limits.")
        return {
            key: self.get(table, key, _check_positive_int, "limits.")
            for key in names
            if key in table
        }

    def features(self, table: Mapping[str, Any]) -> dict[str, bool]:
        """Read a ``[features]`` table into Features field overrides."""
        names = [f.name for f in dataclasses.fields(Features)]
        self.check_keys(table, names, "features.")
        return {
            key: self.get(table, key, _check_bool, "features.") for key in names if key in table
        }


def read_toml(path: Path) -> dict[str, Any]:
    """Parse a TOML file; unreadable files and syntax errors are one ConfigError line with the file (and line)."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: not UTF-8 (byte {exc.start})") from None
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        found = re.search(r"\(at line (\d+), column (\d+)\)$", message)
        if found:
            message = message[: found.start()].rstrip()
            raise ConfigError(f"{path}:{found[1]}:{found[2]}: invalid TOML: {message}") from None
        raise ConfigError(f"{path}: invalid TOML: {message}") from None


# --------------------------------------------------------------------------- layers


@dataclass(slots=True)
class _Layer:
    """What one layer (profile, file or flags) sets; None means "not set here"."""

    source: str
    name: str | None = None
    bind: HostPort | None = None
    advertise: HostPort | None = None
    join: tuple[HostPort, ...] | None = None
    cluster: str | None = None
    key_file: Path | None = None
    state_dir: Path | None = None
    profile: str | None = None
    log_format: str | None = None
    log_level: str | None = None
    metrics_on: bool | None = None
    metrics_addr: HostPort | None = None
    dns_on: bool | None = None
    dns_addr: HostPort | None = None
    mdns: bool | None = None
    tun: bool | None = None
    preset: str | None = None
    gossip: dict[str, Any] = field(default_factory=dict)
    limits: dict[str, int] = field(default_factory=dict)
    overlay_prefix: str | None = None
    block_prefixlen: int | None = None
    dead_quarantine_s: float | None = None


def _bind(text: object) -> HostPort:
    return parse_hostport(
        text,
        default_port=DEFAULT_GOSSIP_PORT,
        empty_host=DEFAULT_BIND_HOST,
        allow_port_zero=True,
        ip_only=True,
    )


def _advertise(text: object) -> HostPort:
    return parse_hostport(text, default_port=DEFAULT_GOSSIP_PORT, ip_only=True)


def _peer(text: object) -> HostPort:
    return parse_hostport(text, default_port=DEFAULT_GOSSIP_PORT)


def _listener(text: object) -> HostPort:
    return parse_hostport(text, empty_host=DEFAULT_BIND_HOST, allow_port_zero=True, ip_only=True)


def _switch_or_address(value: object) -> tuple[bool, HostPort | None]:
    if isinstance(value, bool):
        return value, None
    try:
        return True, _listener(value)
    except _Invalid as exc:
        raise _Invalid(f"{exc.expected}, true or false") from None


def _join_list(value: object) -> tuple[HostPort, ...]:
    if not isinstance(value, list):
        raise _Invalid("a list of HOST:PORT strings")
    peers = []
    for item in value:
        try:
            peers.append(_peer(item))
        except _Invalid as exc:
            raise _Invalid(f"a list of {exc.expected}") from None
    return tuple(peers)


def _check_prefix(value: object) -> str:
    try:
        if not isinstance(value, str):
            raise ValueError
        return str(ipaddress.ip_network(value, strict=True))
    except ValueError:
        raise _Invalid("an IP network such as 10.99.0.0/16 (no host bits set)") from None


FILE_KEYS = (
    "name", "bind", "advertise", "join", "cluster", "key_file", "state_dir", "profile",
    "log_format", "log_level", "metrics", "dns", "mdns", "gossip", "limits", "features", "overlay",
)  # fmt: skip
OVERLAY_KEYS = ("prefix", "block_prefixlen", "dead_quarantine_s")


def _file_layer(path: Path) -> _Layer:
    reader = TableReader(str(path), read_toml(path))
    data = reader.data
    reader.check_keys(data, FILE_KEYS)
    base = path.parent.absolute()
    layer = _Layer(source=str(path))
    layer.name = reader.get(data, "name", lambda v: _check_name(v, "name"))
    layer.bind = reader.get(data, "bind", _bind)
    layer.advertise = reader.get(data, "advertise", _advertise)
    layer.join = reader.get(data, "join", _join_list)
    layer.cluster = reader.get(data, "cluster", lambda v: _check_name(v, "cluster name"))
    layer.key_file = reader.get(data, "key_file", lambda v: _check_path(v, base))
    layer.state_dir = reader.get(data, "state_dir", lambda v: _check_path(v, base))
    layer.profile = reader.get(data, "profile", lambda v: _check_name(v, "profile name"))
    layer.log_format = reader.get(data, "log_format", lambda v: _check_choice(v, LOG_FORMATS))
    layer.log_level = reader.get(data, "log_level", lambda v: _check_choice(v, LOG_LEVELS))
    features = reader.features(reader.table("features"))
    layer.mdns = features.get("mdns")
    layer.metrics_on = features.get("metrics")
    layer.dns_on = features.get("dns")
    layer.tun = features.get("tun")
    mdns = reader.get(data, "mdns", _check_bool)
    if mdns is not None:
        layer.mdns = mdns
    metrics = reader.get(data, "metrics", _switch_or_address)
    if metrics is not None:
        layer.metrics_on, layer.metrics_addr = metrics
    dns = reader.get(data, "dns", _switch_or_address)
    if dns is not None:
        layer.dns_on, layer.dns_addr = dns
    layer.preset, layer.gossip = reader.gossip(reader.table("gossip"))
    layer.limits = reader.limits(reader.table("limits"))
    overlay = reader.table("overlay")
    reader.check_keys(overlay, OVERLAY_KEYS, "overlay.")
    layer.overlay_prefix = reader.get(overlay, "prefix", _check_prefix, "overlay.")
    layer.block_prefixlen = reader.get(overlay, "block_prefixlen", _check_positive_int, "overlay.")
    layer.dead_quarantine_s = reader.get(
        overlay, "dead_quarantine_s", _check_positive_number, "overlay."
    )
    return layer


def _flag_layer(args: argparse.Namespace) -> _Layer:
    def check_flag(option: str, value: object, check: Callable[[object], Any]) -> Any:
        try:
            return check(value)
        except _Invalid as exc:
            raise ConfigError(f"{option}: expected {exc.expected}, got {show(value)}") from None

    def flag(dest: str, option: str, check: Callable[[object], Any]) -> Any:
        value = getattr(args, dest, None)
        return None if value is None else check_flag(option, value, check)

    def switch(value: object) -> tuple[bool, HostPort | None]:
        if isinstance(value, str) and value.lower() == "off":
            return False, None
        try:
            return True, _listener(value)
        except _Invalid as exc:
            raise _Invalid(f"{exc.expected}, or off") from None

    layer = _Layer(source="flags")
    layer.name = flag("name", "--name", lambda v: _check_name(v, "name"))
    layer.bind = flag("bind", "--bind", _bind)
    layer.advertise = flag("advertise", "--advertise", _advertise)
    joins = getattr(args, "join", None)
    if joins:
        layer.join = tuple(check_flag("--join", j, _peer) for j in joins)
    layer.cluster = flag("cluster", "--cluster", lambda v: _check_name(v, "cluster name"))
    layer.key_file = flag("key_file", "--key-file", lambda v: _check_path(v, None))
    layer.state_dir = flag("state_dir", "--state-dir", lambda v: _check_path(v, None))
    layer.profile = flag("profile", "--profile", lambda v: _check_name(v, "profile name"))
    layer.preset = flag("preset", "--preset", lambda v: _check_choice(v, sorted(PRESETS)))
    layer.log_format = flag("log_format", "--log-format", lambda v: _check_choice(v, LOG_FORMATS))
    layer.log_level = flag("log_level", "--log-level", lambda v: _check_choice(v, LOG_LEVELS))
    layer.mdns = flag("mdns", "--no-mdns", _check_bool)
    metrics = flag("metrics", "--metrics", switch)
    if metrics is not None:
        layer.metrics_on, layer.metrics_addr = metrics
    dns = flag("dns", "--dns", switch)
    if dns is not None:
        layer.dns_on, layer.dns_addr = dns
    return layer


def _profile_layer(profile: Profile) -> _Layer:
    return _Layer(
        source=profile.source,
        mdns=profile.features.mdns,
        metrics_on=profile.features.metrics,
        dns_on=profile.features.dns,
        tun=profile.features.tun,
        preset=profile.gossip_preset,
        gossip=dict(profile.gossip_overrides),
        limits=dataclasses.asdict(profile.limits),
    )


# --------------------------------------------------------------------------- defaults


def default_state_dir(euid: int | None = None, environ: Mapping[str, str] | None = None) -> Path:
    """``/var/lib/edgeagent`` as root, else ``$XDG_STATE_HOME/edgeagent`` (fallback ``~/.local/state/edgeagent``)."""
    euid = os.geteuid() if euid is None else euid
    environ = os.environ if environ is None else environ
    if euid == 0:
        return ROOT_STATE_DIR
    xdg = environ.get("XDG_STATE_HOME", "")
    if xdg and Path(xdg).is_absolute():  # the XDG spec says to ignore relative values
        return Path(xdg) / "edgeagent"
    home = environ.get("HOME") or str(Path.home())
    return Path(home) / ".local" / "state" / "edgeagent"


def read_device_model(path: Path = DEVICE_MODEL_PATH) -> str | None:
    """The device-tree model string (``Raspberry Pi 4 Model B Rev 1.4``), or None off ARM boards."""
    try:
        return path.read_bytes().rstrip(b"\0\n").decode("utf-8", "replace") or None
    except OSError:
        return None


def read_memory_mb(path: Path = MEMINFO_PATH) -> int | None:
    """Total RAM in MiB from /proc/meminfo, or None when unknown."""
    try:
        for line in path.read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024  # the kernel reports kB (KiB)
    except (OSError, ValueError, IndexError):
        return None
    return None


# --------------------------------------------------------------------------- loader


def load_config(
    args: argparse.Namespace,
    *,
    environ: Mapping[str, str] | None = None,
    device_model: str | None = None,
    hostname: str | None = None,
    euid: int | None = None,
    memory_mb: int | None = None,
) -> AgentConfig:
    """Build the one resolved config: defaults < profile < file (``args.config``) < flags.

    ``args`` is the namespace from a parser set up by :func:`add_agent_arguments`
    (missing attributes count as "not given"). ``environ``, ``device_model``,
    ``hostname``, ``euid`` and ``memory_mb`` replace the real environment, the
    device-tree model, the hostname, the effective uid and the RAM size, for
    tests; the model and RAM size are read from /proc only when ``device_model``
    is None. Raises ConfigError (one line) on any bad value.
    """
    from .profiles import detect_profile, load_profiles

    config_path = getattr(args, "config", None)
    config_file = Path(config_path).expanduser().absolute() if config_path else None
    file = _file_layer(config_file) if config_file is not None else _Layer(source="")
    flags = _flag_layer(args)

    profiles = load_profiles()
    if flags.profile is not None or file.profile is not None:
        chosen, where = (
            (flags.profile, "--profile")
            if flags.profile is not None
            else (file.profile, f"{file.source}: profile")
        )
        if chosen not in profiles:
            raise ConfigError(
                f"{where}: expected one of {', '.join(sorted(profiles))}, got {show(chosen)}"
            )
        profile = profiles[chosen]
    else:
        if device_model is None:
            device_model = read_device_model()
            memory_mb = read_memory_mb() if memory_mb is None else memory_mb
        profile = detect_profile(device_model, profiles, memory_mb=memory_mb)

    layers = [_profile_layer(profile), file, flags]

    def pick(attr: str, default: Any) -> Any:
        value = default
        for layer in layers:
            if getattr(layer, attr) is not None:
                value = getattr(layer, attr)
        return value

    # Gossip: the top-most layer naming a preset, plus overrides from there upwards.
    start = max(i for i, layer in enumerate(layers) if layer.preset is not None or i == 0)
    preset_name: str = layers[start].preset or DEFAULT_PRESET
    overrides: dict[str, Any] = {}
    for layer in layers[start:]:
        overrides.update(layer.gossip)
    limits = Limits(**{k: v for layer in layers for k, v in layer.limits.items()})
    cluster: str = pick("cluster", DEFAULT_CLUSTER)
    gossip = gossip_preset(
        preset_name, **overrides, cluster_name=cluster, **dataclasses.asdict(limits)
    )
    if not gossip.probe_timeout < gossip.probe_interval:
        src = _source_of(layers[start:], ("probe_timeout", "probe_interval"))
        raise ConfigError(
            f"{src}gossip.probe_timeout: expected less than gossip.probe_interval ({gossip.probe_interval:g} s), got {gossip.probe_timeout:g}"
        )
    if not MIN_DATAGRAM_BYTES <= gossip.max_datagram_bytes <= MAX_UDP_PAYLOAD:
        src = _source_of(layers[start:], ("max_datagram_bytes",))
        raise ConfigError(
            f"{src}gossip.max_datagram_bytes: expected {MIN_DATAGRAM_BYTES}..{MAX_UDP_PAYLOAD}, got {gossip.max_datagram_bytes}"
        )

    prefix: str = pick("overlay_prefix", DEFAULT_OVERLAY_PREFIX)
    block: int = pick("block_prefixlen", DEFAULT_BLOCK_PREFIXLEN)
    max_len = ipaddress.ip_network(prefix).max_prefixlen
    low = ipaddress.ip_network(prefix).prefixlen
    if not low < block <= max_len:
        src = (
            f"{file.source}: "
            if file.block_prefixlen is not None or file.overlay_prefix is not None
            else ""
        )
        raise ConfigError(
            f"{src}overlay.block_prefixlen: expected {low + 1}..{max_len} (inside {prefix}), got {block}"
        )

    mdns: bool = pick("mdns", True)
    tun: bool = pick("tun", False)
    metrics_on: bool = pick("metrics_on", False)
    dns_on: bool = pick("dns_on", False)
    metrics = (
        pick("metrics_addr", (DEFAULT_LOCAL_HOST, DEFAULT_METRICS_PORT)) if metrics_on else None
    )
    dns = pick("dns_addr", (DEFAULT_LOCAL_HOST, DEFAULT_DNS_PORT)) if dns_on else None

    name = pick("name", None)
    if name is None:
        host = hostname if hostname is not None else socket.gethostname()
        try:
            name = _check_name(host, "name")
        except _Invalid as exc:
            raise ConfigError(
                f"hostname {show(host)} is not a usable node name; set --name: expected {exc.expected}"
            ) from None

    return AgentConfig(
        name=name,
        bind=pick("bind", (DEFAULT_BIND_HOST, DEFAULT_GOSSIP_PORT)),
        advertise=pick("advertise", None),
        join=pick("join", ()),
        profile=profile.name,
        cluster=cluster,
        key_file=pick("key_file", None),
        state_dir=pick("state_dir", None) or default_state_dir(euid, environ),
        mdns=mdns,
        metrics=metrics,
        log_format=pick("log_format", "text"),
        log_level=pick("log_level", "info"),
        gossip=gossip,
        dns=dns,
        overlay_prefix=prefix,
        block_prefixlen=block,
        dead_quarantine_s=pick("dead_quarantine_s", DEFAULT_DEAD_QUARANTINE_S),
        limits=limits,
        features=Features(mdns=mdns, metrics=metrics is not None, dns=dns is not None, tun=tun),
        config_file=config_file,
        gossip_preset=preset_name,
    )


def _source_of(layers: Sequence[_Layer], keys: Sequence[str]) -> str:
    """``"FILE: "`` for the top-most layer that set one of ``keys`` (flags and presets: empty)."""
    for layer in reversed(layers):
        if any(k in layer.gossip for k in keys) and layer.source and layer.source != "flags":
            return f"{layer.source}: "
    return ""
