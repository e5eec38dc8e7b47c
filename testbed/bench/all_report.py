"""The Markdown page and plots of ``python -m testbed.bench all`` (see :mod:`testbed.bench.all`).

matplotlib (the ``testbed`` extra) is imported lazily with the Agg backend; without it the
page says the plots were skipped.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

BENCH_HELP = {
    "gossip": "simulated SWIM/Lifeguard cluster: detection, false deaths, dissemination, bandwidth",
    "ipam": "overlay address allocation under partitions and churn (simulated)",
    "signing": "owner-signed state: cost per entry and bytes added",
    "footprint": "RSS and CPU of one real agent",
    "traffic": "bytes on the wire, CPU and RSS of N real agents",
    "detection-real": "crash detection on real sockets in namespaces (root)",
    "hostile": "one live agent under hostile streams and datagrams",
    "insider": "one live agent fed validly sealed hostile messages",
    "coap": "CoAP direct vs proxy vs mesh, failover",
    "scaling": "simulator convergence and bandwidth against N beside the SWIM model",
}


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list | dict):
        text = json.dumps(value)
        return text if len(text) <= 90 else text[:87] + "..."
    return str(value)


def write_page(folder: Path, record: dict[str, Any]) -> None:
    results = record["results"]
    lines = [
        "# edgeagent benchmarks, small sizes",
        "",
        f"Run {record['started']} (Python {record['python']}) by `python -m testbed.bench all`. "
        "Smoke-sized: each benchmark ran with the flags shown, far below its defaults; the "
        "figures are for trends and regressions, the targets in the issues refer to the defaults.",
        "",
        "| benchmark | status | wall (s) | flags |",
        "|---|---|---|---|",
    ]
    for name, r in results.items():
        lines.append(f"| {name} | {r['status']} | {_cell(r.get('wall_s', '-'))} | `{' '.join(r['flags'])}` |")
    images, note = _plots(folder, results.get("scaling", {}))
    if "scaling" in results:
        lines += _scaling_section(results["scaling"], images, note)
    for name, r in results.items():
        if name == "scaling":
            continue
        lines += ["", f"## {name}", "", BENCH_HELP.get(name, ""), ""]
        if r["status"] != "ok":
            lines.append(f"**{r['status']}**: {r.get('error', '')}")
            continue
        lines += ["| key | value |", "|---|---|"]
        for key in sorted(r["result"]):
            lines.append(f"| {key} | {_cell(r['result'][key])} |")
    (folder / "bench.md").write_text("\n".join(lines) + "\n")


def _scaling_section(entry: dict[str, Any], images: list[str], note: str) -> list[str]:
    lines = ["", "## scaling: the simulator against N, beside the SWIM model", ""]
    if entry["status"] != "ok":
        return lines + [f"**{entry['status']}**: {entry.get('error', '')}"]
    res = entry["result"]
    lines += [
        f"Preset `{res['preset']}`: fanout {res['gossip_nodes']} every {res['gossip_interval_s']:g} s, "
        f"probe every {res['probe_interval_s']:g} s, push-pull every {res['push_pull_interval_s']:g} s "
        "(scaled above 32 members). Model: dissemination rounds = log_(k+1) N + ln N / k times "
        "the gossip interval (an upper bound here: a new broadcast is sent at once, not at the "
        "next tick); bandwidth = (ping + ack) per probe interval + one settled push-pull "
        "exchange per scaled push-pull interval. See `testbed/bench/scaling.py`.",
        "",
        "| N | dissemination max (s) | model (s) | model rounds | bytes/node/s | model bytes/node/s "
        "| bootstrap (virtual s) | bootstrap CPU (s) | wall (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in res["sizes"]:
        lines.append(
            f"| {row['nodes']} | {_cell(row['dissemination_max_s'])} | {row['model_dissemination_s']:g} "
            f"| {row['model_rounds']:g} | {row['bytes_per_node_s']:g} | {row['model_bytes_per_node_s']:g} "
            f"| {_cell(row['bootstrap_s'])} | {row['bootstrap_cpu_s']:g} | {row['wall_s']:g} |"
        )
    for row in res["skipped"]:
        hours = row["predicted_bootstrap_cpu_s"] / 3600
        lines.append(
            f"| {row['nodes']} | not run | {row['model_dissemination_s']:g} | {row['model_rounds']:g} "
            f"| not run | {row['model_bytes_per_node_s']:g} | - | ~{row['predicted_bootstrap_cpu_s']} "
            f"predicted ({hours:.1f} h) | - |"
        )
    if res["skipped"]:
        names = ", ".join(f"{r['nodes']:,}" for r in res["skipped"])
        lines += ["", f"**Capped**: N = {names} not simulated: the bootstrap's join storm (every "
                  "Alive reaches every node, O(N^2) deliveries through real AES-GCM and msgpack) "
                  f"is predicted above the {res['max_cpu_s']:g} s CPU budget, extrapolated from the "
                  "two largest sizes run. The model columns are still given."]  # fmt: skip
    lines += [""] + [f"![{i}]({i})" for i in images] + ([note] if note else [])
    return lines


def _plots(folder: Path, entry: dict[str, Any]) -> tuple[list[str], str]:
    if entry.get("status") != "ok" or not entry["result"]["sizes"]:
        return [], ""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return [], "Plots skipped: matplotlib is not installed (pip install -e '.[testbed]')."
    res = entry["result"]
    rows, skipped = res["sizes"], res["skipped"]
    every = sorted(rows + skipped, key=lambda r: r["nodes"])
    written = []
    for name, measured, modelled, ylabel, title in (
        ("scaling_dissemination.png", "dissemination_max_s", "model_dissemination_s",
         "seconds until every node has one update", "Dissemination of one update against N"),
        ("scaling_bandwidth.png", "bytes_per_node_s", "model_bytes_per_node_s",
         "bytes sent per node per second (settled)", "Per-node bandwidth against N"),
    ):  # fmt: skip
        fig, ax = plt.subplots(figsize=(7, 4.2))
        xs = [r["nodes"] for r in rows if r.get(measured) is not None]
        ax.plot(xs, [r[measured] for r in rows if r.get(measured) is not None], "o-",
                label=f"simulator ({res['preset']} preset)")  # fmt: skip
        ax.plot([r["nodes"] for r in every], [r[modelled] for r in every], "s--",
                label="analytic SWIM model")  # fmt: skip
        for r in skipped:
            ax.annotate("not simulated\n(capped)", (r["nodes"], r[modelled]), fontsize=7,
                        textcoords="offset points", xytext=(-70, -28))  # fmt: skip
        ax.set_xscale("log")
        if measured == "bytes_per_node_s":
            ax.set_ylim(bottom=0, top=max([r[modelled] for r in every] + [r[measured] for r in rows]) * 1.3)
        ax.set_xlabel("cluster size N (log scale)")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.grid(True, alpha=0.3, which="both")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(folder / name, dpi=110)
        plt.close(fig)
        written.append(name)
    return written, ""

