"""load_config: layer precedence, defaults, HOST:PORT parsing and one-line errors."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgeagent.config import (
    DEFAULT_GOSSIP_PORT,
    AgentConfig,
    add_agent_arguments,
    default_state_dir,
    load_config,
    parse_hostport,
)
from edgeagent.errors import ConfigError

EXAMPLE = Path(__file__).resolve().parents[2] / "edgeagent" / "example-config.toml"
ENV = {"HOME": "/home/pi"}


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_agent_arguments(parser)
    return parser.parse_args(list(argv))


def load(*argv: str, model: str = "", **kw: object) -> AgentConfig:
    """load_config with the machine taken out: no device model, fixed host, uid and env."""
    kw.setdefault("environ", ENV)
    kw.setdefault("hostname", "testhost")
    kw.setdefault("euid", 1000)
    return load_config(parse(*argv), device_model=model, memory_mb=4096, **kw)  # type: ignore[arg-type]


def write(tmp_path: Path, text: str, name: str = "agent.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def error_of(*argv: str, model: str = "") -> str:
    with pytest.raises(ConfigError) as info:
        load(*argv, model=model)
    message = str(info.value)
    assert "\n" not in message
    return message


# --------------------------------------------------------------------------- defaults


def test_no_config_gives_documented_defaults() -> None:
    cfg = load()
    assert cfg.name == "testhost"
    assert cfg.bind == ("0.0.0.0", DEFAULT_GOSSIP_PORT)
    assert cfg.advertise is None and cfg.join == ()
    assert cfg.cluster == "edgeagent" and cfg.gossip.cluster_name == "edgeagent"
    assert cfg.profile == "generic-x86_64"
    assert cfg.state_dir == Path("/home/pi/.local/state/edgeagent")
    assert cfg.mdns is True and cfg.metrics is None and cfg.dns is None
    assert cfg.log_format == "text" and cfg.log_level == "info"
    assert cfg.gossip_preset == "lan" and cfg.gossip.probe_interval == 1.0
    assert cfg.keyring_path == cfg.state_dir / "keyring"
    assert cfg.config_file is None


def test_state_dir_is_var_lib_for_root_and_xdg_otherwise() -> None:
    assert default_state_dir(0, {}) == Path("/var/lib/edgeagent")
    assert default_state_dir(1000, {"XDG_STATE_HOME": "/x/state", "HOME": "/h"}) == Path(
        "/x/state/edgeagent"
    )
    assert default_state_dir(1000, {"HOME": "/h"}) == Path("/h/.local/state/edgeagent")
    # the XDG spec says a relative value is invalid and must be ignored
    assert default_state_dir(1000, {"XDG_STATE_HOME": "rel", "HOME": "/h"}) == Path(
        "/h/.local/state/edgeagent"
    )
    assert load(euid=0).state_dir == Path("/var/lib/edgeagent")


def test_profile_is_detected_from_device_model() -> None:
    cfg = load(model="Raspberry Pi Zero 2 W Rev 1.0")
    assert cfg.profile == "rpi-zero-2w"
    assert cfg.limits.max_members == cfg.gossip.max_members == 1000


def test_small_unmatched_board_gets_constrained_profile() -> None:
    args = parse()
    cfg = load_config(
        args, device_model="Some ARM board", memory_mb=200, environ=ENV, hostname="h", euid=1
    )
    assert cfg.profile == "constrained"


def test_example_config_file_loads() -> None:
    cfg = load("-c", str(EXAMPLE))
    assert cfg.name == "gateway-1"
    assert cfg.join == (("192.0.2.11", 7946), ("gateway-2.example", 7946))
    assert cfg.metrics == ("127.0.0.1", 9464)
    assert cfg.config_file == EXAMPLE


# --------------------------------------------------------------------------- precedence


def test_each_layer_overrides_the_one_below(tmp_path: Path) -> None:
    """defaults < profile < file < flags, with a value set at each layer."""
    pi4 = "Raspberry Pi 4 Model B Rev 1.4"
    # default only: max_members 10000 (generic); profile rpi-4 sets 5000
    assert load().limits.max_members == 10_000
    assert load(model=pi4).limits.max_members == 5000
    # file beats profile
    f = write(tmp_path, "[limits]\nmax_members = 300\n[gossip]\nprobe_interval = 2.0\n")
    cfg = load("-c", str(f), model=pi4)
    assert cfg.limits.max_members == 300 and cfg.gossip.max_members == 300
    assert cfg.gossip.probe_interval == 2.0
    # profile features (rpi-4: metrics on) beat the default (off); file beats profile; flag beats file
    assert load(model=pi4).metrics == ("127.0.0.1", 9464)
    f2 = write(tmp_path, 'metrics = "127.0.0.1:9100"\nname = "from-file"\n', "b.toml")
    assert load("-c", str(f2), model=pi4).metrics == ("127.0.0.1", 9100)
    cfg = load("-c", str(f2), "--metrics", "127.0.0.2:9200", "--name", "from-flag", model=pi4)
    assert cfg.metrics == ("127.0.0.2", 9200) and cfg.name == "from-flag"
    assert load("-c", str(f2), "--metrics", "off", model=pi4).metrics is None
    assert load("-c", str(f2), model=pi4).name == "from-file"


def test_profile_probe_timeout_reaches_gossip_config_and_file_overrides_it(tmp_path: Path) -> None:
    zero = "Raspberry Pi Zero 2 W Rev 1.0"
    assert load(model=zero).gossip.probe_timeout == 0.8
    f = write(tmp_path, "[gossip]\nprobe_timeout = 0.3\n")
    assert load("-c", str(f), model=zero).gossip.probe_timeout == 0.3


def test_preset_at_a_higher_layer_drops_lower_overrides(tmp_path: Path) -> None:
    zero = "Raspberry Pi Zero 2 W Rev 1.0"
    cfg = load("--preset", "wan", model=zero)
    assert cfg.gossip_preset == "wan"
    assert (cfg.gossip.probe_interval, cfg.gossip.probe_timeout) == (5.0, 3.0)
    f = write(tmp_path, '[gossip]\npreset = "local"\nsuspicion_mult = 5\n')
    cfg = load("-c", str(f), model=zero)
    assert cfg.gossip.probe_timeout == 0.2 and cfg.gossip.suspicion_mult == 5


def test_file_picks_profile_and_flag_overrides_it(tmp_path: Path) -> None:
    f = write(tmp_path, 'profile = "rpi-3"\n')
    assert load("-c", str(f)).profile == "rpi-3"
    assert load("-c", str(f), "--profile", "rpi-5").profile == "rpi-5"


def test_no_mdns_flag_beats_file_and_profile(tmp_path: Path) -> None:
    f = write(tmp_path, "mdns = true\n")
    cfg = load("-c", str(f), "--no-mdns")
    assert cfg.mdns is False and cfg.features.mdns is False


def test_relative_paths_in_file_are_relative_to_the_file(tmp_path: Path) -> None:
    f = write(tmp_path, 'state_dir = "state"\nkey_file = "keys/ring"\n')
    cfg = load("-c", str(f))
    assert cfg.state_dir == tmp_path / "state"
    assert cfg.key_file == tmp_path / "keys" / "ring" == cfg.keyring_path


def test_join_flag_is_repeatable_and_defaults_port() -> None:
    cfg = load("--join", "10.0.0.2", "--join", "[fd00::1]:8000", "--join", "seed.local:7000")
    assert cfg.join == (("10.0.0.2", 7946), ("fd00::1", 8000), ("seed.local", 7000))


# --------------------------------------------------------------------------- HOST:PORT


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:7946", ("127.0.0.1", 7946)),
        ("[::1]:7946", ("::1", 7946)),
        (":7946", ("0.0.0.0", 7946)),
        ("[::]:0", ("::", 0)),
        ("10.0.0.1", ("10.0.0.1", DEFAULT_GOSSIP_PORT)),
    ],
)
def test_bind_accepts_host_port_forms(text: str, expected: tuple[str, int]) -> None:
    assert load("--bind", text).bind == expected


@pytest.mark.parametrize(
    "text", ["x", "nonsense", "1.2.3.4:x", "1.2.3.4:70000", "::1:7946", "[zz]:1", "1.2.3.4:-1"]
)
def test_bad_bind_is_one_line_naming_the_flag(text: str) -> None:
    message = error_of("--bind", text)
    assert message.startswith("--bind: expected HOST:PORT")
    assert message.endswith(f', got "{text}"')


def test_advertise_and_join_refuse_port_zero_and_empty_host() -> None:
    assert "port in 1..65535" in error_of("--advertise", "10.0.0.1:0")
    assert error_of("--join", ":7946").startswith("--join: expected HOST:PORT with a host")


def test_parse_hostport_allows_hostnames_unless_ip_only() -> None:
    assert parse_hostport("seed.example:1") == ("seed.example", 1)
    with pytest.raises(ValueError, match="IP address"):
        parse_hostport("seed.example:1", ip_only=True)


# --------------------------------------------------------------------------- errors


def test_file_value_error_names_file_key_and_expectation(tmp_path: Path) -> None:
    f = write(tmp_path, '[gossip]\nprobe_interval = "fast"\n')
    assert (
        error_of("-c", str(f))
        == f'{f}: gossip.probe_interval: expected a positive number, got "fast"'
    )


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("bind = 5\n", "bind: expected HOST:PORT"),
        (
            'bind = "1.2.3.4:99999"\n',
            'bind: expected HOST:PORT with a port in 0..65535, got "1.2.3.4:99999"',
        ),
        ('join = "10.0.0.1:1"\n', "join: expected a list of HOST:PORT strings"),
        ('join = ["10.0.0.1:x"]\n', "join: expected a list of HOST:PORT with a numeric port"),
        (
            "[gossip]\nsuspicion_mult = 0\n",
            "gossip.suspicion_mult: expected a positive integer, got 0",
        ),
        ("[gossip]\nlifeguard = 1\n", "gossip.lifeguard: expected true or false, got 1"),
        (
            '[gossip]\npreset = "moon"\n',
            'gossip.preset: expected one of lan, local, wan, got "moon"',
        ),
        (
            "[gossip]\nprobe_timeout = 2.0\n",
            "gossip.probe_timeout: expected less than gossip.probe_interval (1 s), got 2",
        ),
        ("[gossip]\nmax_members = 5\n", "gossip.max_members: set it as limits.max_members"),
        ("[gossip]\ncluster_name = 'x'\n", "gossip.cluster_name: set it as cluster"),
        (
            "[gossip]\nmax_datagram_bytes = 100\n",
            "gossip.max_datagram_bytes: expected 508..65507, got 100",
        ),
        ("[limits]\nmax_members = -1\n", "limits.max_members: expected a positive integer, got -1"),
        ('[overlay]\nprefix = "10.99.0.1/16"\n', "overlay.prefix: expected an IP network"),
        (
            "[overlay]\nblock_prefixlen = 40\n",
            "overlay.block_prefixlen: expected 17..32 (inside 10.99.0.0/16), got 40",
        ),
        ('[overlay]\nprefix = "fd00::/48"\nblock_prefixlen = 64\n', ""),
        ('log_format = "xml"\n', 'log_format: expected one of text, json, got "xml"'),
        ('metrics = "on"\n', "metrics: expected HOST:PORT with HOST an IP address, true or false"),
        ('name = ""\n', "name: expected a name of 1..128"),
        (
            'profile = "toaster"\n',
            'profile: expected one of constrained, generic-x86_64, rpi-1, rpi-2, rpi-3, rpi-4, rpi-5, rpi-zero-2w, got "toaster"',
        ),
        ("gossip = 3\n", "gossip: expected a table, got 3"),
    ],
)
def test_each_bad_file_value_is_one_line_with_file_and_key(
    tmp_path: Path, text: str, needle: str
) -> None:
    f = write(tmp_path, text)
    if not needle:
        assert load("-c", str(f)).block_prefixlen == 64
        return
    message = error_of("-c", str(f))
    assert message.startswith(f"{f}: "), message
    assert needle in message, message


def test_unknown_key_is_an_error_with_a_suggestion(tmp_path: Path) -> None:
    f = write(tmp_path, "[gossip]\nprobe_intervall = 1.0\n")
    message = error_of("-c", str(f))
    assert message.startswith(
        f'{f}: gossip.probe_intervall: unknown key (did you mean "probe_interval"?)'
    )
    f2 = write(tmp_path, "colour = 1\n", "b.toml")
    assert error_of("-c", str(f2)).startswith(f"{f2}: colour: unknown key")


def test_toml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    f = write(tmp_path, 'name = "a"\nbind = \n')
    message = error_of("-c", str(f))
    assert message.startswith(f"{f}:2:")
    assert "invalid TOML" in message


def test_missing_config_file_is_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    assert error_of("-c", str(missing)) == f"{missing}: cannot read: No such file or directory"


def test_unknown_profile_flag_lists_the_choices() -> None:
    message = error_of("--profile", "toaster")
    assert message.startswith("--profile: expected one of constrained, generic-x86_64")


def test_unusable_hostname_asks_for_name() -> None:
    with pytest.raises(ConfigError, match="set --name"):
        load(hostname="bad host")


def test_metrics_flag_rejects_words_other_than_off() -> None:
    assert (
        error_of("--metrics", "on")
        == '--metrics: expected HOST:PORT with HOST an IP address, or off, got "on"'
    )


@given(st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)), st.integers(0, 65535))
def test_any_ip_and_port_round_trips_through_parse_hostport(address: object, port: int) -> None:
    host = str(address)
    text = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    assert parse_hostport(text, allow_port_zero=True, ip_only=True) == (host, port)


def test_example_config_documents_every_key() -> None:
    """The annotated example names every key the loader accepts (commented out or not)."""
    from edgeagent.config import FILE_KEYS, OVERLAY_KEYS

    text = EXAMPLE.read_text()
    for key in FILE_KEYS:
        assert re.search(rf"^(# )?{key} = |^(# )?\[{key}\]|^(# )?\[\[{key}\]\]", text, re.M), key
    for key in OVERLAY_KEYS:
        assert re.search(rf"^{key} = ", text, re.M), key


# --------------------------------------------------------------------------- preset rule


RPI3 = "Raspberry Pi 3 Model B Rev 1.2"  # profile rpi-3 tunes probe_timeout = 0.8


def test_profile_timing_is_kept_when_the_file_names_no_preset(tmp_path: Path) -> None:
    f = write(tmp_path, "[gossip]\nsuspicion_mult = 5\n")
    cfg = load("-c", str(f), model=RPI3)
    assert cfg.gossip.probe_timeout == 0.8 and cfg.gossip.suspicion_mult == 5
    assert cfg.gossip_dropped == ()


def test_file_that_only_names_a_preset_starts_timing_over_and_reports_what_it_dropped(
    tmp_path: Path,
) -> None:
    f = write(tmp_path, '[gossip]\npreset = "lan"\n')
    cfg = load("-c", str(f), model=RPI3)
    assert cfg.gossip_preset == "lan" and cfg.gossip.probe_timeout == 0.5
    assert cfg.gossip_dropped == ("gossip.probe_timeout (firmware_profiles/rpi-3.toml)",)


def test_preset_flag_drops_the_file_and_profile_timing_keys_but_not_limits(
    tmp_path: Path,
) -> None:
    f = write(tmp_path, "[gossip]\nsuspicion_mult = 5\n[limits]\nmax_members = 300\n")
    cfg = load("-c", str(f), "--preset", "wan", model="Raspberry Pi Zero 2 W Rev 1.0")
    assert cfg.gossip.suspicion_mult == 6 and cfg.gossip.max_members == 300
    assert cfg.gossip_dropped == (
        "gossip.probe_timeout (firmware_profiles/rpi-zero-2w.toml)",
        "gossip.gossip_nodes (firmware_profiles/rpi-zero-2w.toml)",
        "gossip.push_pull_interval (firmware_profiles/rpi-zero-2w.toml)",
        f"gossip.suspicion_mult ({f})",
    )


def test_a_key_set_again_above_the_preset_is_not_reported_dropped(tmp_path: Path) -> None:
    f = write(tmp_path, '[gossip]\npreset = "lan"\nprobe_timeout = 0.7\n')
    cfg = load("-c", str(f), model=RPI3)
    assert cfg.gossip.probe_timeout == 0.7 and cfg.gossip_dropped == ()


def test_example_config_leaves_the_profile_timing_and_limits_alone() -> None:
    """Copying the example onto a Pi must not silently replace the profile's tuning."""
    cfg = load("-c", str(EXAMPLE), model=RPI3)
    assert cfg.gossip.probe_timeout == 0.8 and cfg.gossip_dropped == ()
    assert cfg.limits.max_members == 2000  # rpi-3's


