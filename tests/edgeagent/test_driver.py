"""The gossip driver on real loopback sockets, around a scripted stand-in core.

The stand-in records every input in order, so the tests can assert what the driver fed it,
from which thread, and in which order (datagrams drained before due timers).
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import sys
import threading
import time
import tracemalloc
from typing import Any

import pytest

from edgeagent.driver import GossipDriver, View
from edgeagent.stream_limits import (
    MAX_INBOUND_PER_SOURCE,
    MAX_INBOUND_STREAMS,
    MAX_OUTBOUND_STREAMS,
)
from edgeagent.streams import CHALLENGE_SIZE, HEADER_SIZE, Header, Kind, StreamAuth, body_digest
from gossip.events import Member, UserMessage
from gossip.keyring import Keyring
from gossip.messages import Address, MemberState

WAIT = 10.0  # generous deadline for anything that should take milliseconds
AUTH = StreamAuth(Keyring([bytes(range(32))]), "test")


class ScriptedCore:
    """Answers b"ping" with b"pong", emits an event on b"event", raises on b"crash"."""

    def __init__(self, addr: Address, now: float) -> None:
        self.addr = addr
        self.log: list[tuple[str, Any]] = []
        self.threads: set[str] = set()
        self.deadline: float | None = None
        self.out_datagrams: list[tuple[Address, bytes]] = []
        self.out_streams: list[tuple[Address, bytes]] = []
        self.events: list[Any] = []

    def _note(self, kind: str, value: Any) -> None:
        self.threads.add(threading.current_thread().name)
        self.log.append((kind, value))

    def receive(self, data: bytes, src: Address, now: float) -> None:
        self._note("datagram", data)
        if data == b"ping":
            self.out_datagrams.append((src, b"pong"))
        elif data == b"event":
            self.events.append(UserMessage(origin="peer", payload=b"hello"))
        elif data == b"crash":
            raise ValueError("scripted failure")

    def handle_stream(self, data: bytes, src: Address, now: float) -> bytes | None:
        self._note("stream", data)
        return b"reply:" + data

    def receive_stream_reply(self, data: bytes, src: Address, now: float) -> None:
        self._note("stream_reply", data)

    def stream_failed(self, dst: Address, now: float) -> None:
        self._note("stream_failed", dst)

    def handle_timeout(self, now: float) -> None:
        self._note("timeout", now)
        self.deadline = None

    def get_timer(self) -> float | None:
        return self.deadline

    def datagrams_to_send(self) -> list[tuple[Address, bytes]]:
        out, self.out_datagrams = self.out_datagrams, []
        return out

    def streams_to_send(self) -> list[tuple[Address, bytes]]:
        out, self.out_streams = self.out_streams, []
        return out

    def next_event(self) -> Any:
        return self.events.pop(0) if self.events else None

    def members(self) -> list[Member]:
        return [self.local_member]

    @property
    def local_member(self) -> Member:
        return Member("self", self.addr, 1, MemberState.ALIVE, b"", 0.0)

    incarnation = 1
    health_score = 0
    pending_broadcasts = 0
    recent_probe_rtts = ((1, 0.002),)

    @property
    def stats(self) -> dict[str, int]:
        return {"datagrams_in": sum(1 for k, _ in self.log if k == "datagram")}


class Harness:
    def __init__(self, **kwargs: Any) -> None:
        self.cores: list[ScriptedCore] = []
        self.updates: list[tuple[tuple[Any, ...], View, str]] = []
        loop = asyncio.get_running_loop()

        def make_core(addr: Address, now: float) -> ScriptedCore:
            core = ScriptedCore(addr, now)
            self.cores.append(core)
            return core

        def on_update(events: tuple[Any, ...], view: View) -> None:
            self.updates.append((events, view, threading.current_thread().name))

        self.driver = GossipDriver(
            make_core,
            ("127.0.0.1", 0),
            main_loop=loop,
            on_update=on_update,
            stream_auth=AUTH,
            **kwargs,
        )
        self.addr = self.driver.start()

    @property
    def core(self) -> ScriptedCore:
        return self.cores[0]

    def stat(self, name: str) -> int:
        """The driver counter ``name`` in the latest View published."""
        return max((v.driver_stats[name] for _, v, _ in self.updates), default=0)


async def wait_until(predicate: Any, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


@pytest.fixture
async def harness() -> Any:
    h = Harness(stream_timeout=0.5)
    yield h
    h.driver.stop()


def udp_client() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(WAIT)
    return sock


async def test_datagram_reaches_core_and_its_reply_is_sent(harness: Harness) -> None:
    with udp_client() as client:
        client.sendto(b"ping", harness.addr)
        data = await asyncio.get_running_loop().run_in_executor(None, client.recv, 100)
    assert data == b"pong"
    assert harness.core.threads == {"gossip"}


async def test_all_readable_datagrams_are_drained_before_a_due_timer(harness: Harness) -> None:
    def arm_timer_then_stall(core: Any, now: float) -> None:
        core.deadline = now + 0.05
        time.sleep(0.3)  # the timer falls due while datagrams pile up in the socket buffer

    future = harness.driver.call(arm_timer_then_stall)
    with udp_client() as client:
        time.sleep(0.05)
        for i in range(50):
            client.sendto(b"d%d" % i, harness.addr)
    await asyncio.wrap_future(future)
    await wait_until(lambda: any(kind == "timeout" for kind, _ in harness.core.log))
    kinds = [kind for kind, _ in harness.core.log]
    assert kinds.count("datagram") == 50
    assert kinds.index("timeout") > max(i for i, k in enumerate(kinds) if k == "datagram")


async def test_timer_is_rearmed_after_a_command(harness: Harness) -> None:
    def arm(core: Any, now: float) -> None:
        core.deadline = now + 0.1

    await harness.driver.acall(arm)
    await wait_until(lambda: any(kind == "timeout" for kind, _ in harness.core.log))


async def test_commands_run_on_the_gossip_thread(harness: Harness) -> None:
    name = await harness.driver.acall(lambda core, now: threading.current_thread().name)
    assert name == "gossip"
    assert threading.current_thread().name != "gossip"


async def test_events_reach_the_main_loop_with_a_snapshot(harness: Harness) -> None:
    with udp_client() as client:
        client.sendto(b"event", harness.addr)
    await wait_until(lambda: any(events for events, _, _ in harness.updates))
    events, view, thread = next(u for u in harness.updates if u[0])
    assert events == (UserMessage(origin="peer", payload=b"hello"),)
    assert thread == threading.current_thread().name
    assert view.local.name == "self" and view.core_stats["datagrams_in"] >= 1


async def test_core_exception_is_counted_and_the_driver_keeps_serving(harness: Harness) -> None:
    with udp_client() as client:
        client.sendto(b"crash", harness.addr)
        client.sendto(b"ping", harness.addr)
        data = await asyncio.get_running_loop().run_in_executor(None, client.recv, 100)
    assert data == b"pong"
    await wait_until(
        lambda: any(v.driver_stats["internal_errors"] == 1 for _, v, _ in harness.updates)
    )


async def test_oversized_datagram_is_dropped_and_counted(harness: Harness) -> None:
    with udp_client() as client:
        client.sendto(b"x" * 5000, harness.addr)
        client.sendto(b"ping", harness.addr)
        await asyncio.get_running_loop().run_in_executor(None, client.recv, 100)
    assert [kind for kind, _ in harness.core.log] == ["datagram"]
    await wait_until(
        lambda: any(v.driver_stats["datagrams_oversized"] == 1 for _, v, _ in harness.updates)
    )


async def connect(harness: Harness, source: str = "127.0.0.1") -> tuple[Any, Any, bytes]:
    """Open a stream from ``source``; return reader, writer and the server's challenge."""
    reader, writer = await asyncio.open_connection(*harness.addr, local_addr=(source, 0))
    challenge = await asyncio.wait_for(reader.readexactly(CHALLENGE_SIZE), WAIT)
    return reader, writer, challenge


