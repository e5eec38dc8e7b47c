"""A blocked application loop must not cost liveness (DESIGN principle 2).

One agent's main event loop is blocked for 10 s (the ``debug-block`` control command, enabled
only by EDGEAGENT_DEBUG_COMMANDS=1). Its gossip thread keeps answering probes, so no peer
declares it dead. With the LOCAL preset a node that stopped answering would be suspected
within about a second and dead a few seconds later, well inside the 10 s block.
"""

from __future__ import annotations

import threading
import time

import pytest

from testbed.loopback import LoopbackCluster

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
