"""The agent's saved clock: restored at start (a 1970 boot starts where it left off), saved
rarely and atomically, pulled forward by members' meta; a real agent restarted (SIGTERM and
kill -9) never goes back more than the save interval."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

from edgeagent import clock_store
from edgeagent.clock_store import CLOCK_FILE, SAVE_INTERVAL_S, AgentClock, advance_saved
from edgeagent.name_conflict import member_meta
from gossip import events as ev
from gossip.messages import MemberState
from overlay.hlc import Timestamp
from testbed.loopback import LoopbackCluster

NOW_2026 = 1_780_000_000.0


def reading(state_dir: Path) -> list[int]:
    return list(json.loads((state_dir / CLOCK_FILE).read_text())["hlc"])


def test_a_1970_boot_restores_the_saved_clock_and_runs_on_from_it(tmp_path: Path) -> None:
    first = AgentClock(tmp_path, wall=lambda: NOW_2026)
    first.since_ms()
    first.save()
    booted = [20.0]  # the Pi's clock after a reboot: 1970 + 20 s
    again = AgentClock(tmp_path, wall=lambda: booted[0])
    assert again.since_ms() >= int(NOW_2026 * 1000)  # not 20 000: 1970 is not believed
    booted[0] += 30.0
    again.save()
    assert reading(tmp_path)[0] >= int(NOW_2026 * 1000) + 30_000  # thirty seconds later


@pytest.mark.parametrize("content", [b"", b"{", b'{"v": 1, "hlc": [1, -1]}', b'{"v": 9}', b"x" * 9000])
def test_an_unreadable_clock_file_is_a_fresh_start(tmp_path: Path, content: bytes) -> None:
    (tmp_path / CLOCK_FILE).write_bytes(content)
    clock = AgentClock(tmp_path, wall=lambda: NOW_2026)
    assert clock.since_ms() == int(NOW_2026 * 1000)


def test_enrollment_moves_the_saved_clock_forward_never_back(tmp_path: Path) -> None:
    advance_saved(tmp_path, NOW_2026)
    assert reading(tmp_path) == [int(NOW_2026 * 1000), 0]
    advance_saved(tmp_path, 1000.0)  # an issuer whose clock is behind ours
    assert reading(tmp_path) == [int(NOW_2026 * 1000), 0]


def test_saves_on_a_timer_and_at_stop_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    writes: list[Timestamp] = []
    monkeypatch.setattr(clock_store, "save", lambda d, r: writes.append(r))
    monkeypatch.setattr(clock_store, "SAVE_INTERVAL_S", 0.05)

    async def run() -> None:
        clock = AgentClock(tmp_path)
        clock.start(asyncio.get_running_loop())
        await asyncio.sleep(0.28)
        clock.stop()

    asyncio.run(run())
    assert 5 <= len(writes) <= 8  # start, about five ticks, stop: never a loop
    assert writes == sorted(writes)


class _View:
    class local:  # noqa: N801 - stands in for View.local
        name = "me"


def joined(name: str, since_ms: int) -> ev.MemberJoined:
    meta = member_meta(f"id-{name}", "generic", since_ms)
    return ev.MemberJoined(ev.Member(name, ("127.0.0.1", 1), 1, MemberState.ALIVE, meta, 0.0))


def test_members_meta_pulls_a_1970_clock_forward_but_one_forger_does_not(tmp_path: Path) -> None:
    clock = AgentClock(tmp_path, wall=lambda: 10.0)
    year_3000 = 32_503_680_000_000
    clock.on_update((joined("forger", year_3000),), _View)
    assert clock.since_ms() < 3_600_000 and clock.status_fields()["clock_capped"] == 1
    clock.on_update((joined("a", int(NOW_2026 * 1000)), joined("b", int(NOW_2026 * 1000))), _View)
    assert int(NOW_2026 * 1000) <= clock.since_ms() < year_3000
    assert clock.status_fields()["clock_jumps"] == 1


# -- a real agent --------------------------------------------------------------------------


def test_agent_restores_its_saved_clock_after_sigterm_and_kill_9() -> None:
    ahead_ms = int((time.time() + 3 * 24 * 3600) * 1000)  # as if our wall clock were 3 days behind
    with LoopbackCluster(1) as cluster:
        agent = cluster.agents[0]
        agent.terminate()
        (agent.state_dir / CLOCK_FILE).write_text(json.dumps({"v": 1, "hlc": [ahead_ms, 0]}))
        agent.start()
        first = agent.status()["clock_ms"]
        assert first >= ahead_ms
        meta = agent.members()[0]["meta"]
        assert meta["since"] >= ahead_ms  # the name-conflict start time comes from it too
        time.sleep(1.0)
        before_stop = agent.status()["clock_ms"]
        agent.terminate()  # saved at shutdown
        agent.start()
        assert agent.status()["clock_ms"] >= before_stop
        time.sleep(1.0)
        before_kill = agent.status()["clock_ms"]
        agent.kill()  # no shutdown save: at most one interval lost
        agent.start()
        after = agent.status()["clock_ms"]
        assert after >= before_kill - SAVE_INTERVAL_S * 1000
        assert after >= ahead_ms