def request_header(
    challenge: bytes, length: int, nonce: bytes = b"n" * 16, body: bytes = b""
) -> bytes:
    """A request header naming ``length`` body bytes, bound to ``body`` (if they are all sent)."""
    return AUTH.seal(Header(Kind.REQUEST, length, challenge, nonce, body_digest(body)))


async def test_stream_request_gets_a_sealed_reply(harness: Harness) -> None:
    reader, writer, challenge = await connect(harness)
    writer.write(request_header(challenge, 5, body=b"state") + b"state")
    header = AUTH.expect(await reader.readexactly(HEADER_SIZE), Kind.REPLY, b"n" * 16)
    reply = await asyncio.wait_for(reader.readexactly(header.length), WAIT)
    writer.close()
    assert reply == b"reply:state"
    assert ("stream", b"state") in harness.core.log


async def test_outgoing_stream_reply_is_fed_to_the_core(harness: Harness) -> None:
    other = Harness()
    try:

        def request(core: Any, now: float) -> None:
            core.out_streams.append((other.addr, b"pull"))

        await harness.driver.acall(request)
        await wait_until(lambda: ("stream_reply", b"reply:pull") in harness.core.log)
        assert ("stream", b"pull") in other.core.log
    finally:
        other.driver.stop()


async def test_unreachable_stream_peer_is_reported_as_failed(harness: Harness) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    dst = ("127.0.0.1", closed_port)

    def request(core: Any, now: float) -> None:
        core.out_streams.append((dst, b"pull"))

    await harness.driver.acall(request)
    await wait_until(lambda: ("stream_failed", dst) in harness.core.log)


