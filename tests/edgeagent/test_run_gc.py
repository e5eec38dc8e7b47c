"""``edgeagent run`` keeps what start-up made out of later garbage collections (gc.freeze)."""

from __future__ import annotations

import argparse
import gc
from pathlib import Path
from typing import Any

import pytest

from edgeagent.commands import run as run_command
from edgeagent.config import add_agent_arguments


def test_run_freezes_what_start_up_made_once_the_agent_has_started(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    seen: dict[str, int] = {}

    class StartedAgent:  # stands in for Agent: start-up is over when it calls on_started
        def __init__(self, config: Any, *, reload: Any, on_started: Any) -> None:
            self.on_started = on_started

        async def run(self) -> int:
            seen["before"] = gc.get_freeze_count()
            self.on_started()
            seen["after"] = gc.get_freeze_count()
            return 0

    monkeypatch.setattr("edgeagent.agent.Agent", StartedAgent)
    monkeypatch.setattr("edgeagent.logs.setup_logging", lambda *a: None)
    parser = argparse.ArgumentParser()
    add_agent_arguments(parser)
    parser.add_argument("--token")
    args = parser.parse_args(["--state-dir", str(tmp_path), "--name", "n1"])
    gc.unfreeze()
    try:
        assert run_command.run(args) == 0
    finally:
        gc.unfreeze()  # the test process's objects go back to ordinary collection
    assert seen["before"] == 0
    assert seen["after"] > 1000  # the modules, config and the rest imported so far
