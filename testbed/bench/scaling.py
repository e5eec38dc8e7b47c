"""Benchmark: convergence and bandwidth against N (10 .. 10,000), beside the SWIM model
(``python -m testbed.bench scaling --sizes 10,100,1000,10000``).

Two engines, every row labelled with the one that made it (``engine``):

- ``core``: the simulator running the real core (:func:`testbed.bench.gossip.run_once`, one
  run per size, no loss), for sizes up to ``--core-max`` (default 2,000). With ``--start
  warm`` (default) the cluster starts converged (:meth:`testbed.sim.Simulator.
  add_converged_cluster`: every member table filled ALIVE, no join storm); ``--start
  bootstrap`` simulates the join storm instead (O(N^2) deliveries: 265 s CPU at N = 1,000,
  hours at 10,000; such sizes are skipped when the predicted bootstrap CPU, extrapolated as
  N^a from the two largest sizes run, exceeds ``--max-cpu-s``). Its ceiling is memory: one
  mutable member record per (node, member), ~215-240 bytes each (peak RSS 0.96 GB at
  N = 2,000, 3.4 GB at 4,000): ~21 GB at 10,000.
- ``montecarlo``: :mod:`testbed.swim_mc`, a Monte-Carlo model of the protocol (not the core:
  the real config, ``retransmit_limit`` and ``push_pull_scale``, message sizes from the real
  codec, random peers per round), ``--model-runs`` runs per size (median, and the
  5th..95th-percentile band across runs), at every size. Where both engines ran,
  ``validation`` compares them: whether the core's dissemination times fall inside the
  model's band, and the bandwidth difference in percent.

Reported per row:

- ``dissemination_max_s`` / ``dissemination_p99_s``: from one ``set_state`` to the last
  (99th-percentile) node's ``StateChanged``: the time the protocol takes to tell everyone one
  thing (the "convergence" of SWIM's dissemination);
- ``bytes_per_node_s``: every sealed byte each node sent during the steady window (probes,
  acks, push-pulls; nothing changing), per node and second;
- ``cpu_s`` (the row's CPU time) and, for the core, ``peak_rss_mb`` (this process's peak so
  far: sizes run in ascending order, so it is the largest size's), ``bootstrap_s`` (virtual;
  0 when warm) and ``bootstrap_cpu_s`` (warm: filling the tables and the settle time).

The analytic SWIM model, from the config only (:func:`model`):

- dissemination: infection-style push to ``gossip_nodes`` (k) random members every
  ``gossip_interval``: all N informed after about ``log_{k+1}(N) + ln(N) / k`` rounds (Pittel's
  bound for push gossip, generalised to fanout k); time = rounds x interval. Our core sends a
  newly queued broadcast at once instead of at the next tick (the parked ticker, see
  docs/architecture.md), so the measured time is below the model: an upper bound.
- bandwidth: per probe interval each node sends one ping and, on average, answers one (an
  ack), sized by encoding them with the real codec and keyring; plus one settled digest
  push-pull exchange (~320 bytes both ways, docs/architecture.md) started per node every
  ``push_pull_scale(push_pull_interval, N)`` and one answered. Constant in N up to the
  push-pull term, which shrinks as the interval is scaled up above 32 members.
"""

from __future__ import annotations

import argparse
import math
import random
import resource
import statistics
import time
from typing import Any

from gossip.codec import DatagramHeader, destination_tag, encode_datagram
from gossip.config import GossipConfig, preset
from gossip.core import push_pull_scale
from gossip.keyring import Keyring
from gossip.messages import Ack, Ping
from testbed.bench import UsageError
from testbed.bench.gossip import run_once
from testbed.bench.stats import nearest_rank
from testbed.swim_mc import MIN_SETTLE, run_model

PUSH_PULL_EXCHANGE_BYTES = 320  # settled digest push-pull, both ways (docs/architecture.md)
DEFAULT_SIZES = "10,100,1000,10000"
DEFAULT_CORE_MAX = 2000  # ~1 GB of member records (N^2 x ~215-240 B) and ~1 min CPU, warm
DEFAULT_MODEL_RUNS = 20
RECORD_BYTES = 215  # memory per (node, member) in the warm-started simulator (3.4 GB at N=4000)
LATENCY, JITTER = 0.001, 0.0005  # s, one way (the gossip benchmark's defaults)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sizes", default=DEFAULT_SIZES, help=f"cluster sizes (default {DEFAULT_SIZES})")
    parser.add_argument("--preset", choices=("lan", "wan", "local"), default="lan")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--core-max", type=int, default=DEFAULT_CORE_MAX,
                        help="largest size run on the real core in the simulator; larger ones "
                        f"run on the Monte-Carlo model only (default {DEFAULT_CORE_MAX}: "
                        "~215 bytes per node per member, 1 GB)")  # fmt: skip
    parser.add_argument("--start", choices=("warm", "bootstrap"), default="warm",
                        help="the core's cluster: start converged (warm, default) or simulate "
                        "the join storm (bootstrap: O(N^2), ~265 s CPU at N=1000)")  # fmt: skip
    parser.add_argument("--model-runs", type=int, default=DEFAULT_MODEL_RUNS,
                        help="Monte-Carlo runs per size, 0 for none "
                        f"(default {DEFAULT_MODEL_RUNS})")  # fmt: skip
    parser.add_argument("--settle", type=float, default=60.0,
                        help="virtual s after the start (or bootstrap) before the steady window "
                        f"(default 60; at least {MIN_SETTLE:g}: the start-up broadcasts drain)")  # fmt: skip
    parser.add_argument("--duration", type=float, default=15.0,
                        help="virtual s after settling (window = a third; default 15)")  # fmt: skip
    parser.add_argument("--max-cpu-s", type=float, default=600.0,
                        help="with --start bootstrap: skip sizes whose predicted bootstrap CPU "
                        "exceeds this (default 600)")  # fmt: skip


