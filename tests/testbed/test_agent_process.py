"""The agent-process harness knows a process by PID and start time, and reports a dead start."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from edgeagent.agent_process import AgentProcess, AgentProcessError

SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]


def test_an_adopted_process_is_killed_by_pid_and_its_starter_sees_it_gone(tmp_path: Path) -> None:
    starter = AgentProcess("a", SLEEPER, tmp_path, tmp_path / "a.log")
    pid = starter.start(wait=False)
    try:
        assert starter.running and starter.pid == pid and starter.start_time is not None
        other = AgentProcess("a", SLEEPER, tmp_path, tmp_path / "a.log")  # e.g. a later CLI run
        other.adopt(pid, starter.start_time)
        assert other.pid == pid
        assert other.kill() is True
        assert not other.running and not starter.running
        assert starter.process is not None and starter.process.wait(5) == -9
    finally:
        starter.kill()


def test_a_reused_pid_is_never_signalled(tmp_path: Path) -> None:
    starter = AgentProcess("a", SLEEPER, tmp_path, tmp_path / "a.log")
    pid = starter.start(wait=False)
    try:
        assert starter.start_time is not None
        stranger = AgentProcess("a", SLEEPER, tmp_path, tmp_path / "a.log")
        stranger.adopt(pid, starter.start_time + 1)  # same PID, another process's start time
        assert stranger.pid is None
        assert stranger.kill() is False
        assert starter.running
    finally:
        starter.kill()


def test_an_agent_that_exits_at_start_up_raises_with_its_log(tmp_path: Path) -> None:
    argv = [sys.executable, "-c", "import sys, time; time.sleep(0.2); sys.exit('bad config')"]
    agent = AgentProcess("a", argv, tmp_path, tmp_path / "a.log")
    with pytest.raises(AgentProcessError, match="bad config"):
        agent.start()
    assert agent.terminate() == 1  # a child: its exit code is known
    assert "--- start " in (tmp_path / "a.log").read_text()
