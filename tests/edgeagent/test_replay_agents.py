"""Replayed captures against real agents (issue 8): no effect, and counted.

Two in-process agents on loopback (real sockets). Every datagram agent ``a`` sends is copied
as it leaves the core (the bytes that go on the wire); the test later sends those copies to
``b``'s UDP port from a socket of its own, as an attacker on the LAN would.
"""

from __future__ import annotations

import asyncio
import base64
import socket
from pathlib import Path
from typing import Any

from edgeagent.features.keys import Keys, fingerprint
from edgeagent.persist import load_keyring_document
from gossip.core import Membership
from gossip.keyring import Keyring
from gossip.messages import Address
from tests.edgeagent.inprocess import Running, call, start, stop, wait_for


async def tap(running: Running) -> list[tuple[Address, bytes]]:
    """From now on, a copy of every datagram the agent's core hands its socket."""
    log: list[tuple[Address, bytes]] = []

    def install(core: Membership, now: float) -> None:
        drain = core.datagrams_to_send

        def copying() -> list[tuple[Address, bytes]]:
            out = drain()
            log.extend(out)
            return out

        core.datagrams_to_send = copying  # type: ignore[method-assign]

    await running.agent.driver.acall(install)
    return log


async def core_stat(running: Running, name: str) -> int:
    value: int = await running.agent.driver.acall(lambda core, now: core.stats[name])
    return value


def send_all(captures: list[bytes], dst: Address) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        for data in captures:
            sock.sendto(data, dst)


def keys_of(running: Running) -> list[str]:
    keys, _ = load_keyring_document(running.agent.config.keyring_path)
    return [fingerprint(k) for k in keys]


async def test_replayed_key_rotation_and_alive_have_no_effect_and_are_counted(tmp_path: Path) -> None:
    a = await start(tmp_path / "a", "a", shared=tmp_path)
    host, port = a.agent.driver.address
    b = await start(tmp_path / "b", "b", ["--join", f"{host}:{port}"], shared=tmp_path)
    await wait_for(lambda: len(b.agent.host.view.members) == 2, "b to join a")
    captured = await tap(a)
    compromised = Keyring.generate_key()
    bad = fingerprint(compromised)
    b64 = base64.b64encode(compromised).decode()
    await call(a.state_dir, "keys", op="install", key=b64)
    await wait_for(lambda: bad in keys_of(b), "the install to reach b")
    await call(a.state_dir, "keys", op="remove", key=b64)  # found compromised: removed again
    await wait_for(lambda: bad not in keys_of(b), "the removal to reach b")
    b_keys: Any = b.agent.feature("keys")
    assert isinstance(b_keys, Keys) and b_keys.generation == 2
    to_b = [data for dst, data in captured if dst == b.agent.driver.address]
    assert to_b, "a sent b nothing while rotating"

    # 1. Replayed while both run: the anti-replay window drops every copy.
    replayed0 = await core_stat(b, "replayed")
    send_all(to_b, b.agent.driver.address)
    await asyncio.sleep(1.0)
    assert await core_stat(b, "replayed") - replayed0 == len(to_b)
    assert bad not in keys_of(b)

    # 2. a leaves; its captured datagrams (its Alive, its pings) do not bring it back.
    await stop(a)
    await wait_for(
        lambda: any(m.name == "a" and m.state.name == "LEFT" for m in b.agent.host.view.members),
        "b to record a's leave",
    )
    replayed1 = await core_stat(b, "replayed")
    send_all(to_b, b.agent.driver.address)
    await asyncio.sleep(1.0)
    assert await core_stat(b, "replayed") - replayed1 == len(to_b)
    assert [m.state.name for m in b.agent.host.view.members if m.name == "a"] == ["LEFT"]

    # 3. b restarts (its windows are empty; a is gone and sends nothing newer): the gossip
    # layer takes the first copies, and the keyring generation saved with the keys refuses
    # the replayed install.
    await stop(b)
    b = await start(tmp_path / "b", "b", shared=tmp_path)
    b_keys = b.agent.feature("keys")
    assert isinstance(b_keys, Keys) and b_keys.generation == 2  # read back from the keyring file
    send_all(to_b, b.agent.driver.address)
    await wait_for(lambda: b_keys.replays_ignored >= 1, "b to hear the replayed key operations")
    await asyncio.sleep(1.0)  # any operation it would apply is saved by now
    assert bad not in keys_of(b)
    status = await call(b.state_dir, "status")
    assert status["key_ops_replayed"] == b_keys.replays_ignored and status["keyring_generation"] == 2
    await stop(b)
