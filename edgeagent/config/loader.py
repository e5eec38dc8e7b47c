"""``load_config``: stack the layers and resolve them into one :class:`AgentConfig`.

The rules (precedence, the gossip preset rule, feature switches) are described
in :mod:`edgeagent.config`; this module applies them in that order: choose the
profile, pick each scalar from the highest layer that sets it, build the
``GossipConfig`` (whose own invariant errors become one ConfigError line naming
the layer and key), check the overlay block size, then the feature addresses.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import socket
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from gossip.config import GossipConfig, InvalidConfig
from gossip.config import preset as gossip_preset

from ..errors import ConfigError
from .checks import Invalid, check_name, show
from .layers import Layer, file_layer, flag_layer, profile_layer
from .machine import default_state_dir, read_device_model, read_memory_mb
from .profiles import Profile, detect_profile, load_profiles
from .schema import (
    DEFAULT_BIND_HOST,
    DEFAULT_BLOCK_PREFIXLEN,
    DEFAULT_CLUSTER,
    DEFAULT_COAP_HOST,
    DEFAULT_COAP_PORT,
    DEFAULT_DEAD_QUARANTINE_S,
    DEFAULT_DNS_PORT,
    DEFAULT_GOSSIP_PORT,
    DEFAULT_LOCAL_HOST,
    DEFAULT_LOG_FORMAT,
    DEFAULT_LOG_LEVEL,
    DEFAULT_METRICS_PORT,
    DEFAULT_MQTT_HOST,
    DEFAULT_MQTT_PORT,
    DEFAULT_OVERLAY_PREFIX,
    DEFAULT_POLICY_INTERVAL_S,
    DEFAULT_PRESET,
    AgentConfig,
    Features,
    Limits,
    default_enroll_port,
    gossip_key,
)


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
    config_path = getattr(args, "config", None)
    config_file = Path(config_path).expanduser().absolute() if config_path else None
    file = file_layer(config_file) if config_file is not None else Layer(source="")
    flags = flag_layer(args)
    profile = _choose_profile(file, flags, device_model, memory_mb)
    layers = [profile_layer(profile), file, flags]

    def pick(attr: str, default: Any) -> Any:
        return _pick(layers, attr, default)

    cluster: str = pick("cluster", DEFAULT_CLUSTER)
    limits = Limits(**{k: v for layer in layers for k, v in layer.limits.items()})
    preset_name, gossip, dropped = _resolve_gossip(layers, cluster, limits)
    prefix, block = _resolve_overlay(layers, file)
    mdns: bool = pick("mdns", True)
    metrics = (
        pick("metrics_addr", (DEFAULT_LOCAL_HOST, DEFAULT_METRICS_PORT))
        if pick("metrics_on", False)
        else None
    )
    dns = (
        pick("dns_addr", (DEFAULT_LOCAL_HOST, DEFAULT_DNS_PORT)) if pick("dns_on", False) else None
    )
    coap_addr = pick("coap_addr", None)
    coap = (coap_addr or (DEFAULT_COAP_HOST, DEFAULT_COAP_PORT)) if pick("coap_on", True) else None
    mqtt_addr = pick("mqtt_addr", None)
    mqtt = (mqtt_addr or (DEFAULT_MQTT_HOST, DEFAULT_MQTT_PORT)) if pick("mqtt_on", True) else None
    bind = pick("bind", (DEFAULT_BIND_HOST, DEFAULT_GOSSIP_PORT))
    return AgentConfig(
        name=_node_name(pick("name", None), hostname),
        bind=bind,
        advertise=pick("advertise", None),
        join=pick("join", ()),
        profile=profile.name,
        cluster=cluster,
        key_file=pick("key_file", None),
        state_dir=pick("state_dir", None) or default_state_dir(euid, environ),
        mdns=mdns,
        metrics=metrics,
        log_format=pick("log_format", DEFAULT_LOG_FORMAT),
        log_level=pick("log_level", DEFAULT_LOG_LEVEL),
        gossip=gossip,
        dns=dns,
        coap=coap,
        coap_explicit=coap_addr is not None,
        mqtt=mqtt,
        mqtt_explicit=mqtt_addr is not None,
        **_mqtt_extra(layers, mqtt is not None),
        overlay_prefix=prefix,
        block_prefixlen=block,
        dead_quarantine_s=pick("dead_quarantine_s", DEFAULT_DEAD_QUARANTINE_S),
        limits=limits,
        features=Features(mdns=mdns, metrics=metrics is not None, dns=dns is not None),
        config_file=config_file,
        gossip_preset=preset_name,
        gossip_dropped=dropped,
        name_is_default=pick("name", None) is None,
        enroll_port=pick("enroll_port", default_enroll_port(bind[1])),
        cluster_source=_cluster_source(file, flags),
        **_services_and_policy(pick, file.policy_sync),
    )


def _services_and_policy(pick: Callable[[str, Any], Any], sync: dict[str, Any]) -> dict[str, Any]:
    """The [services] and [policy] fields of AgentConfig (``sync``: the file's url, ca, ...)."""
    return {
        "services": pick("services", ()),
        "services_mdns_import": pick("services_mdns_import", True),
        "services_mdns_export": pick("services_mdns_export", True),
        "services_site": pick("services_site", ""),
        "policy_trusted_keys": pick("policy_trusted_keys", ()),
        "policy_url": sync.get("url", ""),
        "policy_ca": sync.get("ca"),
        "policy_interval_s": sync.get("interval", DEFAULT_POLICY_INTERVAL_S),
        "policy_report_url": sync.get("report_url", ""),
    }


def _cluster_source(file: Layer, flags: Layer) -> str:
    """Where the cluster name was set, for a conflict message; "" when it is the default."""
    if flags.cluster is not None:
        return "--cluster"
    return f"{file.source}: cluster" if file.cluster is not None else ""


def _pick(layers: Sequence[Layer], attr: str, default: Any) -> Any:
    """The value of ``attr`` from the highest layer that sets it, else ``default``."""
    value = default
    for layer in layers:
        if getattr(layer, attr) is not None:
            value = getattr(layer, attr)
    return value


def _choose_profile(
    file: Layer, flags: Layer, device_model: str | None, memory_mb: int | None
) -> Profile:
    """``--profile``, else the file's ``profile``, else detected from the machine."""
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
        return profiles[chosen]
    if device_model is None:
        device_model = read_device_model()
        memory_mb = read_memory_mb() if memory_mb is None else memory_mb
    return detect_profile(device_model, profiles, memory_mb=memory_mb)


def _resolve_gossip(
    layers: Sequence[Layer], cluster: str, limits: Limits
) -> tuple[str, GossipConfig, tuple[str, ...]]:
    """(preset name, GossipConfig, the lower layers' keys the preset dropped).

    The highest layer naming a preset starts the timing over from that preset;
    only its own and higher layers' gossip keys apply on top.
    """
    start = max(i for i, layer in enumerate(layers) if layer.preset is not None or i == 0)
    preset_name: str = layers[start].preset or DEFAULT_PRESET
    overrides: dict[str, Any] = {}
    for layer in layers[start:]:
        overrides.update(layer.gossip)
    dropped = tuple(
        f"{gossip_key(key)} ({layer.source})"
        for layer in layers[:start]
        for key in layer.gossip
        if key not in overrides
    )
    try:
        gossip = gossip_preset(
            preset_name, **overrides, cluster_name=cluster, **dataclasses.asdict(limits)
        )
    except InvalidConfig as exc:
        src = _source_of(layers, start, (exc.field, *exc.others))
        raise ConfigError(f"{src}{exc.describe(gossip_key)}") from None
    return preset_name, gossip, dropped


def _source_of(layers: Sequence[Layer], start: int, keys: Sequence[str]) -> str:
    """``"FILE: "`` for the highest layer that set one of ``keys`` (flags and presets: empty).

    Gossip keys count from the preset's layer up; limits and the cluster name from every layer.
    """
    for index in reversed(range(len(layers))):
        layer = layers[index]
        sets = any(
            (k in layer.gossip and index >= start)
            or k in layer.limits
            or (k == "cluster_name" and layer.cluster is not None)
            for k in keys
        )
        if sets and layer.source and layer.source != "flags":
            return f"{layer.source}: "
    return ""


def _resolve_overlay(layers: Sequence[Layer], file: Layer) -> tuple[str, int]:
    """The overlay prefix and block length; the block must fit inside the prefix."""
    prefix: str = _pick(layers, "overlay_prefix", DEFAULT_OVERLAY_PREFIX)
    block: int = _pick(layers, "block_prefixlen", DEFAULT_BLOCK_PREFIXLEN)
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
    return prefix, block


def _node_name(name: str | None, hostname: str | None) -> str:
    """The configured name, else the hostname if it is a usable node name (the agent makes
    a default name from it when the identity is created)."""
    if name is not None:
        return name
    host = hostname if hostname is not None else socket.gethostname()
    try:
        return check_name(host, "name")
    except Invalid as exc:
        raise ConfigError(
            f"hostname {show(host)} is not a usable node name; set --name: expected {exc.expected}"
        ) from None


def _mqtt_extra(layers: list[Layer], mqtt_on: bool) -> dict[str, Any]:
    """The TLS listener, attach and uplink settings; none of them without the MQTT feature
    (an ``[uplink]`` with MQTT off is a ConfigError: its data path is the agent's broker)."""
    if not mqtt_on:
        for layer in layers:
            if layer.uplink is not None:
                raise ConfigError(f"{layer.source}: uplink: needs the MQTT feature (mqtt is off)")
        return {}
    return {k: _pick(layers, k, None) for k in ("mqtt_tls", "mqtt_attach", "uplink")}
