"""Firmware profiles: per-device-class defaults shipped as TOML in ``firmware_profiles/``.

A profile is the lowest layer above the built-in defaults (see
:mod:`edgeagent.config`). Each file ``firmware_profiles/NAME.toml`` holds::

    name = "rpi-4"                        # must equal the file name
    description = "Raspberry Pi 4 / 400 / CM4 (1-8 GB)"
    match = ["Raspberry Pi 4", ...]       # substrings of /proc/device-tree/model
    max_memory_mb = 256                   # optional: chosen on unmatched boards this small
    [gossip]    preset = "lan" plus any GossipConfig overrides (as in the config file)
    [limits]    max_members, max_broadcast_queue, max_state_bytes   (all three required)
    [features]  mdns, metrics, dns                                   (all three required)

Detection: the longest match string contained in the model (case-insensitive)
wins; else, when the machine's memory is known, the smallest profile whose
``max_memory_mb`` covers it; else ``generic-x86_64``. Files are read with
importlib.resources so they work from a wheel, and validated at load: a bad
file is one ConfigError line naming the file and the key.
"""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from types import MappingProxyType
from typing import Any

from gossip.config import GossipConfig, InvalidConfig
from gossip.config import preset as gossip_preset

from ..errors import ConfigError
from .checks import show
from .reader import TableReader
from .schema import DEFAULT_PROFILE, Features, Limits, gossip_key

PROFILE_PACKAGE = "firmware_profiles"
PROFILE_KEYS = ("name", "description", "match", "max_memory_mb", "gossip", "limits", "features")


@dataclass(frozen=True, slots=True)
class Profile:
    """One device class's defaults."""

    name: str
    description: str
    match: tuple[str, ...]  # device-tree model substrings that select it
    gossip_preset: str
    gossip_overrides: Mapping[str, Any]  # validated GossipConfig field overrides (read-only)
    limits: Limits
    features: Features
    max_memory_mb: int | None = None  # fallback selection by memory size
    source: str = ""  # "firmware_profiles/NAME.toml", for messages

    def gossip_config(self) -> GossipConfig:
        """The profile's gossip settings on their own (limits applied)."""
        return gossip_preset(
            self.gossip_preset, **self.gossip_overrides, **dataclasses.asdict(self.limits)
        )


def parse_profile(source: str, text: str, expected_name: str | None = None) -> Profile:
    """Validate one profile document. ``source`` names it in errors."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: invalid TOML: {exc}") from None
    reader = TableReader(source, data)
    reader.check_keys(data, PROFILE_KEYS)

    def required(table: Mapping[str, Any], key: str, prefix: str = "") -> Any:
        if key not in table:
            raise ConfigError(f"{source}: {prefix}{key}: missing; every profile sets it")
        return table[key]

    name = required(data, "name")
    if not isinstance(name, str) or not name:
        raise reader.error("name", "a non-empty string", name)
    if expected_name is not None and name != expected_name:
        raise reader.error("name", f'"{expected_name}" (the file name)', name)
    description = required(data, "description")
    if not isinstance(description, str) or not description:
        raise reader.error("description", "a non-empty string", description)
    match = required(data, "match")
    if not isinstance(match, list) or not all(isinstance(m, str) and m.strip() for m in match):
        raise reader.error("match", "a list of non-empty strings", match)
    memory = data.get("max_memory_mb")
    if memory is not None and (
        isinstance(memory, bool) or not isinstance(memory, int) or memory < 1
    ):
        raise reader.error("max_memory_mb", "a positive integer", memory)

    gossip_table = reader.table("gossip")
    preset_name, overrides = reader.gossip(gossip_table)
    if preset_name is None:
        required(gossip_table, "preset", "gossip.")
    limits_table = reader.table("limits")
    for f in dataclasses.fields(Limits):
        required(limits_table, f.name, "limits.")
    features_table = reader.table("features")
    for f in dataclasses.fields(Features):
        required(features_table, f.name, "features.")
    profile = Profile(
        name=name,
        description=description,
        match=tuple(match),
        gossip_preset=str(preset_name),
        gossip_overrides=MappingProxyType(overrides),
        limits=Limits(**reader.limits(limits_table)),
        features=Features(**reader.features(features_table)),
        max_memory_mb=memory,
        source=source,
    )
    try:
        profile.gossip_config()
    except InvalidConfig as exc:
        raise ConfigError(f"{source}: {exc.describe(gossip_key)}") from None
    return profile


def load_profiles() -> dict[str, Profile]:
    """Every shipped profile by name, validated (ConfigError on a bad or ambiguous file)."""
    profiles: dict[str, Profile] = {}
    owners: dict[str, str] = {}
    for entry in sorted(resources.files(PROFILE_PACKAGE).iterdir(), key=lambda e: e.name):
        if not entry.name.endswith(".toml"):
            continue
        source = f"{PROFILE_PACKAGE}/{entry.name}"
        try:
            text = entry.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{source}: cannot read: {exc}") from None
        profile = parse_profile(source, text, expected_name=entry.name.removesuffix(".toml"))
        for needle in profile.match:
            key = needle.casefold()
            if key in owners:
                raise ConfigError(
                    f"{source}: match: {show(needle)} is already claimed by {owners[key]}"
                )
            owners[key] = source
        profiles[profile.name] = profile
    if DEFAULT_PROFILE not in profiles:
        raise ConfigError(
            f"{PROFILE_PACKAGE}/{DEFAULT_PROFILE}.toml: missing; it is the fallback profile"
        )
    return profiles


def detect_profile(
    model: str | None,
    profiles: Mapping[str, Profile],
    *,
    memory_mb: int | None = None,
) -> Profile:
    """The profile for this device-tree ``model`` (longest matching substring), else by ``memory_mb``, else generic."""
    if model:
        folded = model.casefold()
        hits = [
            (len(m), p.name) for p in profiles.values() for m in p.match if m.casefold() in folded
        ]
        if hits:
            return profiles[max(hits)[1]]
    if memory_mb is not None:
        small = [
            p
            for p in profiles.values()
            if p.max_memory_mb is not None and memory_mb <= p.max_memory_mb
        ]
        if small:
            return min(small, key=lambda p: (p.max_memory_mb, p.name))
    return profiles[DEFAULT_PROFILE]
