"""N real agents as processes on loopback addresses, with the helpers tests and benchmarks use.

How it works. :class:`LoopbackCluster` is :class:`edgeagent.localmesh.LocalMesh` (a random
``127.A.B.0/24``, one port, one state dir and the same cluster key per agent, the first few
agents as seeds, each agent a real ``python -m edgeagent run`` process behind
:class:`edgeagent.agent_process.AgentProcess`) plus waiting on cluster-wide conditions.
:class:`LoopbackAgent` adds metrics scraping and RSS to an agent. The mesh itself lives in the
installed package because ``edgeagent demo`` runs on it; these helpers are for a checkout.

Used by the real-socket tests and the benchmarks::

    with LoopbackCluster(5) as cluster:
        cluster.wait_converged()
        cluster.agents[2].kill()              # SIGKILL
        cluster.wait_for(lambda: all(a.state_of("node3") == "dead" for a in cluster.running()))
        cluster.agents[2].start()             # same name and state dir: a restart
"""

from __future__ import annotations

import http.client
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from edgeagent.agent_process import POLL_INTERVAL, READY_TIMEOUT, STOP_TIMEOUT
from edgeagent.errors import AgentUnavailable
from edgeagent.localmesh import DEBUG_COMMANDS_ENV, MAX_SEEDS, LocalMesh, MeshAgent, free_port

__all__ = [
    "DEBUG_COMMANDS_ENV",
    "MAX_SEEDS",
    "POLL_INTERVAL",
    "READY_TIMEOUT",
    "STOP_TIMEOUT",
    "LoopbackAgent",
    "LoopbackCluster",
    "free_port",
]


class LoopbackAgent(MeshAgent):
    """One agent process; it keeps its name, address and state dir across restarts."""

    def scrape_metrics(self, timeout: float = 10.0) -> dict[str, float]:
        """The agent's Prometheus samples, ``{'name{labels}': value}`` (needs ``metrics=True``)."""
        where = self.status().get("metrics")
        if not where:
            raise RuntimeError(f"{self.name} serves no metrics (start the cluster with metrics=True)")
        host, port = where.rsplit(":", 1)
        conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
        try:
            conn.request("GET", "/metrics")
            text = conn.getresponse().read().decode()
        finally:
            conn.close()
        samples: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                samples[name] = float(value)
        return samples

    def rss_kb(self) -> int | None:
        """Resident set size from /proc, in KiB (None if not running)."""
        pid = self.pid
        if pid is None:
            return None
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return None


class LoopbackCluster(LocalMesh[LoopbackAgent]):
    """Start ``n`` agents on loopback; stop them all (and remove their files) at exit."""

    agent_class = LoopbackAgent

    def __enter__(self) -> LoopbackCluster:
        self.start()
        return self

    def wait_for(
        self, predicate: Callable[[], bool], timeout: float = 60.0, what: str = "condition"
    ) -> float:
        """Poll ``predicate`` until true; return the seconds it took. TimeoutError otherwise.

        A control socket that does not answer for a moment counts as "not yet".
        """
        start = time.monotonic()
        while True:
            try:
                if predicate():
                    return time.monotonic() - start
            except AgentUnavailable:
                pass
            if time.monotonic() - start > timeout:
                raise TimeoutError(f"{what} not reached in {timeout} s")
            time.sleep(POLL_INTERVAL)

    def views_agree(
        self, expected: dict[str, str], observers: Iterable[LoopbackAgent] | None = None
    ) -> bool:
        """Every observer sees each named member in the expected state."""
        for agent in self.running() if observers is None else observers:
            states = agent.states()
            if any(states.get(name) != state for name, state in expected.items()):
                return False
        return True

    def wait_converged(self, timeout: float = 60.0) -> float:
        """Wait until every running agent sees every running agent alive."""

        def converged() -> bool:
            alive = {a.name: "alive" for a in self.running()}
            return self.views_agree(alive)

        return self.wait_for(converged, timeout, "all running agents alive everywhere")
