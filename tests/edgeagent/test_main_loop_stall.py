"""A blocked application loop must not cost liveness (DESIGN principle 2), nor unbounded memory.

One agent's main event loop is blocked for 10 s (the ``debug-block`` control command, enabled
only by EDGEAGENT_DEBUG_COMMANDS=1). Its gossip thread keeps answering probes, so no peer
declares it dead. With the LOCAL preset a node that stopped answering would be suspected
within about a second and dead a few seconds later, well inside the 10 s block.

And while it is blocked, what waits for it is the latest view and a bounded event queue: an
in-process agent stalls its loop while a peer (a bare gossip driver: its own thread) sets
many replicated keys; the queue stays within its bound, the overflow is counted, and a
feature that resyncs on ``EventsDropped`` ends with the peer's exact state.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from pathlib import Path

import pytest

from edgeagent import bridge, onboarding
from edgeagent.agent import Agent
from edgeagent.bridge import EventsDropped
from edgeagent.driver import GossipDriver
from edgeagent.host import FeatureHost
from edgeagent.state_signing import load_state_signing
from edgeagent.streams import StreamAuth
from gossip import events as ev
from gossip.core import Membership
from gossip.keyring import Keyring
from gossip.messages import Address
from testbed.loopback import LoopbackCluster
from tests.edgeagent import inprocess

pytestmark = pytest.mark.slow

BLOCK_S = 10.0


def test_blocked_main_loop_is_not_declared_dead() -> None:
    with LoopbackCluster(3, debug_commands=True) as cluster:
        cluster.wait_converged(60.0)
        stalled, peers = cluster.agents[0], cluster.agents[1:]
        result: dict[str, object] = {}

        def block() -> None:
            result["reply"] = stalled.call("debug-block", seconds=BLOCK_S, timeout=BLOCK_S + 30)

        blocker = threading.Thread(target=block)
        blocker.start()
        seen: set[str] = set()
        started = time.monotonic()
        while blocker.is_alive() or time.monotonic() - started < BLOCK_S + 2:
            for peer in peers:
                seen.add(peer.state_of(stalled.name) or "unknown")
            time.sleep(0.2)
        blocker.join()

        assert result["reply"] == {"blocked_s": BLOCK_S}  # the block really happened
        assert "dead" not in seen and "unknown" not in seen
        assert cluster.views_agree({stalled.name: "alive"}, peers)


# -- bounded memory while stalled ---------------------------------------------------------

QUEUE_BOUND = 16  # the bridge's event bound in this test (the default is 4096)
CHURN_KEYS = 30  # distinct keys the peer sets while we are stalled (signed, ~90 B each: within
# the default 4 KiB per-node state budget beside its ~570-byte certificate)
STALL_S = 4.0


class Tracker:
    """A feature mirroring the peer's replicated keys ``c*`` from events, resyncing after drops."""

    def __init__(self, peer: str) -> None:
        self.peer = peer
        self.values: dict[str, object] = {}
        self.resyncs = 0
        self.host: FeatureHost | None = None

    async def start(self, host: FeatureHost) -> None:
        self.host = host
        host.add_listener(self._on_update)

    async def stop(self) -> None:
        pass

    def _on_update(self, events: tuple[object, ...], view: object) -> None:
        for event in events:
            if isinstance(event, EventsDropped):
                asyncio.get_running_loop().create_task(self._resync())
            elif isinstance(event, ev.StateChanged) and event.owner == self.peer:
                if event.key.startswith("c"):
                    self.values[event.key] = None if event.deleted else event.value

    async def _resync(self) -> None:
        assert self.host is not None
        peer = self.peer
        state = await self.host.call(lambda core, now: dict(core.state_of(peer)))
        self.resyncs += 1
        self.values = {k: v for k, v in state.items() if k.startswith("c")}


def bare_peer(agent: Agent, name: str, state_dir: Path) -> GossipDriver[Membership]:
    """A gossip driver with a core of ``agent``'s cluster and no agent around it: its thread
    runs on while the test's (the stalled agent's) loop is blocked. It is provisioned by the
    agent's CA in ``state_dir`` and signs its state as a member would (the agent refuses
    unsigned state)."""
    config = agent.config.gossip
    keyring = Keyring(list(agent.host.keyring.keys))
    ca = inprocess.cluster_ca(agent.config.state_dir)
    identity = onboarding.provision_member(ca, state_dir, name)
    signing = load_state_signing(state_dir, identity)

    def make_core(addr: Address, now: float) -> Membership:
        return Membership(
            name,
            addr,
            config,
            random.Random(7),
            now,
            keyring=keyring,
            signer=signing.signer,
            verifier=signing.verifier,
        )

    return GossipDriver(
        make_core,
        ("127.0.0.1", 0),
        main_loop=asyncio.get_running_loop(),
        on_update=lambda events, view: None,
        stream_auth=StreamAuth(keyring, config.cluster_name),
    )


async def test_stalled_main_loop_keeps_a_bounded_queue_and_resyncs(
    state_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bridge, "MAX_QUEUED_EVENTS", QUEUE_BOUND)
    tracker = Tracker("peer")
    agent = inprocess.make_agent(state_dir, "stalled", extra_features={"t": tracker})
    task = asyncio.create_task(agent.run())
    await inprocess.wait_for(lambda: agent.started or task.done(), "the stalled agent to start")
    peer = bare_peer(agent, "peer", tmp_path / "peer")
    peer.start()
    try:
        await peer.acall(lambda core, now: core.join([agent.driver.address], now))
        await inprocess.wait_for(lambda: len(agent.host.view.members) == 2, "the join")
        high_water = 0

        def churn() -> None:
            nonlocal high_water
            for i in range(CHURN_KEYS):
                key = f"c{i}"
                peer.call(lambda core, now, k=key, v=i: core.set_state(k, v, now))
                time.sleep(STALL_S / 2 / CHURN_KEYS)
                high_water = max(high_water, agent.driver.bridge.queued)

        churner = threading.Thread(target=churn)
        churner.start()
        time.sleep(STALL_S)  # deliberately blocks this (the stalled agent's) loop
        churner.join()
        stalled_bridge = agent.driver.bridge
        assert 0 < high_water <= QUEUE_BOUND + bridge.MAX_KEPT_EVENTS
        assert stalled_bridge.high_water <= QUEUE_BOUND + bridge.MAX_KEPT_EVENTS
        assert stalled_bridge.dropped > 0  # the stall really overflowed the queue
        expected = {f"c{i}": i for i in range(CHURN_KEYS)}
        await inprocess.wait_for(lambda: tracker.values == expected, "the tracker to resync")
        assert tracker.resyncs >= 1
        status = await inprocess.call(state_dir, "status")
        assert status["events_dropped"] == stalled_bridge.dropped > 0
        assert status["members"]["alive"] == 2  # the view delivered after the stall is whole
    finally:
        peer.stop()
        agent.request_stop()
        assert await asyncio.wait_for(task, inprocess.TIMEOUT) == 0
