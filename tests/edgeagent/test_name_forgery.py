"""A forged Alive with our name and an earlier start must not stop an established agent.

Any cluster-key holder can seal such a datagram. Before the rule in
:mod:`edgeagent.name_conflict` (an established holder never yields), one of them made a
long-running agent decide REFUSE and exit 2, and the systemd unit does not restart on 2.
The same claim reaching an agent that has just started still makes it yield (the legitimate
case: the later starter gives the name up), so the rule can fail both ways.
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
from gossip.codec import PROTOCOL_VERSION, destination_tag
from gossip.keyring import Keyring
from tests.edgeagent import inprocess
from tests.edgeagent.inprocess import start, stop, wait_for

_counter = itertools.count()


def forge_alive(running: inprocess.Running, other_addr: tuple[str, int]) -> None:
    """Our name, another node id, started at the epoch: sealed with the cluster key."""
    agent = running.agent
    name = agent.config.name
    meta = name_conflict.member_meta("f" * 32, "generic-x86_64", 1)
    header = ["forger", 1, next(_counter), destination_tag(name)]
    wire = [*header, [5, name, 1, list(other_addr), meta]]
    plain = bytes((PROTOCOL_VERSION,)) + msgpack.packb(wire, use_bin_type=True)
    ring = Keyring(list(inprocess.cluster_ca(running.state_dir).keys))
    sealed = ring.encrypt(plain, agent.config.gossip.cluster_name.encode())
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.sendto(sealed, agent.driver.address)


@pytest.mark.parametrize("established", [True, False])
async def test_a_forged_earlier_claim_of_our_name(
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
        forge_alive(running, ("127.0.0.1", 9))
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
