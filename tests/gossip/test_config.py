"""GossipConfig checks its own invariants: every preset is valid, each broken rule raises InvalidConfig."""

from __future__ import annotations

import math
from typing import Any

import pytest

from gossip import codec
from gossip.config import (
    MAX_UDP_PAYLOAD,
    MIN_DATAGRAM_BYTES,
    PRESETS,
    GossipConfig,
    InvalidConfig,
    lan,
    preset,
)
from gossip.errors import LocalError

DURATIONS = (
    "probe_interval",
    "probe_timeout",
    "gossip_interval",
    "gossip_to_the_dead_time",
    "push_pull_interval",
    "reconnect_interval",
    "dead_member_ttl",
)
COUNTS = (
    "indirect_checks",
    "awareness_max_multiplier",
    "suspicion_mult",
    "suspicion_max_timeout_mult",
    "retransmit_mult",
    "gossip_nodes",
    "max_datagram_bytes",
    "max_meta_bytes",
    "max_members",
    "max_broadcast_queue",
    "max_user_broadcast_queue",
    "max_state_bytes",
    "max_state_memory",
    "max_total_state_memory",
    "max_stream_bytes",
)


def broken(**changes: Any) -> InvalidConfig:
    with pytest.raises(InvalidConfig) as info:
        lan(**changes)
    return info.value


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_is_valid(name: str) -> None:
    config = preset(name)
    assert config.probe_timeout < config.probe_interval


def test_invalid_config_is_a_local_error_and_a_value_error() -> None:
    error = broken(probe_timeout=2.0)
    assert isinstance(error, LocalError) and isinstance(error, ValueError)


def test_every_field_is_covered_by_a_rule() -> None:
    checked = {*DURATIONS, *COUNTS, "lifeguard", "cluster_name"}
    assert checked == {f for f in GossipConfig.__dataclass_fields__}


def test_probe_timeout_must_be_less_than_probe_interval() -> None:
    error = broken(probe_interval=1.0, probe_timeout=1.0)
    assert (error.field, error.others, error.value) == ("probe_timeout", ("probe_interval",), 1.0)
    assert str(error) == "probe_timeout: expected less than probe_interval (1 s), got 1"
    assert error.describe(lambda f: f"gossip.{f}") == (
        "gossip.probe_timeout: expected less than gossip.probe_interval (1 s), got 1"
    )
    assert lan(probe_interval=1.0, probe_timeout=0.99).probe_timeout == 0.99


@pytest.mark.parametrize("name", DURATIONS)
@pytest.mark.parametrize("value", [0, -1.0, math.nan, math.inf, True, "1"])
def test_durations_must_be_finite_positive_numbers(name: str, value: object) -> None:
    changes: dict[str, Any] = {name: value}
    if name == "probe_timeout":
        changes["probe_interval"] = 10.0
    error = broken(**changes)
    assert error.field == name and "positive number" in error.expected


@pytest.mark.parametrize("name", COUNTS)
@pytest.mark.parametrize("value", [0, -3, 1.5, True])
def test_counts_and_sizes_must_be_integers_at_least_one(name: str, value: object) -> None:
    error = broken(**{name: value})
    assert error.field == name and error.expected == "an integer >= 1"


def test_suspicion_max_timeout_mult_of_one_keeps_max_equal_to_min() -> None:
    assert lan(suspicion_max_timeout_mult=1).suspicion_max_timeout_mult == 1


def test_lifeguard_must_be_a_bool() -> None:
    assert broken(lifeguard=1).field == "lifeguard"


def test_cluster_name_must_be_a_string() -> None:
    assert broken(cluster_name=b"edge").field == "cluster_name"


@pytest.mark.parametrize(
    ("size", "ok"),
    [
        (MIN_DATAGRAM_BYTES - 1, False),
        (MIN_DATAGRAM_BYTES, True),
        (MAX_UDP_PAYLOAD, True),
        (MAX_UDP_PAYLOAD + 1, False),
    ],
)
def test_datagram_size_stays_within_what_udp_carries(size: int, ok: bool) -> None:
    if ok:
        assert lan(max_datagram_bytes=size).max_datagram_bytes == size
    else:
        assert str(broken(max_datagram_bytes=size)) == (
            f"max_datagram_bytes: expected {MIN_DATAGRAM_BYTES}..{MAX_UDP_PAYLOAD}, got {size}"
        )


def test_meta_and_member_limits_stay_within_what_the_codec_decodes() -> None:
    assert lan(max_meta_bytes=codec.MAX_META_BYTES).max_meta_bytes == codec.MAX_META_BYTES
    assert broken(max_meta_bytes=codec.MAX_META_BYTES + 1).field == "max_meta_bytes"
    assert lan(max_members=codec.MAX_PUSHPULL_MEMBERS).max_members == codec.MAX_PUSHPULL_MEMBERS
    assert broken(max_members=codec.MAX_PUSHPULL_MEMBERS + 1).field == "max_members"


def test_with_overrides_is_checked_too() -> None:
    with pytest.raises(InvalidConfig):
        lan().with_overrides(probe_timeout=5.0)
