"""Push-pull streams: a sealed header first, then one request body and one reply.

The server reads no body before the header opened with the cluster key, and refuses a body
over the frame limit or the budget; the header decoder only ever raises HeaderError.
"""

from __future__ import annotations

import asyncio
import os
import random
import struct

import pytest

from edgeagent.streams import (
    CHALLENGE_SIZE,
    HEADER_PLAIN,
    HEADER_SIZE,
    Budget,
    Header,
    HeaderError,
    Kind,
    Served,
    StreamAuth,
    StreamSettings,
    body_digest,
    exchange,
    serve_stream,
)
from gossip.keyring import Keyring

LIMIT = 64
TIMEOUT = 5.0
KEY = bytes(range(32))
AUTH = StreamAuth(Keyring([KEY]), "test")
SETTINGS = StreamSettings(LIMIT, TIMEOUT, header_timeout=0.3)


async def _server(
    handle_reply: bytes | None,
    outcomes: list[Served],
    handled: list[bytes] | None = None,
    budget: Budget | None = None,
) -> asyncio.Server:
    def handle(frame: bytes, src: object) -> bytes | None:
        if handled is not None:
            handled.append(frame)
        return handle_reply

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        outcomes.append(await serve_stream(reader, writer, handle, AUTH, SETTINGS, budget=budget))

    return await asyncio.start_server(on_connect, "127.0.0.1", 0)


async def _outcome(outcomes: list[Served], n: int = 1) -> list[Served]:
    """The server's outcomes once its handlers finished (they may end after the client does)."""
    for _ in range(300):
        if len(outcomes) >= n:
            break
        await asyncio.sleep(0.01)
    return outcomes


def _port(server: asyncio.Server) -> int:
    return int(server.sockets[0].getsockname()[1])


async def test_exchange_gets_the_reply_that_serve_stream_sends() -> None:
    outcomes: list[Served] = []
    server = await _server(b"pong", outcomes)
    async with server:
        reply = await exchange(("127.0.0.1", _port(server)), b"ping", None, AUTH, SETTINGS)
        served = await _outcome(outcomes)
    assert reply == b"pong"
    assert served == [Served.ANSWERED]


async def test_an_oversized_request_is_refused_and_the_exchange_fails() -> None:
    outcomes: list[Served] = []
    server = await _server(b"pong", outcomes)
    async with server:
        reply = await exchange(
            ("127.0.0.1", _port(server)), b"x" * (LIMIT + 1), None, AUTH, SETTINGS
        )
        served = await _outcome(outcomes)
    assert reply is None
    assert served == [Served.OVERSIZED]


async def test_a_client_with_another_key_is_unauthenticated_and_gets_nothing() -> None:
    outcomes: list[Served] = []
    server = await _server(b"pong", outcomes)
    other = StreamAuth(Keyring([Keyring.generate_key()]), "test")
    async with server:
        reply = await exchange(("127.0.0.1", _port(server)), b"ping", None, other, SETTINGS)
        served = await _outcome(outcomes)
    assert reply is None
    assert served == [Served.UNAUTHENTICATED]


async def test_another_cluster_name_is_unauthenticated() -> None:
    outcomes: list[Served] = []
    server = await _server(b"pong", outcomes)
    other = StreamAuth(Keyring([KEY]), "another-site")
    async with server:
        reply = await exchange(("127.0.0.1", _port(server)), b"ping", None, other, SETTINGS)
        served = await _outcome(outcomes)
    assert reply is None
    assert served == [Served.UNAUTHENTICATED]


async def test_a_header_replayed_on_another_connection_is_unauthenticated() -> None:
    outcomes: list[Served] = []
    server = await _server(b"pong", outcomes)
    async with server:
        reader, writer = await asyncio.open_connection("127.0.0.1", _port(server))
        challenge = await reader.readexactly(CHALLENGE_SIZE)
        recorded = AUTH.seal(Header(Kind.REQUEST, 4, challenge, os.urandom(16), body_digest(b"ping")))
        writer.write(recorded + b"ping")
        assert await reader.read() != b""  # the genuine exchange is answered
        writer.close()
        reader, writer = await asyncio.open_connection("127.0.0.1", _port(server))
        await reader.readexactly(CHALLENGE_SIZE)
        writer.write(recorded + b"ping")  # same bytes, new challenge
        assert await reader.read() == b""
        writer.close()
        served = await _outcome(outcomes, 2)
    assert served == [Served.ANSWERED, Served.UNAUTHENTICATED]


async def test_unauthenticated_bytes_beyond_the_header_are_never_read_as_a_body() -> None:
    outcomes: list[Served] = []
    server = await _server(b"pong", outcomes)
    async with server:
        reader, writer = await asyncio.open_connection("127.0.0.1", _port(server))
        writer.write(struct.pack(">I", 1 << 20) + os.urandom(HEADER_SIZE))  # old-style prefix
        assert await reader.readexactly(CHALLENGE_SIZE)
        assert await reader.read() == b""
        writer.close()
        served = await _outcome(outcomes)
    assert served == [Served.UNAUTHENTICATED]


