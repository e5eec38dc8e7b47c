"""Per-sender budgets for datagrams that fail validation, and rate-limited warnings."""

from __future__ import annotations

import asyncio
import logging

import pytest

from edgeagent.features.keys import KEY_OP_PREFIX, Keys
from edgeagent.ratelimit import (
    BAD_BURST,
    BAD_RATE,
    TOTAL_BAD_BURST,
    LineBudget,
    SenderBudget,
    WarnLimiter,
)

log = logging.getLogger("test.ratelimit")


def flood(budget: SenderBudget, host: str, count: int, start: float, rate: float, bad: bool = True) -> int:
    """``count`` datagrams from ``host`` at ``rate`` a second; how many were read."""
    read = 0
    for i in range(count):
        now = start + i / rate
        if budget.admit(host, now):
            read += 1
            budget.outcome(host, bad, now)
    return read


def test_a_sender_failing_validation_is_read_a_few_times_a_second(caplog: pytest.LogCaptureFixture) -> None:
    budget = SenderBudget(WarnLimiter(log))
    with caplog.at_level(logging.WARNING):
        read = flood(budget, "10.0.0.66", 40_000, 0.0, 4_000.0)  # 10 s at 4,000 a second
    assert read <= BAD_BURST + BAD_RATE * 10 + 1
    assert budget.dropped == 40_000 - read and budget.limited == 1
    warnings = [r for r in caplog.records if "10.0.0.66" in r.getMessage()]
    assert len(warnings) == 1  # once per interval, not once per datagram
    # Honest members are never limited, during the flood or after it.
    assert flood(budget, "10.0.0.2", 10_000, 0.0, 4_000.0, bad=False) == 10_000


def test_the_sender_is_read_again_once_it_behaves() -> None:
    budget = SenderBudget(WarnLimiter(log))
    flood(budget, "10.0.0.66", 1_000, 0.0, 1_000.0)
    assert budget.dropped > 800
def test_a_limited_sender_is_read_at_its_rate_even_when_most_of_its_datagrams_pass() -> None:
    # The insider bench's fuzzer: one message in eight fails validation, the other seven
    # (forged Alives, state the signature check sets aside) pass. Once limited, a sender is on
    # probation: every datagram read costs a token, so it is read ~BAD_RATE a second, not
    # ~8 datagrams per token (which kept the agent decrypting and handling ~80 a second per
    # source and let the kernel drop the pings of the real members).
    budget = SenderBudget(WarnLimiter(log))
    read = 0
    for i in range(240_000):  # 60 s at 4,000 a second
        now = i / 4_000
        if budget.admit("10.0.0.66", now):
            read += 1
            budget.outcome("10.0.0.66", i % 8 == 3, now)
    assert read <= BAD_BURST * 8 + BAD_RATE * 60 + 20  # (its burst refills a little meanwhile)
    assert budget.limited == 1  # one limiting, kept while the flood goes on
    # It is released once it stayed under the rate for a whole burst.
    later = 60.0 + BAD_BURST / BAD_RATE
    assert flood(budget, "10.0.0.66", 500, later, 100.0, bad=False) == 500


    later = 1.0 + BAD_BURST / BAD_RATE
    assert flood(budget, "10.0.0.66", 500, later, 100.0, bad=False) == 500


def test_a_flood_from_many_sources_spares_the_members_that_sent_good_datagrams() -> None:
    budget = SenderBudget(WarnLimiter(log))
    budget.outcome("10.0.0.2", False, 0.0)  # a real member, heard from
    spoofed = [f"172.16.{i // 256}.{i % 256}" for i in range(20_000)]
    read = sum(flood(budget, host, 1, 1.0 + i / 4_000, 4_000.0) for i, host in enumerate(spoofed))
    assert read < TOTAL_BAD_BURST + 200 * 5 + 1  # the shared budget: burst plus ~5 s at its rate
    assert budget.admit("10.0.0.2", 5.0)  # the real member is still read
    assert not budget.admit("172.31.0.1", 5.0)  # a newcomer is not, while the budget is spent


def test_warnings_are_one_per_key_per_interval_and_count_what_was_suppressed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    limiter = WarnLimiter(log, interval=60.0, max_warnings=3)
    with caplog.at_level(logging.WARNING):
        for i in range(100):
            limiter.warn("a", i * 0.1, "bad input from a")
        for key in "bcdef":
            limiter.warn(key, 11.0, f"bad input from {key}")  # over the 3 per interval
        limiter.warn("a", 61.0, "bad input from a")
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["bad input from a", "bad input from b", "bad input from c", "bad input from a"]
    assert caplog.records[-1].fields["suppressed"] == 99  # type: ignore[attr-defined]


async def test_malformed_key_rotations_warn_once_a_minute_per_origin(caplog: pytest.LogCaptureFixture) -> None:
    keys = Keys()
    with caplog.at_level(logging.WARNING):
        for i in range(500):
            await keys._apply_remote("evil", KEY_OP_PREFIX + b"{not json" + bytes([i % 256]))
        await keys._apply_remote("other", KEY_OP_PREFIX + b"[]")
    lines = [r for r in caplog.records if "malformed keyring operation" in r.getMessage()]
    assert [r.fields["origin"] for r in lines] == ["evil", "other"]  # type: ignore[attr-defined]
    await asyncio.sleep(0)


def test_member_event_lines_are_capped_per_interval_with_one_summary(caplog: pytest.LogCaptureFixture) -> None:
    budget = LineBudget(max_lines=5, interval=60.0)
    with caplog.at_level(logging.INFO):
        allowed = sum(budget.allow(i * 0.01, log, "member event") for i in range(1000))
        assert allowed == 5 and not caplog.records
        assert budget.allow(61.0, log, "member event")
    assert [r.getMessage() for r in caplog.records] == [
        "995 member event lines not logged in the last 60 s (more than 5)"
    ]
