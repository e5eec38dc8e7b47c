"""``python -m testbed.bench insider``: a short real run (one agent, a few thousand messages).

Checks the result's shape and what must hold at any size (the agent survives, the real
member is back, the numbers are counted), not the flood targets: those are for the full run.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

FIELDS = {
    "rss_growth_mb", "phantoms_peak", "phantoms_after_60s", "ping_p99_ms", "pings_lost",
    "own_state_rewrites", "observer_state_at_end", "observer_back_after_s", "key_warnings", "datagrams_limited",
    "flood_cpu_percent", "kernel_drops", "idle_ping_p99_ms", "crashed", "targets",
}  # fmt: skip


def test_a_short_insider_run_reports_every_field_and_the_agent_survives() -> None:
    argv = [sys.executable, "-m", "testbed.bench", "insider", "--json",
            "--messages", "6000", "--rate", "2000", "--sources", "2", "--after", "3"]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    assert FIELDS <= set(result), FIELDS - set(result)
    assert result["crashed"] is False
    assert result["phantoms_peak"] > 0  # the flood reached the agent's table
    assert result["datagrams_limited"] > 0  # its sources failed validation and were limited
    assert result["pings"] > 0 and result["ping_p99_ms"] is not None
    assert result["key_warnings"] <= 8  # one a minute per origin, not one per message


def test_bad_options_are_one_line() -> None:
    argv = [sys.executable, "-m", "testbed.bench", "insider", "--rate", "0"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2 and "--rate" in done.stderr and len(done.stderr.splitlines()) == 1
