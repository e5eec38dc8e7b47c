"""Every benchmark at a small size, one Markdown page: ``python -m testbed.bench all --report DIR``.

How it works. Each benchmark of :data:`SMALL` runs in its own process (``python -m
testbed.bench NAME --json`` with the flags listed there: small clusters, short windows, so the
whole set takes minutes, not hours) one after the other (the machine is shared; parallel runs
would measure each other). A benchmark that needs root is skipped with the reason when not
root; one that fails or exceeds its timeout is reported with its last error line, and the
others still run. Then ``DIR`` gets ``results.json`` (every result), ``bench.md`` (a table per
benchmark; the scaling table beside the analytic SWIM model) and the scaling plots
(``scaling_dissemination.png``, ``scaling_bandwidth.png``; matplotlib, the ``testbed`` extra).

These are smoke-sized numbers for a trend and a regression eye, not the figures of record:
each benchmark's own defaults (see its module docstring) are what the issues' targets refer to.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from testbed.bench import UsageError

# name -> (flags, timeout s, needs root)
SMALL: dict[str, tuple[list[str], float, bool]] = {
    "gossip": (["--nodes", "50", "--duration", "30", "--settle", "10"], 300, False),
    "ipam": (["--nodes", "20", "--runs", "2"], 300, False),
    "signing": (["--entries", "100", "--rounds", "3"], 120, False),
    "footprint": (["--members", "20", "--seconds", "10", "--warmup", "5"], 180, False),
    "traffic": (["--nodes", "5", "--startup-window", "5", "--settle", "10", "--window", "10",
                 "--timeline", "10"], 240, False),  # fmt: skip
    "detection-real": (["--hosts", "5", "--runs", "2", "--preset", "local"], 300, True),
    "hostile": (["--streams", "4", "--hold", "8", "--deadline", "10", "--pps", "500",
                 "--seconds", "2"], 180, False),  # fmt: skip
    "insider": (["--messages", "5000", "--rate", "2000", "--after", "5"], 180, False),
    "coap": (["--requests", "300", "--concurrency", "10", "--soak-s", "0"], 240, False),
    "mqtt": (["--count", "1000", "--rate", "100"], 300, False),
    "mqtt-broker": ([], 120, False),
    "uplink": (["--nodes", "3", "--count", "300", "--down-s", "10"], 300, False),
    "scaling": (["--sizes", "10,100,1000,10000", "--core-max", "1000", "--model-runs", "10"], 600, False),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--report", type=Path, help="output folder (default: bench-report-<time>)")
    parser.add_argument("--only", help="comma-separated subset of: " + ", ".join(SMALL))
    parser.add_argument("--sizes", help="the scaling benchmark's --sizes (default 10,100,1000,10000)")


def run_one(name: str, flags: list[str], timeout: float) -> dict[str, Any]:
    """One benchmark in its own process: its JSON, or why not."""
    argv = [sys.executable, "-m", "testbed.bench", name, "--json", *flags]
    started = time.perf_counter()
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "error": f"exceeded {timeout:g} s", "wall_s": timeout, "flags": flags}
    wall = round(time.perf_counter() - started, 1)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode == 0 and lines:
        try:
            return {"status": "ok", "result": json.loads(lines[-1]), "wall_s": wall, "flags": flags}
        except ValueError:
            pass
    tail = (proc.stderr.strip().splitlines() or proc.stdout.strip().splitlines() or ["no output"])[-1]
    return {"status": "failed", "error": tail[:300], "wall_s": wall, "flags": flags}


def run(args: argparse.Namespace) -> dict[str, Any]:
    chosen = list(SMALL) if not args.only else [n.strip() for n in args.only.split(",")]
    unknown = [n for n in chosen if n not in SMALL]
    if unknown:
        raise UsageError(f"all: unknown benchmark {unknown[0]!r} (known: {', '.join(SMALL)})")
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    folder = args.report or Path.cwd() / f"bench-report-{stamp}"
    folder.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    for name in chosen:
        flags, timeout, root = SMALL[name]
        if name == "scaling" and args.sizes:
            flags = ["--sizes", args.sizes, *flags[2:]]
        if root and os.geteuid() != 0:
            results[name] = {"status": "skipped", "error": "needs root", "flags": flags}
            continue
        print(f"bench {name} {' '.join(flags)} ...", file=sys.stderr, flush=True)
        results[name] = run_one(name, flags, timeout)
        print(f"  {results[name]['status']} in {results[name].get('wall_s', 0):g} s", file=sys.stderr)
    record = {"started": stamp, "python": sys.version.split()[0], "results": results}
    (folder / "results.json").write_text(json.dumps(record, indent=1))
    from .all_report import write_page

    write_page(folder, record)
    return {
        "report": str(folder),
        "ok": sorted(n for n, r in results.items() if r["status"] == "ok"),
        "not_ok": sorted(f"{n}: {r['status']}" for n, r in results.items() if r["status"] != "ok"),
        "wall_s": round(sum(r.get("wall_s", 0) for r in results.values()), 1),
    }
