"""edgeagent.coap_proxy in one process: the deduplication bound, the upstream client, the owner side."""

from __future__ import annotations

import asyncio
import datetime as dt
import random
import socket
import struct
import time

import aiocoap
import aiocoap.resource as resource
import pytest

from edgeagent import coap_proxy
from edgeagent.coap_proxy import DEDUP_MAX, Router, Upstream, bound_deduplication
from edgeagent.localmesh import free_port
from gossip.messages import MemberState
from overlay import coap_route as cr
from overlay.balancer import Balancer
from overlay.catalog import Catalog, encode_instances, make_instance
from overlay.pki import CertIdentity


class Counting(resource.Resource):
    def __init__(self, delay: float = 0.0) -> None:
        super().__init__()
        self.delay = delay
        self.renders = 0
        self.active = self.peak = 0

    async def render_get(self, request: aiocoap.Message) -> aiocoap.Message:
        self.renders += 1
        self.active += 1
        self.peak = max(self.peak, self.active)
        await asyncio.sleep(self.delay)
        self.active -= 1
        return aiocoap.Message(payload=b"x")


async def _server(site_resource: Counting) -> tuple[aiocoap.Context, int]:
    root = resource.Site()
    root.add_resource([], site_resource)
    port = free_port(["127.0.0.1"])
    ctx = await aiocoap.Context.create_server_context(
        root, bind=("127.0.0.1", port), transports=["udp6"]
    )
    return ctx, port


def _con_get(mid: int) -> bytes:
    return struct.pack("!BBHH", 0x42, 0x01, mid, mid)  # CON GET, the mid as 2-byte token


CHUNK = 64  # requests sent at once by the deduplication test


def test_deduplication_is_bounded_and_still_catches_a_retransmission() -> None:
    async def run() -> tuple[int, int, int]:
        counting = Counting()
        ctx, port = await _server(counting)
        assert bound_deduplication(ctx) == 1
        mman = next(iter(ctx.request_interfaces)).token_interface
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.setblocking(False)
            # In chunks, each answered before the next: a slow machine otherwise overflowed
            # the socket buffer and fewer than DEDUP_MAX requests arrived (CI: 1,835).
            for first in range(0, 2 * DEDUP_MAX, CHUNK):
                for mid in range(first, first + CHUNK):
                    sock.sendto(_con_get(mid), ("127.0.0.1", port))
                deadline = time.monotonic() + 10.0
                while counting.renders < first + CHUNK and time.monotonic() < deadline:
                    await asyncio.sleep(0.005)
            fresh = 2 * DEDUP_MAX + 1
            sock.sendto(_con_get(fresh), ("127.0.0.1", port))
            await asyncio.sleep(0.2)
            before = counting.renders
            sock.sendto(_con_get(fresh), ("127.0.0.1", port))  # its retransmission
            await asyncio.sleep(0.2)
        held = len(mman._recent_messages)
        await ctx.shutdown()
        return held, before, counting.renders

    held, before, after = asyncio.run(run())
    assert 0 < held <= DEDUP_MAX
    assert before > DEDUP_MAX and after == before  # the duplicate was not rendered again


def test_upstream_keeps_many_cons_in_flight_to_one_instance_on_one_socket() -> None:
    """aiocoap's NSTART=1 made a slow instance a one-at-a-time pipe; our client does not."""

    async def run() -> tuple[list[cr.ReplyStatus], int, int]:
        counting = Counting(delay=0.05)
        ctx, port = await _server(counting)
        upstream = Upstream()
        await upstream.start()
        inst = make_instance("t", f"coap://127.0.0.1:{port}")
        msg = cr.Message(1, (), b"", cr.CON)
        results = await asyncio.gather(*(upstream.forward(inst, msg, 5.0) for _ in range(12)))
        opened = upstream.stats["opened"]
        await upstream.close()
        await ctx.shutdown()
        return [status for status, _ in results], counting.peak, opened

    statuses, peak, opened = asyncio.run(run())
    assert statuses == [cr.ReplyStatus.ANSWERED] * 12
    assert peak > 1 and opened == 1  # rendered side by side, all over one socket


