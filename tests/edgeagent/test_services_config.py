"""[[service]] tables and the [services] switches in the config file; the CLI's service
register / deregister input checks: one line naming the file and key (or flag), exit 2."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgeagent.errors import ConfigError
from tests.edgeagent.test_cli_errors import assert_one_line_usage_error, edgeagent
from tests.edgeagent.test_config import load, write


def test_service_tables_become_checked_instances(tmp_path: Path) -> None:
    f = write(tmp_path, """
[[service]]
name = "Temperature"
uri = "coap://127.0.0.1:5684/sensors/"
weight = 3
tags = { site = "hall", version = "1.2" }

[[service]]
name = "humidity"
uri = "coap://[::1]"

[services]
mdns_export = false
site = "hall"
""")  # fmt: skip
    cfg = load("-c", str(f))
    (temp, humid) = cfg.services
    assert (temp.name, temp.endpoint, temp.weight, temp.tags) == (
        "temperature", "coap://127.0.0.1:5684/sensors", 3, (("site", "hall"), ("version", "1.2"))
    )  # fmt: skip
    assert (humid.endpoint, humid.weight, humid.tags) == ("coap://[::1]:5683", 1, ())
    assert (cfg.services_mdns_import, cfg.services_mdns_export) == (True, False)
    assert cfg.services_site == "hall"
    assert load().services == () and load().services_mdns_import is True
    assert load().services_site == ""


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ('[service]\nname = "a"\nuri = "coap://h"\n', "service: expected [[service]] tables"),
        ('[[service]]\nuri = "coap://h"\n', 'service[0].name: expected a string'),
        ('[[service]]\nname = "a"\n', "service[0].uri: expected a string"),
        ('[[service]]\nname = "a b"\nuri = "coap://h"\n', "service[0].name: service name 'a b'"),
        ('[[service]]\nname = "a"\nuri = "http://h"\n', "service[0].uri: URI 'http://h': scheme"),
        ('[[service]]\nname = "a"\nuri = "coap://h:0"\n', "service[0].uri: URI 'coap://h:0': port"),
        ('[[service]]\nname = "a"\nuri = "coap://h"\nweight = 1.5\n', "service[0].weight: weight 1.5"),
        ('[[service]]\nname = "a"\nuri = "coap://h"\nweight = 0\n', "service[0].weight"),
        ('[[service]]\nname = "a"\nuri = "coap://h"\ntags = "x"\n', "service[0].tags: expected a table"),
        ('[[service]]\nname = "a"\nuri = "coap://h"\ntags = { site = 3 }\n', "service[0].tags: tag site"),
        ('[[service]]\nname = "a"\nuri = "coap://h"\nport = 1\n', "service[0].port: unknown key"),
        ('[[service]]\nname = "a"\nuri = "coap://h"\n[[service]]\nname = "a"\nuri = "coap://h:5683"\n'
         'weight = 2\n', "service: a at coap://h:5683 given twice"),
        ("[services]\nmdns_inport = true\n", 'services.mdns_inport: unknown key (did you mean "mdns_import"?)'),
        ('[services]\nmdns_export = "yes"\n', "services.mdns_export: expected true or false"),
        ('[services]\nsite = "two words"\n', 'services.site: expected 1-64 printable characters'),
        ("[services]\nsite = 3\n", "services.site: expected 1-64 printable"),
    ],
)  # fmt: skip
def test_bad_service_config_is_one_line_naming_file_and_key(
    tmp_path: Path, text: str, needle: str
) -> None:
    f = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load("-c", str(f))
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{f}: ") and needle in message, message


def test_too_many_services_in_the_file_is_one_line(tmp_path: Path) -> None:
    body = "".join(f'[[service]]\nname = "s{i}"\nuri = "coap://h:{1000 + i}"\n' for i in range(33))
    f = write(tmp_path, body)
    with pytest.raises(ConfigError, match=r": service: 33 instances on one node; at most 32"):
        load("-c", str(f))


def test_run_with_a_bad_service_table_exits_2(tmp_path: Path) -> None:
    f = write(tmp_path, '[[service]]\nname = "-x"\nuri = "coap://h"\n')
    result = edgeagent("run", "--state-dir", str(tmp_path / "s"), "--no-mdns", "-c", str(f))
    assert_one_line_usage_error(result, f"{f}: service[0].name:")


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["register", "node", "coap://h"], "service name 'node' is reserved"),
        (["register", "a", "coap://h", "--weight", "x"], "--weight 'x' must be a whole number"),
        (["register", "a", "coap://h", "--weight", "2000"], "weight 2000 must be"),
        (["register", "a", "coap://h", "--tag", "site"], "tag 'site' must look like KEY=VALUE"),
        (["register", "a", "coap://h", "--tag", "a=1", "--tag", "A=2"], "the same KEY given twice"),
        (["register", "a", "coap://h?q=1"], "a query or fragment is not allowed"),
        (["register", "a"], "the following arguments are required: URI"),
        (["deregister", "a", "mqtt://[::1"], "unterminated '['"),
    ],
)
def test_service_register_bad_input_is_one_line_exit_2(
    tmp_path: Path, argv: list[str], needle: str
) -> None:
    result = edgeagent("service", *argv, "--state-dir", str(tmp_path))
    assert_one_line_usage_error(result, needle)


def test_service_install_still_works(tmp_path: Path) -> None:
    result = edgeagent("service", "install", "--dry-run", "--unit-dir", str(tmp_path))
    assert result.returncode == 0 and "ExecStart=" in result.stdout