async def test_a_header_naming_a_huge_body_is_refused_without_reading(harness: Harness) -> None:
    reader, writer, challenge = await connect(harness)
    writer.write(request_header(challenge, 0xFFFFFFFF))
    assert await asyncio.wait_for(reader.read(), WAIT) == b""
    writer.close()
    assert not any(kind == "stream" for kind, _ in harness.core.log)
    await wait_until(lambda: harness.stat("frames_oversized") == 1)


async def test_partial_body_is_cut_off_after_the_stream_timeout(harness: Harness) -> None:
    reader, writer, challenge = await connect(harness)
    writer.write(request_header(challenge, 100) + b"only part")
    assert await asyncio.wait_for(reader.read(), WAIT) == b""
    writer.close()
    assert not any(kind == "stream" for kind, _ in harness.core.log)
    await wait_until(lambda: harness.stat("stream_errors") == 1)


async def test_a_slowloris_header_is_cut_at_the_header_timeout() -> None:
    harness = Harness(stream_timeout=WAIT, header_timeout=0.3)
    try:
        reader, writer, _ = await connect(harness)
        writer.write(os.urandom(HEADER_SIZE - 1))  # all but the last byte, then nothing
        started = time.monotonic()
        assert await asyncio.wait_for(reader.read(), WAIT) == b""
        assert time.monotonic() - started < WAIT / 2  # the header deadline, not the stream one
        writer.close()
        await wait_until(lambda: harness.stat("stream_headers_late") == 1)
    finally:
        harness.driver.stop()


async def test_an_unauthenticated_8_mib_stream_is_not_buffered(harness: Harness) -> None:
    size = 8 * 1024 * 1024
    data = struct.pack(">I", size) + os.urandom(size)  # the old frame: a length and a body

    def send() -> None:
        with socket.create_connection(harness.addr, timeout=WAIT) as sock:
            try:
                sock.sendall(data)
                while sock.recv(65536):
                    pass
            except OSError:
                pass  # reset by the agent: expected

    tracemalloc.start()
    try:
        await asyncio.to_thread(send)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2 * 1024 * 1024  # a few socket reads at most, never the 8 MiB body
    await wait_until(lambda: harness.stat("stream_headers_rejected") == 1)
    assert not any(kind == "stream" for kind, _ in harness.core.log)


