"""Benchmark: the simulator's convergence and bandwidth against N, beside the SWIM model
(``python -m testbed.bench scaling --sizes 10,100,1000``).

How it works. For each size one run of the gossip benchmark's scenario
(:func:`testbed.bench.gossip.run_once`: bootstrap, settle, a steady window, one state update,
one crash) with the chosen preset, no loss. Reported per N:

- ``dissemination_max_s``: from one ``set_state`` to the last node's ``StateChanged``: the
  time the protocol takes to tell everyone one thing (the "convergence" of SWIM's
  dissemination);
- ``bytes_per_node_s``: every sealed byte each node sent during the steady window (probes,
  acks, push-pulls; nothing changing), per node and second;
- ``bootstrap_s`` (bootstrap start to every node seeing every node alive, virtual) and
  ``bootstrap_cpu_s`` (what the simulation of it cost: the join storm, every Alive reaching
  every node, O(N^2) deliveries).

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

Sizes whose bootstrap would take too long are not run: ``--max-cpu-s`` (default 600) bounds
the predicted bootstrap CPU, extrapolated from the two largest sizes run (as N^a with the
measured exponent a); the result lists each skipped size with its estimate.
"""

from __future__ import annotations

import argparse
import math
import random
import time
from typing import Any

from gossip.codec import DatagramHeader, destination_tag, encode_datagram
from gossip.config import GossipConfig, preset
from gossip.core import push_pull_scale
from gossip.keyring import Keyring
from gossip.messages import Ack, Ping
from testbed.bench.gossip import run_once

PUSH_PULL_EXCHANGE_BYTES = 320  # settled digest push-pull, both ways (docs/architecture.md)
DEFAULT_SIZES = "10,100,1000,10000"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sizes", default=DEFAULT_SIZES, help=f"cluster sizes (default {DEFAULT_SIZES})")
    parser.add_argument("--preset", choices=("lan", "wan", "local"), default="lan")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--settle", type=float, default=60.0,
                        help="virtual s after bootstrap before the steady window (default 60: the "
                        "join storm's broadcasts drain)")  # fmt: skip
    parser.add_argument("--duration", type=float, default=15.0,
                        help="virtual s after settling (window = a third; default 15)")  # fmt: skip
    parser.add_argument("--max-cpu-s", type=float, default=600.0,
                        help="skip sizes whose predicted bootstrap CPU exceeds this (default 600)")


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


def run(args: argparse.Namespace) -> dict[str, Any]:
    try:
        sizes = sorted({int(s) for s in args.sizes.split(",") if s.strip()})
    except ValueError:
        raise SystemExit(f"scaling: --sizes: expected numbers like 10,100,1000, got {args.sizes!r}") from None
    if not sizes or sizes[0] < 2 or sizes[-1] > 100_000:
        raise SystemExit("scaling: --sizes must be between 2 and 100000")
    config = preset(args.preset)
    done: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    for n in sizes:
        predicted = _predict(done, n)
        if predicted is not None and predicted > args.max_cpu_s:
            skipped.append({"nodes": n, "predicted_bootstrap_cpu_s": round(predicted)} | model(config, n))
            continue
        started = time.perf_counter()
        r = run_once(config, nodes=n, loss=0.0, starved=0.0, seed=f"{args.seed}:scaling:{n}",
                     duration=args.duration, settle=args.settle, converge_timeout=300.0,
                     latency=0.001, jitter=0.0005)  # fmt: skip
        done.append({
            "nodes": n,
            "dissemination_max_s": _round(r.dissemination_max),
            "dissemination_p99_s": _round(r.dissemination_p99),
            "bytes_per_node_s": round(r.bytes_per_node_s, 1),
            "bootstrap_s": r.converge_s,
            "bootstrap_cpu_s": round(r.bootstrap_cpu_s, 2),
            "wall_s": round(time.perf_counter() - started, 2),
        } | model(config, n))
    return {
        "preset": args.preset,
        "gossip_nodes": config.gossip_nodes,
        "gossip_interval_s": config.gossip_interval,
        "probe_interval_s": config.probe_interval,
        "push_pull_interval_s": config.push_pull_interval,
        "sizes": done,
        "skipped": skipped,
        "max_cpu_s": args.max_cpu_s,
    }
