"""Lifeguard Local Health Multiplier bounds and scaling (memberlist awareness.go)."""

from __future__ import annotations

import pytest

from gossip.awareness import Awareness


def test_score_is_clamped_between_zero_and_max_minus_one() -> None:
    a = Awareness(8)
    a.apply_delta(-3)
    assert a.score == 0
    a.apply_delta(5)
    assert a.score == 5
    a.apply_delta(10)
    assert a.score == 7
    a.apply_delta(-1)
    assert a.score == 6


def test_timeouts_scale_by_score_plus_one() -> None:
    a = Awareness(8)
    assert a.scale(0.5) == pytest.approx(0.5)
    a.apply_delta(3)
    assert a.scale(0.5) == pytest.approx(2.0)


def test_multiplier_below_one_is_refused() -> None:
    with pytest.raises(ValueError):
        Awareness(0)
