"""Push-pull streams: a sealed header before any body, one request and one reply per TCP connection.

Wire format (stream version 2), in the order the bytes flow on one connection::

    server -> client   challenge       16 random bytes, sent as soon as the server accepts
    client -> server   request header  82 bytes, sealed: kind 1 | body length | challenge | nonce | digest
    client -> server   request body    body-length bytes: the core's sealed push-pull request
    server -> client   reply header    82 bytes, sealed: kind 2 | body length | nonce | challenge | digest
    server -> client   reply body      the core's sealed push-pull reply

A header is the plaintext ``kind (1 byte) | length (4, big-endian) | echo (16) | nonce (16) |
digest (16)`` sealed with the cluster keyring (:meth:`gossip.keyring.Keyring.encrypt`: version, AEAD nonce,
ciphertext, tag; 29 bytes more), the associated data being :data:`HEADER_AAD` plus the cluster
name, so neither a datagram nor a body can pass for a header. The client's header echoes the
server's challenge and carries a fresh nonce of its own; the server's reply header echoes that
nonce. The digest is the first 16 bytes of the SHA-256 of the body that follows
(:func:`body_digest`); a body that does not match it is refused like a header that does not
open. If the core has no reply, the server closes after the request body.

Why a header. The server reads exactly :data:`HEADER_SIZE` bytes within ``header_timeout``
(short: 2 s), opens them, and only then learns a body length and starts reading it. A peer
without the key never gets more than the header buffered, and never holds a connection past
the header timeout; the body length it names is checked against the frame limit and reserved
from a :class:`Budget` of bytes in flight before one body byte is read.

Why a challenge and not a timestamp. Freshness comes from the server's random challenge, so a
recorded header cannot be replayed on another connection to make the server buffer a body, and
no clock is trusted: a Raspberry Pi without a real-time clock boots in 1970 and must still join.
The client's nonce does the same for the reply. Why a digest: the bodies are sealed by the core
with the cluster name alone, so without it a body recorded earlier (an old push-pull, with an
old member list and old replicated state) could be spliced behind a fresh header of the same
length by someone on the path; bound to the header, a body is as fresh as its challenge, and
push-pull needs no anti-replay window of its own (datagrams have one: :mod:`gossip.replay`).

Deadlines: the header within ``header_timeout`` of the accept; the request body, and draining
the reply, each within ``timeout``; the client's whole exchange within ``timeout``. Only framing
and deadlines live here; the driver (:mod:`edgeagent.driver`) adds admission and counting
(:mod:`edgeagent.stream_limits`), and the footprint benchmark's lightweight peers reuse
:func:`serve_stream` and :func:`exchange`.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from gossip.errors import DecryptError
from gossip.keyring import OVERHEAD, Keyring
from gossip.messages import Address

from .advertise import unmap

STREAM_VERSION = 2  # bump with any change to the layout above (2: the body digest)
CHALLENGE_SIZE = 16  # 128 random bits: a challenge never repeats in practice
DIGEST_SIZE = 16  # of SHA-256: binds the body to its header
HEADER_PLAIN = struct.Struct(">BI16s16s16s")  # kind, body length, echo, nonce, body digest
HEADER_SIZE = OVERHEAD + HEADER_PLAIN.size  # 82 bytes on the wire
HEADER_AAD = b"edgeagent stream header v2\x00"  # prefixed to the cluster name
HEADER_TIMEOUT = 2.0  # accept to whole header: one LAN round trip with a wide margin


class Kind(enum.IntEnum):
    """Which side sealed a header."""

    REQUEST = 1
    REPLY = 2


class FrameError(Exception):
    """A stream header or body was short, late, oversized or did not authenticate."""


class FrameTooLarge(FrameError):
    """The header names a body longer than the limit (the body is never read)."""


class HeaderError(FrameError):
    """A header did not open with the keyring, or is not the one this connection expects."""


class Served(enum.Enum):
    """How :func:`serve_stream` ended."""

    ANSWERED = "answered"  # request read; the reply (if any) sent
    HEADER_TIMEOUT = "header_timeout"  # no whole header within header_timeout (idle, slowloris)
    UNAUTHENTICATED = "unauthenticated"  # the header did not open: no key, other cluster, garbage
    OVERSIZED = "oversized"  # the header names a body above the frame limit
    OVER_BUDGET = "over_budget"  # the bytes-in-flight budget cannot hold the body now
    FAILED = "failed"  # short or late body, closed early, or the reply could not be sent


@dataclass(frozen=True, slots=True)
class Header:
    """One header's plaintext."""

    kind: Kind
    length: int  # body bytes that follow
    echo: bytes  # the other side's challenge or nonce
    nonce: bytes  # this side's challenge or nonce
    digest: bytes = bytes(DIGEST_SIZE)  # body_digest() of the body that follows


def body_digest(body: bytes) -> bytes:
    """What a header carries to bind the body that follows it."""
    return hashlib.sha256(body).digest()[:DIGEST_SIZE]


