"""``python -m testbed.bench policy``: a tiny run, so the benchmark keeps working."""

from __future__ import annotations

import argparse

from testbed.bench import policy


def test_a_tiny_simulated_policy_spread_reaches_every_node() -> None:
    args = argparse.Namespace(sim_nodes=40, real_nodes=0, interval=1.0, seed=3, timeout=60.0)
    result = policy.run(args)
    assert result["sim_nodes"] == 40 and result["sim_enforced"] == 40 and result["real_nodes"] == 0
    assert policy.SIM_FETCH_S <= result["sim_enforced_p99_s"] <= result["sim_enforced_max_s"] < 5.0
