"""The Agent class in-process: extension points for later features, and a clean stop."""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edgeagent.agent import Agent
from edgeagent.config import add_agent_arguments, load_config
from edgeagent.control import ControlClient, socket_path
from edgeagent.driver import View
from edgeagent.errors import AgentUnavailable


@pytest.fixture
def state_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="ea-") as d:
        yield Path(d)


def make_agent(state_dir: Path) -> Agent:
    parser = argparse.ArgumentParser()
    add_agent_arguments(parser)
    args = parser.parse_args(
        ["--name", "solo", "--bind", "127.0.0.1:0", "--no-mdns", "--preset", "local",
         "--state-dir", str(state_dir), "--metrics", "off"]
    )  # fmt: skip
    return Agent(load_config(args))


async def call(state_dir: Path, cmd: str, **args: Any) -> Any:
    deadline = time.monotonic() + 30
    while True:
        try:
            return await asyncio.to_thread(ControlClient(socket_path(state_dir)).call, cmd, **args)
        except AgentUnavailable:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


async def test_features_add_commands_and_hear_updates_then_stop_cleanly(state_dir: Path) -> None:
    agent = make_agent(state_dir)
    views: list[View] = []
    agent.add_listener(lambda events, view: views.append(view))
    agent.control.register("hello", lambda request: f"hello {request.get('who')}")
    run = asyncio.create_task(agent.run())

    assert await call(state_dir, "hello", who="feature") == "hello feature"
    members = await call(state_dir, "members")
    assert [(m["name"], m["state"]) for m in members] == [("solo", "alive")]
    deadline = time.monotonic() + 30
    while not views:
        assert time.monotonic() < deadline, "no update reached the listener"
        await asyncio.sleep(0.05)
    assert views[-1].local.name == "solo"
    assert await agent.driver.acall(lambda core, now: core.num_alive) == 1

    agent.request_stop()
    assert await asyncio.wait_for(run, 30) == 0
    assert not socket_path(state_dir).exists()
