"""Push-pull streams: one request frame, one reply frame; an oversized request is refused."""

from __future__ import annotations

import asyncio

from edgeagent.streams import Served, encode_frame, exchange, serve_stream

LIMIT = 64
TIMEOUT = 5.0


async def _server(handle_reply: bytes | None, outcomes: list[Served]) -> asyncio.Server:
    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        outcomes.append(await serve_stream(reader, writer, lambda f, s: handle_reply, LIMIT, TIMEOUT))

    return await asyncio.start_server(on_connect, "127.0.0.1", 0)


async def _outcome(outcomes: list[Served]) -> list[Served]:
    """The server's outcomes once its handler finished (it may end after the client does)."""
    for _ in range(100):
        if outcomes:
            break
        await asyncio.sleep(0.01)
    return outcomes


async def test_exchange_gets_the_reply_that_serve_stream_sends() -> None:
    outcomes: list[Served] = []
    server = await _server(b"pong", outcomes)
    port = server.sockets[0].getsockname()[1]
    async with server:
        reply = await exchange(("127.0.0.1", port), b"ping", None, LIMIT, TIMEOUT)
        served = await _outcome(outcomes)
    assert reply == b"pong"
    assert served == [Served.ANSWERED]


async def test_an_oversized_request_is_refused_and_the_exchange_fails() -> None:
    outcomes: list[Served] = []
    server = await _server(b"pong", outcomes)
    port = server.sockets[0].getsockname()[1]
    async with server:
        reply = await exchange(("127.0.0.1", port), b"x" * (LIMIT + 1), None, LIMIT, TIMEOUT)
        served = await _outcome(outcomes)
    assert reply is None
    assert served == [Served.OVERSIZED]


async def test_a_half_frame_is_a_failed_stream() -> None:
    outcomes: list[Served] = []
    server = await _server(b"pong", outcomes)
    port = server.sockets[0].getsockname()[1]
    async with server:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(encode_frame(b"hello")[:6])
        writer.write_eof()
        assert await reader.read() == b""
        writer.close()
        served = await _outcome(outcomes)
    assert served == [Served.FAILED]
