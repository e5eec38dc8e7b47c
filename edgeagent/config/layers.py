"""The three layers above the defaults: what the firmware profile, the file and the flags each set.

A :class:`Layer` holds one layer's settings with None for "not set here";
:func:`~edgeagent.config.loader.load_config` stacks them. Building a layer
checks every value it sets, so a bad value is reported with its own source
(``FILE: KEY: ...`` or ``--FLAG: ...``).
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gossip.config import PRESETS
from overlay.catalog import Instance

from ..errors import ConfigError
from .checks import (
    Invalid,
    check_advertise,
    check_bind,
    check_bool,
    check_choice,
    check_https_url,
    check_join_list,
    check_listener,
    check_name,
    check_path,
    check_peer,
    check_port,
    check_positive_int,
    check_positive_number,
    check_prefix,
    check_switch_or_address,
    check_trusted_key,
    show,
)
from .mqtt_extra import read_mqtt_extra
from .profiles import Profile
from .reader import TableReader, read_toml
from .schema import (
    FILE_KEYS,
    LOG_FORMATS,
    LOG_LEVELS,
    MAX_TRUSTED_KEYS,
    MQTT_KEYS,
    OVERLAY_KEYS,
    POLICY_KEYS,
    HostPort,
    MqttAttach,
    MqttTls,
    UplinkSettings,
)
from .uplink import read_uplink


@dataclass(slots=True)
class Layer:
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
    enroll_port: int | None = None
    log_format: str | None = None
    log_level: str | None = None
    metrics_on: bool | None = None
    metrics_addr: HostPort | None = None
    dns_on: bool | None = None
    dns_addr: HostPort | None = None
    coap_on: bool | None = None
    coap_addr: HostPort | None = None
    mqtt_on: bool | None = None
    mqtt_addr: HostPort | None = None
    mqtt_tls: MqttTls | None = None
    mqtt_attach: MqttAttach | None = None
    mdns: bool | None = None
    preset: str | None = None
    gossip: dict[str, Any] = field(default_factory=dict)
    limits: dict[str, int] = field(default_factory=dict)
    overlay_prefix: str | None = None
    block_prefixlen: int | None = None
    dead_quarantine_s: float | None = None
    services: tuple[Instance, ...] | None = None
    services_mdns_import: bool | None = None
    services_mdns_export: bool | None = None
    services_site: str | None = None
    policy_trusted_keys: tuple[bytes, ...] | None = None
    policy_sync: dict[str, Any] = field(default_factory=dict)  # url, ca, interval, report_url
    uplink: UplinkSettings | None = None


def file_layer(path: Path) -> Layer:
    """What the TOML file at ``path`` sets; relative paths in it are relative to its directory."""
    reader = TableReader(str(path), read_toml(path))
    data = reader.data
    reader.check_keys(data, FILE_KEYS)
    base = path.parent.absolute()
    layer = Layer(source=str(path))
    layer.name = reader.get(data, "name", lambda v: check_name(v, "name"))
    layer.bind = reader.get(data, "bind", check_bind)
    layer.advertise = reader.get(data, "advertise", check_advertise)
    layer.join = reader.get(data, "join", check_join_list)
    layer.cluster = reader.get(data, "cluster", lambda v: check_name(v, "cluster name"))
    layer.key_file = reader.get(data, "key_file", lambda v: check_path(v, base))
    layer.state_dir = reader.get(data, "state_dir", lambda v: check_path(v, base))
    layer.profile = reader.get(data, "profile", lambda v: check_name(v, "profile name"))
    layer.enroll_port = reader.get(data, "enroll_port", check_port)
    layer.log_format = reader.get(data, "log_format", lambda v: check_choice(v, LOG_FORMATS))
    layer.log_level = reader.get(data, "log_level", lambda v: check_choice(v, LOG_LEVELS))
    features = reader.features(reader.table("features"))
    layer.mdns = features.get("mdns")
    layer.metrics_on = features.get("metrics")
    layer.dns_on = features.get("dns")
    mdns = reader.get(data, "mdns", check_bool)
    if mdns is not None:
        layer.mdns = mdns
    metrics = reader.get(data, "metrics", check_switch_or_address)
    if metrics is not None:
        layer.metrics_on, layer.metrics_addr = metrics
    dns = reader.get(data, "dns", check_switch_or_address)
    if dns is not None:
        layer.dns_on, layer.dns_addr = dns
    coap = reader.get(data, "coap", check_switch_or_address)
    if coap is not None:
        layer.coap_on, layer.coap_addr = coap
    mqtt = reader.table("mqtt")
    reader.check_keys(mqtt, MQTT_KEYS, "mqtt.")
    listen = reader.get(mqtt, "listen", check_switch_or_address, "mqtt.")
    if listen is not None:
        layer.mqtt_on, layer.mqtt_addr = listen
    layer.mqtt_tls, layer.mqtt_attach = read_mqtt_extra(reader, mqtt, base)
    layer.preset, layer.gossip = reader.gossip(reader.table("gossip"))
    layer.limits = reader.limits(reader.table("limits"))
    overlay = reader.table("overlay")
    reader.check_keys(overlay, OVERLAY_KEYS, "overlay.")
    layer.overlay_prefix = reader.get(overlay, "prefix", check_prefix, "overlay.")
    layer.block_prefixlen = reader.get(overlay, "block_prefixlen", check_positive_int, "overlay.")
    layer.dead_quarantine_s = reader.get(
        overlay, "dead_quarantine_s", check_positive_number, "overlay."
    )
    if "service" in data:
        layer.services = reader.service_list(data["service"])
    switches = reader.services_table(reader.table("services"))
    layer.services_mdns_import = switches.get("mdns_import")
    layer.services_mdns_export = switches.get("mdns_export")
    layer.services_site = switches.get("site")
    layer.policy_trusted_keys = _policy_keys(reader, base)
    layer.policy_sync = _policy_sync(reader, base)
    layer.uplink = read_uplink(reader, base)
    return layer


def _policy_sync(reader: TableReader, base: Path) -> dict[str, Any]:
    """``[policy] url / ca / interval / report_url`` (only the ones set)."""
    table = reader.table("policy")
    checks: dict[str, Callable[[object], Any]] = {
        "url": check_https_url,
        "report_url": check_https_url,
        "ca": lambda v: check_path(v, base),
        "interval": check_positive_number,
    }
    out = {}
    for key, check in checks.items():
        value = reader.get(table, key, check, "policy.")
        if value is not None:
            out[key] = value
    return out


def _policy_keys(reader: TableReader, base: Path) -> tuple[bytes, ...] | None:
    """The ``[policy] trusted_keys`` list (None when absent)."""
    table = reader.table("policy")
    reader.check_keys(table, POLICY_KEYS, "policy.")
    if "trusted_keys" not in table:
        return None
    value = table["trusted_keys"]
    if not isinstance(value, list) or len(value) > MAX_TRUSTED_KEYS:
        raise reader.error(
            "policy.trusted_keys", f"a list of at most {MAX_TRUSTED_KEYS} keys", value
        )
    return tuple(_one_key(reader, item, i, base) for i, item in enumerate(value))


def _one_key(reader: TableReader, item: object, index: int, base: Path) -> bytes:
    try:
        return check_trusted_key(item, base)
    except Invalid as exc:
        raise reader.error(f"policy.trusted_keys[{index}]", str(exc)) from None


def flag_layer(args: argparse.Namespace) -> Layer:
    """What the ``run`` flags set (attributes missing from ``args`` count as not given)."""

    def check_flag(option: str, value: object, check: Callable[[object], Any]) -> Any:
        try:
            return check(value)
        except Invalid as exc:
            raise ConfigError(f"{option}: expected {exc.expected}, got {show(value)}") from None

    def flag(dest: str, option: str, check: Callable[[object], Any]) -> Any:
        value = getattr(args, dest, None)
        return None if value is None else check_flag(option, value, check)

    def switch(value: object) -> tuple[bool, HostPort | None]:
        if isinstance(value, str) and value.lower() == "off":
            return False, None
        try:
            return True, check_listener(value)
        except Invalid as exc:
            raise Invalid(f"{exc.expected}, or off") from None

    layer = Layer(source="flags")
    layer.name = flag("name", "--name", lambda v: check_name(v, "name"))
    layer.bind = flag("bind", "--bind", check_bind)
    layer.advertise = flag("advertise", "--advertise", check_advertise)
    joins = getattr(args, "join", None)
    if joins:
        layer.join = tuple(check_flag("--join", j, check_peer) for j in joins)
    layer.cluster = flag("cluster", "--cluster", lambda v: check_name(v, "cluster name"))
    layer.key_file = flag("key_file", "--key-file", lambda v: check_path(v, None))
    layer.state_dir = flag("state_dir", "--state-dir", lambda v: check_path(v, None))
    layer.profile = flag("profile", "--profile", lambda v: check_name(v, "profile name"))
    layer.enroll_port = flag("enroll_port", "--enroll-port", check_port)
    layer.preset = flag("preset", "--preset", lambda v: check_choice(v, sorted(PRESETS)))
    layer.log_format = flag("log_format", "--log-format", lambda v: check_choice(v, LOG_FORMATS))
    layer.log_level = flag("log_level", "--log-level", lambda v: check_choice(v, LOG_LEVELS))
    layer.mdns = flag("mdns", "--no-mdns", check_bool)
    metrics = flag("metrics", "--metrics", switch)
    if metrics is not None:
        layer.metrics_on, layer.metrics_addr = metrics
    dns = flag("dns", "--dns", switch)
    if dns is not None:
        layer.dns_on, layer.dns_addr = dns
    coap = flag("coap", "--coap", switch)
    if coap is not None:
        layer.coap_on, layer.coap_addr = coap
    mqtt = flag("mqtt", "--mqtt", switch)
    if mqtt is not None:
        layer.mqtt_on, layer.mqtt_addr = mqtt
    return layer


def profile_layer(profile: Profile) -> Layer:
    """What the firmware profile sets: features, a preset with its overrides, and all limits."""
    return Layer(
        source=profile.source,
        mdns=profile.features.mdns,
        metrics_on=profile.features.metrics,
        dns_on=profile.features.dns,
        preset=profile.gossip_preset,
        gossip=dict(profile.gossip_overrides),
        limits=dataclasses.asdict(profile.limits),
    )