async def test_connections_from_one_source_are_capped(harness: Harness) -> None:
    held = [await connect(harness) for _ in range(MAX_INBOUND_PER_SOURCE)]
    reader, writer = await asyncio.open_connection(*harness.addr)
    assert await asyncio.wait_for(reader.read(), WAIT) == b""  # closed before any challenge
    writer.close()
    await wait_until(lambda: harness.stat("streams_per_source") == 1)
    reader, writer, challenge = await connect(harness, "127.0.0.2")  # another source gets in
    writer.write(request_header(challenge, 2, body=b"ok") + b"ok")
    assert await asyncio.wait_for(reader.read(), WAIT) != b""
    for _, w, _ in held:
        w.close()
    writer.close()


async def test_idle_connections_holding_every_slot_give_way_to_a_member() -> None:
    harness = Harness(stream_timeout=WAIT, header_timeout=WAIT)
    per_source = MAX_INBOUND_PER_SOURCE
    try:
        held = [
            await connect(harness, f"127.0.1.{1 + i // per_source}")
            for i in range(MAX_INBOUND_STREAMS)
        ]
        started = time.monotonic()
        reader, writer, challenge = await connect(harness, "127.0.2.1")
        writer.write(request_header(challenge, 4, body=b"join") + b"join")
        assert await asyncio.wait_for(reader.read(), WAIT) != b""
        assert time.monotonic() - started < 2.0  # not after the idle ones time out
        assert ("stream", b"join") in harness.core.log
        await wait_until(lambda: harness.stat("streams_evicted") == 1)
        for _, w, _ in held:
            w.close()
        writer.close()
    finally:
        harness.driver.stop()


async def test_bodies_in_flight_share_one_budget() -> None:
    limit = 1000  # the budget is 4 frame limits: 4000 bytes
    harness = Harness(stream_timeout=WAIT, max_stream_bytes=limit)
    try:
        holding = []
        for i in range(4):  # four authenticated streams, each promising a whole frame
            reader, writer, challenge = await connect(harness, f"127.0.3.{i + 1}")
            writer.write(request_header(challenge, limit) + b"x")
            holding.append(writer)
        reader, writer, challenge = await connect(harness, "127.0.3.9")
        writer.write(request_header(challenge, 10, body=b"0123456789") + b"0123456789")
        assert await asyncio.wait_for(reader.read(), WAIT) == b""  # no room: refused
        await wait_until(lambda: harness.stat("streams_over_budget") == 1)
        for w in holding:
            w.close()
        writer.close()
        await wait_until(lambda: harness.stat("stream_errors") == 4)  # budget given back
        reader, writer, challenge = await connect(harness, "127.0.3.9")
        writer.write(request_header(challenge, 10, body=b"0123456789") + b"0123456789")
        assert await asyncio.wait_for(reader.read(), WAIT) != b""
        writer.close()
    finally:
        harness.driver.stop()


async def test_outbound_streams_are_capped(harness: Harness) -> None:
    accepted: list[asyncio.StreamWriter] = []

    async def black_hole(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)  # never sends a challenge: the push-pull hangs until its timeout

    server = await asyncio.start_server(black_hole, "127.0.0.1", 0)
    dst = ("127.0.0.1", int(server.sockets[0].getsockname()[1]))
    async with server:

        def request(core: Any, now: float) -> None:
            core.out_streams.extend([(dst, b"pull")] * (MAX_OUTBOUND_STREAMS + 1))

        await harness.driver.acall(request)
        await wait_until(lambda: ("stream_failed", dst) in harness.core.log, 0.4)  # at once
        await wait_until(lambda: harness.stat("streams_out_rejected") == 1)
        await wait_until(lambda: len(accepted) == MAX_OUTBOUND_STREAMS)
        for w in accepted:
            w.close()


