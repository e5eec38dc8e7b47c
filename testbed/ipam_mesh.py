"""The IPAM simulation mesh: overlay allocators on simulated gossip cores, and one scenario run.

How it works. Every node of a :class:`testbed.sim.Simulator` runs a real gossip core plus an
:class:`overlay.ipam.Allocator`, glued by :class:`IpamMesh` the way the daemon glues them:
core events feed the allocator; the allocator's claim goes back into the core's replicated
state under ``"ipam"``; its persisted state survives a crash. The mesh records every
``Renumbered`` with what it knew around it, and a violation for any block change that did not
follow a lost conflict.

:func:`one_run` is one seeded scenario on a mesh: bootstrap, claim-time probes, partition and
churn cycles, heal, settle. It returns a :class:`RunResult`; the property test
(tests/overlay/test_ipam_sim.py) asserts on it, and the benchmark (:mod:`testbed.bench.ipam`,
whose docstring defines each phase and measurement) aggregates many runs.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from gossip.config import GossipConfig
from gossip.events import (
    Event,
    MemberAlive,
    MemberFailed,
    MemberJoined,
    MemberLeft,
    MemberReaped,
    MemberSuspected,
    MemberUpdated,
    StateChanged,
)
from gossip.messages import MemberState
from overlay.ipam import (
    DEFAULT_QUARANTINE_S,
    DEFAULT_REVIVE_GRACE_S,
    DEFAULT_SETTLE_S,
    STATE_KEY,
    Allocator,
    BlockClaimed,
    IpamEvent,
    Renumbered,
)
from testbed.sim import Simulator

BOOTSTRAP_SPACING = 0.01  # seconds between node starts during bootstrap
BOOTSTRAP_SEEDS = 3  # each new node joins this many random earlier nodes
PROBE_SPACING = 10.0  # seconds between claim-time probes
ASYMMETRIC_BLOCKS = 2  # one-way blocks inside each side of a split, on top of it
# How the mesh is cut: two or three groups, or one-way (side 0 cannot reach side 1).
PARTITION_MODES = ("split", "split3", "oneway")
CHURN_KINDS = ("join", "join", "twin", "crash", "restart", "leave")

_MEMBER_EVENTS = (
    MemberJoined,
    MemberUpdated,
    MemberSuspected,
    MemberAlive,
    MemberFailed,
    MemberLeft,
)


@dataclass
class Change:
    """One Renumbered, with what the harness knew around it."""

    at: float
    node: str
    event: Renumbered
    old_time: Any  # the loser's losing claim timestamp, as published
    new_time: Any  # the loser's new claim timestamp (None if exhausted)
    could_know: float  # when the loser could first know it lost


@dataclass
class IpamMesh:
    """Allocators on simulated gossip cores, glued like the daemon glues them."""

    sim: Simulator
    prefix: str = "10.99.0.0/20"
    block_prefixlen: int = 28
    quarantine_s: float = DEFAULT_QUARANTINE_S
    settle_s: float = DEFAULT_SETTLE_S
    revive_grace_s: float = DEFAULT_REVIVE_GRACE_S
    wall_offset: float = 0.0  # wall clock = simulated time + this (0: the nodes think it is 1970)
    wall_offsets: dict[str, float] = field(default_factory=dict)  # per node, read at each start
    allocs: dict[str, Allocator] = field(default_factory=dict)
    persisted: dict[str, dict[str, Any]] = field(default_factory=dict)
    published: set[tuple[str, Any, Any]] = field(default_factory=set)  # (owner, block, time)
    last_block: dict[str, str | None] = field(default_factory=dict)
    learned: dict[tuple[str, str], tuple[float, Any]] = field(default_factory=dict)
    first_seen: dict[tuple[str, str, Any], float] = field(default_factory=dict)
    last_time: dict[str, Any] = field(default_factory=dict)  # node -> last published claim t
    alive_seen: dict[tuple[str, str], float] = field(default_factory=dict)
    changes: list[Change] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    events: list[tuple[float, str, IpamEvent]] = field(default_factory=list)
    _armed: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.sim.on_event(self._on_event)

    # ---- lifecycle ------------------------------------------------------------------

    def _new_allocator(self, name: str) -> Allocator:
        return Allocator(
            name,
            f"id-{name}",
            self.prefix,
            self.block_prefixlen,
            self.quarantine_s,
            self.sim.now,
            self.persisted.get(name),
            settle_s=self.settle_s,
            revive_grace_s=self.revive_grace_s,
            wall_offset=self.wall_offsets.get(name, self.wall_offset),
        )

    def add(self, name: str, join: list[str], prepare: Callable[[str], None] | None = None) -> None:
        """Start a node with a fresh allocator (no persisted state) joining ``join``.

        ``prepare(name)`` runs between creating the node and joining it (to put it
        in a partition group or block its links first).
        """
        self.allocs[name] = self._new_allocator(name)
        self._armed.pop(name, None)
        self.sim.add_node(name)
        if prepare is not None:
            prepare(name)
        seeds = [self.sim.nodes[s].addr for s in join]
        if seeds:
            self.sim.call(name, lambda core, now: core.join(seeds, now))
        self._pump(name)

    def crash(self, name: str) -> None:
        self.sim.crash(name)

    def restart(self, name: str, join: list[str] | None = None) -> None:
        """Restart a stopped node from its persisted allocator state."""
        self.allocs[name] = self._new_allocator(name)
        self._armed.pop(name, None)
        self.sim.restart(name, join=join)
        self._pump(name)

    def leave(self, name: str) -> None:
        self.sim.leave(name)

    # ---- glue -----------------------------------------------------------------------

    def _on_event(self, now: float, name: str, event: Event) -> None:
        alloc = self.allocs.get(name)
        if alloc is None:
            return
        if isinstance(event, StateChanged):
            if event.key != STATE_KEY:
                return
            value = None if event.deleted else event.value
            alloc.on_claim(event.owner, value, now)
            previous = self.learned.get((name, event.owner))
            if previous is None or _claim_time(previous[1]) != _claim_time(value):
                self.learned[(name, event.owner)] = (now, value)  # first sight of this claim
                self.first_seen.setdefault((name, event.owner, _claim_time(value)), now)
        elif isinstance(event, _MEMBER_EVENTS):
            member = event.member
            alloc.on_member(member.name, member.state, now)
            if member.state in (MemberState.ALIVE, MemberState.SUSPECT):
                self.alive_seen.setdefault((name, member.name), now)
            else:
                self.alive_seen.pop((name, member.name), None)
            if isinstance(event, MemberJoined) and member.name != name:
                alloc.synced(now)
        elif isinstance(event, MemberReaped):
            alloc.on_reaped(event.member.name, now)
        else:
            return
        self._arm(name, now)

    def _arm(self, name: str, at: float) -> None:
        armed = self._armed.get(name)
        if armed is not None and armed <= at:
            return
        self._armed[name] = at
        alloc = self.allocs[name]
        self.sim.schedule(at, lambda: self._fire(name, alloc, at))

    def _fire(self, name: str, alloc: Allocator, at: float) -> None:
        if self.allocs.get(name) is not alloc or self._armed.get(name) != at:
            return  # replaced by a restart, or superseded by an earlier pump
        del self._armed[name]
        self._pump(name)

    def _pump(self, name: str) -> None:
        """Run the allocator's due decisions and hand its outputs to the core."""
        node = self.sim.nodes[name]
        alloc = self.allocs[name]
        if not node.alive:
            return
        now = self.sim.now
        timer = alloc.get_timer()
        if timer is not None and timer <= now:
            alloc.handle_timeout(now)
        saved = alloc.state_to_persist()
        if saved is not None:  # persist before publishing, as the daemon must
            self.persisted[name] = saved
        drained: list[IpamEvent] = []
        while (ev := alloc.next_event()) is not None:
            drained.append(ev)
            self.events.append((now, name, ev))
        update = alloc.claim_to_publish()
        if update is not None:
            self._check_change(name, update.value, drained, now)
            value = update.value
            if update.again:
                self.sim.call(name, lambda core, t: core.rebroadcast_state(STATE_KEY, t))
            else:
                self.sim.call(name, lambda core, t: core.set_state(STATE_KEY, value, t))
        timer = alloc.get_timer()
        if timer is not None:
            self._arm(name, max(timer, now))

    def _check_change(
        self, name: str, value: dict[str, Any] | None, drained: list[IpamEvent], now: float
    ) -> None:
        """Record the claim; a changed block must come with a lost conflict."""
        block = value["block"] if value is not None else None
        if value is not None:
            self.published.add((name, block, tuple(value["t"])))
        previous = self.last_block.get(name)
        self.last_block[name] = block
        old_time = self.last_time.get(name)
        self.last_time[name] = _claim_time(value)
        if previous is None or previous == block:
            return
        renumbers = [e for e in drained if isinstance(e, Renumbered)]
        claimed = [e for e in drained if isinstance(e, BlockClaimed)]
        if not renumbers or renumbers[-1].old_block != previous:
            self.violations.append(
                f"{now:.3f} {name}: {previous} -> {block} without a lost conflict"
            )
            return
        ev = renumbers[-1]
        winner_key = (ev.because, ev.old_block, tuple(ev.winner_time.to_value()))
        if winner_key not in self.published:
            self.violations.append(f"{now:.3f} {name}: lost {previous} to a claim never made: {ev}")
        learned = self.learned.get((name, ev.because), (now, None))[0]
        seen = self.alive_seen.get((name, ev.because), now)
        self.changes.append(
            Change(
                now,
                name,
                ev,
                old_time,
                tuple(claimed[-1].time.to_value()) if claimed else None,
                max(learned, seen),
            )
        )

    # ---- queries --------------------------------------------------------------------

    def running(self) -> list[str]:
        """Nodes up (not crashed, not leaving or left)."""
        return [n.name for n in self.sim.nodes.values() if n.alive and n.status == "up"]

    def duplicates(self) -> list[tuple[str, str]]:
        """Pairs of running nodes holding the same block."""
        holders: dict[str, list[str]] = {}
        for name in self.running():
            block = self.allocs[name].block
            if block is not None:
                holders.setdefault(str(block), []).append(name)
        return [(h[0], other) for h in holders.values() for other in h[1:]]

    def unclaimed(self) -> list[str]:
        return [n for n in self.running() if self.allocs[n].block is None]

    def views_agree(self) -> bool:
        """Every running node knows every other running node's current claim."""
        running = self.running()
        current = {n: self.allocs[n].claim for n in running}
        for observer in running:
            claims = self.allocs[observer]._claims
            for owner in running:
                if owner == observer:
                    continue
                mine, seen = current[owner], claims.get(owner)
                if mine is None or seen is None or seen.time != mine.time:
                    return False
        return True

    def settled(self) -> bool:
        if not self.sim.converged() or not self.views_agree():
            return False
        now = self.sim.now
        for name in self.running():
            alloc = self.allocs[name]
            timer = alloc._decide_at
            if timer is not None and timer <= now:
                return False
            # A member that just came back is judged only after its revive grace:
            # until then a conflict with it is pending, not settled.
            if alloc._own is not None and alloc._grace_until:
                return False
        return True

    def run_until_settled(self, timeout: float, step: float = 0.5) -> bool:
        end = self.sim.now + timeout
        while not self.settled():
            if self.sim.now >= end:
                return False
            self.sim.run_until(min(end, self.sim.now + step))
        return True

    def resolved_at(self, change: Change) -> float | None:
        """When the last running node that had seen the losing claim saw the new one.

        None if one of them never did; ``change.at`` if no other node had seen it.
        """
        loser, latest = change.node, change.at
        for observer in self.running():
            if observer == loser or (observer, loser, change.old_time) not in self.first_seen:
                continue
            at = self.first_seen.get((observer, loser, change.new_time))
            if at is None:
                return None
            latest = max(latest, at)
        return latest

    def known_everywhere_at(self, owner: str) -> float | None:
        """When the last running node learned ``owner``'s current claim (None: not all)."""
        claim = self.allocs[owner].claim
        if claim is None:
            return None
        latest = 0.0
        for observer in self.running():
            if observer == owner:
                continue
            at, value = self.learned.get((observer, owner), (None, None))
            if (
                at is None
                or not isinstance(value, dict)
                or tuple(value.get("t", ())) != tuple(claim.time.to_value())
            ):
                return None
            latest = max(latest, at)
        return latest


