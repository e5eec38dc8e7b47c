"""Push-pull streams: one length-prefixed request frame and one reply frame per TCP connection.

How it works. A frame is a 4-byte big-endian length followed by that many bytes (one sealed
push-pull message), bounded by the caller's ``limit`` (``max_stream_bytes``). The side that
starts a push-pull calls :func:`exchange`: connect, send the request frame, read the reply
frame. The listening side hands each accepted connection to :func:`serve_stream`, which reads
the request, asks ``handle`` for the reply and sends it. Connecting, reading a whole frame and
draining the reply are each bounded by ``timeout``, so a peer that sends half a frame
(slowloris) is cut off.

Only framing and deadlines live here: the gossip driver (:mod:`edgeagent.driver`) adds its
counters, its bound on concurrent inbound streams and its core, and the footprint benchmark's
lightweight peers reuse the same two functions.
"""

from __future__ import annotations

import asyncio
import enum
import struct
from collections.abc import Callable

from gossip.messages import Address

FRAME_HEADER = struct.Struct(">I")  # push-pull frame: 4-byte big-endian length prefix


class FrameError(Exception):
    """A stream frame was short, oversized or late."""


class FrameTooLarge(FrameError):
    """The frame's length prefix exceeds the limit (the body is never read)."""


class Served(enum.Enum):
    """How :func:`serve_stream` ended."""

    ANSWERED = "answered"  # request read; the reply (if any) sent
    OVERSIZED = "oversized"  # the request's length prefix exceeded the limit
    FAILED = "failed"  # short or late request, or the reply could not be sent


async def read_frame(reader: asyncio.StreamReader, limit: int) -> bytes:
    """Read one length-prefixed frame; raise :class:`FrameError` if longer than ``limit``."""
    try:
        header = await reader.readexactly(FRAME_HEADER.size)
        (length,) = FRAME_HEADER.unpack(header)
        if length > limit:
            raise FrameTooLarge(f"frame of {length} bytes exceeds {limit}")
        return await reader.readexactly(length)
    except asyncio.IncompleteReadError as exc:
        raise FrameError("connection closed inside a frame") from exc


def encode_frame(data: bytes) -> bytes:
    """Prefix ``data`` with its 4-byte big-endian length."""
    return FRAME_HEADER.pack(len(data)) + data


async def serve_stream(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    handle: Callable[[bytes, Address], bytes | None],
    limit: int,
    timeout: float,
) -> Served:
    """Answer one inbound push-pull: read the request, send ``handle``'s reply, close."""
    try:
        peer = writer.get_extra_info("peername")
        src: Address = (peer[0], peer[1]) if peer else ("", 0)
        try:
            frame = await asyncio.wait_for(read_frame(reader, limit), timeout)
        except FrameTooLarge:
            return Served.OVERSIZED
        except (FrameError, TimeoutError, OSError):
            return Served.FAILED
        reply = handle(frame, src)
        if reply is not None:
            writer.write(encode_frame(reply))
            try:
                await asyncio.wait_for(writer.drain(), timeout)
            except (TimeoutError, OSError):
                return Served.FAILED
        return Served.ANSWERED
    finally:
        writer.close()


async def exchange(
    dst: Address, data: bytes, local_addr: Address | None, limit: int, timeout: float
) -> bytes | None:
    """One outbound push-pull: send ``data`` to ``dst``, return its reply (None on failure)."""
    writer: asyncio.StreamWriter | None = None
    try:
        reader, connected = await asyncio.wait_for(
            asyncio.open_connection(dst[0], dst[1], local_addr=local_addr), timeout
        )
        writer = connected
        connected.write(encode_frame(data))
        return await asyncio.wait_for(_drain_and_read(reader, connected, limit), timeout)
    except (FrameError, TimeoutError, OSError):
        return None
    finally:
        if writer is not None:
            writer.close()


async def _drain_and_read(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, limit: int
) -> bytes:
    await writer.drain()
    return await read_frame(reader, limit)
