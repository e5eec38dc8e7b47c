"""``python -m testbed.bench all`` and ``scaling``: the page, the plots, the SWIM model, the cap,
the two engines (real core, Monte-Carlo model) and their comparison."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gossip.config import preset
from testbed.bench.scaling import _predict, datagram_sizes, model

ROOT = Path(__file__).resolve().parents[2]


def test_model_bandwidth_is_flat_in_n_and_rounds_grow_with_log_n() -> None:
    config = preset("lan")
    rows = [model(config, n) for n in (10, 100, 1000, 10_000)]
    rounds = [r["model_rounds"] for r in rows]
    assert rounds == sorted(rounds) and rounds[-1] < 4 * rounds[0]
    # log growth: each factor of 10 adds about the same number of rounds
    steps = [b - a for a, b in zip(rounds, rounds[1:], strict=False)]
    assert max(steps) - min(steps) < 0.05
    bandwidth = [r["model_bytes_per_node_s"] for r in rows]
    assert max(bandwidth) < 1.2 * min(bandwidth)
    ping, ack = datagram_sizes(config, 5)
    assert 40 < ack < ping < config.max_datagram_bytes


def test_sizes_predicted_over_the_budget_are_capped() -> None:
    done = [{"nodes": 10, "bootstrap_cpu_s": 1.0}, {"nodes": 100, "bootstrap_cpu_s": 100.0}]
    assert _predict(done, 1000) == pytest.approx(10_000.0)  # the measured exponent, 2
    assert _predict(done[:1], 1000) is None


def test_all_writes_one_page_with_tables_and_plots(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    import matplotlib.image

    out = tmp_path / "bench"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "testbed.bench", "all", "--only", "signing,scaling",
         "--sizes", "5,10", "--report", str(out), "--json"],
        capture_output=True, text=True, timeout=300, env=env, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout)
    assert summary["ok"] == ["scaling", "signing"] and summary["not_ok"] == []
    page = (out / "bench.md").read_text()
    assert "## scaling" in page and "## signing" in page and "| sign_us |" in page
    assert page.count("| 5 | core (simulator, warm start)") == 1 and "| 10 | Monte-Carlo model" in page
    results = json.loads((out / "results.json").read_text())["results"]
    scaling = results["scaling"]["result"]
    sizes = scaling["sizes"]
    assert [(r["nodes"], r["engine"]) for r in sizes] == [
        (5, "core"), (5, "montecarlo"), (10, "core"), (10, "montecarlo")
    ]
    assert all(r["bytes_per_node_s"] > 0 for r in sizes)
    # Where both engines ran, the page compares them.
    assert [v["nodes"] for v in scaling["validation"]] == [5, 10] and "Model against the core" in page
    for name in ("scaling_dissemination.png", "scaling_bandwidth.png"):
        assert f"![{name}]({name})" in page
        pixels = matplotlib.image.imread(out / name)
        assert pixels.shape[0] > 200 and len({tuple(p) for p in pixels[::9, ::9, :3].reshape(-1, 3).round(2).tolist()}) > 8