def test_upstream_answers_with_the_instances_response() -> None:
    async def run() -> tuple[cr.ReplyStatus, cr.Message]:
        ctx, port = await _server(Counting())
        upstream = Upstream()
        await upstream.start()
        inst = make_instance("t", f"coap://127.0.0.1:{port}")
        result = await upstream.forward(inst, cr.Message(1, (), b"", cr.NON), 5.0)
        await upstream.close()
        await ctx.shutdown()
        return result

    status, response = asyncio.run(run())
    assert status == cr.ReplyStatus.ANSWERED
    assert (response.code, response.payload, response.token) == (cr.code(2, 5), b"x", b"")


def test_upstream_reports_a_stopped_instance_unreachable_at_once() -> None:
    """The ICMP port-unreachable fails the try (5.02, the balancer moves on): no timeout."""

    async def run() -> tuple[cr.ReplyStatus, int]:
        upstream = Upstream()
        await upstream.start()
        inst = make_instance("t", f"coap://127.0.0.1:{free_port(['127.0.0.1'])}")
        status, _ = await upstream.forward(inst, cr.Message(1, (), b"", cr.CON), 30.0)
        await upstream.close()
        return status, upstream.stats["timeouts"]

    assert asyncio.run(asyncio.wait_for(run(), 10.0)) == (cr.ReplyStatus.UNREACHABLE, 0)


def _opened(host: str, ttl: float, monkeypatch: pytest.MonkeyPatch) -> int:
    """How many sockets the upstream opens (and so name lookups) for 6 tries in a row."""
    monkeypatch.setattr(coap_proxy, "RESOLVED_TTL_S", ttl)

    async def run() -> int:
        ctx, port = await _server(Counting())
        upstream = Upstream()
        await upstream.start()
        inst = make_instance("t", f"coap://{host}:{port}")
        msg = cr.Message(1, (), b"", cr.CON)
        statuses = [(await upstream.forward(inst, msg, 5.0))[0] for _ in range(6)]
        assert statuses == [cr.ReplyStatus.ANSWERED] * 6
        await upstream.close()
        await ctx.shutdown()
        return upstream.stats["opened"]

    return asyncio.run(run())


def test_upstream_resolves_a_name_once_until_the_ttl(monkeypatch: pytest.MonkeyPatch) -> None:
    assert _opened("localhost", 30.0, monkeypatch) == 1
    assert _opened("localhost", 0.0, monkeypatch) == 6  # expired at once: resolved every time
    assert _opened("127.0.0.1", 0.0, monkeypatch) == 1  # an address is never looked up


def _reprs_while_serving(unnamed: bool, monkeypatch: pytest.MonkeyPatch) -> int:
    """How often a message is repr()'d while a server context answers 3 GETs (raw UDP)."""
    reprs = 0
    real = aiocoap.Message.__repr__

    def counting(self: aiocoap.Message) -> str:
        nonlocal reprs
        reprs += 1
        return real(self)

    async def run() -> None:
        ctx, port = await _server(Counting())
        if unnamed:
            coap_proxy.unnamed_render_tasks(ctx)
        loop = asyncio.get_running_loop()
        monkeypatch.setattr(aiocoap.Message, "__repr__", counting)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.setblocking(False)
            await loop.sock_connect(sock, ("127.0.0.1", port))
            for mid in range(3):
                await loop.sock_sendall(sock, _con_get(mid))
                reply = await asyncio.wait_for(loop.sock_recv(sock, 1500), 5.0)
                assert reply.endswith(b"\xffx")  # the payload
        monkeypatch.undo()
        await ctx.shutdown()

    asyncio.run(run())
    return reprs


