"""``python -m testbed.bench signing``: a tiny run, so the benchmark keeps working."""

from __future__ import annotations

import argparse

from testbed.bench import signing


def test_a_tiny_signing_bench_reports_costs_and_bytes() -> None:
    result = signing.run(argparse.Namespace(entries=5, rounds=1))
    assert result["sig_bytes_per_entry"] == 66  # bin8 header + raw r||s
    assert 400 < result["credential_der_bytes"] < 800
    for key in ("canonical_us", "sign_us", "verify_cached_us", "verify_first_cert_us", "receive_signed_us"):
        assert result[key] > 0