async def test_commands_after_stop_fail_cleanly(harness: Harness) -> None:
    harness.driver.stop()
    with pytest.raises(RuntimeError):
        await harness.driver.acall(lambda core, now: None)


class GatedCore(ScriptedCore):
    """Counts b"bad" as a decode error (a refusal) and blocks on b"hold" until ``gate`` is set."""

    def __init__(self, addr: Address, now: float) -> None:
        super().__init__(addr, now)
        self.gate = threading.Event()
        self.bad = 0

    def receive(self, data: bytes, src: Address, now: float) -> None:
        super().receive(data, src, now)
        if data == b"bad":
            self.bad += 1
        elif data == b"hold":
            self.gate.wait(WAIT)

    @property
    def stats(self) -> dict[str, int]:
        return {**super().stats, "decode_errors": self.bad}


async def test_a_clean_senders_ping_is_answered_ahead_of_a_tainted_senders_backlog() -> None:
    cores: list[GatedCore] = []

    def make_core(addr: Address, now: float) -> GatedCore:
        cores.append(GatedCore(addr, now))
        return cores[0]

    driver = GossipDriver(
        make_core, ("127.0.0.1", 0), main_loop=asyncio.get_running_loop(),
        on_update=lambda events, view: None, stream_auth=AUTH,
    )  # fmt: skip
    addr = driver.start()
    core = cores[0]
    flood, clean = udp_client(), socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        clean.bind(("127.0.0.2", 0))
        clean.settimeout(WAIT)
        flood.sendto(b"bad", addr)  # the flood's host failed validation once: tainted
        await wait_until(lambda: core.bad == 1)
        flood.sendto(b"hold", addr)  # keeps the gossip thread busy while the socket fills
        await wait_until(lambda: ("datagram", b"hold") in core.log)
        for i in range(50):
            flood.sendto(b"x%d" % i, addr)
        clean.sendto(b"ping", addr)
        await asyncio.sleep(0.05)  # (only lets the datagrams reach the socket buffer)
        core.gate.set()
        reply = await asyncio.get_running_loop().run_in_executor(None, clean.recv, 100)
        await wait_until(lambda: ("datagram", b"x49") in core.log)
    finally:
        core.gate.set()
        flood.close()
        clean.close()
        driver.stop()
    assert reply == b"pong"
    order = [data for kind, data in core.log if kind == "datagram"]
    # Read in one drain after the hold: the clean ping first, the tainted backlog after it.
    assert order.index(b"ping") < order.index(b"x0")
    assert order[order.index(b"x0") :] == [b"x%d" % i for i in range(50)]


async def test_a_limited_senders_datagrams_never_reach_the_core() -> None:
    # The limiter works on the source address before the core decrypts anything; on
    # probation, the datagrams that pass validation do not buy the sender more reads.
    from edgeagent.ratelimit import BAD_BURST, BAD_RATE

    cores: list[GatedCore] = []
    driver = GossipDriver(
        lambda addr, now: cores.append(GatedCore(addr, now)) or cores[0],
        ("127.0.0.1", 0), main_loop=asyncio.get_running_loop(),
        on_update=lambda events, view: None, stream_auth=AUTH,
    )  # fmt: skip
    addr = driver.start()
    start = time.monotonic()
    try:
        with udp_client() as flood:
            for _ in range(BAD_BURST + 1):
                flood.sendto(b"bad", addr)
            await wait_until(lambda: cores[0].bad == BAD_BURST + 1)
            for i in range(2000):  # paced over ~1 s: tokens refill meanwhile
                flood.sendto(b"x", addr)
                if i % 10 == 0:
                    await asyncio.sleep(0.005)

            async def limited() -> int:
                return (await driver.snapshot()).driver_stats["datagrams_limited"]

            received = lambda: sum(1 for kind, _ in cores[0].log if kind == "datagram")  # noqa: E731
            deadline = time.monotonic() + WAIT
            while received() - (BAD_BURST + 1) + await limited() < 2000:
                assert time.monotonic() < deadline, "the driver did not read every datagram"
                await asyncio.sleep(0.02)
        elapsed = time.monotonic() - start
    finally:
        driver.stop()
    assert received() <= BAD_BURST + 1 + BAD_RATE * elapsed + 1  # one read per refilled token