def test_unnamed_render_tasks_serve_without_formatting_each_request(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert _reprs_while_serving(False, monkeypatch) >= 3  # aiocoap's task names
    assert _reprs_while_serving(True, monkeypatch) == 0


class _Directory:
    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self.balancer = Balancer(catalog, random.Random(1))


def _owner_router() -> Router:
    catalog = Catalog("me")
    catalog.on_state("me", encode_instances([make_instance("t", "coap://127.0.0.1:9")]))
    return Router(_Directory(catalog), "me", lambda name: None, Upstream())


# A peer as the channel authenticates it (the router reads its name for the intentions).
IDENTITY = CertIdentity("peer", "0" * 32, dt.datetime(2100, 1, 1, tzinfo=dt.UTC))


def test_owner_refuses_malformed_unknown_and_spent_requests() -> None:
    router = _owner_router()

    def serve(data: bytes) -> tuple[cr.ReplyStatus, cr.Message]:
        return cr.decode_reply(asyncio.run(router.serve_channel(IDENTITY, data)))

    status, msg = serve(b"\x07garbage")
    assert (status, msg.code) == (cr.ReplyStatus.REFUSED, cr.BAD_REQUEST)
    get = cr.Message(1, ((cr.URI_PATH, b"x"),))
    other = cr.MeshRequest("t", "coap://127.0.0.1:10", 1000, get)
    status, msg = serve(cr.encode_request(other))
    assert (status, msg.code) == (cr.ReplyStatus.REFUSED, cr.NOT_FOUND)  # not an instance of ours
    spent = cr.Message(1, ((cr.HOP_LIMIT, b"\x01"),))
    status, msg = serve(cr.encode_request(cr.MeshRequest("t", "coap://127.0.0.1:9", 1000, spent)))
    assert (status, msg.code) == (cr.ReplyStatus.HOP_LIMIT, cr.HOP_LIMIT_REACHED)
    assert router.stats["channel_malformed"] == 1 and router.stats["channel_refused"] == 1


def test_ingress_answers_503_without_live_instances_and_502_without_a_channel() -> None:
    catalog = Catalog("me")
    catalog.on_state("far", encode_instances([make_instance("t", "coap://127.0.0.1:9")]))
    router = Router(_Directory(catalog), "me", lambda name: None, Upstream())
    get = cr.Message(1, ((cr.URI_HOST, b"t.mesh"),), b"", cr.CON)
    assert asyncio.run(router.handle(get)).code == cr.SERVICE_UNAVAILABLE  # "far" not alive
    catalog.on_member("far", MemberState.ALIVE)
    response = asyncio.run(router.handle(get))
    assert response.code == cr.BAD_GATEWAY
    # GET is retried (max_retries 2), on the same instance since it is the only one
    assert (router.stats["try_unreachable"], router.stats["retries"]) == (3, 2)
    assert (
        asyncio.run(router.handle(cr.Message(1, ((cr.URI_HOST, b"u.mesh"),)))).code == cr.NOT_FOUND
    )


def test_upstream_module_constants_are_sane() -> None:
    assert coap_proxy.DEDUP_LIFETIME_S < 247 and coap_proxy.UPSTREAM_LINKS >= 8


def test_cached_address_checks_answer_as_aiocoap_and_stay_bounded() -> None:
    from aiocoap.transports import udp6

    class Iface:  # the address holds its interface by weakref only
        pass

    iface = Iface()

    def pktinfo(addr: str) -> bytes:
        return socket.inet_pton(socket.AF_INET6, addr) + struct.pack("I", 0)

    cases = [  # (sockaddr host, pktinfo host, multicast, multicast locally)
        ("::ffff:127.0.0.1", "::ffff:127.0.0.1", False, False),
        ("::ffff:224.0.1.187", "::ffff:224.0.1.187", True, True),
        ("ff05::fd", "::1", True, False),
        ("::1", "ff02::fd", False, True),
    ]
    coap_proxy.cached_address_checks()
    coap_proxy.cached_address_checks()  # idempotent: not wrapped twice
    for _ in range(2):  # the second round answers from the table
        for host, local, multicast, locally in cases:
            address = udp6.UDP6EndpointAddress((host, 5683, 0, 0), iface, pktinfo=pktinfo(local))
            assert address.is_multicast is multicast, host
            assert address.is_multicast_locally is locally, local
            assert (address.as_response_address().pktinfo is None) is locally
    for i in range(coap_proxy.ADDRESS_CHECKS_MAX + 10):  # many sources: the table is cleared
        host = f"::ffff:10.0.{i // 256}.{i % 256}"
        assert not udp6.UDP6EndpointAddress((host, 5683, 0, 0), iface).is_multicast
        assert len(coap_proxy.ADDRESS_CHECKS[0]) <= coap_proxy.ADDRESS_CHECKS_MAX
    assert "::ffff:10.0.4.9" in coap_proxy.ADDRESS_CHECKS[0]  # the latest are remembered


class _StubRouter:
    """What the fast path needs of a Router: ``handle``, here slow on request."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.clients: list[object] = []

    async def handle(self, msg: cr.Message, client: object) -> cr.Message:
        self.clients.append(client)
        await asyncio.sleep(self.delay)
        return cr.Message(cr.code(2, 5), (), b"fast")


def _fast_path_run(delay: float, datagrams: list[bytes]) -> tuple[list[cr.Message], dict[str, int]]:
    """Send ``datagrams`` one after another to an aiocoap server with the fast path in front;
    every datagram that comes back, decoded, and the fast path's counters."""
    from edgeagent.coap_fastpath import install

    async def run() -> tuple[list[cr.Message], dict[str, int]]:
        ctx, port = await _server(Counting())
        fast = install(ctx, _StubRouter(delay))  # type: ignore[arg-type]
        assert fast is not None
        got: list[cr.Message] = []
        loop = asyncio.get_running_loop()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.setblocking(False)
            sock.connect(("127.0.0.1", port))
            for data in datagrams:
                await loop.sock_sendall(sock, data)
                await asyncio.sleep(delay + 0.15)
                while True:
                    try:
                        got.append(cr.decode_message(sock.recv(2048)))
                    except BlockingIOError:
                        break
        fast.close()
        await ctx.shutdown()
        return got, dict(fast.stats)

    return asyncio.run(run())


def test_fast_path_answers_on_aiocoaps_socket_and_leaves_blocks_to_aiocoap() -> None:
    block2 = cr.encode_message(cr.Message(1, ((cr.BLOCK2, b"\x02"),), b"", cr.CON, 2, b"b"))
    got, stats = _fast_path_run(0.0, [_con_get(1), _con_get(1), block2])
    assert [(m.mtype, m.mid, m.payload) for m in got[:2]] == [(cr.ACK, 1, b"fast")] * 2
    assert (got[2].mtype, got[2].mid, got[2].token) == (cr.ACK, 2, b"b")
    assert got[2].payload == b"x"  # aiocoap's site answered the block request
    assert (stats["fast"], stats["duplicates"], stats["delegated"]) == (1, 1, 1)


def test_fast_path_answers_5_03_when_too_many_requests_are_in_flight(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from edgeagent import coap_fastpath

    monkeypatch.setattr(coap_fastpath, "IN_FLIGHT_MAX", 0)
    got, stats = _fast_path_run(0.0, [_con_get(3)])
    assert [(m.mtype, m.code, m.mid) for m in got] == [(cr.ACK, cr.SERVICE_UNAVAILABLE, 3)]
    assert stats["fast_busy"] == 1


def test_fast_path_sends_an_empty_ack_then_a_separate_con_response() -> None:
    got, stats = _fast_path_run(0.3, [_con_get(5)])
    assert (got[0].mtype, got[0].code, got[0].mid) == (cr.ACK, 0, 5)  # empty ACK at 0.1 s
    separate = got[1]
    assert (separate.mtype, separate.token, separate.payload) == (cr.CON, b"\x00\x05", b"fast")
    assert stats["empty_acks"] == 1 and stats["separate"] == 1
