"""A forged Alive with our name and an earlier start must not stop an agent.

Any cluster-key holder can seal such a datagram. Before the rule in
:mod:`edgeagent.name_conflict` (an established holder never yields), one of them made a
long-running agent decide REFUSE and exit 2, and the systemd unit does not restart on 2;
until claims had to be signed (issue 14), it still stopped an agent that had just started.
Now a claim counts only when signed by the key of a certificate naming our name (the CA
issues a name once): the unsigned datagram leaves both running. The same claim signed with
our key (a copy of this state dir elsewhere) still makes a just-started agent yield, and an
established one keeps the name, so the rules can fail both ways.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import socket
from pathlib import Path

import msgpack
import pytest

from edgeagent import name_conflict
from edgeagent.agent import EXIT_NAME_CONFLICT
from edgeagent.state_signing import load_state_signing
from gossip.codec import PROTOCOL_VERSION, destination_tag
from gossip.keyring import Keyring
from gossip.signing import canonical_alive
from tests.edgeagent import inprocess
from tests.edgeagent.inprocess import start, stop, wait_for

_counter = itertools.count()


def forge_alive(running: inprocess.Running, other_addr: tuple[str, int], signed: bool = False) -> None:
    """Our name, another node id, started at the epoch: sealed with the cluster key (and
    signed with the agent's own node key when ``signed``: a copy of its state dir)."""
    agent = running.agent
    name = agent.config.name
    meta = name_conflict.member_meta("f" * 32, "generic-x86_64", 1)
    header = ["forger", 1, next(_counter), destination_tag(name)]
    alive: list[object] = [5, name, 1, list(other_addr), meta]
    if signed:
        assert agent._identity is not None
        signer = load_state_signing(running.state_dir, agent._identity).signer
        assert signer is not None
        cluster = agent.config.gossip.cluster_name
        alive.append(signer.sign(canonical_alive(cluster, name, 1, other_addr, meta)))
    wire = [*header, alive]
    plain = bytes((PROTOCOL_VERSION,)) + msgpack.packb(wire, use_bin_type=True)
    ring = Keyring(list(inprocess.cluster_ca(running.state_dir).keys))
    sealed = ring.encrypt(plain, agent.config.gossip.cluster_name.encode())
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.sendto(sealed, agent.driver.address)


@pytest.mark.parametrize("established", [True, False])
async def test_an_unsigned_earlier_claim_of_our_name(
    state_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    established: bool,
) -> None:
    monkeypatch.setattr(name_conflict, "ESTABLISHED_S", 0.5 if established else 3600.0)
    caplog.set_level(logging.WARNING)
    running = await start(state_dir, "solo")
    try:
        await asyncio.sleep(1.0)
        core = running.agent.driver._core  # the counter is the core's (a metric, with metrics on)
        assert core is not None
        forge_alive(running, ("127.0.0.1", 9))
        await wait_for(lambda: core.stats.alive_forged >= 1, "the forged claim to be refused")
        await asyncio.sleep(1.0)
        assert not running.task.done()  # still running, established or not
        assert "and keeps it" not in caplog.text  # not even a conflict
    finally:
        if not running.task.done():
            await stop(running)


@pytest.mark.parametrize("established", [True, False])
async def test_a_signed_earlier_claim_of_our_name(
    state_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    established: bool,
) -> None:
    monkeypatch.setattr(name_conflict, "ESTABLISHED_S", 0.5 if established else 3600.0)
    caplog.set_level(logging.WARNING)
    running = await start(state_dir, "solo")
    try:
        await asyncio.sleep(1.0)
        forge_alive(running, ("127.0.0.1", 9), signed=True)
        if established:
            await wait_for(lambda: "and keeps it" in caplog.text, "the keep warning")
            await asyncio.sleep(1.0)
            assert not running.task.done()  # still running
        else:
            await wait_for(running.task.done, "the agent to yield the name")
            assert running.task.result() == EXIT_NAME_CONFLICT
    finally:
        if not running.task.done():
            await stop(running)