def _claim_time(value: Any) -> Any:
    """The timestamp identifying a claim value (a re-publication keeps it), or None."""
    return tuple(value["t"]) if isinstance(value, dict) and "t" in value else None


def start_index(node_id: str, num_blocks: int) -> int:
    """The allocator's hash start for ``node_id`` (same function as overlay.ipam)."""
    digest = hashlib.blake2b(node_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % num_blocks


def twin_name(base: str, num_blocks: int, taken: set[str], tag: str) -> str:
    """A fresh node name whose hash start equals ``base``'s."""
    target = start_index(f"id-{base}", num_blocks)
    for i in range(1_000_000):
        name = f"{tag}{i}"
        if name not in taken and start_index(f"id-{name}", num_blocks) == target:
            return name
    raise RuntimeError("no twin name found")


def prefix_for(nodes: int, block_prefixlen: int = 28) -> str:
    """A tight prefix: about 2.5 blocks per node, at least 128 (a /21 of /28 for 50
    nodes), so hash starts collide often and probes race, yet joins and quarantined
    blocks do not exhaust it."""
    blocks = 128
    while blocks < 2.5 * nodes:
        blocks *= 2
    return f"10.99.0.0/{block_prefixlen - blocks.bit_length() + 1}"


@dataclass
class RunResult:
    duplicates: int
    unclaimed: int
    settled: bool
    violations: list[str]
    claim_times: list[float]
    claim_failures: int
    resolution: list[float]
    heal_to_resolved: list[float]
    renumbered: int
    forced: int


def one_run(
    seed: str,
    nodes: int,
    config: GossipConfig,
    *,
    prefix: str,
    block_prefixlen: int,
    quarantine_s: float,
    probes: int,
    churn: int,
    partition_s: float,
    settle_timeout: float,
    loss: float = 0.0,
    cycles: int = 1,
) -> RunResult:
    """One bootstrap + claim-time probes + partition/churn + heal run.

    The phases and what each field of the result measures: :mod:`testbed.bench.ipam`.
    """
    sim = Simulator(seed, config, loss=loss)
    mesh = IpamMesh(sim, prefix=prefix, block_prefixlen=block_prefixlen, quarantine_s=quarantine_s)
    rng = random.Random(f"{seed}:scenario")
    names: set[str] = set()

    for i in range(nodes):
        if i:
            sim.run_until(sim.now + BOOTSTRAP_SPACING)
        earlier = mesh.running()
        names.add(f"n{i:03d}")
        mesh.add(f"n{i:03d}", rng.sample(earlier, min(BOOTSTRAP_SEEDS, len(earlier))))
    mesh.run_until_settled(settle_timeout)

    # Claim-time probes on the converged mesh.
    claim_times: list[float] = []
    claim_failures = 0
    for p in range(probes):
        name = f"p{p:03d}"
        joined_at = sim.now
        names.add(name)
        mesh.add(name, [rng.choice(mesh.running())])
        sim.run_for(PROBE_SPACING)
        at = mesh.known_everywhere_at(name)
        if at is None or any(name in pair for pair in mesh.duplicates()):
            claim_failures += 1
        else:
            claim_times.append(at - joined_at)

    # Partition and churn, then heal.
    changes_before = len(mesh.changes)
    num_blocks = 1 << (block_prefixlen - int(prefix.split("/")[1]))
    crashed: list[str] = []
    forced = 0
    heal_at = sim.now
    for cycle in range(cycles):
        forced += partition_cycle(
            mesh, rng, names, crashed, f"c{cycle}", num_blocks, churn, partition_s
        )
        heal_at = sim.now
        sim.heal()
    settled = mesh.run_until_settled(settle_timeout)

    resolution: list[float] = []
    heal_to_resolved: list[float] = []
    running_now = set(mesh.running())
    for change in mesh.changes[changes_before:]:
        if change.at < heal_at or change.node not in running_now:
            continue
        claim = mesh.allocs[change.node].claim
        if claim is None or tuple(claim.time.to_value()) != change.new_time:
            continue  # it moved again later: its last move is measured instead
        done = mesh.resolved_at(change)
        if done is None:
            continue
        resolution.append(done - change.could_know)
        heal_to_resolved.append(done - heal_at)
    return RunResult(
        duplicates=len(mesh.duplicates()),
        unclaimed=len(mesh.unclaimed()),
        settled=settled,
        violations=mesh.violations,
        claim_times=claim_times,
        claim_failures=claim_failures,
        resolution=resolution,
        heal_to_resolved=heal_to_resolved,
        renumbered=len(mesh.changes),
        forced=forced,
    )


def partition_cycle(
    mesh: IpamMesh,
    rng: random.Random,
    names: set[str],
    crashed: list[str],
    tag: str,
    num_blocks: int,
    churn: int,
    partition_s: float,
) -> int:
    """Cut the mesh (a random PARTITION_MODES), churn for ``partition_s``; return the
    number of forced twin joins. The caller heals."""
    sim = mesh.sim
    mode = rng.choice(PARTITION_MODES)
    running = mesh.running()
    rng.shuffle(running)
    count = 3 if mode == "split3" else 2
    sides = [set(running[i::count]) for i in range(count)]
    if mode == "oneway":
        for a in sides[0]:
            for b in sides[1]:
                sim.block(a, b)
    else:
        sim.partition(sides)
        for side in sides:  # asymmetric links inside each side, on top
            members = sorted(side)
            for _ in range(ASYMMETRIC_BLOCKS if len(members) > 2 else 0):
                a, b = rng.sample(members, 2)
                sim.block(a, b)

    def join_side(name: str, i: int, seed_pool: list[str]) -> None:
        sides[i].add(name)
        names.add(name)
        group = sim.nodes[seed_pool[0]].group

        def prepare(node_name: str) -> None:
            sim.nodes[node_name].group = group
            if mode == "oneway":
                for other in sides[1 - i]:
                    sim.block(*((node_name, other) if i == 0 else (other, node_name)))

        mesh.add(name, [rng.choice(seed_pool)], prepare)

    forced = 0
    start = sim.now
    times = sorted(start + rng.uniform(0.0, partition_s * 0.8) for _ in range(churn))
    for k, at in enumerate(times):
        sim.run_until(at)
        kind = rng.choice(CHURN_KINDS)
        live = [[n for n in mesh.running() if n in side] for side in sides]
        if kind == "twin":
            i, j = rng.sample(range(count), 2)
            if live[i] and live[j]:
                base = f"{tag}j{k}a"
                join_side(base, i, live[i])
                join_side(twin_name(base, num_blocks, names, f"{tag}j{k}b"), j, live[j])
                forced += 1
        elif kind == "join":
            i = rng.randrange(count)
            if live[i]:
                join_side(f"{tag}j{k}", i, live[i])
        elif kind == "crash" and len(mesh.running()) > 4:
            victim = rng.choice(mesh.running())
            mesh.crash(victim)
            crashed.append(victim)
        elif kind == "restart" and crashed:
            name = crashed.pop(rng.randrange(len(crashed)))
            pool = next((p for p, side in zip(live, sides, strict=True) if name in side), [])
            if pool:
                mesh.restart(name, join=[rng.choice(pool)])
        elif kind == "leave" and len(mesh.running()) > 4:
            mesh.leave(rng.choice(mesh.running()))
    sim.run_until(start + partition_s)
    return forced
