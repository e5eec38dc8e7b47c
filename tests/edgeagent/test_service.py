"""The shipped systemd unit and ``edgeagent service install``."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from edgeagent.cli import main
from edgeagent.commands import service


def directives(text: str) -> dict[str, list[str]]:
    """Every ``Key=value`` of a unit, by key (a key may repeat)."""
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            found.setdefault(key.strip(), []).append(value.strip())
    return found


def test_unit_is_a_notify_service_with_watchdog_restart_and_state_dir() -> None:
    unit = directives(service.unit_text("/opt/ea/bin/python"))
    assert unit["Type"] == ["notify"] and unit["NotifyAccess"] == ["main"]
    assert unit["WatchdogSec"] and unit["Restart"] == ["on-failure"]
    assert unit["StateDirectory"] == ["edgeagent"]
    assert unit["ExecStart"] == ["/opt/ea/bin/python -m edgeagent run"]
    assert unit["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert unit["RestartPreventExitStatus"] == ["2"]  # a config error is not retried forever


def test_unit_hardening_still_allows_gossip_and_mdns() -> None:
    unit = directives(service.unit_text())
    families = unit["RestrictAddressFamilies"][0].split()
    assert {"AF_INET", "AF_INET6", "AF_UNIX"} <= set(families)  # gossip, mDNS, control socket
    assert "PrivateNetwork" not in unit and "IPAddressDeny" not in unit
    assert unit["CapabilityBoundingSet"] == [""] and unit["NoNewPrivileges"] == ["yes"]
    assert unit["ProtectSystem"] == ["strict"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_systemd_accepts_the_unit(tmp_path: Path) -> None:
    path = tmp_path / service.UNIT_NAME
    path.write_text(service.unit_text())
    out = subprocess.run(
        ["systemd-analyze", "verify", str(path)], capture_output=True, text=True, timeout=60
    )
    complaints = [line for line in out.stderr.splitlines() if str(path) in line]
    assert out.returncode == 0 and complaints == [], out.stderr


def test_dry_run_prints_the_unit_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["service", "install", "--dry-run", "--unit-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"# would write {tmp_path / service.UNIT_NAME}:")
    assert f"ExecStart={sys.executable} -m edgeagent run" in out
    assert list(tmp_path.iterdir()) == []


def test_install_writes_0644_says_what_next_and_keeps_a_changed_unit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["service", "install", "--unit-dir", str(tmp_path)]
    path = tmp_path / service.UNIT_NAME
    assert main(argv) == 0
    assert path.read_text() == service.unit_text()
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    out = capsys.readouterr().out
    assert "written" in out and "systemctl daemon-reload && systemctl enable --now edgeagent" in out
    assert main(argv) == 0 and "unchanged" in capsys.readouterr().out

    path.write_text(path.read_text() + "# local edit\n")
    assert main(argv) == 2
    assert "exists and differs; --force replaces it" in capsys.readouterr().err
    assert main([*argv, "--force"]) == 0 and path.read_text() == service.unit_text()


def test_install_without_write_access_says_to_run_as_root(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # a normal user on /etc
    assert main(["service", "install", "--unit-dir", str(tmp_path)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "run as root (sudo edgeagent service install)" in errors[0]
    assert list(tmp_path.iterdir()) == []


def test_a_python_under_home_is_warned_about(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "executable", "/home/pi/venv/bin/python")
    assert main(["service", "install", "--dry-run", "--unit-dir", str(tmp_path)]) == 0
    assert "ProtectHome=yes hides" in capsys.readouterr().err
