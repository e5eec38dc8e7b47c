"""Benchmark: a simulated SWIM/Lifeguard cluster (``python -m testbed.bench gossip``).

Each run is one fresh :class:`testbed.sim.Simulator` seeded with ``"{seed}:{run}"``
(so ``--lifeguard on`` and ``off`` see the same network draws, node picks and
starved set for the same ``--seed``). A run goes:

1. Bootstrap, not measured: ``--nodes`` nodes are added 10 ms apart with no
   loss, each joining up to 3 random nodes added before it; the simulator runs
   until every node sees every node ALIVE (checked every 2 simulated s, at
   most ``--converge-timeout`` s; a node whose view is still incomplete at a
   check push-pulls with one random node, which the periodic push-pull would
   do later anyway), then ``--settle`` more seconds so the join broadcasts
   drain. ``t0`` is the end of this; ``converge_s`` is bootstrap
   start to full view.
2. At ``t0`` the global datagram loss becomes ``--loss`` and ``--starved``
   (a fraction of the nodes, rounded up, picked at random) start reading their
   datagrams 0.5-2.5 s late (drawn per packet); their timers stay on time.
   Every failure-detector event from here on counts.
3. Steady-state window ``[t0, t0 + W)``, ``W = duration / 3``: nothing is
   done to the cluster. ``bytes_per_node_s`` = every sealed byte sent by every
   node in the window (datagrams whether lost or not, push-pull requests and
   replies) / (nodes x W), then the worst run. Push-pulls fall in the window at
   their natural rate (staggered timers), so they are amortised, not excluded.
4. At ``t0 + W`` one random non-starved node sets a replicated-state key.
   For each other live node, the delay is from the ``set_state`` call to the
   node's ``StateChanged`` for that (owner, key). Per run the 99% time is the
   nearest-rank 99th percentile of those delays and the 100% time is the
   largest; ``dissemination_p99_s`` / ``dissemination_max_s`` report the worst
   run (a node that never got it counts in ``dissemination_missing`` and makes
   that run's max null).
5. At ``t0 + W + 5`` one random non-starved node (not the state origin)
   crashes. Detection time for each node alive at the end = its first
   ``MemberFailed`` about the crashed node minus the crash time. The run goes
   on to ``t0 + duration``; nodes that never emitted one are ``undetected``.
   ``detection_p50_s`` / ``detection_p99_s`` are nearest-rank percentiles over
   every (run, node) pair that detected it.
6. ``false_deaths``: over all runs, the distinct (member, incarnation) pairs
   for which any node emitted ``MemberFailed`` while that member was running
   (not crashed, not left), at or after ``t0``. ``false_suspicions``: the same
   with ``MemberSuspected``.

``max_datagram_bytes`` is the largest sealed datagram any node sent (bootstrap
included); ``sim_wall_s`` is the wall-clock time of all runs together,
``sim_cpu_s`` the CPU time of this process over them (steadier than wall time
on a shared machine), ``bootstrap_cpu_s`` the part of it spent in step 1 (at
N=1,000 the join storm dominates: every Alive reaches every node), and
``sim_seconds`` the virtual time one run covers, bootstrap included.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass
from functools import partial
from typing import Any

from gossip.config import GossipConfig, preset
from gossip.events import Event, MemberFailed, MemberSuspected, StateChanged
from gossip.messages import Address
from testbed.bench.stats import nearest_rank
from testbed.sim import Simulator

BOOTSTRAP_SPACING = 0.01  # seconds between node starts during bootstrap
BOOTSTRAP_SEEDS = 3  # each new node joins this many random earlier nodes
REPAIR_EVERY = 2.0  # seconds between bootstrap view checks / repair push-pulls
CRASH_AFTER_UPDATE = 5.0  # seconds between the state update and the crash
STATE_KEY = "bench"
PER_RUN_ARRAYS_MAX = 20  # per-run arrays appear in the output for at most this many runs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Command-line options of the gossip benchmark."""
    parser.add_argument("--nodes", type=int, default=100, help="cluster size (default 100)")
    parser.add_argument("--runs", type=int, default=1, help="independent runs (default 1)")
    parser.add_argument("--loss", type=float, default=0.0, help="datagram loss 0..1 (default 0)")
    parser.add_argument(
        "--starved", type=float, default=0.0, help="fraction of starved nodes 0..1 (default 0)"
    )
    parser.add_argument("--seed", type=int, default=1, help="base seed (default 1)")
    parser.add_argument("--lifeguard", choices=("on", "off"), default="on")
    parser.add_argument("--preset", choices=("lan", "wan", "local"), default="lan")
    parser.add_argument(
        "--duration",
        type=float,
        default=90.0,
        help="simulated seconds per run after convergence (default 90)",
    )
    parser.add_argument(
        "--settle",
        type=float,
        default=20.0,
        help="simulated seconds after convergence before measuring (default 20)",
    )
    parser.add_argument(
        "--converge-timeout",
        type=float,
        default=120.0,
        help="simulated seconds allowed for the bootstrap to converge (default 120)",
    )
    parser.add_argument(
        "--latency", type=float, default=0.001, help="one-way latency in s (default 0.001)"
    )
    parser.add_argument(
        "--jitter", type=float, default=0.0005, help="latency jitter +/- s (default 0.0005)"
    )


