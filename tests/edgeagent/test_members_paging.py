"""``edgeagent members`` on a large table: paged control calls (one reply of 10,000 members
was over the control socket's reply limit: "reply too long")."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from edgeagent import cli
from edgeagent.commands.members import pages
from edgeagent.control import ControlError
from edgeagent.control_json import MEMBERS_PAGE
from gossip.codec import DatagramHeader, destination_tag, encode_datagram
from gossip.core import Membership
from gossip.messages import Alive
from tests.edgeagent.inprocess import call, start, stop

MEMBERS = 9_999  # with the agent itself: the default max_members


def add_members(core: Membership, now: float) -> int:
    """Members that spoke for themselves (verified), on addresses nothing listens on."""
    aad = core.config.cluster_name.encode()
    for i in range(MEMBERS):
        addr = (f"127.99.{i // 250}.{1 + i % 250}", 9)
        name = f"m{i:05d}"
        header = DatagramHeader(name, 1, 0, destination_tag(core.name))
        sealed = core._keyring.encrypt(encode_datagram([Alive(name, 1, addr, b"")], header), aad)
        core.receive(sealed, addr, now)
    core.datagrams_to_send()
    return len(core.members())


async def test_members_json_lists_ten_thousand_members_in_pages(
    state_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    running = await start(state_dir, "solo")
    try:
        assert await running.agent.driver.acall(add_members) == MEMBERS + 1
        calls: list[dict[str, Any]] = []

        def counted(**page: Any) -> Any:
            calls.append(page)
            return asyncio.run_coroutine_threadsafe(call(state_dir, "members", **page), loop).result()

        loop = asyncio.get_running_loop()
        listed = await asyncio.to_thread(lambda: list(pages(counted)))
        names = [m["name"] for m in listed]
        assert names == sorted(set(names)) and len(names) == MEMBERS + 1
        assert len(calls) == (MEMBERS + 1) // MEMBERS_PAGE + 1
        capsys.readouterr()
        code = await asyncio.to_thread(cli.main, ["members", "--json", "--state-dir", str(state_dir)])
        out = capsys.readouterr().out
        assert code == 0 and [m["name"] for m in json.loads(out)] == names
        with pytest.raises(ControlError, match="limit"):
            await call(state_dir, "members", limit=0)
    finally:
        await stop(running)


def test_pages_stop_against_an_agent_that_does_not_page() -> None:
    table = [{"name": f"n{i:03d}"} for i in range(30)]
    got = list(pages(lambda **page: table, size=10))  # ignores after/limit: the whole table each time
    assert got == table
