"""Firmware profiles: every shipped file loads and validates, detection, clear errors for broken files."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from edgeagent import config
from edgeagent.cli import main
from edgeagent.config.profiles import Profile, detect_profile, load_profiles, parse_profile
from edgeagent.errors import ConfigError

EXPECTED = {
    "rpi-1", "rpi-2", "rpi-zero-2w", "rpi-3", "rpi-4", "rpi-5", "generic-x86_64", "constrained"
}  # fmt: skip
GOOD = """\
name = "test"
description = "a test profile"
match = ["Test Board"]
[gossip]
preset = "lan"
[limits]
max_members = 10
max_broadcast_queue = 10
max_state_bytes = 100
[features]
mdns = true
metrics = false
dns = false
"""


@pytest.fixture(scope="module")
def profiles() -> dict[str, Profile]:
    return load_profiles()


def test_all_shipped_profiles_load(profiles: dict[str, Profile]) -> None:
    assert set(profiles) == EXPECTED
    for profile in profiles.values():
        gossip = profile.gossip_config()
        assert gossip.probe_timeout < gossip.probe_interval
        assert gossip.max_members == profile.limits.max_members
        assert profile.source == f"firmware_profiles/{profile.name}.toml"


def test_constrained_profile_is_smaller_and_has_extras_off(profiles: dict[str, Profile]) -> None:
    small, big = profiles["constrained"], profiles["generic-x86_64"]
    assert small.limits.max_members < big.limits.max_members
    assert small.limits.max_state_bytes < big.limits.max_state_bytes
    assert not small.features.metrics and not small.features.dns
    assert small.max_memory_mb == 256


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("Raspberry Pi Model B Rev 1", "rpi-1"),
        ("Raspberry Pi Model B Rev 2", "rpi-1"),
        ("Raspberry Pi Model B Plus Rev 1.2", "rpi-1"),
        ("Raspberry Pi Compute Module Rev 1.0", "rpi-1"),
        ("Raspberry Pi 2 Model B Rev 1.1", "rpi-2"),
        ("Raspberry Pi 2 Model B Rev 1.2", "rpi-2"),
        ("Raspberry Pi Zero 2 W Rev 1.0", "rpi-zero-2w"),
        ("Raspberry Pi 3 Model B Rev 1.2", "rpi-3"),
        ("Raspberry Pi 3 Model B Plus Rev 1.3", "rpi-3"),
        ("Raspberry Pi Compute Module 3 Plus Rev 1.0", "rpi-3"),
        ("Raspberry Pi 4 Model B Rev 1.4", "rpi-4"),
        ("Raspberry Pi 400 Rev 1.0", "rpi-4"),
        ("Raspberry Pi Compute Module 4 Rev 1.0", "rpi-4"),
        ("Raspberry Pi 5 Model B Rev 1.0", "rpi-5"),
        ("Raspberry Pi Compute Module 5 Rev 1.0", "rpi-5"),
        ("Raspberry Pi Zero W Rev 1.1", "constrained"),
        ("Raspberry Pi Model A Plus Rev 1.1", "constrained"),
        ("raspberry pi 4 model b", "rpi-4"),
        ("Pine64 RockPro64", "generic-x86_64"),
        ("", "generic-x86_64"),
        (None, "generic-x86_64"),
    ],
)
def test_detection_by_device_tree_model(
    profiles: dict[str, Profile], model: str | None, expected: str
) -> None:
    assert detect_profile(model, profiles).name == expected


def test_pi_1_and_2_have_their_own_class_limits_and_pi_1_the_constrained_timing(
    profiles: dict[str, Profile],
) -> None:
    pi1, pi2, small = profiles["rpi-1"], profiles["rpi-2"], profiles["constrained"]
    generic, pi3 = profiles["generic-x86_64"], profiles["rpi-3"]
    assert small.limits.max_members < pi1.limits.max_members < pi2.limits.max_members
    assert pi2.limits.max_members <= pi3.limits.max_members < generic.limits.max_members
    assert pi1.gossip_config() == dataclasses.replace(
        small.gossip_config(),
        max_members=pi1.limits.max_members,
        max_state_bytes=pi1.limits.max_state_bytes,
    )
    assert not pi1.features.metrics and not pi1.features.dns and not pi2.features.dns


def test_unmatched_small_board_is_constrained_but_model_match_wins(
    profiles: dict[str, Profile],
) -> None:
    assert detect_profile("Orange Pi Zero", profiles, memory_mb=256).name == "constrained"
    assert detect_profile("Orange Pi Zero", profiles, memory_mb=512).name == "generic-x86_64"
    assert (
        detect_profile("Raspberry Pi 3 Model A Plus Rev 1.0", profiles, memory_mb=200).name
        == "rpi-3"
    )


def test_good_profile_text_parses() -> None:
    profile = parse_profile("x/test.toml", GOOD, expected_name="test")
    assert profile.match == ("Test Board",) and profile.limits.max_members == 10


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (lambda t: t.replace('preset = "lan"', 'preset = "lan"\nprobe_interval = "fast"'),
         'x/test.toml: gossip.probe_interval: expected a positive number, got "fast"'),
        (lambda t: t.replace("max_members = 10", "max_members = 0"),
         "x/test.toml: limits.max_members: expected a positive integer, got 0"),
        (lambda t: t.replace("max_members = 10\n", ""), "x/test.toml: limits.max_members: missing"),
        (lambda t: t.replace("dns = false\n", ""), "x/test.toml: features.dns: missing"),
        (lambda t: t + "tun = false\n", "x/test.toml: features.tun: unknown key"),
        (lambda t: t.replace('preset = "lan"', ""), "x/test.toml: gossip.preset: missing"),
        (lambda t: t.replace('match = ["Test Board"]', 'match = "Test Board"'),
         'x/test.toml: match: expected a list of non-empty strings, got "Test Board"'),
        (lambda t: t.replace('name = "test"', 'name = "other"'),
         'x/test.toml: name: expected "test" (the file name), got "other"'),
        (lambda t: t + "colour = 1\n", "x/test.toml: features.colour: unknown key"),
        (lambda t: t.replace('preset = "lan"', 'preset = "lan"\nprobe_timeout = 5.0'),
         "x/test.toml: gossip.probe_timeout: expected less than gossip.probe_interval (1 s), got 5"),
        (lambda t: t.replace("[gossip]", "[gossip"), "x/test.toml: invalid TOML"),
    ],
)  # fmt: skip
def test_broken_profile_gives_one_line_naming_file_and_key(edit, needle: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError) as info:
        parse_profile("x/test.toml", edit(GOOD), expected_name="test")
    assert str(info.value).startswith(needle), str(info.value)
    assert "\n" not in str(info.value)


def test_broken_shipped_profile_file_fails_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bad file in the profiles package stops load_profiles with the file named."""
    package = tmp_path / "broken_firmware_profiles"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "generic-x86_64.toml").write_text(GOOD.replace('"test"', '"generic-x86_64"'))
    (package / "bad.toml").write_text(
        GOOD.replace('"test"', '"bad"').replace("mdns = true", "mdns = 1")
    )
    monkeypatch.setattr("edgeagent.config.profiles.PROFILE_PACKAGE", "broken_firmware_profiles")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(
        ConfigError,
        match=r"^broken_firmware_profiles/bad.toml: features.mdns: expected true or false, got 1$",
    ):
        load_profiles()


def test_profiles_json_marks_the_matched_profile(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(config, "read_device_model", lambda: "Raspberry Pi 5 Model B Rev 1.0")
    assert main(["profiles", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["name"] for r in rows} == EXPECTED
    assert [r["name"] for r in rows if r["matched"]] == ["rpi-5"]
    assert all({"name", "description", "match", "matched", "gossip_preset"} <= set(r) for r in rows)


def test_profiles_table_marks_the_matched_profile(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(config, "read_device_model", lambda: "Raspberry Pi 3 Model B Rev 1.2")
    assert main(["profiles"]) == 0
    marked = [line for line in capsys.readouterr().out.splitlines() if line.startswith("*")]
    assert len(marked) == 1 and marked[0].split()[1] == "rpi-3"
