"""edgeagent's IPAM service: real agents on loopback (in-process, real sockets) with it on."""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dns.asyncquery
import dns.message
import dns.rcode
import pytest

from edgeagent.agent import Agent
from edgeagent.cli import main as cli_main
from edgeagent.config import add_agent_arguments, load_config
from edgeagent.control import ControlClient, socket_path
from edgeagent.errors import AgentUnavailable, ConfigError
from edgeagent.ipam_service import IpamService

TIMEOUT = 60.0  # generous: the machine is shared


@pytest.fixture
def base_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="ea-ipam-") as d:
        yield Path(d)


def make_agent(state_dir: Path, name: str, join: str | None, dns_on: bool) -> Agent:
    parser = argparse.ArgumentParser()
    add_agent_arguments(parser)
    argv = ["--name", name, "--bind", "127.0.0.1:0", "--no-mdns", "--preset", "local",
            "--state-dir", str(state_dir), "--metrics", "off",
            "--dns", "127.0.0.1:0" if dns_on else "off",
            "--key-file", str(state_dir.parent / "keyring")]  # fmt: skip
    if join:
        argv += ["--join", join]
    return Agent(load_config(parser.parse_args(argv)))


async def call(state_dir: Path, cmd: str, **args: Any) -> Any:
    deadline = time.monotonic() + TIMEOUT
    while True:
        try:
            return await asyncio.to_thread(ControlClient(socket_path(state_dir)).call, cmd, **args)
        except AgentUnavailable:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


class Running:
    def __init__(self, agent: Agent, task: asyncio.Task[int], service: IpamService) -> None:
        self.agent, self.task, self.service = agent, task, service


async def start(base: Path, name: str, join: str | None, dns_on: bool = False) -> Running:
    state_dir = base / name
    state_dir.mkdir(exist_ok=True)
    agent = make_agent(state_dir, name, join, dns_on)
    task = asyncio.create_task(agent.run())
    await call(state_dir, "status")  # the driver is up once the control socket answers
    await wait_for(lambda: agent.ipam is not None, "the agent to start its address service")
    return Running(agent, task, agent.ipam)


async def stop(r: Running) -> None:
    r.agent.request_stop()  # the agent closes its address service on the way out
    assert await asyncio.wait_for(r.task, TIMEOUT) == 0


async def wait_for(predicate: Any, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


def everyone_knows_everyone(agents: list[Running]) -> bool:
    blocks = {r.agent.config.name: r.service.alloc.block for r in agents}
    if None in blocks.values():
        return False
    for r in agents:
        for name, block in blocks.items():
            if (
                name != r.agent.config.name
                and r.service.alloc.owner_address(name)
                != (
                    block[1]  # type: ignore[index]
                )
            ):
                return False
    return True


async def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    """Run the real CLI (its blocking control client) off the event loop."""
    capsys.readouterr()
    rc = await asyncio.to_thread(cli_main, list(argv))
    return rc, capsys.readouterr().out


async def test_five_loopback_agents_hold_distinct_addresses_and_dns_answers(
    base_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first = await start(base_dir, "a0", None, dns_on=True)
    seed = f"127.0.0.1:{first.agent.driver.address[1]}"
    agents = [first] + [await start(base_dir, f"a{i}", seed) for i in range(1, 5)]
    try:
        await wait_for(lambda: everyone_knows_everyone(agents), "every claim known everywhere")
        blocks = [r.service.alloc.block for r in agents]
        assert len(set(blocks)) == 5

        rows = await call(base_dir / "a3", "addresses")
        assert {r["node"] for r in rows} == {f"a{i}" for i in range(5)}
        assert len({r["block"] for r in rows}) == 5

        host, port = first.service.dns_address  # type: ignore[misc]
        for r in agents:
            name = r.agent.config.name
            query = dns.message.make_query(f"{name}.node.mesh.", "A")
            reply = await dns.asyncquery.udp(query, host, port=port, timeout=TIMEOUT)
            answers = [rd.to_text() for rrset in reply.answer for rd in rrset]
            assert answers == [str(r.service.alloc.address)]
        query = dns.message.make_query("nobody.node.mesh.", "A")
        reply = await dns.asyncquery.udp(query, host, port=port, timeout=TIMEOUT)
        assert reply.rcode() == dns.rcode.NXDOMAIN

        rc, out = await cli(capsys, "addresses", "--json", "--state-dir", str(base_dir / "a1"))
        assert rc == 0
        listed = json.loads(out)
        assert {(r["node"], r["block"], r["address"]) for r in listed} == {
            (r.agent.config.name, str(r.service.alloc.block), str(r.service.alloc.address))
            for r in agents
        }

        got = await call(base_dir / "a2", "address", op="allocate", name="camera")
        assert ipaddress.ip_address(got["address"]) in agents[2].service.alloc.block  # type: ignore[operator]
        assert await call(base_dir / "a2", "address", op="list") == {"camera": got["address"]}
        rc, out = await cli(
            capsys, "address", "allocate", "camera", "--state-dir", str(base_dir / "a2")
        )
        assert (rc, out.strip()) == (0, got["address"])
    finally:
        for r in reversed(agents):
            await stop(r)


async def test_agent_restart_keeps_its_block_and_named_addresses(base_dir: Path) -> None:
    first = await start(base_dir, "b0", None)
    seed = f"127.0.0.1:{first.agent.driver.address[1]}"
    second = await start(base_dir, "b1", seed)
    try:
        await wait_for(lambda: everyone_knows_everyone([first, second]), "claims known")
        block = second.service.alloc.block
        named = await call(base_dir / "b1", "address", op="allocate", name="svc")
        await stop(second)
        second = await start(base_dir, "b1", seed)
        assert second.service.alloc.block == block
        await wait_for(lambda: everyone_knows_everyone([first, second]), "claims known again")
        assert second.service.alloc.block == block
        assert await call(base_dir / "b1", "address", op="list") == {"svc": named["address"]}
    finally:
        await stop(second)
        await stop(first)


async def test_dns_port_in_use_is_one_clear_config_error(base_dir: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        state_dir = base_dir / "c0"
        state_dir.mkdir()
        agent = make_agent(state_dir, "c0", None, dns_on=False)
        task = asyncio.create_task(agent.run())
        await call(state_dir, "status")
        await wait_for(lambda: agent.ipam is not None, "the agent to start its address service")
        service = agent.ipam
        try:
            with pytest.raises(ConfigError, match=f"dns 127.0.0.1:{port}: cannot listen"):
                await service.start_dns("127.0.0.1", port)
        finally:
            await stop(Running(agent, task, service))
