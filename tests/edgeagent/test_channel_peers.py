"""The channel's peer table: rebuilt from every view, without re-parsing unchanged members."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from edgeagent.driver import View
from edgeagent.features import channel as channel_feature
from edgeagent.features.channel import Peers
from gossip.events import Member
from gossip.messages import MemberState


def _view(members: list[Member]) -> Any:
    return dataclasses.replace(_BASE, members=tuple(members))


_LOCAL = Member("me", ("10.0.0.1", 7946), 1, MemberState.ALIVE, b"{}", 0.0)
_BASE = View(_LOCAL, (), 1, 0, 0, {}, (), {}, 0.0)


def test_unchanged_members_are_not_parsed_again(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[bytes] = []
    real = channel_feature.claimant

    def counting(meta: bytes, addr: Any) -> Any:
        calls.append(meta)
        return real(meta, addr)

    monkeypatch.setattr(channel_feature, "claimant", counting)
    members = [
        Member(f"ph{i}", (f"10.9.0.{i}", 7946), 1, MemberState.ALIVE, b'{"id":"n%d"}' % i, 0.0)
        for i in range(1000)
    ]
    peers = Peers()
    for _ in range(50):  # a phantom flood: a view per event batch, the same thousand members
        peers.update(_view(members))
    assert len(calls) == 1000  # each parsed once, not once per view
    assert (p := peers("ph7")) is not None and p.node_id == "n7" and p.port == 7948
    moved = dataclasses.replace(members[7], addr=("10.9.1.7", 8000), meta=b'{"id":"new"}')
    peers.update(_view([moved, *members[8:]]))
    assert (p := peers("ph7")) is not None and (p.node_id, p.host, p.port) == (
        "new",
        "10.9.1.7",
        8002,
    )
    assert peers("ph0") is None and len(calls) == 1001
