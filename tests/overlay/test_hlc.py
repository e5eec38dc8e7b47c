"""The hybrid logical clock (overlay.hlc): ordered ticks, remote observation, drift refusal."""

from __future__ import annotations

import pytest

from overlay.hlc import MAX_DRIFT_MS, HybridClock, Timestamp


def test_hlc_ticks_stay_ordered_when_wall_clock_stands_still() -> None:
    clock = HybridClock()
    a, b = clock.tick(5.0), clock.tick(5.0)
    assert a < b and a.wall_ms == b.wall_ms == 5000


def test_hlc_tick_after_observing_later_remote_is_later_than_it() -> None:
    clock = HybridClock()
    remote = Timestamp(9_000, 7)
    assert clock.observe(remote, 1.0)
    assert clock.tick(1.0) > remote


def test_hlc_refuses_timestamp_far_ahead_of_now() -> None:
    clock = HybridClock()
    assert not clock.observe(Timestamp(MAX_DRIFT_MS + 2_000, 0), 1.0)
    assert clock.tick(1.0) == Timestamp(1_000, 0)


@pytest.mark.parametrize("bad", [None, [1], [1, -1], [1.5, 0], ["1", 0], [-1, 0], [1, 1 << 40]])
def test_timestamp_from_value_rejects_malformed(bad: object) -> None:
    with pytest.raises(ValueError):
        Timestamp.from_value(bad)
