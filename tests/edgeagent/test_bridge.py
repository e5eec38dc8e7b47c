"""Gossip thread -> main loop: a stalled loop gets the latest view and a bounded queue."""

from __future__ import annotations

import asyncio
import logging
import threading

import pytest

from edgeagent.bridge import EventsDropped, UpdateBridge
from gossip import events as ev

BOUND = 50


def state_event(i: int) -> ev.StateChanged:
    return ev.StateChanged("peer", "k", i, i, False)


def test_a_stalled_loop_holds_one_view_and_at_most_the_bound(
    caplog: pytest.LogCaptureFixture,
) -> None:
    loop = asyncio.new_event_loop()
    delivered: list[tuple[tuple[object, ...], int]] = []
    bridge: UpdateBridge[int] = UpdateBridge(
        loop, lambda events, view: delivered.append((events, view)), max_events=BOUND
    )
    conflict = ev.NameConflict("me", ("127.0.0.9", 1), 3, b"")

    def gossip_thread() -> None:  # the loop is not running: it is "stalled"
        for i in range(5000):
            bridge.put((state_event(i),), i)
            if i == 10:
                bridge.put((conflict,), i)
            assert bridge.queued <= BOUND + 1

    try:
        with caplog.at_level(logging.WARNING, logger="edgeagent"):
            thread = threading.Thread(target=gossip_thread)
            thread.start()
            thread.join()
        assert bridge.high_water <= BOUND + 1 and bridge.dropped == 5000 - BOUND
        assert sum("not keeping up" in r.getMessage() for r in caplog.records) == 1
        loop.run_until_complete(asyncio.sleep(0.01))  # the loop runs again: one delivery
        assert len(delivered) == 1
        events, view = delivered[0]
        assert view == 4999  # the latest view only
        assert events[0] == EventsDropped(5000 - BOUND)
        assert events[1] is conflict  # a kept event is not pushed out by churn
        assert [e.value for e in events[2:]] == list(range(5000 - BOUND, 5000))  # newest kept
        assert bridge.queued == 0
        bridge.put((), 5000)  # a later update with no events: no EventsDropped again
        loop.run_until_complete(asyncio.sleep(0.01))
        assert delivered[1] == ((), 5000)
    finally:
        loop.close()


def test_every_event_is_delivered_in_order_or_counted_as_dropped() -> None:
    async def main() -> tuple[list[object], UpdateBridge[int]]:
        got: list[object] = []
        loop = asyncio.get_running_loop()
        bridge: UpdateBridge[int] = UpdateBridge(
            loop, lambda events, view: got.extend(events), max_events=BOUND
        )

        def produce() -> None:
            for i in range(2000):
                bridge.put((state_event(i),), i)

        await asyncio.to_thread(produce)  # this loop drains meanwhile, as fast as it can
        await asyncio.sleep(0.05)
        return got, bridge

    got, bridge = asyncio.run(main())
    values = [e.value for e in got if isinstance(e, ev.StateChanged)]
    dropped = sum(e.count for e in got if isinstance(e, EventsDropped))
    assert values == sorted(set(values)) and values[-1] == 1999  # in order, none twice
    assert len(values) + dropped == 2000 and dropped == bridge.dropped
