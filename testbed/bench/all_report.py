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
    "scaling": "convergence and bandwidth against N: real core and Monte-Carlo model beside the SWIM model",
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


def _band_cell(row: dict[str, Any], key: str) -> str:
    if row.get(f"{key}_p5") is None:
        return _cell(row.get(key))
    return f"{_cell(row[key])} [{_cell(row[f'{key}_p5'])}..{_cell(row[f'{key}_p95'])}]"


def _engine(row: dict[str, Any]) -> str:
    if row.get("engine", "core") == "core":
        return f"core (simulator, {row.get('start', 'bootstrap')} start)"
    return f"Monte-Carlo model ({row['runs']} runs)"


def _scaling_section(entry: dict[str, Any], images: list[str], note: str) -> list[str]:
    lines = ["", "## scaling: the simulator against N, beside the SWIM model", ""]
    if entry["status"] != "ok":
        return lines + [f"**{entry['status']}**: {entry.get('error', '')}"]
    res = entry["result"]
    lines += [
        f"Preset `{res['preset']}`: fanout {res['gossip_nodes']} every {res['gossip_interval_s']:g} s, "
        f"probe every {res['probe_interval_s']:g} s, push-pull every {res['push_pull_interval_s']:g} s "
        "(scaled above 32 members). Engines: **core** = the real gossip core in the simulator "
        f"(up to N = {res.get('core_max', '-')}, {res.get('start', 'bootstrap')} start; its member "
        "records, ~215-240 B per node per member, cap it: ~21 GB at N = 10,000); **Monte-Carlo model** = "
        "`testbed/swim_mc.py`, a model of the protocol (not the core) with the real config, "
        "retransmit limit and codec sizes: the median of its runs, [5th..95th percentile]. "
        "Analytic model: dissemination rounds = log_(k+1) N + ln N / k times the gossip "
        "interval (an upper bound here: a new broadcast is sent at once, not at the next "
        "tick); bandwidth = (ping + ack) per probe interval + one settled push-pull exchange "
        "per scaled push-pull interval. See `testbed/bench/scaling.py`.",
        "",
        "| N | engine | dissemination max (s) | dissemination p99 (s) | analytic (s) | bytes/node/s "
        "| analytic bytes/node/s | CPU (s) | peak RSS (MB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in res["sizes"]:
        lines.append(
            f"| {row['nodes']} | {_engine(row)} | {_band_cell(row, 'dissemination_max_s')} "
            f"| {_band_cell(row, 'dissemination_p99_s')} | {row['model_dissemination_s']:g} "
            f"| {row['bytes_per_node_s']:g} | {row['model_bytes_per_node_s']:g} "
            f"| {_cell(row.get('cpu_s', row.get('bootstrap_cpu_s', '-')))} | {_cell(row.get('peak_rss_mb', '-'))} |"
        )
    for row in res["skipped"]:
        if "predicted_bootstrap_cpu_s" in row:
            why = f"bootstrap predicted ~{row['predicted_bootstrap_cpu_s']} s CPU"
        else:
            why = row.get("reason", "not run")
        lines.append(f"| {row['nodes']} | core: not run ({why}) | - | - | {row['model_dissemination_s']:g} "
                     f"| - | {row['model_bytes_per_node_s']:g} | - | - |")  # fmt: skip
    lines += _validation_lines(res.get("validation", []))
    lines += [""] + [f"![{i}]({i})" for i in images] + ([note] if note else [])
    return lines


def _validation_lines(validation: list[dict[str, Any]]) -> list[str]:
    if not validation:
        return []
    lines = [
        "", "**Model against the core** where both ran: is the core's one run inside the "
        "model's 5th..95th-percentile band of runs (one run against a 90% band: about one "
        "comparison in ten falls outside by chance), and how far apart is the bandwidth?", "",
        "| N | core max (s) | model max (s) [band] | inside | core p99 (s) | model p99 (s) [band] "
        "| inside | core bytes/node/s | model bytes/node/s | diff (%) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for v in validation:
        cells = [str(v["nodes"])]
        for key in ("dissemination_max_s", "dissemination_p99_s"):
            low, high = v[f"montecarlo_{key}_band"]
            inside = v[f"{key}_within_band"]
            cells += [_cell(v[f"core_{key}"]), f"{_cell(v[f'montecarlo_{key}'])} [{_cell(low)}..{_cell(high)}]",
                      "-" if inside is None else ("yes" if inside else "**no**")]  # fmt: skip
        cells += [_cell(v["core_bytes_per_node_s"]), _cell(v["montecarlo_bytes_per_node_s"]),
                  _cell(v["bytes_diff_pct"])]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
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
    rows = res["sizes"]
    every = sorted({r["nodes"] for r in rows} | {r["nodes"] for r in res["skipped"]})
    analytic = {r["nodes"]: r for r in rows + res["skipped"]}
    written = []
    for name, measured, modelled, ylabel, title in (
        ("scaling_dissemination.png", "dissemination_max_s", "model_dissemination_s",
         "s from set_state to the last (p99) node", "Dissemination of one update against N"),
        ("scaling_bandwidth.png", "bytes_per_node_s", "model_bytes_per_node_s",
         "bytes sent per node per second (settled)", "Per-node bandwidth against N"),
    ):  # fmt: skip
        fig, ax = plt.subplots(figsize=(7, 4.2))
        tops = [analytic[n][modelled] for n in every]
        for engine, style, label in (
            ("core", "o-", f"real core in the simulator ({res['preset']}, {res.get('start', 'bootstrap')} start)"),
            ("montecarlo", "x:", "Monte-Carlo protocol model (median, 5-95% band)"),
        ):  # fmt: skip
            got = [r for r in rows if r.get("engine", "core") == engine and r.get(measured) is not None]
            if measured == "dissemination_max_s":
                label += ": max"
            if not got:
                continue
            xs, ys = [r["nodes"] for r in got], [r[measured] for r in got]
            tops += ys
            if got[0].get(f"{measured}_p5") is not None:
                low = [y - r[f"{measured}_p5"] for r, y in zip(got, ys, strict=True)]
                high = [r[f"{measured}_p95"] - y for r, y in zip(got, ys, strict=True)]
                tops += [r[f"{measured}_p95"] for r in got]
                ax.errorbar(xs, ys, yerr=[low, high], fmt=style, capsize=3, label=label)
            else:
                ax.plot(xs, ys, style, label=label)
            if measured == "dissemination_max_s":  # the steadier 99% figure, lighter
                p99 = [(r["nodes"], r["dissemination_p99_s"]) for r in got if r.get("dissemination_p99_s") is not None]
                ax.plot([x for x, _ in p99], [y for _, y in p99], style, alpha=0.35, markersize=4,
                        color=ax.lines[-1].get_color(), label=f"{label.split(' (')[0]}: p99")  # fmt: skip
        ax.plot(every, [analytic[n][modelled] for n in every], "s--", label="analytic SWIM model")
        cap = res.get("core_max")
        if cap and any(n > cap for n in every):
            ax.axvline(cap, color="grey", linewidth=0.8, linestyle="-.")
            ax.text(cap * 1.08, 0.45, f"core run up to N={cap}\n(--core-max); beyond:\nthe model only",
                    transform=ax.get_xaxis_transform(), fontsize=7, color="grey")  # fmt: skip
        ax.set_xscale("log")
        ax.set_ylim(bottom=0, top=max(tops) * 1.3)
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