# --------------------------------------------------------------------------- one schema


def test_gossip_invariant_broken_by_limits_names_the_limits_key(tmp_path: Path) -> None:
    f = write(tmp_path, "[limits]\nmax_members = 70000\n")
    assert error_of("-c", str(f)) == f"{f}: limits.max_members: expected 1..65535, got 70000"


def test_gossip_invariant_broken_against_the_preset_names_the_file(tmp_path: Path) -> None:
    """The local preset's 0.2 s timeout against the file's 0.1 s interval: the file is named."""
    f = write(tmp_path, '[gossip]\npreset = "local"\nprobe_interval = 0.1\n')
    message = error_of("-c", str(f))
    assert message == (
        f"{f}: gossip.probe_timeout: expected less than gossip.probe_interval (0.1 s), got 0.2"
    )


def test_tun_switch_is_gone_until_the_l3_data_path_exists(tmp_path: Path) -> None:
    from edgeagent.config import Features

    assert "tun" not in Features.__dataclass_fields__
    f = write(tmp_path, "[features]\ntun = true\n")
    assert error_of("-c", str(f)).startswith(f"{f}: features.tun: unknown key")


def test_dns_help_says_it_answers_nodes_and_services() -> None:
    parser = argparse.ArgumentParser()
    add_agent_arguments(parser)
    help_text = " ".join(parser.format_help().split())
    assert "NODE.node.mesh and SERVICE.mesh" in help_text


