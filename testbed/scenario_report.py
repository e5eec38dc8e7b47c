"""The report folder of a scenario run: ``report.json``, ``report.md`` and PNG plots.

``report.json`` is the run's whole record (:func:`testbed.scenario_run.execute`): steps with
their times, each expect clause with its measured value, faults, detections, loads and the
membership timeline. ``report.md`` is the same for a person, with the plots embedded:

- ``membership.png``: per observer, a heat map of its view of every other node over time
  (alive / suspect / dead / left / not known, blank while the observer itself is down), with
  the steps marked;
- ``detection_cdf.png``: the CDF of detection times: from a kill to each observer seeing the
  node dead, and from a partition to each observer seeing a node across it dead;
- ``coap.png`` (when the scenario ran a CoAP load): request success ratio and latency per
  second across the run, kills marked;
- ``mqtt.png`` (when it ran an MQTT load): the same for messages, by the second each was
  published (delivered ratio, publish-to-receipt latency, published and lost per second).

matplotlib is optional (the ``testbed`` extra: ``pip install -e '.[testbed]'``) and imported
only here, lazily, with the Agg backend; without it the plots are skipped with one line in
``report.md``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

STATE_CODES = {"alive": 0, "suspect": 1, "dead": 2, "left": 3, None: 4}  # None: not known
UNOBSERVED = 5  # the observer was down (or not polled): no view
STATE_COLOURS = ["#2ca02c", "#ff7f0e", "#d62728", "#7f7f7f", "#c6dbef", "#ffffff"]
STATE_LABELS = ["alive", "suspect", "dead", "left", "not in view", "observer down"]
GAP_POLLS = 3  # a pause longer than this many polls between an observer's samples is shown blank
MAX_OBSERVERS_PLOTTED = 8  # one panel per observer; a bigger cluster shows the first eight
MARKED = ("kill", "stop", "start", "partition", "heal", "loss", "loss-ramp", "coap-load", "reboot",
          "mqtt-load", "publish-policy", "cloud-outage")


def write_report(folder: Path, record: dict[str, Any], *, plots: bool = True) -> list[Path]:
    """Write the folder; return the files written."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    record = dict(record)
    agent_logs = record.pop("agent_logs", None) or {}
    written = _write_logs(folder, agent_logs)
    written.append(folder / "report.json")
    (folder / "report.json").write_text(json.dumps(record, indent=1, default=_json_default))
    images: list[str] = []
    note = ""
    if plots:
        try:
            images = render_plots(folder, record)
        except ImportError:
            note = "Plots skipped: matplotlib is not installed (pip install -e '.[testbed]')."
    written += [folder / name for name in images]
    (folder / "report.md").write_text(render_markdown(record, images, note))
    written.append(folder / "report.md")
    return written


def _write_logs(folder: Path, logs: dict[str, str]) -> list[Path]:
    """``logs/NODE.log`` per node (the backend's agent logs; none on the simulator)."""
    written = []
    for node, text in sorted(logs.items()):
        if not node.replace("-", "").isalnum():
            continue  # names come from the backend; never a path
        (folder / "logs").mkdir(exist_ok=True)
        path = folder / "logs" / f"{node}.log"
        path.write_text(text)
        written.append(path)
    return written


def _json_default(value: Any) -> Any:
    if isinstance(value, tuple | set):
        return list(value)
    if isinstance(value, float) and math.isinf(value):
        return None
    return str(value)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}".rstrip("0").rstrip(".")
    return str(value)


def render_markdown(record: dict[str, Any], images: list[str], note: str = "") -> str:
    sc = record["scenario"]
    lines = [
        f"# Scenario {sc['name']}: {'PASS' if record['ok'] else 'FAIL'}",
        "",
        f"{sc['description']}" if sc["description"] else "",
        "",
        f"- file: `{sc['file']}`; backend: **{record['backend']}**; started {record['started']}",
        f"- {sc['nodes']} nodes, gossip preset `{sc['preset']}`, seed {sc['seed']}, "
        f"poll every {sc['poll']:g} s, fault grace {sc['grace']:g} s",
    ]
    if record["error"]:
        lines.append(f"- **error**: {record['error']}")
    lines += ["", "## Steps", "", "| # | t start (s) | t end (s) | action | arguments | result |",
              "|---|---|---|---|---|---|"]  # fmt: skip
    for s in record["steps"]:
        result = {True: "ok", False: "**failed**", None: "skipped"}[s.get("ok")]
        detail = f"{result}: {s['detail']}" if s.get("detail") and s["detail"] != "skipped" else result
        lines.append(f"| {s['index']} | {_fmt(s.get('t_start'))} | {_fmt(s.get('t_end'))} | "
                     f"{s['action']} | {s['args']} | {detail} |")  # fmt: skip
    lines += ["", "## Expectations", "", "| # | check | arguments | measured | result |",
              "|---|---|---|---|---|"]  # fmt: skip
    for e in record["expects"]:
        args = ", ".join(f"{k}={_fmt(v)}" for k, v in e["args"].items() if v is not None)
        args = args.replace("('", "").replace("', '", ",").replace("')", "")
        measured = f"{_fmt(e['measured'])} {e.get('unit', '')}".strip()
        lines.append(f"| {e['index']} | {e['check']} | {args} | {measured} | "
                     f"{'PASS' if e['ok'] else '**FAIL**'} |")  # fmt: skip
    for e in record["expects"]:
        if e.get("events"):
            lines += ["", f"Expect {e['index']} ({e['check']}), first offending samples:", ""]
            lines += [f"- `{json.dumps(ev, default=_json_default)}`" for ev in e["events"]]
    lines += _detection_table(record) + _load_table(record) + _mqtt_table(record)
    if images or note:
        lines += ["", "## Plots", ""]
        lines += [f"![{name}]({name})" for name in images]
        lines += [note] if note else []
    return "\n".join(lines) + "\n"