def datagram_sizes(config: GossipConfig, name_len: int) -> tuple[int, int]:
    """Sealed bytes of one ping and one ack between members with names of ``name_len``."""
    rng = random.Random(0)
    ring = Keyring([bytes(32)], nonce_source=rng.randbytes)
    me, peer = "n" * name_len, "m" * name_len
    header = DatagramHeader(me, 1, 5000, destination_tag(peer))  # a counter an hour in
    addr = ("10.0.3.231", 7946)
    ping = Ping(5000, peer, me, addr)
    aad = config.cluster_name.encode()
    sizes = [len(ring.encrypt(encode_datagram([m], header), aad)) for m in (ping, Ack(5000, me))]
    return sizes[0], sizes[1]


def model(config: GossipConfig, n: int) -> dict[str, float]:
    """The analytic SWIM figures for ``n`` members (see the module docstring)."""
    k = config.gossip_nodes
    rounds = math.log(n, k + 1) + math.log(n) / k if n > 1 else 0.0
    ping, ack = datagram_sizes(config, max(3, len(str(n - 1))) + 1)
    probe_bytes = (ping + ack) / config.probe_interval
    pp_bytes = PUSH_PULL_EXCHANGE_BYTES / push_pull_scale(config.push_pull_interval, n)
    return {
        "model_rounds": round(rounds, 2),
        "model_dissemination_s": round(rounds * config.gossip_interval, 3),
        "model_bytes_per_node_s": round(probe_bytes + pp_bytes, 1),
        "model_probe_bytes_per_node_s": round(probe_bytes, 1),
        "ping_bytes": ping,
        "ack_bytes": ack,
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def _predict(done: list[dict[str, Any]], n: int) -> float | None:
    """Bootstrap CPU for ``n`` extrapolated from the two largest sizes run (N^a)."""
    runs = [r for r in done if r.get("bootstrap_cpu_s")]
    if len(runs) < 2:
        return None
    (n1, c1), (n2, c2) = [(r["nodes"], r["bootstrap_cpu_s"]) for r in runs[-2:]]
    exponent = max(1.0, math.log(c2 / c1) / math.log(n2 / n1)) if c1 > 0 and n2 > n1 else 2.0
    return float(c2 * (n / n2) ** exponent)


def _core_gb(n: int) -> float:
    """Roughly what the simulator's member records take at ``n``: every node holds every member."""
    return n * n * RECORD_BYTES / 1e9


def _peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux


def core_row(config: GossipConfig, n: int, args: argparse.Namespace) -> dict[str, Any]:
    """One run of the real core in the simulator at ``n``."""
    started, cpu = time.perf_counter(), time.process_time()
    r = run_once(config, nodes=n, loss=0.0, starved=0.0, seed=f"{args.seed}:scaling:{n}",
                 duration=args.duration, settle=args.settle, converge_timeout=300.0,
                 latency=LATENCY, jitter=JITTER, warm=args.start == "warm")  # fmt: skip
    return {
        "nodes": n,
        "engine": "core",
        "start": args.start,
        "dissemination_max_s": _round(r.dissemination_max),
        "dissemination_p99_s": _round(r.dissemination_p99),
        "dissemination_missing": r.dissemination_missing,
        "bytes_per_node_s": round(r.bytes_per_node_s, 1),
        "bootstrap_s": r.converge_s,
        "bootstrap_cpu_s": round(r.bootstrap_cpu_s, 2),
        "cpu_s": round(time.process_time() - cpu, 2),
        "peak_rss_mb": _peak_rss_mb(),
        "wall_s": round(time.perf_counter() - started, 2),
    } | model(config, n)


def _band(values: list[float | None], prefix: str) -> dict[str, float | None]:
    """Median and 5th / 95th nearest-rank percentiles across runs (None if a run had none)."""
    if not values or any(v is None for v in values):
        return {prefix: None, f"{prefix}_p5": None, f"{prefix}_p95": None}
    got = [v for v in values if v is not None]
    return {
        prefix: _round(statistics.median(got)),
        f"{prefix}_p5": _round(nearest_rank(got, 5.0)),
        f"{prefix}_p95": _round(nearest_rank(got, 95.0)),
    }


def montecarlo_row(config: GossipConfig, n: int, args: argparse.Namespace) -> dict[str, Any]:
    """``--model-runs`` runs of the Monte-Carlo protocol model at ``n``."""
    started, cpu = time.perf_counter(), time.process_time()
    runs = [
        run_model(config, n, f"{args.seed}:{i}:montecarlo:{n}", settle=args.settle,
                  duration=args.duration, latency=LATENCY, jitter=JITTER)  # fmt: skip
        for i in range(args.model_runs)
    ]
    return {
        "nodes": n,
        "engine": "montecarlo",
        "runs": len(runs),
        **_band([r.dissemination_max for r in runs], "dissemination_max_s"),
        **_band([r.dissemination_p99 for r in runs], "dissemination_p99_s"),
        "dissemination_missing": sum(r.dissemination_missing for r in runs),
        "bytes_per_node_s": round(statistics.median(r.bytes_per_node_s for r in runs), 1),
        "cpu_s": round(time.process_time() - cpu, 2),
        "wall_s": round(time.perf_counter() - started, 2),
    } | model(config, n)


def _within(value: float | None, row: dict[str, Any], key: str) -> bool | None:
    low, high = row.get(f"{key}_p5"), row.get(f"{key}_p95")
    if value is None or low is None or high is None:
        return None
    return bool(low <= value <= high)


def validate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The core beside the model at every size both ran."""
    mc = {r["nodes"]: r for r in rows if r["engine"] == "montecarlo"}
    out = []
    for core in (r for r in rows if r["engine"] == "core" and r["nodes"] in mc):
        m = mc[core["nodes"]]
        entry: dict[str, Any] = {"nodes": core["nodes"]}
        for key in ("dissemination_max_s", "dissemination_p99_s"):
            entry[f"core_{key}"] = core[key]
            entry[f"montecarlo_{key}"] = m[key]
            entry[f"montecarlo_{key}_band"] = [m[f"{key}_p5"], m[f"{key}_p95"]]
            entry[f"{key}_within_band"] = _within(core[key], m, key)
        entry["core_bytes_per_node_s"] = core["bytes_per_node_s"]
        entry["montecarlo_bytes_per_node_s"] = m["bytes_per_node_s"]
        entry["bytes_diff_pct"] = round(100 * (m["bytes_per_node_s"] / core["bytes_per_node_s"] - 1), 2)
        out.append(entry)
    return out


def _sizes(args: argparse.Namespace) -> list[int]:
    try:
        sizes = sorted({int(s) for s in args.sizes.split(",") if s.strip()})
    except ValueError:
        raise UsageError(f"scaling: --sizes: expected numbers like 10,100,1000, got {args.sizes!r}") from None
    if not sizes or sizes[0] < 2 or sizes[-1] > 100_000:
        raise UsageError("scaling: --sizes must be between 2 and 100000")
    if args.model_runs < 0 or args.core_max < 0:
        raise UsageError("scaling: --model-runs and --core-max cannot be negative")
    if args.model_runs and args.settle < MIN_SETTLE:
        raise UsageError(f"scaling: --settle must be at least {MIN_SETTLE:g} s for the model")
    if args.duration <= 0:
        raise UsageError("scaling: --duration must be positive")
    return sizes


def run(args: argparse.Namespace) -> dict[str, Any]:
    sizes = _sizes(args)
    config = preset(args.preset)
    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    for n in (n for n in sizes if n <= args.core_max):
        predicted = _predict(rows, n) if args.start == "bootstrap" else None
        if predicted is not None and predicted > args.max_cpu_s:
            skipped.append({"nodes": n, "predicted_bootstrap_cpu_s": round(predicted)} | model(config, n))
            continue
        rows.append(core_row(config, n, args))
    skipped += [{"nodes": n, "reason": f"above --core-max {args.core_max}; ~{_core_gb(n):.3g} GB "
                 "of member records"} | model(config, n) for n in sizes if n > args.core_max]  # fmt: skip
    if args.model_runs:
        rows += [montecarlo_row(config, n, args) for n in sizes]
    rows.sort(key=lambda r: (r["nodes"], r["engine"]))
    return {
        "preset": args.preset,
        "gossip_nodes": config.gossip_nodes,
        "gossip_interval_s": config.gossip_interval,
        "probe_interval_s": config.probe_interval,
        "push_pull_interval_s": config.push_pull_interval,
        "start": args.start,
        "core_max": args.core_max,
        "model_runs": args.model_runs,
        "sizes": rows,
        "skipped": skipped,
        "validation": validate(rows),
        "max_cpu_s": args.max_cpu_s,
    }