async def test_the_gil_switch_interval_is_short_only_while_hostile_senders_are_read() -> None:
    """Short while a tainted sender's datagrams come (the gossip thread must get the GIL back
    fast under a flood), the default otherwise (short always costs every request the main
    loop serves) and again once the driver stops."""
    from edgeagent import driver as driver_module

    default = sys.getswitchinterval()
    cores: list[GatedCore] = []
    driver = GossipDriver(
        lambda addr, now: cores.append(GatedCore(addr, now)) or cores[0],
        ("127.0.0.1", 0), main_loop=asyncio.get_running_loop(),
        on_update=lambda events, view: None, stream_auth=AUTH,
    )  # fmt: skip
    addr = driver.start()
    try:
        with udp_client() as flood:
            flood.sendto(b"x", addr)  # a clean datagram: nothing changes
            await wait_until(lambda: ("datagram", b"x") in cores[0].log)
            assert sys.getswitchinterval() == default
            flood.sendto(b"bad", addr)  # fails validation: the sender is tainted
            await wait_until(lambda: cores[0].bad == 1)
            flood.sendto(b"y", addr)
            await wait_until(lambda: ("datagram", b"y") in cores[0].log)
            assert sys.getswitchinterval() == driver_module.FAST_SWITCH_INTERVAL_S
    finally:
        driver.stop()
    assert sys.getswitchinterval() == default


async def test_unsolicited_views_are_rare_until_someone_wants_fresh_counters(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Issue 13: a snapshot a second woke the main loop and every listener of a settled agent
    for nothing; without metrics it comes every IDLE_VIEW_INTERVAL, with them every second.
    The idle wait already armed is cut short: the metrics feature starts after the driver,
    and a scrape must not read the start-up counters for a whole IDLE_VIEW_INTERVAL (CI: a
    3-second bench window saw no bytes at all)."""
    import edgeagent.driver as driver_mod

    monkeypatch.setattr(driver_mod, "IDLE_VIEW_INTERVAL", 60.0)
    monkeypatch.setattr(driver_mod, "VIEW_INTERVAL", 0.05)
    h = Harness()
    try:
        await asyncio.sleep(0.4)
        idle = len(h.updates)
        assert idle <= 1  # the start-up view at most: not one per VIEW_INTERVAL
        h.driver.want_fresh_views()
        await wait_until(lambda: len(h.updates) >= idle + 6, 5.0)
    finally:
        h.driver.stop()


async def test_a_new_incarnation_reaches_the_main_loop_at_once_without_an_event(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The main loop saves a refuted incarnation from the View: it must not wait for the
    next unsolicited one (a kill meanwhile restarted a member at its old incarnation)."""
    import edgeagent.driver as driver_mod

    monkeypatch.setattr(driver_mod, "IDLE_VIEW_INTERVAL", 60.0)
    h = Harness()
    try:
        await wait_until(lambda: len(h.updates) >= 1, 5.0)  # the start-up view
        seen = len(h.updates)

        def refute(core: Any, now: float) -> None:
            core.incarnation = 2  # as a refutation does: no event of its own

        await asyncio.wrap_future(h.driver.call(refute))
        await wait_until(lambda: any(v.incarnation == 2 for _, v, _ in h.updates[seen:]), 5.0)
    finally:
        h.driver.stop()
