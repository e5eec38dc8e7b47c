"""Lifeguard suspicion timeout arithmetic (memberlist suspicion.go values)."""

from __future__ import annotations

import math

import pytest

from gossip.suspicion import Suspicion, remaining_suspicion_time, suspicion_timeout


@pytest.mark.parametrize(
    ("n", "expected"),
    [(0, 4.0), (1, 4.0), (5, 4.0), (10, 4.0), (50, 6.795), (100, 8.0), (1000, 12.0)],
)
def test_min_timeout_is_mult_times_log10_n_times_interval(n: int, expected: float) -> None:
    assert suspicion_timeout(4, n, 1.0) == pytest.approx(expected)


def test_remaining_time_follows_the_log_curve_from_max_to_min() -> None:
    lo, hi = 8.0, 48.0
    assert remaining_suspicion_time(0, 2, 0.0, lo, hi) == pytest.approx(48.0)
    assert remaining_suspicion_time(1, 2, 0.0, lo, hi) == pytest.approx(
        math.floor(1000 * (48 - 40 * math.log(2) / math.log(3))) / 1000
    )
    assert remaining_suspicion_time(2, 2, 0.0, lo, hi) == pytest.approx(8.0)
    assert remaining_suspicion_time(3, 2, 0.0, lo, hi) == pytest.approx(8.0)  # never below min
    assert remaining_suspicion_time(2, 2, 5.0, lo, hi) == pytest.approx(3.0)  # elapsed counts
    assert remaining_suspicion_time(2, 2, 10.0, lo, hi) == pytest.approx(-2.0)


def test_suspicion_starts_at_max_and_shrinks_with_independent_confirmations() -> None:
    s = Suspicion("a", k=2, min_timeout=8.0, max_timeout=48.0, now=100.0)
    assert s.deadline == pytest.approx(148.0)
    assert not s.confirm("a", 101.0)  # the accuser is not its own confirmation
    assert s.confirm("b", 101.0)
    assert s.deadline == pytest.approx(100.0 + 22.762)
    assert not s.confirm("b", 102.0)  # one confirmation per sender
    assert s.confirm("c", 102.0)
    assert s.deadline == pytest.approx(108.0)
    assert not s.confirm("d", 103.0)  # k reached: no more


def test_suspicion_without_expected_confirmations_uses_min() -> None:
    s = Suspicion("a", k=0, min_timeout=4.0, max_timeout=24.0, now=10.0)
    assert s.deadline == pytest.approx(14.0)
    assert not s.confirm("b", 11.0)


def test_overdue_confirmation_expires_now() -> None:
    s = Suspicion("a", k=1, min_timeout=4.0, max_timeout=24.0, now=0.0)
    assert s.confirm("b", 10.0)
    assert s.deadline == pytest.approx(10.0)