def starved_count(fraction: float, nodes: int) -> int:
    """How many nodes ``--starved`` means: the fraction of ``nodes``, rounded up."""
    return math.ceil(fraction * nodes - 1e-9)


@dataclass
class RunResult:
    """What one run measured."""

    converge_s: float | None
    detections: list[float]
    undetected: int
    false_deaths: int
    false_suspicions: int
    dissemination_p99: float | None
    dissemination_max: float | None
    dissemination_missing: int
    bytes_per_node_s: float
    max_datagram_bytes: int
    sim_seconds: float
    datagrams_lost: int
    bootstrap_cpu_s: float


def _join_one(peer: Address, core: Any, now: float) -> None:
    core.join([peer], now)


def bootstrap(sim: Simulator, nodes: int, timeout: float) -> bool:
    """Run until every node sees all ``nodes`` ALIVE, at most ``timeout`` s.

    Joins that overlap can miss each other's Alive broadcasts; the periodic
    push-pull (every 30 s scaled up with N) repairs that eventually. To get
    there sooner, every :data:`REPAIR_EVERY` s each node with an incomplete view
    push-pulls (joins) with one random node.
    """
    end = sim.now + timeout
    while not sim.converged():
        if sim.now >= end:
            return False
        sim.run_until(min(end, sim.now + REPAIR_EVERY))
        live = sim.live_nodes()
        for node in live:
            if node.core.num_alive < nodes:  # type: ignore[attr-defined]
                peer = sim.rng.choice(live).addr
                sim.call(node.name, partial(_join_one, peer))
    return True


def run_once(
    config: GossipConfig,
    *,
    nodes: int,
    loss: float,
    starved: float,
    seed: str,
    duration: float,
    settle: float,
    converge_timeout: float,
    latency: float,
    jitter: float,
    warm: bool = False,
) -> RunResult:
    """One run of the scenario described in the module docstring.

    ``warm``: instead of step 1's join storm, start the cluster already converged
    (:meth:`testbed.sim.Simulator.add_converged_cluster`; ``converge_s`` is then 0) and
    only settle; the steps from 2 on are the same.
    """
    sim = Simulator(seed, config, latency=latency, jitter=jitter, loss=0.0)
    pick = sim.rng  # node picks come from the same seeded stream, after bootstrap
    measuring = False
    false_dead: set[tuple[str, int]] = set()
    false_suspect: set[tuple[str, int]] = set()
    failed_seen: dict[str, dict[str, float]] = {}  # member -> observer -> first MemberFailed
    state_seen: dict[str, float] = {}
    watch: dict[str, Any] = {"owner": None}

    def on_event(now: float, name: str, event: Event) -> None:
        if not measuring:
            return
        if isinstance(event, MemberFailed):
            member = event.member
            failed_seen.setdefault(member.name, {}).setdefault(name, now)
            if sim.nodes[member.name].alive:
                false_dead.add((member.name, member.incarnation))
        elif isinstance(event, MemberSuspected):
            member = event.member
            if sim.nodes[member.name].alive:
                false_suspect.add((member.name, member.incarnation))
        elif isinstance(event, StateChanged):
            if event.owner == watch["owner"] and event.key == STATE_KEY:
                state_seen.setdefault(name, now)

    sim.on_event(on_event)
    cpu_started = time.process_time()
    if warm:
        sim.add_converged_cluster(nodes)
        converge_s: float | None = 0.0
    else:
        sim.add_cluster(nodes, seeds=BOOTSTRAP_SEEDS, spacing=BOOTSTRAP_SPACING)
        converge_s = sim.now if bootstrap(sim, nodes, converge_timeout) else None
    sim.run_for(settle)
    bootstrap_cpu_s = time.process_time() - cpu_started

    t0 = sim.now
    measuring = True
    sim.loss = loss
    names = list(sim.nodes)
    starved_names = set(pick.sample(names, starved_count(starved, nodes)))
    for name in sorted(starved_names):
        sim.starve(name)
    healthy = [n for n in names if n not in starved_names]

    window = duration / 3.0
    before = {n.name: n.bytes_sent for n in sim.nodes.values()}
    sim.run_until(t0 + window)
    sent = sum(n.bytes_sent - before[n.name] for n in sim.nodes.values())
    bytes_per_node_s = sent / (nodes * window)

    origin = pick.choice(healthy)
    watch["owner"] = origin
    t_update = sim.now
    sim.call(origin, lambda core, now: core.set_state(STATE_KEY, seed, now))

    sim.run_until(t_update + CRASH_AFTER_UPDATE)
    victim = pick.choice([n for n in healthy if n != origin])
    t_crash = sim.now
    sim.crash(victim)
    sim.run_until(t0 + duration)

    receivers = [n.name for n in sim.nodes.values() if n.alive and n.name != origin]
    delays = [state_seen[n] - t_update for n in receivers if n in state_seen]
    missing = len(receivers) - len(delays)
    dis_p99 = nearest_rank(delays, 99.0)
    if dis_p99 is not None and len(delays) < math.ceil(0.99 * len(receivers)):
        dis_p99 = None  # fewer than 99% ever got it
    dis_max = max(delays) if delays and missing == 0 else None

    observers = [n.name for n in sim.nodes.values() if n.alive]
    seen = failed_seen.get(victim, {})
    detections = [seen[n] - t_crash for n in observers if n in seen and seen[n] >= t_crash]
    totals = sim.totals()
    return RunResult(
        converge_s=converge_s,
        detections=detections,
        undetected=len(observers) - len(detections),
        false_deaths=len(false_dead),
        false_suspicions=len(false_suspect),
        dissemination_p99=dis_p99,
        dissemination_max=dis_max,
        dissemination_missing=missing,
        bytes_per_node_s=bytes_per_node_s,
        max_datagram_bytes=totals["max_datagram_bytes"],
        sim_seconds=sim.now,
        datagrams_lost=totals["datagrams_lost"],
        bootstrap_cpu_s=bootstrap_cpu_s,
    )