def _detection_table(record: dict[str, Any]) -> list[str]:
    from .bench.stats import nearest_rank

    out: list[str] = []
    for kind, rows in record["detections"].items():
        times = [r["seconds"] for r in rows if r["seconds"] is not None]
        if not rows:
            continue
        if not out:
            out = ["", "## Detection", "", "| after | samples | undetected | p50 (s) | p99 (s) | max (s) |",
                   "|---|---|---|---|---|---|"]  # fmt: skip
        out.append(f"| {kind} | {len(times)} | {len(rows) - len(times)} | "
                   f"{_fmt(nearest_rank(times, 50))} | {_fmt(nearest_rank(times, 99))} | "
                   f"{_fmt(max(times) if times else None)} |")  # fmt: skip
    return out


def _load_table(record: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for name, info in record["loads"].items():
        if info.get("kind", "coap") != "coap":
            continue
        r = info.get("result")
        if not out:
            out = ["", "## CoAP loads", "", "| load | ingress | ok | failed | p50 (ms) | p99 (ms) |",
                   "|---|---|---|---|---|---|"]  # fmt: skip
        if r is None:
            out.append(f"| {name} | {info['ingress']} | - | - | - | - |")
        else:
            out.append(f"| {name} | {info['ingress']} | {r['ok']} | {r['failed']} | "
                       f"{_fmt(r.get('p50_ms'))} | {_fmt(r.get('p99_ms'))} |")  # fmt: skip
    return out


def _mqtt_table(record: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for name, info in record["loads"].items():
        if info.get("kind") != "mqtt":
            continue
        r = info.get("result") or {}
        if not out:
            out = ["", "## MQTT loads", "", "| load | pub | sub | qos | published | received | lost | "
                   "duplicates | p50 (ms) | p99 (ms) |", "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        out.append(f"| {name} | {info['pub']} | {info['sub']} | {info['qos']} | {info['count']} | "
                   f"{_fmt(r.get('received'))} | {_fmt(r.get('lost'))} | {_fmt(r.get('duplicates'))} | "
                   f"{_fmt(r.get('p50_ms'))} | {_fmt(r.get('p99_ms'))} |")  # fmt: skip
    return out


# --- plots --------------------------------------------------------------------------------------


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def render_plots(folder: Path, record: dict[str, Any]) -> list[str]:
    """Draw every plot the record has data for; the file names written."""
    plt = _pyplot()
    written = []
    for name, draw in (("membership.png", plot_membership), ("detection_cdf.png", plot_detection),
                       ("coap.png", plot_coap), ("mqtt.png", plot_mqtt)):  # fmt: skip
        fig = draw(plt, record)
        if fig is not None:
            fig.savefig(folder / name, dpi=110)
            plt.close(fig)
            written.append(name)
    return written


def _mark_steps(ax: Any, record: dict[str, Any], label: bool) -> None:
    """Dashed lines at the steps that change the cluster; labels staggered so none overlap."""
    marked = [s for s in record["steps"]
              if s["action"] in MARKED and s.get("t_start") is not None and s.get("ok") is not None]
    span = max([s["t_start"] for s in marked] + [ax.get_xlim()[1], 1.0])
    placed: list[float] = []
    for s in marked:
        ax.axvline(s["t_start"], color="black", linewidth=0.8, linestyle="--")
        if label:
            level = sum(abs(s["t_start"] - x) < span * 0.09 for x in placed)
            placed.append(s["t_start"])
            text = f"{s['index']}: {s['action']} {s['args']}".strip()
            ax.annotate(text[:34], (s["t_start"], 1.03 + 0.3 * level),
                        xycoords=("data", "axes fraction"), fontsize=7, va="bottom", ha="left",
                        annotation_clip=False)  # fmt: skip


def _node_key(name: str) -> tuple[int, str]:
    digits = "".join(ch for ch in name if ch.isdigit())
    return (int(digits) if digits else 0, name)


def _cells(rows: list[dict[str, Any]], others: list[str], poll: float) -> tuple[list[float], list[list[int]]]:
    """Column edges and state codes (one row per member) of one observer's samples; a gap
    between samples longer than GAP_POLLS polls gets a blank column."""
    edges: list[float] = []
    columns: list[list[int]] = []
    for i, row in enumerate(rows):
        t = row["t"]
        nxt = rows[i + 1]["t"] if i + 1 < len(rows) else t + poll
        edges.append(t)
        columns.append([STATE_CODES.get(row["view"].get(m), 4) for m in others])
        if nxt - t > GAP_POLLS * poll:
            edges.append(t + poll)
            columns.append([UNOBSERVED] * len(others))
    edges.append(rows[-1]["t"] + poll)
    grid = [[col[j] for col in columns] for j in range(len(others))]
    return edges, grid


def plot_membership(plt: Any, record: dict[str, Any]) -> Any:
    from matplotlib.colors import BoundaryNorm, ListedColormap
    from matplotlib.patches import Patch

    timeline = record["timeline"]
    if not timeline:
        return None
    nodes = sorted({f"n{i}" for i in range(1, record["scenario"]["nodes"] + 1)}, key=_node_key)
    observers = nodes[:MAX_OBSERVERS_PLOTTED]
    end = max(s["t"] for s in timeline) + record["scenario"]["poll"]
    cmap = ListedColormap(STATE_COLOURS)
    norm = BoundaryNorm([-0.5, 0.5, 1.5, 2.5, 3.5, 4.5, 5.5], cmap.N)
    height = 1.6 + len(observers) * (0.35 + 0.17 * len(nodes))
    fig, axes = plt.subplots(len(observers), 1, figsize=(11, height), sharex=True, squeeze=False)
    for ax, observer in zip(axes[:, 0], observers, strict=True):
        rows = [s for s in timeline if s["observer"] == observer]
        others = [n for n in nodes if n != observer]
        ax.set_ylabel(f"{observer}\nsees", rotation=0, ha="right", va="center", fontsize=8)
        ax.set_xlim(0, end)
        if not rows:
            continue
        edges, grid = _cells(rows, others, record["scenario"]["poll"])
        ax.pcolormesh(edges, range(len(others) + 1), grid, cmap=cmap, norm=norm, shading="flat")
        ax.set_ylim(0, len(others))
        ax.set_yticks([i + 0.5 for i in range(len(others))], others, fontsize=7)
        _mark_steps(ax, record, label=ax is axes[0, 0])
    axes[-1, 0].set_xlabel(f"time since start (s, {record['backend']} clock)")
    handles = [Patch(facecolor=c, edgecolor="#999999", label=lbl)
               for c, lbl in zip(STATE_COLOURS, STATE_LABELS, strict=True)]  # fmt: skip
    fig.legend(handles=handles, loc="lower center", ncol=6, fontsize=8, frameon=False)
    shown = "" if len(observers) == len(nodes) else f" (first {len(observers)} observers)"
    fig.suptitle(f"{record['scenario']['name']}: each observer's view of the other nodes{shown}",
                 y=0.995)  # fmt: skip
    fig.tight_layout(rect=(0, 0.05, 1, 0.93))
    return fig


def plot_detection(plt: Any, record: dict[str, Any]) -> Any:
    series = {k: sorted(r["seconds"] for r in rows if r["seconds"] is not None)
              for k, rows in record["detections"].items()}  # fmt: skip
    if not any(series.values()):
        return None
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for kind, times in series.items():
        if times:
            ys = [(i + 1) / len(times) for i in range(len(times))]
            ax.step([0.0, *times], [0.0, *ys], where="post",
                    label=f"after a {kind} ({len(times)} observations)")  # fmt: skip
    ax.set_xlabel("seconds from the fault to the observer seeing the node dead")
    ax.set_ylabel("fraction of observations")
    ax.set_ylim(0, 1.05)
    ax.set_xlim(left=0)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(f"{record['scenario']['name']}: detection time CDF ({record['backend']}, "
                 f"poll {record['scenario']['poll']:g} s)", fontsize=10)  # fmt: skip
    fig.tight_layout()
    return fig


def _per_second(records: list[list[Any]]) -> dict[int, list[tuple[bool, float]]]:
    """Requests by the second they were sent in: (ok, latency ms) each."""
    bins: dict[int, list[tuple[bool, float]]] = {}
    for rec in records:
        latency = float(rec[3]) if len(rec) > 3 and rec[3] is not None else math.nan
        bins.setdefault(int(rec[0]), []).append((bool(rec[1]), latency))
    return bins


_WORDS = {
    "coap": {"sent": "sent", "failed": "failed", "ratio": "success ratio", "answered": "answered\nrequests",
             "things": "requests", "a_thing": "a request", "title": "CoAP requests"},
    "mqtt": {"sent": "published", "failed": "lost", "ratio": "delivered ratio", "answered": "delivered\nmessages",
             "things": "messages", "a_thing": "a message", "title": "MQTT messages"},
}


def plot_mqtt(plt: Any, record: dict[str, Any]) -> Any:
    """MQTT loads in :func:`plot_coap`'s three panels (their records have the same shape)."""
    return plot_coap(plt, record, "mqtt")


def plot_coap(plt: Any, record: dict[str, Any], kind: str = "coap") -> Any:
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    loads = {n: i["result"] for n, i in record["loads"].items()
             if i.get("kind", "coap") == kind and (i.get("result") or {}).get("records")}  # fmt: skip
    if not loads:
        return None
    w = _WORDS[kind]
    fig, (top, middle, bottom) = plt.subplots(3, 1, figsize=(10, 7.5), sharex=True)
    for name, result in loads.items():
        bins = _per_second(result["records"])
        secs = sorted(bins)
        xs = [s + 0.5 for s in secs]
        top.plot(xs, [sum(ok for ok, _ in bins[s]) / len(bins[s]) for s in secs], marker=".",
                 label=f"load {name}")  # fmt: skip
        answered = {s: sorted(lat for ok, lat in bins[s] if ok) for s in secs}
        middle.plot(xs, [_median(answered[s]) for s in secs], marker=".", label=f"{name}: p50")
        middle.plot(xs, [answered[s][-1] if answered[s] else math.nan for s in secs],
                    marker=".", linestyle=":", label=f"{name}: max")  # fmt: skip
        _count_bars(bottom, name, result["records"] if kind == "coap" else [], bins, w)
    for ax in (top, middle, bottom):
        _mark_steps(ax, record, label=ax is top)
        ax.grid(True, alpha=0.3)
    top.set_ylabel(w["ratio"])
    top.set_ylim(-0.05, 1.05)
    top.legend(loc="lower left", fontsize=8)
    middle.set_ylabel(f"latency of {w['answered']} (ms)")
    middle.set_yscale("log")
    middle.yaxis.set_major_formatter(ScalarFormatter())
    middle.yaxis.set_minor_formatter(NullFormatter())
    middle.legend(loc="upper left", fontsize=8)
    bottom.set_ylabel(f"{w['things']} per second")
    bottom.set_xlabel(f"time since start (s), by the second {w['a_thing']} was {w['sent']}")
    bottom.legend(loc="upper right", fontsize=8)
    fig.suptitle(f"{record['scenario']['name']}: {w['title']} through the mesh", y=0.99)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    return fig


ANSWERERS_SHOWN = 6  # instances told apart in coap.png's bottom panel (the most frequent)


def _count_bars(ax: Any, name: str, records: list[list[Any]], bins: dict[int, list[tuple[bool, float]]],
                w: dict[str, str]) -> None:  # fmt: skip
    """Per second: what was sent and what failed; when the answers came from two or more
    instances (CoAP records: the payload names the answering server), the answered requests
    stacked by instance instead, so a failover shows as one colour handing over to another."""
    secs = sorted(bins)
    xs = [s + 0.5 for s in secs]
    by: dict[str, dict[int, int]] = {}
    for rec in records:
        if rec[1] and isinstance(rec[2], str):
            per = by.setdefault(rec[2][:20], {})
            per[int(rec[0])] = per.get(int(rec[0]), 0) + 1
    shown = sorted(by, key=lambda who: -sum(by[who].values()))[:ANSWERERS_SHOWN]
    failed = [sum(not ok for ok, _ in bins[s]) for s in secs]
    if len(shown) < 2:
        ax.bar(xs, [len(bins[s]) for s in secs], width=0.9, alpha=0.35, label=f"{name}: {w['sent']}")
        ax.bar(xs, failed, width=0.9, color="#d62728", label=f"{name}: {w['failed']}")
        return
    base = [0] * len(secs)
    for who in sorted(shown):
        heights = [by[who].get(s, 0) for s in secs]
        ax.bar(xs, heights, width=0.9, bottom=base, alpha=0.6, label=f"{name}: answered by {who}")
        base = [b + h for b, h in zip(base, heights, strict=True)]
    ax.bar(xs, failed, width=0.9, bottom=base, color="#d62728", label=f"{name}: {w['failed']}")


def _median(values: list[float]) -> float:
    if not values:
        return math.nan
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2
