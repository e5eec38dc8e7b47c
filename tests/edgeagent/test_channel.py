"""The agent channel over real TLS on loopback: pooling, many in flight, refusals, failure, idle."""

from __future__ import annotations

import asyncio
import datetime as dt
import random
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from edgeagent import channel, mtls, onboarding
from edgeagent.persist import load_or_create_identity
from overlay import channel as mux
from overlay.pki import CertIdentity


def _now() -> dt.datetime:
    """The wall clock now (not at import: a long suite outlives the 5-minute backdating)."""
    return dt.datetime.now(dt.UTC)


def _tls(tmp: Path, ca: onboarding.ClusterCA | None, name: str) -> tuple[mtls.ChannelTls, str]:
    state = tmp / name
    if ca is None:
        onboarding.create_cluster(state, name, "site")
    else:
        onboarding.provision_member(ca, state, name)
    return mtls.load_channel_tls(state, _now()), load_or_create_identity(state, name).node_id


class Node:
    def __init__(self, tls: mtls.ChannelTls, node_id: str, **kw: object) -> None:
        self.seen: list[str] = []
        self.delay = 0.0
        self.fail = False
        self.node_id = node_id
        self.channel = channel.Channel(tls, self.handle, rng=random.Random(1), **kw)  # type: ignore[arg-type]
        self.addr: tuple[str, int] = ("", 0)

    async def handle(self, peer: CertIdentity, request: bytes) -> bytes:
        self.seen.append(peer.name)
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.fail:
            raise RuntimeError("handler broke")
        return request[::-1]

    def peer(self, name: str) -> channel.Peer:
        return channel.Peer(name, self.node_id, *self.addr)


@pytest.fixture
async def mesh(tmp_path: Path) -> AsyncIterator[dict[str, Node]]:
    a_tls, a_id = _tls(tmp_path, None, "a")
    ca = onboarding.load_ca(tmp_path / "a")
    nodes = {
        "a": Node(a_tls, a_id),
        "b": Node(*_tls(tmp_path, ca, "b")),
        "x": Node(*_tls(tmp_path, onboarding.new_ca("elsewhere"), "x")),
    }
    nodes["a"].addr = await nodes["a"].channel.serve("127.0.0.1", 0)
    yield nodes
    for node in nodes.values():
        await node.channel.close()


async def test_requests_share_one_connection_and_reach_the_handler(mesh: dict[str, Node]) -> None:
    a, b = mesh["a"], mesh["b"]
    replies = await asyncio.gather(
        *(b.channel.request(a.peer("a"), f"req {i}".encode(), 5.0) for i in range(200))
    )
    assert replies == [f"req {i}".encode()[::-1] for i in range(200)]
    assert b.channel.stats["connections_dialled"] == 1
    assert a.channel.stats["connections_accepted"] == 1
    assert set(a.seen) == {"b"} and len(a.seen) == 200  # the verified identity of the caller


async def test_frames_of_one_loop_turn_go_out_in_one_write(mesh: dict[str, Node]) -> None:
    a, b = mesh["a"], mesh["b"]
    assert await b.channel.request(a.peer("a"), b"warm", 5.0) == b"mraw"  # dialled
    before = b.channel.stats["writes"]
    replies = await asyncio.gather(
        *(b.channel.request(a.peer("a"), f"req {i}".encode(), 5.0) for i in range(50))
    )
    assert replies == [f"req {i}".encode()[::-1] for i in range(50)]
    assert b.channel.stats["writes"] - before == 1  # 50 OPEN frames, one TLS write
    assert a.channel.stats["writes"] < 50  # replies of one turn coalesce too


async def test_large_messages_cross_flow_control(mesh: dict[str, Node]) -> None:
    a, b = mesh["a"], mesh["b"]
    big = bytes(random.Random(2).randbytes(700_000))  # > stream window (256 KiB) both ways
    assert await b.channel.request(a.peer("a"), big, 10.0) == big[::-1]
    with pytest.raises(ValueError, match="over"):
        await b.channel.request(a.peer("a"), bytes(channel.MAX_MESSAGE_BYTES + 1), 1.0)


async def test_a_peer_that_is_not_the_member_we_meant_is_refused_then_backed_off(
    mesh: dict[str, Node],
) -> None:
    a, b = mesh["a"], mesh["b"]
    wrong = channel.Peer("b", b.node_id, *a.addr)  # a's address, but we want b
    with pytest.raises(channel.ChannelUnavailable, match="node id") as info:
        await b.channel.request(wrong, b"x", 5.0)
    assert info.value.retryable
    assert b.channel.stats["refused_peers"] == 1
    with pytest.raises(channel.ChannelUnavailable, match="backing off"):
        await b.channel.request(wrong, b"x", 5.0)
    assert b.channel.stats["backoff_refusals"] == 1
    assert a.seen == []


async def test_a_node_of_another_ca_is_refused_by_the_server(mesh: dict[str, Node]) -> None:
    a, x = mesh["a"], mesh["x"]
    with pytest.raises((channel.ChannelUnavailable, TimeoutError)):
        await x.channel.request(a.peer("a"), b"let me in", 3.0)
    for _ in range(100):
        if a.channel.stats["inbound_refused"]:
            break
        await asyncio.sleep(0.02)
    assert a.channel.stats["inbound_refused"] == 1
    assert a.seen == [] and a.channel.status()["inbound"] == 0


