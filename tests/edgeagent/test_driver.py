"""The gossip driver on real loopback sockets, around a scripted stand-in core.

The stand-in records every input in order, so the tests can assert what the driver fed it,
from which thread, and in which order (datagrams drained before due timers).
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
import time
from typing import Any

import pytest

from edgeagent.driver import GossipDriver, View, encode_frame
from gossip.events import Member, UserMessage
from gossip.messages import Address, MemberState

WAIT = 10.0  # generous deadline for anything that should take milliseconds


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
            make_core, ("127.0.0.1", 0), main_loop=loop, on_update=on_update, **kwargs
        )
        self.addr = self.driver.start()

    @property
    def core(self) -> ScriptedCore:
        return self.cores[0]


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


async def read_reply_frame(reader: asyncio.StreamReader) -> bytes:
    (length,) = struct.unpack(">I", await reader.readexactly(4))
    return await reader.readexactly(length)


async def test_stream_request_gets_a_framed_reply(harness: Harness) -> None:
    reader, writer = await asyncio.open_connection(*harness.addr)
    writer.write(encode_frame(b"state"))
    reply = await asyncio.wait_for(read_reply_frame(reader), WAIT)
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


async def test_huge_length_prefix_is_refused_without_reading(harness: Harness) -> None:
    reader, writer = await asyncio.open_connection(*harness.addr)
    writer.write(struct.pack(">I", 0xFFFFFFFF))
    assert await asyncio.wait_for(reader.read(), WAIT) == b""
    writer.close()
    assert not any(kind == "stream" for kind, _ in harness.core.log)
    await wait_until(
        lambda: any(v.driver_stats["frames_oversized"] == 1 for _, v, _ in harness.updates)
    )


async def test_partial_frame_is_cut_off_after_the_stream_timeout(harness: Harness) -> None:
    reader, writer = await asyncio.open_connection(*harness.addr)
    writer.write(struct.pack(">I", 100) + b"only part")
    assert await asyncio.wait_for(reader.read(), WAIT) == b""
    writer.close()
    assert not any(kind == "stream" for kind, _ in harness.core.log)


async def test_commands_after_stop_fail_cleanly(harness: Harness) -> None:
    harness.driver.stop()
    with pytest.raises(RuntimeError):
        await harness.driver.acall(lambda core, now: None)
