"""``edgeagent demo`` tells the whole story, in order, and leaves nothing behind."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

DEMO_TIMEOUT = 180.0  # a hang bound; the demo itself takes seconds


def _expect_in_order(lines: list[str], patterns: list[str]) -> list[re.Match[str]]:
    """Each pattern matches a line after the previous pattern's line; the matches."""
    matches = []
    position = 0
    for pattern in patterns:
        for index in range(position, len(lines)):
            match = re.search(pattern, lines[index])
            if match:
                matches.append(match)
                position = index + 1
                break
        else:
            raise AssertionError(f"{pattern!r} not found after line {position}:\n" + "\n".join(lines))
    return matches


def test_demo_converges_detects_crash_rejoins_higher_and_leaves_cleanly() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "edgeagent", "demo", "--nodes", "5"],
        capture_output=True, text=True, timeout=DEMO_TIMEOUT, check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    matches = _expect_in_order(lines, [
        r"time\s+node1\s+node2\s+node3\s+node4\s+node5",
        r"==> converged .* all 5 members alive",
        r"==> SIGKILL (node\d)",
        r"\bsuspect\b",
        r"==> node\d suspected",
        r"==> (node\d) dead in every view",
        r"==> restarting",
        r"==> (node\d) rejoined: alive everywhere with incarnation (\d+) \(was (\d+)\)",
        r"==> SIGTERM node\d: graceful leave",
        r"\bleft\b",
        r"recorded as left \(not dead\)",
        r"==> all 5 agents exited with code 0; removed (\S+)",
    ])
    victim = matches[2].group(1)
    assert matches[5].group(1) == victim and matches[7].group(1) == victim
    assert int(matches[7].group(2)) > int(matches[7].group(3))
    # The cluster view never shows a gracefully stopped agent as dead: after the SIGTERMs
    # begin, no table row holds "dead".
    after_leave = lines[lines.index(matches[8].string):]
    assert not [row for row in after_leave if re.search(r"\bdead\b", row) and "==>" not in row]
    assert not Path(matches[-1].group(1)).exists()
    assert proc.stderr == ""


def test_demo_rejects_too_few_nodes_in_one_line() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "edgeagent", "demo", "--nodes", "1"],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "--nodes" in proc.stderr
