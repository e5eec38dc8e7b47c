"""The mesh outbox's spool for an away destination (`edgeagent.mqtt_mesh._Outbox`), with a
scripted channel: kept on disk while away, sent in order once back, a head refused again
and again dropped rather than blocking the spool, reopened after a restart."""

from __future__ import annotations

import asyncio
import collections
from pathlib import Path

import pytest

from edgeagent import mqtt_mesh
from edgeagent.mqtt_mesh import OK, REFUSED, _Outbox
from overlay.mqtt.mesh import Envelope, decode_batch


class FakeChannel:
    def __init__(self) -> None:
        self.up = False
        self.replies: list[bytes] = []  # scripted answers; OK when empty
        self.got: list[str] = []  # payloads the destination accepted, in order
        self.peers = self

    def names(self) -> set[str]:
        return {"dest"} if self.up else set()

    async def request(self, node: str, data: bytes, timeout: float) -> bytes:
        if not self.up:
            raise mqtt_mesh.ChannelUnavailable("down")
        reply = self.replies.pop(0) if self.replies else OK
        if reply == OK:
            self.got += [e.payload.decode() for e in decode_batch(data[1:])]
        return reply


class FakeRouter:
    def keeps(self, node: str, topic: str) -> bool:
        return topic.startswith("keep/")


class FakeLink:
    def __init__(self, spool_dir: Path) -> None:
        self.stats: collections.defaultdict[str, int] = collections.defaultdict(int)
        self.chan = FakeChannel()
        self.router = FakeRouter()
        self.spool_dir = spool_dir
        self.open_spools = 0  # other destinations' spools

    def spools(self) -> int:
        return self.open_spools

    def warn_spool(self, node: str, exc: OSError) -> None:
        raise AssertionError(f"spool failed: {exc}")


def env(seq: int, topic: str = "keep/x") -> Envelope:
    return Envelope("me", seq, topic, f"m{seq}".encode(), qos=1)


async def settle(box: _Outbox) -> None:
    for _ in range(200):
        await asyncio.sleep(0.01)
        if box.task is None and box.writer is None:
            return


@pytest.fixture(autouse=True)
def no_probe_delay(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mqtt_mesh, "PROBE_S", 0.0)


def test_away_destination_spooled_then_sent_in_order_once_back(tmp_path: Path) -> None:
    async def scenario() -> None:
        link = FakeLink(tmp_path)
        box = _Outbox(link, "dest")  # type: ignore[arg-type]
        done = [box.put(env(i), tracked=True) for i in range(3)]
        lost = box.put(env(9, "clean/x"), tracked=True)  # no persistent session wants it
        await settle(box)
        assert [f.result() for f in done if f] == [True] * 3 and lost and lost.result() is False
        assert link.stats["mesh_spooled"] == 3 and link.stats["mesh_lost"] == 1
        link.chan.up = True
        box.put(env(3), tracked=True)  # behind the spool, even though dest is back
        box.tend()
        await settle(box)
        assert link.chan.got == ["m0", "m1", "m2", "m3"]
        assert box.spooled == 0 and link.stats["mesh_unspooled"] == 4
        assert box.spool is not None
        box.spool.close()

    asyncio.run(scenario())


def test_a_spool_head_refused_again_and_again_is_dropped(tmp_path: Path) -> None:
    async def scenario() -> None:
        link = FakeLink(tmp_path)
        box = _Outbox(link, "dest")  # type: ignore[arg-type]
        box.put(env(0))
        await settle(box)
        link.chan.up = True
        link.chan.replies = [REFUSED] * mqtt_mesh.MAX_REFUSALS
        for _ in range(mqtt_mesh.MAX_REFUSALS + 1):
            box.tend()
            await settle(box)
        box.put(env(1))
        box.tend()
        await settle(box)
        assert link.chan.got == ["m1"]  # m0 was refused 5 times: dropped, m1 not blocked
        assert link.stats["mesh_spool_refused"] == 1
        assert box.spool is not None
        box.spool.close()

    asyncio.run(scenario())


def test_a_spool_left_by_the_last_run_is_sent(tmp_path: Path) -> None:
    async def first_run() -> None:
        box = _Outbox(FakeLink(tmp_path), "dest")  # type: ignore[arg-type]
        box.put(env(0))
        await settle(box)
        assert box.spool is not None
        box.spool.close()

    async def second_run() -> list[str]:
        link = FakeLink(tmp_path)
        box = _Outbox(link, "dest")  # type: ignore[arg-type]
        spool = await box._open_spool()
        box.spooled = spool.pending
        link.chan.up = True
        box.tend()
        await settle(box)
        spool.close()
        return link.chan.got

    asyncio.run(first_run())
    assert asyncio.run(second_run()) == ["m0"]


def test_no_new_spool_past_the_bound_on_spools(tmp_path: Path) -> None:
    async def scenario() -> None:
        link = FakeLink(tmp_path)
        link.open_spools = mqtt_mesh.MAX_SPOOLS
        box = _Outbox(link, "dest")  # type: ignore[arg-type]
        done = box.put(env(0), tracked=True)
        await settle(box)
        assert done is not None and done.result() is False
        assert link.stats["mesh_lost"] == 1 and box.spool is None

    asyncio.run(scenario())