def test_defaults_shared_with_gossip_are_gossips() -> None:
    from edgeagent.config import DEFAULT_CLUSTER, Limits
    from gossip.config import GossipConfig

    gossip = GossipConfig()
    assert DEFAULT_CLUSTER == gossip.cluster_name
    assert Limits() == Limits(
        gossip.max_members, gossip.max_broadcast_queue, gossip.max_state_bytes
    )
    assert load().gossip == GossipConfig()


def test_config_package_modules_import_each_other_without_a_cycle() -> None:
    """The import graph inside edgeagent/config/ is acyclic (config and profiles used to import each other)."""
    import ast
    import graphlib

    package = Path(__file__).resolve().parents[2] / "edgeagent" / "config"
    graph: dict[str, set[str]] = {}
    for source in package.glob("*.py"):
        tree = ast.parse(source.read_text())
        graph[source.stem] = {
            node.module
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module
        }
    graph["__init__"] = set()  # the package re-exports; nothing inside imports it
    graphlib.TopologicalSorter(graph).prepare()  # raises CycleError on a cycle


def test_run_with_a_broken_gossip_invariant_is_one_stderr_line_exit_2(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    bad = write(tmp_path, "[gossip]\nprobe_interval = 0.5\nprobe_timeout = 0.5\n", "bad.toml")
    result = subprocess.run(
        [sys.executable, "-m", "edgeagent", "run", "-c", str(bad), "--state-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    assert result.returncode == 2, result
    assert result.stderr == (
        f"edgeagent: error: {bad}: gossip.probe_timeout: expected less than "
        "gossip.probe_interval (0.5 s), got 0.5\n"
    )


def test_coap_listener_default_flag_file_and_off(tmp_path: Path) -> None:
    default = load()
    assert (default.coap, default.coap_explicit) == (("0.0.0.0", 5683), False)
    flagged = load("--coap", "127.0.0.7:5684")
    assert (flagged.coap, flagged.coap_explicit) == (("127.0.0.7", 5684), True)
    assert load("--coap", "off").coap is None
    file = tmp_path / "agent.toml"
    file.write_text("coap = false\n")
    assert load("-c", str(file)).coap is None
    assert load("-c", str(file), "--coap", "127.0.0.1:5683").coap == ("127.0.0.1", 5683)
    file.write_text('coap = "127.0.0.2:6000"\n')
    assert load("-c", str(file)).coap == ("127.0.0.2", 6000)
    with pytest.raises(ConfigError, match="--coap"):
        load("--coap", "nowhere")
    file.write_text("coap = 5683\n")
    with pytest.raises(ConfigError, match="coap"):
        load("-c", str(file))


def test_mqtt_listener_default_flag_file_and_off(tmp_path: Path) -> None:
    default = load()
    assert (default.mqtt, default.mqtt_explicit) == (("0.0.0.0", 1883), False)
    flagged = load("--mqtt", "127.0.0.7:1884")
    assert (flagged.mqtt, flagged.mqtt_explicit) == (("127.0.0.7", 1884), True)
    assert load("--mqtt", "off").mqtt is None
    file = tmp_path / "agent.toml"
    file.write_text("[mqtt]\nlisten = false\n")
    assert load("-c", str(file)).mqtt is None
    assert load("-c", str(file), "--mqtt", "127.0.0.1:1883").mqtt == ("127.0.0.1", 1883)
    file.write_text('[mqtt]\nlisten = "127.0.0.2:6000"\n')
    assert load("-c", str(file)).mqtt == ("127.0.0.2", 6000)
    with pytest.raises(ConfigError, match="--mqtt"):
        load("--mqtt", "nowhere")
    file.write_text("[mqtt]\nlisten = 1883\n")
    with pytest.raises(ConfigError, match="mqtt.listen"):
        load("-c", str(file))
    file.write_text('[mqtt]\nlisen = "127.0.0.1:1883"\n')
    with pytest.raises(ConfigError, match='mqtt.lisen: unknown key \\(did you mean "listen"\\?\\)'):
        load("-c", str(file))
    file.write_text('mqtt = "127.0.0.1:1883"\n')
    with pytest.raises(ConfigError, match="mqtt: expected a table"):
        load("-c", str(file))