def _worst(values: list[float | None]) -> float | None:
    """The largest value, or None if any run had none (it never completed)."""
    if not values or any(v is None for v in values):
        return None
    return max(v for v in values if v is not None)


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run ``--runs`` runs and aggregate them (see the module docstring)."""
    config = preset(args.preset, lifeguard=args.lifeguard == "on")
    started = time.perf_counter()
    cpu_started = time.process_time()
    results = [
        run_once(
            config,
            nodes=args.nodes,
            loss=args.loss,
            starved=args.starved,
            seed=f"{args.seed}:{r}",
            duration=args.duration,
            settle=args.settle,
            converge_timeout=args.converge_timeout,
            latency=args.latency,
            jitter=args.jitter,
        )
        for r in range(args.runs)
    ]
    wall = time.perf_counter() - started
    cpu = time.process_time() - cpu_started
    detections = [d for r in results for d in r.detections]
    out: dict[str, Any] = {
        "nodes": args.nodes,
        "runs": args.runs,
        "loss": args.loss,
        "starved": starved_count(args.starved, args.nodes),
        "seed": args.seed,
        "lifeguard": args.lifeguard,
        "preset": args.preset,
        "duration_s": args.duration,
        "detection_p50_s": _round(nearest_rank(detections, 50.0)),
        "detection_p99_s": _round(nearest_rank(detections, 99.0)),
        "detection_max_s": _round(max(detections) if detections else None),
        "undetected": sum(r.undetected for r in results),
        "false_deaths": sum(r.false_deaths for r in results),
        "false_deaths_per_run": round(sum(r.false_deaths for r in results) / args.runs, 3),
        "false_suspicions": sum(r.false_suspicions for r in results),
        "dissemination_p99_s": _round(_worst([r.dissemination_p99 for r in results])),
        "dissemination_max_s": _round(_worst([r.dissemination_max for r in results])),
        "dissemination_missing": sum(r.dissemination_missing for r in results),
        "bytes_per_node_s": round(max(r.bytes_per_node_s for r in results), 1),
        "max_datagram_bytes": max(r.max_datagram_bytes for r in results),
        "converge_s": _round(_worst([r.converge_s for r in results])),
        "datagrams_lost": sum(r.datagrams_lost for r in results),
        "sim_seconds": round(max(r.sim_seconds for r in results), 1),
        "sim_wall_s": round(wall, 2),
        "sim_cpu_s": round(cpu, 2),
        "bootstrap_cpu_s": round(sum(r.bootstrap_cpu_s for r in results), 2),
    }
    if args.runs <= PER_RUN_ARRAYS_MAX:
        out["false_deaths_runs"] = [r.false_deaths for r in results]
        out["bytes_per_node_s_runs"] = [round(r.bytes_per_node_s, 1) for r in results]
        out["dissemination_max_s_runs"] = [_round(r.dissemination_max) for r in results]
    return out
