"""``python -m testbed``: one-line errors, and the network operations from a shell (root).

The root tests build the network without agents (``up --no-agents``), so they check the
harness's mechanics - namespaces, addresses, fault rules, clean-up - in a few seconds.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import testbed.__main__ as cli
from testbed import netns
from tests.host_tools import needs_netns

needs_root = needs_netns("ip", "nft")


def _run(command: str, *args: str, root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "testbed", command, "--root", str(root), *args],
        capture_output=True, text=True, timeout=120, check=False,
    )


def test_without_root_cli_says_so_in_one_line_and_exits_2(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(cli, "is_root", lambda: False)
    assert cli.main(["up", "--hosts", "3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs root" in err


def test_unknown_command_is_one_line_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["explode"])
    assert exc.value.code == 2
    assert capsys.readouterr().err.count("\n") == 1


@needs_root
def test_status_with_no_testbed_up_is_one_line_exit_2(tmp_path: Path) -> None:
    proc = _run("status", root=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "no testbed is up" in proc.stderr


@needs_root
def test_up_faults_heal_and_down_from_the_shell(tmp_path: Path) -> None:
    up = _run("up", "--hosts", "3", "--no-agents", "--json", root=tmp_path)
    assert up.returncode == 0, up.stderr
    info = json.loads(up.stdout)
    namespaces = [h["netns"] for h in info["hosts"].values()]
    try:
        assert set(namespaces) <= netns.list_netns()
        addr = _run("exec", "h2", "ip", "-j", "-4", "addr", "show", "eth0", root=tmp_path)
        assert addr.returncode == 0, addr.stderr
        assert json.loads(addr.stdout)[0]["addr_info"][0]["local"] == info["hosts"]["h2"]["ip"]

        assert _run("partition", "h1,2/h3", root=tmp_path).returncode == 0
        assert _run("loss", "h2", "20", root=tmp_path).returncode == 0
        assert _run("isolate", "h3", root=tmp_path).returncode == 0
        status = json.loads(_run("status", "--json", root=tmp_path).stdout)["hosts"]
        assert [status[h]["partitioned"] for h in ("h1", "h2", "h3")] == [True, True, True]
        assert [status[h]["loss_percent"] for h in ("h1", "h2", "h3")] == [0, 20, 0]
        assert [status[h]["link_up"] for h in ("h1", "h2", "h3")] == [True, True, False]

        assert _run("heal", root=tmp_path).returncode == 0
        status = json.loads(_run("status", "--json", root=tmp_path).stdout)["hosts"]
        assert not any(status[h]["partitioned"] for h in status)
        assert all(status[h]["link_up"] for h in status)
        assert status["h2"]["loss_percent"] == 20  # heal leaves loss alone
        assert _run("loss", "h2", "0", root=tmp_path).returncode == 0

        bad = _run("loss", "h9", "10", root=tmp_path)
        assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "h9" in bad.stderr
        bad = _run("partition", "h1,h2", root=tmp_path)
        assert bad.returncode == 2 and "two or more groups" in bad.stderr
    finally:
        down = _run("down", root=tmp_path)
    assert down.returncode == 0, down.stderr
    assert not set(namespaces) & netns.list_netns()
    assert not (tmp_path / info["id"]).exists()
    assert _run("down", "--all", root=tmp_path).returncode == 0  # nothing left: still fine
