"""Seed traces: fixed seeds in the simulator must replay the recorded event traces.

Each scenario below runs real cores (``testbed.sim.Simulator``) from a fixed
seed through one part of the state machine and records, in a stable text form:
every event every node emitted (virtual time, node, event), then each node's
final member table, core counters and the simulator's network totals. The
recorded files under ``tests/gossip/traces/`` were taken from the core as it
was before a refactor; a refactor that keeps behaviour (the same events at the
same times, the same RNG draws in the same order) replays them byte for byte.

A change that alters behaviour on purpose must re-record, deliberately::

    EDGEAGENT_RECORD_TRACES=1 python -m pytest tests/gossip/test_seed_traces.py

then review the diff of the traces (``zcat`` them) and commit it with the
change that explains it.
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from gossip.config import GossipConfig, lan
from gossip.events import Event
from testbed.sim import Simulator

TRACES = Path(__file__).with_name("traces")
RECORD = os.environ.get("EDGEAGENT_RECORD_TRACES") == "1"


class Trace:
    """A simulator plus the lines of its trace."""

    def __init__(self, seed: int, config: GossipConfig, **network: float) -> None:
        self.sim = Simulator(seed, config, **network)
        self.lines: list[str] = []
        self.sim.on_event(self._record)

    def _record(self, now: float, name: str, event: Event) -> None:
        self.lines.append(f"{now!r} {name} {event!r}")

    def mark(self, what: str) -> None:
        self.lines.append(f"{self.sim.now!r} -- {what}")

    def finish(self) -> str:
        sim = self.sim
        out = list(self.lines)
        for node in sim.nodes.values():
            out.append(f"== {node.name} {node.status} incarnation={node.core.incarnation}")
            members = sorted(node.core.members(), key=lambda m: m.name)
            out.extend(f"   {m!r}" for m in members)
            out.append(f"   stats {node.core.stats.as_dict()!r}")
            out.append(f"   state {[(m.name, node.core.state_of(m.name)) for m in members]!r}")
        out.append(f"== totals {sim.totals()!r}")
        return "\n".join(out) + "\n"


def converge() -> Trace:
    """16 members joining with 2% loss settle into one view."""
    t = Trace(1, lan(), loss=0.02)
    t.sim.add_cluster(16)
    t.mark("cluster added")
    t.sim.run_for(40.0)
    return t


def crash_restart() -> Trace:
    """A crash is suspected then declared dead; the restart rejoins at a higher incarnation."""
    t = Trace(2, lan(), loss=0.01)
    t.sim.add_cluster(10)
    t.sim.run_for(15.0)
    t.mark("crash n003")
    t.sim.crash("n003")
    t.sim.run_for(30.0)
    t.mark("restart n003")
    t.sim.restart("n003")
    t.sim.run_for(20.0)
    return t


def leave_and_reap() -> Trace:
    """A graceful leave is recorded LEFT everywhere, then reaped after the TTL."""
    t = Trace(3, lan(dead_member_ttl=20.0))
    t.sim.add_cluster(8)
    t.sim.run_for(10.0)
    t.mark("leave n005")
    t.sim.leave("n005")
    t.sim.run_for(30.0)
    return t


def leave_in_partition() -> Trace:
    """A member leaves while the other side holds it DEAD; after healing it is LEFT there too."""
    t = Trace(9, lan())
    t.sim.add_cluster(8)
    t.sim.run_for(10.0)
    names = list(t.sim.nodes)
    t.mark("partition")
    t.sim.partition([names[:4], names[4:]])
    t.sim.run_for(40.0)
    t.mark("leave n001")
    t.sim.leave("n001")
    t.sim.run_for(10.0)
    t.mark("heal")
    t.sim.heal()
    t.sim.run_for(40.0)
    return t


def simultaneous_leaves() -> Trace:
    """Three members leave at the same instant; the rest record all three LEFT."""
    t = Trace(10, lan(), loss=0.02)
    t.sim.add_cluster(8)
    t.sim.run_for(10.0)
    t.mark("leave n002 n004 n006")
    for name in ("n002", "n004", "n006"):
        t.sim.leave(name)
    t.sim.run_for(20.0)
    return t


def partition_heal() -> Trace:
    """A partition splits the view in two; healing merges it back (reconnect, push-pull)."""
    t = Trace(4, lan(), loss=0.01)
    t.sim.add_cluster(12)
    t.sim.run_for(15.0)
    names = list(t.sim.nodes)
    t.mark("partition")
    t.sim.partition([names[:6], names[6:]])
    t.sim.run_for(40.0)
    t.mark("heal")
    t.sim.heal()
    t.sim.run_for(60.0)
    return t


def replicated_state() -> Trace:
    """Replicated state set / overwrite / delete and a metadata change spread."""
    t = Trace(5, lan(), loss=0.02)
    t.sim.add_cluster(8)
    t.sim.run_for(10.0)
    t.mark("state")
    t.sim.call("n001", lambda c, now: c.set_state("addr", "10.1.0.0/24", now))
    t.sim.call("n002", lambda c, now: c.set_state("svc", {"port": 80, "up": True}, now))
    t.sim.run_for(5.0)
    t.sim.call("n001", lambda c, now: c.set_state("addr", "10.1.1.0/24", now))
    t.sim.call("n002", lambda c, now: c.delete_state("svc", now))
    t.sim.call("n004", lambda c, now: c.set_meta(b"role=gw", now))
    t.sim.run_for(40.0)
    return t


def starved() -> Trace:
    """A starved member (late reads) is suspected; Lifeguard keeps it from being declared dead wrongly."""
    t = Trace(6, lan())
    t.sim.add_cluster(10)
    t.sim.run_for(10.0)
    t.mark("starve n002")
    t.sim.starve("n002", 0.5, 2.5)
    t.sim.run_for(40.0)
    t.mark("unstarve n002")
    t.sim.unstarve("n002")
    t.sim.run_for(30.0)
    return t


def user_broadcasts() -> Trace:
    """User broadcasts reach every member once."""
    t = Trace(7, lan(), loss=0.02)
    t.sim.add_cluster(8)
    t.sim.run_for(10.0)
    t.mark("broadcast")
    for i in range(3):
        t.sim.call("n000", lambda c, now, i=i: c.broadcast(b"hello %d" % i, now))
    t.sim.call("n006", lambda c, now: c.broadcast(b"from n006", now))
    t.sim.run_for(10.0)
    return t


def key_rotation() -> Trace:
    """Install a new key everywhere, switch to it, remove the old one; the cluster stays whole."""
    t = Trace(8, lan())
    t.sim.add_cluster(8)
    t.sim.run_for(10.0)
    new_key = bytes(range(100, 132))
    old_key = t.sim.key
    t.mark("install")
    for name in t.sim.nodes:
        t.sim.nodes[name].keyring.install(new_key)
    t.sim.run_for(5.0)
    t.mark("use")
    for name in t.sim.nodes:
        t.sim.nodes[name].keyring.use(new_key)
    t.sim.run_for(5.0)
    t.mark("remove")
    for name in t.sim.nodes:
        t.sim.nodes[name].keyring.remove(old_key)
    t.sim.run_for(20.0)
    return t


SCENARIOS: dict[str, Callable[[], Trace]] = {
    f.__name__: f
    for f in (converge, crash_restart, leave_and_reap, leave_in_partition, simultaneous_leaves,
              partition_heal, replicated_state, starved, user_broadcasts, key_rotation)
}


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_seed_trace_replays(name: str) -> None:
    text = SCENARIOS[name]().finish()
    path = TRACES / f"{name}.txt.gz"
    if RECORD:
        TRACES.mkdir(exist_ok=True)
        path.write_bytes(gzip.compress(text.encode(), mtime=0))
        return
    assert path.exists(), f"no recorded trace {path}; record with EDGEAGENT_RECORD_TRACES=1"
    want = gzip.decompress(path.read_bytes()).decode().splitlines()
    got = text.splitlines()
    for i, (w, g) in enumerate(zip(want, got, strict=False)):
        assert g == w, f"{name}: trace differs first at line {i + 1}:\n  recorded: {w}\n  now:      {g}"
    assert len(got) == len(want), f"{name}: {len(got)} lines now, {len(want)} recorded"
