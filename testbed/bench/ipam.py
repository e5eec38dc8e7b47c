"""Benchmark: overlay address allocation under partitions and churn (``python -m testbed.bench ipam``).

Each run is one :func:`testbed.ipam_mesh.one_run` on an
:class:`testbed.ipam_mesh.IpamMesh` (allocators on simulated gossip cores, glued the
way the daemon glues them); this module aggregates the runs. Each run is seeded
with ``"{seed}:{run}"``. The prefix is deliberately tight (``--prefix``; default
about 2.5 /28 blocks per node, at least 128: a /21 for 50 nodes, a /19 for 200),
so hash starts collide and probes race. One run:

1. Bootstrap, not measured: ``--nodes`` nodes join 10 ms apart (each joins up to
   3 earlier nodes); run until the membership converged and every node knows
   every claim (``settled``, below).
2. Claim time, on the converged mesh: ``--probes`` new nodes join one at a time,
   10 s apart, each through one random member. A probe's claim time is from its
   join to the moment the last live node learned the claim it holds at the end
   of the phase (so a probe that had to move is measured to its final claim),
   and only if that claim overlaps no other live claim. ``claim_time_p99_s``
   is the nearest-rank 99th percentile over all probes of all runs; a probe whose
   claim was not known everywhere within the 10 s counts as infinitely slow
   (``claim_probes_failed``; a percentile that lands on one is null).
3. Partition and churn (``--cycles`` times, back to back): the running nodes are
   cut one of three ways, picked at random per cycle: two groups, three groups
   (each with a few one-way blocks inside it: asymmetric links), or one-way
   (group 0 cannot reach group 1, the reverse works). During ``--partition-s``,
   ``--churn`` events happen at random times, each one of: a join on a random
   side (two kinds in three), a *twin* join (two new nodes on two sides whose
   hash starts are equal: a forced race), a crash, a restart of a node crashed
   in this cycle (from its persisted claim), a graceful leave. The quarantine is
   ``--quarantine-s`` (short, so sides reuse each other's dead blocks and
   collide at the heal). Then every cut is healed.
4. ``t_heal`` is the last heal; run until settled or ``--settle-timeout`` s.
   ``settled``: every running node sees exactly the running nodes alive, every
   running node's view of every other running node's claim is that node's
   current claim, and no allocator has a decision pending.
   ``duplicates_after_convergence``: pairs of running nodes holding the same
   block at that point, summed over runs (target 0); ``unsettled_runs`` counts
   runs that did not settle in time (their duplicates are counted all the same);
   ``unclaimed_after_convergence`` counts running nodes without a block.
   ``unexplained_renumbers``: block changes without a lost conflict (a
   ``Renumbered`` whose winner really published an earlier claim on that block);
   must be 0.
5. ``conflict_resolution_p99_s`` (after the heal): for each ``Renumbered`` at
   or after ``t_heal`` (the loser's last move), from the moment the loser could
   know it lost (the later of: it learned the winner's claim, it saw the winner
   alive) to the moment the last running node that had seen the losing claim
   saw the loser's new one (the conflict is gone from every view that held
   it; nodes that never saw the losing claim had no conflict to clear). This
   is the allocator's share, plus gossip dissemination of one update.
   ``heal_to_resolved_p99_s`` is from ``t_heal`` to that same moment: it adds
   SWIM's own partition healing (dead members are re-joined every
   ``reconnect_interval``, 10 s), reported for honesty.
6. ``renumbered_nodes``: ``Renumbered`` events over all runs (each is one node
   moving once); ``renumbered_per_run`` the mean. ``conflicts_forced`` counts
   cross-partition same-hash joiner pairs.

``sim_wall_s`` is the wall-clock time of all runs together. ``duplicates`` and
``unexplained_renumbers`` are what the property test (tests/overlay/test_ipam_sim.py)
asserts to be zero; the rest are measurements.

Example: ``python -m testbed.bench ipam --nodes 20 --runs 500 --probes 1 --churn 8
--partition-s 20 --quarantine-s 10 --seed 500 --json`` (the 500-run duplicate check).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from typing import Any

from gossip.config import preset
from testbed.bench.stats import nearest_rank
from testbed.ipam_mesh import RunResult, one_run, prefix_for


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nodes", type=int, default=50, help="bootstrap cluster size")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--seed", default="1")
    parser.add_argument("--preset", default="lan", help="gossip timing preset")
    parser.add_argument(
        "--prefix", default=None, help="overlay prefix (default: tight, ~2.5 blocks per node)"
    )
    parser.add_argument("--block-prefixlen", type=int, default=28)
    parser.add_argument("--quarantine-s", type=float, default=15.0)
    parser.add_argument("--probes", type=int, default=2, help="claim-time joins per run")
    parser.add_argument("--churn", type=int, default=12, help="churn events per partition")
    parser.add_argument("--partition-s", type=float, default=40.0)
    parser.add_argument("--settle-timeout", type=float, default=90.0)
    parser.add_argument("--loss", type=float, default=0.0, help="datagram loss probability")
    parser.add_argument("--cycles", type=int, default=1, help="partition/churn/heal cycles per run")
    parser.add_argument("--progress", action="store_true", help="one line per run on stderr")


def run(args: argparse.Namespace) -> dict[str, Any]:
    config = preset(args.preset)
    started = time.perf_counter()
    results: list[RunResult] = []
    for r in range(args.runs):
        result = one_run(
            f"{args.seed}:{r}",
            args.nodes,
            config,
            prefix=args.prefix or prefix_for(args.nodes, args.block_prefixlen),
            block_prefixlen=args.block_prefixlen,
            quarantine_s=args.quarantine_s,
            probes=args.probes,
            churn=args.churn,
            partition_s=args.partition_s,
            settle_timeout=args.settle_timeout,
            loss=args.loss,
            cycles=args.cycles,
        )
        results.append(result)
        if args.progress:
            print(
                f"run {r + 1}/{args.runs}: duplicates={result.duplicates} "
                f"settled={result.settled} renumbered={result.renumbered} "
                f"violations={len(result.violations)} t={time.perf_counter() - started:.0f}s",
                file=sys.stderr,
                flush=True,
            )
    # A probe not known everywhere within PROBE_SPACING counts as infinitely slow.
    claim_times = [t for r in results for t in r.claim_times]
    claim_times += [math.inf] * sum(r.claim_failures for r in results)
    resolution = [t for r in results for t in r.resolution]
    heal = [t for r in results for t in r.heal_to_resolved]
    renumbered = sum(r.renumbered for r in results)

    def rounded(value: float | None) -> float | None:
        return None if value is None or math.isinf(value) else round(value, 3)

    return {
        "nodes": args.nodes,
        "runs": args.runs,
        "duplicates_after_convergence": sum(r.duplicates for r in results),
        "unclaimed_after_convergence": sum(r.unclaimed for r in results),
        "unsettled_runs": sum(not r.settled for r in results),
        "unexplained_renumbers": sum(len(r.violations) for r in results),
        "claim_time_p50_s": rounded(nearest_rank(claim_times, 50)),
        "claim_time_p99_s": rounded(nearest_rank(claim_times, 99)),
        "claim_probes_failed": sum(r.claim_failures for r in results),
        "conflict_resolution_p50_s": rounded(nearest_rank(resolution, 50)),
        "conflict_resolution_p99_s": rounded(nearest_rank(resolution, 99)),
        "heal_to_resolved_p99_s": rounded(nearest_rank(heal, 99)),
        "conflicts_after_heal": len(resolution),
        "conflicts_forced": sum(r.forced for r in results),
        "renumbered_nodes": renumbered,
        "renumbered_per_run": round(renumbered / max(1, len(results)), 2),
        "sim_wall_s": round(time.perf_counter() - started, 1),
    }
