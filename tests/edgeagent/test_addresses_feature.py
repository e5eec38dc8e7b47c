"""Real agents on loopback (in-process, real sockets) running the addresses and DNS features."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import dns.asyncquery
import dns.message
import dns.rcode
import pytest

from edgeagent.cli import main as cli_main
from edgeagent.errors import ConfigError
from edgeagent.features.addresses import Addresses
from edgeagent.features.dns import Dns
from tests.edgeagent.inprocess import TIMEOUT, Running, call, make_agent, stop, wait_for
from tests.edgeagent.inprocess import start as start_agent


@pytest.fixture
def base_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="ea-ipam-") as d:
        yield Path(d)


async def start(base: Path, name: str, join: str | None, dns_on: bool = False) -> Running:
    flags = ["--dns", "127.0.0.1:0" if dns_on else "off", *(["--join", join] if join else [])]
    return await start_agent(base / name, name, flags, shared=base)  # one cluster per base dir


def addresses(r: Running) -> Addresses:
    feature = r.agent.feature("addresses")
    assert isinstance(feature, Addresses)
    return feature


def everyone_knows_everyone(agents: list[Running]) -> bool:
    blocks = {r.agent.config.name: addresses(r).alloc.block for r in agents}
    if None in blocks.values():
        return False
    for r in agents:
        for name, block in blocks.items():
            if (
                name != r.agent.config.name
                and addresses(r).alloc.owner_address(name)
                != (
                    block[1]  # type: ignore[index]
                )
            ):
                return False
    return True


def dns_address(r: Running) -> tuple[str, int]:
    feature = r.agent.feature("dns")
    assert isinstance(feature, Dns) and feature.address is not None
    return feature.address


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
        blocks = [addresses(r).alloc.block for r in agents]
        assert len(set(blocks)) == 5

        rows = await call(base_dir / "a3", "addresses")
        assert {r["node"] for r in rows} == {f"a{i}" for i in range(5)}
        assert len({r["block"] for r in rows}) == 5

        host, port = dns_address(first)
        for r in agents:
            name = r.agent.config.name
            query = dns.message.make_query(f"{name}.node.mesh.", "A")
            reply = await dns.asyncquery.udp(query, host, port=port, timeout=TIMEOUT)
            answers = [rd.to_text() for rrset in reply.answer for rd in rrset]
            assert answers == [str(addresses(r).alloc.address)]
        query = dns.message.make_query("nobody.node.mesh.", "A")
        reply = await dns.asyncquery.udp(query, host, port=port, timeout=TIMEOUT)
        assert reply.rcode() == dns.rcode.NXDOMAIN

        rc, out = await cli(capsys, "addresses", "--json", "--state-dir", str(base_dir / "a1"))
        assert rc == 0
        listed = json.loads(out)
        assert {(r["node"], r["block"], r["address"]) for r in listed} == {
            (r.agent.config.name, str(addresses(r).alloc.block), str(addresses(r).alloc.address))
            for r in agents
        }

        got = await call(base_dir / "a2", "address", op="allocate", name="camera")
        assert ipaddress.ip_address(got["address"]) in addresses(agents[2]).alloc.block  # type: ignore[operator]
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
        block = addresses(second).alloc.block
        named = await call(base_dir / "b1", "address", op="allocate", name="svc")
        await stop(second)
        second = await start(base_dir, "b1", seed)
        assert addresses(second).alloc.block == block
        await wait_for(lambda: everyone_knows_everyone([first, second]), "claims known again")
        assert addresses(second).alloc.block == block
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
        agent = make_agent(state_dir, "c0", "--dns", f"127.0.0.1:{port}")
        with pytest.raises(ConfigError, match=f"dns 127.0.0.1:{port}: cannot listen"):
            await asyncio.wait_for(agent.run(), TIMEOUT)
        assert not (state_dir / "control.sock").exists()  # everything started was stopped