async def test_a_half_header_is_cut_at_the_header_timeout() -> None:
    outcomes: list[Served] = []
    server = await _server(b"pong", outcomes)
    async with server:
        reader, writer = await asyncio.open_connection("127.0.0.1", _port(server))
        writer.write(os.urandom(HEADER_SIZE // 2))  # and then nothing (slowloris)
        started = asyncio.get_running_loop().time()
        await reader.readexactly(CHALLENGE_SIZE)
        assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""
        elapsed = asyncio.get_running_loop().time() - started
        writer.close()
        served = await _outcome(outcomes)
    assert served == [Served.HEADER_TIMEOUT]
    assert elapsed < TIMEOUT / 2  # the short header deadline, not the body one


async def test_a_body_spliced_behind_a_fresh_header_is_unauthenticated() -> None:
    """An on-path attacker keeps the client's fresh header and swaps in a recorded body of the
    same length (an old push-pull): the header's digest names the body, so it is refused."""
    outcomes: list[Served] = []
    handled: list[bytes] = []
    server = await _server(b"pong", outcomes, handled)
    async with server:
        reader, writer = await asyncio.open_connection("127.0.0.1", _port(server))
        challenge = await reader.readexactly(CHALLENGE_SIZE)
        header = AUTH.seal(Header(Kind.REQUEST, 4, challenge, os.urandom(16), body_digest(b"ping")))
        writer.write(header + b"OLD!")
        assert await reader.read() == b""
        writer.close()
        served = await _outcome(outcomes)
    assert served == [Served.UNAUTHENTICATED] and handled == []


async def test_a_reply_body_that_is_not_the_one_its_header_names_is_refused() -> None:
    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(os.urandom(CHALLENGE_SIZE))
        request = AUTH.open(await reader.readexactly(HEADER_SIZE))
        await reader.readexactly(request.length)
        reply = Header(Kind.REPLY, 4, request.nonce, request.echo, body_digest(b"pong"))
        writer.write(AUTH.seal(reply) + b"OLD!")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    async with server:
        assert await exchange(("127.0.0.1", _port(server)), b"ping", None, AUTH, SETTINGS) is None


async def test_a_half_body_is_a_failed_stream() -> None:
    outcomes: list[Served] = []
    server = await _server(b"pong", outcomes)
    async with server:
        reader, writer = await asyncio.open_connection("127.0.0.1", _port(server))
        challenge = await reader.readexactly(CHALLENGE_SIZE)
        writer.write(AUTH.seal(Header(Kind.REQUEST, 10, challenge, os.urandom(16))) + b"hello")
        writer.write_eof()
        assert await reader.read() == b""
        writer.close()
        served = await _outcome(outcomes)
    assert served == [Served.FAILED]


async def test_a_body_over_the_budget_is_refused_and_the_budget_is_returned() -> None:
    outcomes: list[Served] = []
    budget = Budget(LIMIT)
    assert budget.take(LIMIT - 3)  # another stream holds most of it
    server = await _server(b"pong", outcomes, budget=budget)
    async with server:
        addr = ("127.0.0.1", _port(server))
        assert await exchange(addr, b"ping", None, AUTH, SETTINGS) is None
        budget.give(LIMIT - 3)
        assert await exchange(addr, b"ping", None, AUTH, SETTINGS) == b"pong"
        served = await _outcome(outcomes, 2)
    assert served == [Served.OVER_BUDGET, Served.ANSWERED]
    assert budget.in_flight == 0


async def test_a_reply_that_does_not_answer_our_nonce_is_refused() -> None:
    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        challenge = os.urandom(CHALLENGE_SIZE)
        writer.write(challenge)
        request = AUTH.open(await reader.readexactly(HEADER_SIZE))
        await reader.readexactly(request.length)
        writer.write(AUTH.seal(Header(Kind.REPLY, 4, os.urandom(16), challenge)) + b"pong")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    async with server:
        assert await exchange(("127.0.0.1", _port(server)), b"ping", None, AUTH, SETTINGS) is None


def test_a_header_opens_to_what_was_sealed() -> None:
    header = Header(Kind.REPLY, 12345, b"e" * 16, b"n" * 16, b"d" * 16)
    sealed = AUTH.seal(header)
    assert len(sealed) == HEADER_SIZE
    assert AUTH.open(sealed) == header
    with pytest.raises(HeaderError):
        AUTH.expect(sealed, Kind.REQUEST, b"e" * 16)
    with pytest.raises(HeaderError):
        AUTH.expect(sealed, Kind.REPLY, b"x" * 16)


def test_the_header_decoder_raises_only_header_error() -> None:
    rng = random.Random(8)
    good = AUTH.seal(Header(Kind.REQUEST, 10, b"c" * 16, b"n" * 16))
    unknown_kind = AUTH.keyring.encrypt(
        HEADER_PLAIN.pack(9, 10, b"c" * 16, b"n" * 16, b"d" * 16), AUTH.aad
    )
    short_plain = AUTH.keyring.encrypt(b"\x01" * (HEADER_PLAIN.size - 1), AUTH.aad)
    cases = [b"", good[:-1], good + b"\x00", unknown_kind, short_plain + b"\x00"]
    for _ in range(3000):
        data = bytearray(good)
        for _ in range(rng.randrange(1, 4)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        if data != good:  # two flips of one bit cancel out
            cases.append(bytes(data))
        cases.append(rng.randbytes(rng.choice((HEADER_SIZE, rng.randrange(0, 200)))))
    for data in cases:
        with pytest.raises(HeaderError):
            AUTH.open(data)
