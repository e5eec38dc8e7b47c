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


# ---- clocks far behind, clocks far ahead -------------------------------------------------

NOW_2026 = 1_780_000_000.0  # seconds: a plausible wall clock
DAY = 24 * 3600.0


def test_restore_is_trusted_and_the_clock_keeps_running_from_it() -> None:
    clock = HybridClock()
    saved = Timestamp(int(NOW_2026 * 1000), 4)
    clock.restore(saved, 10.0)  # booted at 1970 + 10 s
    assert clock.tick(10.0) > saved
    later = clock.tick(70.0)  # a minute of uptime later: a minute later in mesh time
    assert later.wall_ms == saved.wall_ms + 60_000
    assert clock.read(70.0) == later


def test_a_single_far_ahead_source_never_moves_the_clock_however_often_it_sends() -> None:
    clock = HybridClock()
    now = NOW_2026
    for step in range(1, 200):  # a forger creeping one more day ahead each time
        remote = Timestamp(int((now + step * DAY) * 1000), 0)
        clock.observe(remote, now, "forger")
    # The first reading was within the drift bound and merged; none moved the bound itself.
    assert clock.tick(now).wall_ms == int(now * 1000) + MAX_DRIFT_MS
    assert clock.offset_ms == 0
    assert clock.stats["capped"] > 150 and clock.stats["jumps"] == 0


def test_a_1970_clock_is_pulled_to_honest_peers_not_to_a_forger() -> None:
    clock = HybridClock()
    boot = 5.0  # the Pi's clock says 1970
    year_3000 = Timestamp(32_503_680_000_000, 0)
    assert not clock.observe(year_3000, boot, "forger")
    honest = [Timestamp(int((NOW_2026 + i) * 1000), 0) for i in range(3)]
    # Two sources far ahead: jump to the smaller of the two (the honest one), never the forger's.
    assert clock.observe(honest[0], boot, "h0")
    assert clock.observe(honest[1], boot, "h1")  # now within the drift bound: merged
    assert clock.observe(honest[2], boot, "h2")
    assert not clock.observe(year_3000, boot, "forger")  # still refused
    stamp = clock.tick(boot)
    assert honest[2] < stamp < Timestamp(int((NOW_2026 + DAY) * 1000), 0)
    assert clock.stats["jumps"] == 1


def test_counter_at_its_bound_moves_to_the_next_millisecond() -> None:
    clock = HybridClock()
    remote = Timestamp(5_000, (1 << 31) - 1)
    assert clock.observe(remote, 5.0)
    stamp = clock.tick(5.0)
    assert stamp > remote and Timestamp.from_value(stamp.to_value()) == stamp


@pytest.mark.parametrize("seed", range(20))
def test_random_traffic_with_one_forger_keeps_ticks_ordered_and_the_forger_out(seed: int) -> None:
    import random

    rng = random.Random(seed)
    skew = rng.choice([0.0, -NOW_2026])  # a right clock, or one that booted in 1970
    clock, now, issued = HybridClock(), NOW_2026, []
    for _ in range(500):
        now += rng.uniform(0.0, 5.0)
        roll = rng.random()
        if roll < 0.3:
            issued.append(clock.tick(now + skew))
        elif roll < 0.5:
            forged = Timestamp(int((now + rng.uniform(2, 900) * DAY) * 1000), rng.randrange(9))
            clock.observe(forged, now + skew, "forger")
        else:
            honest = Timestamp(int((now + rng.uniform(-60, 60)) * 1000), rng.randrange(9))
            clock.observe(honest, now + skew, f"peer{rng.randrange(5)}")
    assert issued == sorted(issued) and len(set(issued)) == len(issued)
    # Forged readings are days ahead; honest ones at most a minute: the clock followed these.
    assert clock.last.wall_ms <= int((now + 60) * 1000) + 1
    if skew:
        assert clock.last.wall_ms >= int((now - 3600) * 1000)  # the 1970 clock was pulled forward
