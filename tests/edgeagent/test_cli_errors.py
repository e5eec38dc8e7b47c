"""Bad human input at the command line: one stderr line, exit code 2, never a traceback."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from edgeagent.cli import main

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 60.0


def edgeagent(*argv: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "edgeagent", *argv],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        cwd=cwd,
        env=env,
    )


def assert_one_line_usage_error(result: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def has_command(name: str) -> bool:
    return importlib.util.find_spec(f"edgeagent.commands.{name}") is not None


def test_profiles_unknown_flag_is_one_line_exit_2() -> None:
    line = assert_one_line_usage_error(
        edgeagent("profiles", "--bogus"), "unrecognized arguments: --bogus"
    )
    assert line.startswith("edgeagent")


def test_profiles_json_succeeds_in_a_subprocess() -> None:
    result = edgeagent("profiles", "--json")
    assert result.returncode == 0 and result.stderr == ""
    assert '"matched": true' in result.stdout


def test_config_error_from_a_command_is_one_line_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A minimal command that calls load_config: cli.main prints its ConfigError as one line, exit 2."""
    from edgeagent import cli
    from edgeagent.config import add_agent_arguments, load_config

    def register(subparsers: Any) -> None:
        parser = subparsers.add_parser("fakerun")
        add_agent_arguments(parser)
        parser.set_defaults(
            func=lambda args: load_config(
                args, device_model="", hostname="h", euid=1000, environ={}
            )
        )

    monkeypatch.setitem(
        sys.modules, "edgeagent.commands.fakerun", SimpleNamespace(register=register)
    )
    monkeypatch.setattr(cli, "COMMANDS", (*cli.COMMANDS, "fakerun"))
    bad = tmp_path / "agent.toml"
    bad.write_text('[gossip]\nprobe_interval = "fast"\n')
    assert main(["fakerun", "-c", str(bad)]) == 2
    err = capsys.readouterr().err
    assert (
        err
        == f'edgeagent: error: {bad}: gossip.probe_interval: expected a positive number, got "fast"\n'
    )
    assert main(["fakerun", "--bind", "nonsense"]) == 2
    assert (
        capsys.readouterr().err
        == 'edgeagent: error: --bind: expected HOST:PORT with HOST an IP address, got "nonsense"\n'
    )


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (
            ["--bind", "nonsense"],
            '--bind: expected HOST:PORT with HOST an IP address, got "nonsense"',
        ),
        (["--join", "10.0.0.1:x"], "--join: expected HOST:PORT with a numeric port"),
        (["--profile", "toaster"], "--profile: expected one of"),
        (["--metrics", "on"], "--metrics: expected HOST:PORT"),
        (["--log-format", "xml"], "argument --log-format: invalid choice"),
        (["-c", "/nonexistent/edgeagent.toml"], "/nonexistent/edgeagent.toml: cannot read"),
    ],
)
def test_run_with_bad_flag_is_one_line_exit_2(argv: list[str], needle: str, tmp_path: Path) -> None:
    if not has_command("run"):
        pytest.skip("the run command is not in this tree yet")
    result = edgeagent("run", "--state-dir", str(tmp_path), "--no-mdns", *argv)
    assert_one_line_usage_error(result, needle)


def test_run_with_bad_config_file_names_file_and_line(tmp_path: Path) -> None:
    if not has_command("run"):
        pytest.skip("the run command is not in this tree yet")
    bad = tmp_path / "agent.toml"
    bad.write_text('name = "a"\nbind = \n')
    result = edgeagent("run", "--state-dir", str(tmp_path), "-c", str(bad))
    assert_one_line_usage_error(result, f"{bad}:2:", "invalid TOML")


def test_run_help_documents_defaults() -> None:
    if not has_command("run"):
        pytest.skip("the run command is not in this tree yet")
    result = edgeagent("run", "--help")
    assert result.returncode == 0
    for text in (
        "--bind HOST:PORT",
        "0.0.0.0:7946",
        "--join HOST:PORT",
        "--no-mdns",
        "/var/lib/edgeagent",
    ):
        assert text in result.stdout