async def test_timeouts_and_handler_errors_fail_one_request_not_the_connection(
    mesh: dict[str, Node],
) -> None:
    a, b = mesh["a"], mesh["b"]
    a.delay = 1.0
    with pytest.raises(TimeoutError):
        await b.channel.request(a.peer("a"), b"slow", 0.2)
    a.delay, a.fail = 0.0, True
    with pytest.raises(channel.ChannelUnavailable, match="reset") as info:
        await b.channel.request(a.peer("a"), b"boom", 5.0)
    assert not info.value.retryable  # the handler ran: not safe to resend a non-idempotent one
    a.fail = False
    assert await b.channel.request(a.peer("a"), b"ok", 5.0) == b"ko"
    assert b.channel.stats["connections_dialled"] == 1


async def test_a_dead_peer_fails_pending_requests_and_is_redialled_after_it_returns(
    mesh: dict[str, Node],
) -> None:
    a, b = mesh["a"], mesh["b"]
    a.delay = 5.0
    pending = asyncio.ensure_future(b.channel.request(a.peer("a"), b"in flight", 10.0))
    await asyncio.sleep(0.3)
    await a.channel.close()  # GOAWAY, then the connection closes under the request
    with pytest.raises(channel.ChannelUnavailable):
        await pending
    with pytest.raises(channel.ChannelUnavailable) as info:  # nobody listens there now
        await b.channel.request(a.peer("a"), b"again", 2.0)
    assert info.value.retryable
    a.delay = 0.0
    a.addr = await a.channel.serve("127.0.0.1", a.addr[1])
    await asyncio.sleep(channel.BACKOFF_MIN_S * 2)
    assert await b.channel.request(a.peer("a"), b"back", 5.0) == b"kcab"


async def test_an_idle_connection_is_closed_and_redialled_on_demand(tmp_path: Path) -> None:
    a_tls, a_id = _tls(tmp_path, None, "a")
    b_tls, b_id = _tls(tmp_path, onboarding.load_ca(tmp_path / "a"), "b")
    quick = mux.ChannelConfig(idle_timeout_s=0.3, keepalive_s=0.2)
    a, b = Node(a_tls, a_id, config=quick), Node(b_tls, b_id, config=quick)
    a.addr = await a.channel.serve("127.0.0.1", 0)
    try:
        assert await b.channel.request(a.peer("a"), b"1", 5.0) == b"1"
        for _ in range(100):
            if b.channel.status()["outbound"] == 0:
                break
            await asyncio.sleep(0.05)
        assert b.channel.status()["outbound"] == 0
        assert b.channel.stats["idle_closed"] + a.channel.stats["idle_closed"] >= 1
        assert await b.channel.request(a.peer("a"), b"2", 5.0) == b"2"
        assert b.channel.stats["connections_dialled"] == 2
    finally:
        await a.channel.close()
        await b.channel.close()


async def test_connections_that_never_handshake_do_not_keep_a_member_out(
    mesh: dict[str, Node],
) -> None:
    a, b = mesh["a"], mesh["b"]
    held = []
    for i in range(2, 22):  # 20 source addresses x 4 = 80 connections > MAX_INBOUND (64)
        for _ in range(channel.MAX_INBOUND_PER_SOURCE + 1):
            _, writer = await asyncio.open_connection(*a.addr, local_addr=(f"127.0.0.{i}", 0))
            held.append(writer)
    await asyncio.sleep(0.2)
    try:
        assert a.channel.stats["inbound_per_source"] >= 20  # the fifth from each source
        assert await b.channel.request(a.peer("a"), b"member", 5.0) == b"rebmem"
        assert a.channel.stats["inbound_evicted"] >= 1
    finally:
        for writer in held:
            writer.close()


async def test_a_streamed_reply_arrives_in_parts_and_closing_it_cancels_the_handler(
    tmp_path: Path,
) -> None:
    """A handler returning an async iterator streams; the caller's close() frees it."""
    a_tls, a_id = _tls(tmp_path, None, "a")
    b_tls, _ = _tls(tmp_path, onboarding.load_ca(tmp_path / "a"), "b")
    freed = asyncio.Event()
    more = asyncio.Event()

    async def parts(request: bytes):  # type: ignore[no-untyped-def]
        try:
            for i in range(3):
                yield request + str(i).encode()
            await more.wait()  # until cancelled (or told to finish)
            yield b"last"
        finally:
            freed.set()

    async def handler(peer: CertIdentity, request: bytes):  # type: ignore[no-untyped-def]
        return parts(request)

    a = channel.Channel(a_tls, handler, rng=random.Random(1))
    b = channel.Channel(b_tls, handler, rng=random.Random(2))
    addr = await a.serve("127.0.0.1", 0)
    try:
        peer = channel.Peer("a", a_id, *addr)
        stream = await b.stream(peer, b"n", 5.0)
        got = b""
        while len(got) < 6:
            got += await asyncio.wait_for(stream.read(), 5.0)
        assert got == b"n0n1n2"
        stream.close()
        await asyncio.wait_for(freed.wait(), 5.0)  # the RESET cancelled a's handler
        freed.clear()
        more.set()  # a second one runs to its END
        stream = await b.stream(peer, b"m", 5.0)
        got = b""
        while chunk := await asyncio.wait_for(stream.read(), 5.0):
            got += chunk
        assert got == b"m0m1m2last" and freed.is_set()
        assert a.stats["streams_served"] == 2 and b.stats["streams"] == 2
    finally:
        await b.close()
        await a.close()