@dataclass(frozen=True, slots=True)
class StreamAuth:
    """What seals and opens headers: the cluster keyring (shared, rotated in place) and name."""

    keyring: Keyring
    cluster: str
    random: Callable[[int], bytes] = field(default=os.urandom, repr=False)

    @property
    def aad(self) -> bytes:
        return HEADER_AAD + self.cluster.encode()

    def seal(self, header: Header) -> bytes:
        """The header's :data:`HEADER_SIZE` wire bytes."""
        plain = HEADER_PLAIN.pack(header.kind, header.length, header.echo, header.nonce, header.digest)
        return self.keyring.encrypt(plain, self.aad)

    def open(self, data: bytes) -> Header:
        """Open a header; raise :class:`HeaderError` for anything but a well-formed one."""
        if len(data) != HEADER_SIZE:
            raise HeaderError(f"header of {len(data)} bytes, not {HEADER_SIZE}")
        try:
            plain = self.keyring.decrypt(data, self.aad)
        except DecryptError as exc:
            raise HeaderError(str(exc)) from exc
        if len(plain) != HEADER_PLAIN.size:
            raise HeaderError("header plaintext of the wrong size")
        code, length, echo, nonce, digest = HEADER_PLAIN.unpack(plain)
        try:
            kind = Kind(code)
        except ValueError:
            raise HeaderError(f"unknown header kind {code}") from None
        return Header(kind, length, echo, nonce, digest)

    def expect(self, data: bytes, kind: Kind, echo: bytes) -> Header:
        """Open a header and check it is ``kind`` answering ``echo`` (else HeaderError)."""
        header = self.open(data)
        if header.kind is not kind or header.echo != echo:
            raise HeaderError("header is not for this connection")
        return header


@dataclass(frozen=True, slots=True)
class StreamSettings:
    """Bounds on one stream: body size and the two deadlines."""

    frame_limit: int  # largest body accepted (see stream_limits.frame_limit)
    timeout: float  # request body, reply drain; a client's whole exchange
    header_timeout: float = HEADER_TIMEOUT  # accept to whole request header


class Budget:
    """Bytes of request bodies in flight across every inbound stream, up to ``total``."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.in_flight = 0

    def take(self, n: int) -> bool:
        """Reserve ``n`` bytes; False (nothing reserved) if they do not fit now."""
        if self.in_flight + n > self.total:
            return False
        self.in_flight += n
        return True

    def give(self, n: int) -> None:
        """Release ``n`` bytes taken earlier."""
        self.in_flight -= n


async def serve_stream(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    handle: Callable[[bytes, Address], bytes | None],
    auth: StreamAuth,
    settings: StreamSettings,
    *,
    budget: Budget | None = None,
    authenticated: Callable[[], None] | None = None,
) -> Served:
    """Answer one inbound push-pull: challenge, header, body, ``handle``'s reply; then close.

    ``authenticated`` is called once the header opened (the connection is then a member's).
    """
    try:
        peer = writer.get_extra_info("peername")
        src: Address = (unmap(str(peer[0])), peer[1]) if peer else ("", 0)
        challenge = auth.random(CHALLENGE_SIZE)
        try:
            header = await asyncio.wait_for(
                _read_header(reader, writer, auth, challenge), settings.header_timeout
            )
        except TimeoutError:
            return Served.HEADER_TIMEOUT
        except HeaderError:
            return Served.UNAUTHENTICATED
        except (FrameError, OSError):
            return Served.FAILED
        if authenticated is not None:
            authenticated()
        if header.length > settings.frame_limit:
            return Served.OVERSIZED
        if budget is not None and not budget.take(header.length):
            return Served.OVER_BUDGET
        try:
            return await _answer(reader, writer, handle, auth, settings, header, src)
        finally:
            if budget is not None:
                budget.give(header.length)
    finally:
        writer.close()


async def _read_header(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, auth: StreamAuth, challenge: bytes
) -> Header:
    writer.write(challenge)
    await writer.drain()
    return auth.expect(await _read_exactly(reader, HEADER_SIZE), Kind.REQUEST, challenge)


async def _answer(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    handle: Callable[[bytes, Address], bytes | None],
    auth: StreamAuth,
    settings: StreamSettings,
    header: Header,
    src: Address,
) -> Served:
    try:
        body = await asyncio.wait_for(_read_exactly(reader, header.length), settings.timeout)
    except (FrameError, TimeoutError, OSError):
        return Served.FAILED
    if body_digest(body) != header.digest:
        return Served.UNAUTHENTICATED  # a body spliced behind someone else's header
    reply = handle(body, src)
    if reply is not None:
        sealed = auth.seal(Header(Kind.REPLY, len(reply), header.nonce, header.echo, body_digest(reply)))
        writer.write(sealed + reply)
        try:
            await asyncio.wait_for(writer.drain(), settings.timeout)
        except (TimeoutError, OSError):
            return Served.FAILED
    return Served.ANSWERED


async def exchange(
    dst: Address,
    data: bytes,
    local_addr: Address | None,
    auth: StreamAuth,
    settings: StreamSettings,
) -> bytes | None:
    """One outbound push-pull: send ``data`` to ``dst``, return its reply (None on failure)."""
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(settings.timeout):
            reader, writer = await asyncio.open_connection(dst[0], dst[1], local_addr=local_addr)
            challenge = await _read_exactly(reader, CHALLENGE_SIZE)
            nonce = auth.random(CHALLENGE_SIZE)
            writer.write(auth.seal(Header(Kind.REQUEST, len(data), challenge, nonce, body_digest(data))) + data)
            await writer.drain()
            header = auth.expect(await _read_exactly(reader, HEADER_SIZE), Kind.REPLY, nonce)
            if header.length > settings.frame_limit:
                raise FrameTooLarge(f"reply of {header.length} bytes exceeds {settings.frame_limit}")
            reply = await _read_exactly(reader, header.length)
            if body_digest(reply) != header.digest:
                raise HeaderError("the reply is not the body its header names")
            return reply
    except (FrameError, TimeoutError, OSError):
        return None
    finally:
        if writer is not None:
            writer.close()


async def _read_exactly(reader: asyncio.StreamReader, n: int) -> bytes:
    try:
        return await reader.readexactly(n)
    except asyncio.IncompleteReadError as exc:
        raise FrameError("connection closed inside a header or body") from exc
