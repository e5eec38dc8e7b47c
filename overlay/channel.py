"""The agent-to-agent channel's multiplexer: many streams over one byte stream, sans-IO.

It runs over one mutually authenticated TLS connection per peer (the adapter in
``edgeagent/`` owns the socket); it carries one CoAP exchange per stream now, MQTT next.
In the style of h11 / h2 / aioquic: :meth:`Connection.receive_data` takes the bytes read and
returns events; ``open_stream`` / ``send_data`` / ``reset_stream`` / ``ping`` / ``close``
queue bytes that :meth:`Connection.data_to_send` hands back for writing; every call that
depends on time takes ``now``; :meth:`Connection.get_timer` says when to call
:meth:`Connection.handle_timeout`.

Frames
------
A 10-byte header, then the body::

    type u8 | flags u8 | stream id u32 | body length u32 (big-endian)

========  ======  ==========================================================================
type      stream  body
========  ======  ==========================================================================
HELLO 0   0       version u8, max frame u32, stream window u32, connection window u32,
                  max streams u32 (more bytes: ignored, for later versions). First frame
                  each way, sent once.
OPEN 1    s       the stream's opening bytes (e.g. a request head); flag END: nothing follows
DATA 2    s       stream bytes; flag END: the sender's last
RESET 3   s       error code u32: the stream is abandoned, both ways
PING 4    0       8 opaque bytes, answered by PONG 5 with the same bytes
GOAWAY 6  0       last stream id u32 (the highest of the receiver's streams the sender
                  processed or will), error code u32, a reason (UTF-8)
WINDOW 7  s or 0  increment u32 (1 .. 2^31-1) to the stream's or the connection's window
========  ======  ==========================================================================

Unknown frame types are skipped (later versions may add some); unknown flag bits are ignored.

Streams: the side that dialled (``client=True``) opens odd ids, the other even ids, each
strictly increasing; either side may open streams. A stream is open until both sides have
sent END, or one side sent RESET. At most ``max_streams`` streams opened by each side are
open at once (the receiver's announced limit).

Flow control (h2's, simplified): the bodies of DATA frames count against a per-stream and
a per-connection window of the receiver. OPEN bodies do not (like h2 HEADERS); they are
bounded by the frame size and the stream limit. Receiving more DATA than the window allows
is a violation. The application must call :meth:`Connection.acknowledge` for every byte
it was given in a :class:`DataReceived` (even after the stream ends or is reset); that
returns window to the peer with WINDOW frames once half of a window is consumed. Data that
arrives for a stream already closed here is dropped and its window returned at once.
:meth:`Connection.send_data` sends what the windows allow and returns how much; the rest
waits for :class:`WindowOpened`.

Limits and announcements: each side announces its limits in HELLO; announced values may
only be at or above the protocol floors (:data:`FLOOR_MAX_FRAME`, :data:`FLOOR_WINDOW`,
:data:`FLOOR_STREAMS`), and until the peer's HELLO arrives a side assumes the floors. So a
side can start sending at once, and limits only ever grow (no h2 SETTINGS races).

Errors: :meth:`Connection.receive_data` never raises. A protocol violation by the peer
(bad frame, frame too large, data beyond a window, a stream id out of order, a frame before
HELLO, a flood of PINGs while our output is not drained) yields one
:class:`ConnectionTerminated` event, queues a GOAWAY with the error code, resets every
stream, and any later input is ignored. Input is buffered only up to one frame (header +
``max_frame``): a header announcing a bigger body is a violation at once. The one error
that escapes this module is :class:`ChannelError`, raised by the ``send``-side calls when
the application asks for something the protocol forbids (a closed stream, the stream
limit, a frame too large, a connection going away or closed).

Liveness: with nothing received for ``keepalive_s`` a PING is sent; no frame at all within
``ping_timeout_s`` after it terminates the connection (code TIMEOUT). With no stream open
for ``idle_timeout_s`` an :class:`IdleTimeout` event tells the adapter to :meth:`close`.

Shutdown: :meth:`Connection.close` sends GOAWAY naming the last stream of the peer's
that will be served; no new streams are accepted or opened, open ones finish, then
:attr:`Connection.finished` is true and the socket may be closed. Receiving GOAWAY resets
our streams above its last stream id with ``retryable=True`` (the peer never processed
them, so even a non-idempotent request may be sent elsewhere).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

HEADER = struct.Struct("!BBII")
HEADER_SIZE = HEADER.size
_HELLO = struct.Struct("!BIIII")
_U32 = struct.Struct("!I")
_GOAWAY = struct.Struct("!II")
PROTOCOL_VERSION = 1
FLOOR_MAX_FRAME = 16_384
FLOOR_WINDOW = 65_535
FLOOR_STREAMS = 16
MAX_WINDOW = 2**31 - 1
MAX_FRAME_LIMIT = 1 << 24  # largest max_frame a side may announce or configure
MAX_STREAM_ID = 2**31 - 1
MAX_REASON_CHARS = 256
FLAG_END = 0x01


class FrameType(IntEnum):
    HELLO = 0
    OPEN = 1
    DATA = 2
    RESET = 3
    PING = 4
    PONG = 5
    GOAWAY = 6
    WINDOW = 7


class ErrorCode(IntEnum):
    NO_ERROR = 0
    PROTOCOL = 1
    FLOW_CONTROL = 2
    FRAME_SIZE = 3
    REFUSED = 4  # the stream was not processed: safe to send elsewhere
    CANCEL = 5
    INTERNAL = 6
    TIMEOUT = 7
    ENHANCE_YOUR_CALM = 8  # the peer floods us


class ChannelError(Exception):
    """The application asked for something the channel's protocol forbids (local misuse)."""


@dataclass(frozen=True, slots=True)
class ChannelConfig:
    """Our side's limits, announced in HELLO. Floors are the protocol's minimums."""

    max_frame: int = FLOOR_MAX_FRAME
    stream_window: int = 256 * 1024
    conn_window: int = 1024 * 1024
    max_streams: int = 128
    keepalive_s: float = 10.0
    ping_timeout_s: float = 5.0
    idle_timeout_s: float = 60.0
    max_output_bytes: int = 1 << 20  # our undrained output beyond which a PING flood is fatal

    def __post_init__(self) -> None:
        checks = (
            ("max_frame", self.max_frame, FLOOR_MAX_FRAME, MAX_FRAME_LIMIT),
            ("stream_window", self.stream_window, FLOOR_WINDOW, MAX_WINDOW),
            ("conn_window", self.conn_window, FLOOR_WINDOW, MAX_WINDOW),
            ("max_streams", self.max_streams, FLOOR_STREAMS, 1 << 16),
        )
        for name, value, low, high in checks:
            if not low <= value <= high:
                raise ValueError(f"channel {name} must be from {low} to {high}, not {value}")
        if min(self.keepalive_s, self.ping_timeout_s, self.idle_timeout_s) <= 0:
            raise ValueError("channel timeouts must be positive")


@dataclass(frozen=True, slots=True)
class Settings:
    """What a side announced in its HELLO."""

    max_frame: int = FLOOR_MAX_FRAME
    stream_window: int = FLOOR_WINDOW
    conn_window: int = FLOOR_WINDOW
    max_streams: int = FLOOR_STREAMS


# -- events --------------------------------------------------------------------------------


class Event:
    """Base of what receive_data / handle_timeout return."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class HelloReceived(Event):
    settings: Settings


@dataclass(frozen=True, slots=True)
class StreamOpened(Event):
    stream_id: int
    data: bytes
    end: bool


@dataclass(frozen=True, slots=True)
class DataReceived(Event):
    stream_id: int
    data: bytes  # acknowledge(stream_id, len(data)) once consumed
    end: bool


@dataclass(frozen=True, slots=True)
class StreamReset(Event):
    stream_id: int
    code: int
    by_peer: bool
    retryable: bool  # the peer never processed it


@dataclass(frozen=True, slots=True)
class WindowOpened(Event):
    stream_id: int  # 0: the connection's window


@dataclass(frozen=True, slots=True)
class PingAcked(Event):
    rtt_s: float


@dataclass(frozen=True, slots=True)
class GoAwayReceived(Event):
    last_stream_id: int
    code: int
    reason: str


@dataclass(frozen=True, slots=True)
class ConnectionTerminated(Event):
    code: int
    reason: str
    by_peer: bool


@dataclass(frozen=True, slots=True)
class IdleTimeout(Event):
    idle_s: float


class _Violation(Exception):
    def __init__(self, code: ErrorCode, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


@dataclass(slots=True)
class _Stream:
    send_window: int
    recv_window: int
    local_open: bool = True  # we may still send
    remote_open: bool = True  # the peer may still send
    unacked: int = 0  # delivered to the application, window not yet returned


def encode_frame(kind: int, flags: int, stream_id: int, body: bytes = b"") -> bytes:
    """One frame on the wire (also for tests and tools)."""
    return HEADER.pack(kind, flags, stream_id, len(body)) + body


class Connection:
    """One side of a channel connection; see the module docstring."""

    def __init__(self, *, client: bool, now: float, config: ChannelConfig | None = None) -> None:
        self.client = client
        self.config = config or ChannelConfig()
        self.peer = Settings()
        self._in = bytearray()
        self._out = bytearray()
        self._hello_received = False
        self._terminated = False
        self._goaway_sent = False
        self._goaway_received = False
        self._streams: dict[int, _Stream] = {}
        self._next_id = 1 if client else 2
        self._last_peer_id = 0
        self._served_up_to = MAX_STREAM_ID  # peer streams above this are refused (our GOAWAY)
        self._conn_send = FLOOR_WINDOW
        self._conn_recv = self.config.conn_window
        self._conn_unacked = 0  # delivered, window not yet returned
        self._delivered = 0  # delivered to the application and not acknowledged
        self._last_recv = now
        self._ping_sent_at: float | None = None
        self._ping_seq = 0
        self._idle_since: float | None = now
        self._idle_reported = False
        self.stats: dict[str, int] = {
            "frames_in": 0,
            "frames_out": 0,
            "violations": 0,
            "flow_control_violations": 0,
            "unknown_frames": 0,
            "dropped_data_bytes": 0,
            "refused_streams": 0,
            "ignored_after_close": 0,
        }
        c = self.config
        self._frame(
            FrameType.HELLO,
            0,
            0,
            _HELLO.pack(
                PROTOCOL_VERSION, c.max_frame, c.stream_window, c.conn_window, c.max_streams
            ),
        )

    # -- state -----------------------------------------------------------------------------

    @property
    def terminated(self) -> bool:
        """A violation, a timeout, an error GOAWAY or EOF ended the connection."""
        return self._terminated

    @property
    def finished(self) -> bool:
        """Nothing more will happen: terminated, or going away with no stream left."""
        going = self._goaway_sent or self._goaway_received
        return self._terminated or (going and not self._streams)

    @property
    def can_open(self) -> bool:
        return not (self._terminated or self._goaway_sent or self._goaway_received) and (
            self._open_by_us() < self.peer.max_streams and self._next_id <= MAX_STREAM_ID
        )

    def open_streams(self) -> int:
        return len(self._streams)

    def _open_by_us(self) -> int:
        parity = 1 if self.client else 0
        return sum(1 for sid in self._streams if sid % 2 == parity)

    def _ours(self, stream_id: int) -> bool:
        return stream_id % 2 == (1 if self.client else 0)

    def _used(self, stream_id: int) -> bool:
        """Whether ``stream_id`` was ever opened (by either side)."""
        return (
            stream_id < self._next_id if self._ours(stream_id) else stream_id <= self._last_peer_id
        )

    def send_window(self, stream_id: int) -> int:
        """Bytes send_data may send on ``stream_id`` now."""
        stream = self._streams.get(stream_id)
        if stream is None or not stream.local_open:
            return 0
        return max(0, min(stream.send_window, self._conn_send))

    # -- output ----------------------------------------------------------------------------

    def data_to_send(self) -> bytes:
        """The bytes to write to the socket (and forget)."""
        out = bytes(self._out)
        self._out.clear()
        return out

    def _frame(self, kind: int, flags: int, stream_id: int, body: bytes = b"") -> None:
        self._out += HEADER.pack(kind, flags, stream_id, len(body))
        self._out += body
        self.stats["frames_out"] += 1

    def _check_usable(self) -> None:
        if self._terminated:
            raise ChannelError("the channel connection is closed")

    def open_stream(self, data: bytes = b"", *, end: bool = False) -> int:
        """Open a stream with ``data`` as its first bytes (at most the peer's max frame)."""
        self._check_usable()
        if self._goaway_sent or self._goaway_received:
            raise ChannelError("the channel connection is going away: no new streams")
        if self._open_by_us() >= self.peer.max_streams:
            raise ChannelError(f"the peer allows {self.peer.max_streams} streams at once")
        if self._next_id > MAX_STREAM_ID:
            raise ChannelError("stream ids exhausted on this connection")
        if len(data) > self.peer.max_frame:
            raise ChannelError(f"opening bytes over the peer's frame size {self.peer.max_frame}")
        stream_id = self._next_id
        self._next_id += 2
        self._streams[stream_id] = _Stream(
            self.peer.stream_window if self._hello_received else FLOOR_WINDOW,
            self.config.stream_window,
            local_open=not end,
        )
        self._idle_since = None
        self._frame(FrameType.OPEN, FLAG_END if end else 0, stream_id, bytes(data))
        return stream_id

    def send_data(self, stream_id: int, data: bytes, *, end: bool = False) -> int:
        """Send as much of ``data`` as the windows allow; END only if all of it went."""
        self._check_usable()
        stream = self._streams.get(stream_id)
        if stream is None or not stream.local_open:
            raise ChannelError(f"stream {stream_id} is not open for sending")
        room = max(0, min(stream.send_window, self._conn_send, len(data)))
        view = memoryview(data)
        sent = 0
        while sent < room:
            chunk = view[sent : sent + min(room - sent, self.peer.max_frame)]
            sent += len(chunk)
            last = end and sent == len(data)
            self._frame(FrameType.DATA, FLAG_END if last else 0, stream_id, bytes(chunk))
        stream.send_window -= sent
        self._conn_send -= sent
        if end and sent == len(data):
            if not data:
                self._frame(FrameType.DATA, FLAG_END, stream_id)
            stream.local_open = False
            self._maybe_forget(stream_id, stream)
        return sent

    def reset_stream(self, stream_id: int, code: int = ErrorCode.CANCEL) -> None:
        """Abandon a stream both ways (no-op if it is already closed, or the connection)."""
        if not self._terminated and self._streams.pop(stream_id, None) is not None:
            self._frame(FrameType.RESET, 0, stream_id, _U32.pack(code & 0xFFFFFFFF))
            self._note_idle_if_empty()

    def acknowledge(self, stream_id: int, nbytes: int) -> None:
        """The application consumed ``nbytes`` it got in DataReceived on ``stream_id``."""
        if nbytes < 0 or nbytes > self._delivered:
            raise ChannelError(
                f"acknowledging {nbytes} bytes; {self._delivered} are unacknowledged"
            )
        self._delivered -= nbytes
        if self._terminated:
            return
        self._conn_unacked += nbytes
        if self._conn_unacked >= self.config.conn_window // 2:
            self._frame(FrameType.WINDOW, 0, 0, _U32.pack(self._conn_unacked))
            self._conn_recv += self._conn_unacked
            self._conn_unacked = 0
        stream = self._streams.get(stream_id)
        if stream is not None and stream.remote_open:
            stream.unacked += nbytes
            if stream.unacked >= self.config.stream_window // 2:
                self._frame(FrameType.WINDOW, 0, stream_id, _U32.pack(stream.unacked))
                stream.recv_window += stream.unacked
                stream.unacked = 0

    def ping(self, now: float) -> None:
        """Send a PING (one at a time); PingAcked reports the round trip."""
        self._check_usable()
        if self._ping_sent_at is None:
            self._ping_seq += 1
            self._ping_sent_at = now
            self._frame(FrameType.PING, 0, 0, self._ping_seq.to_bytes(8, "big"))

    def close(self, code: int = ErrorCode.NO_ERROR, reason: str = "") -> list[Event]:
        """Send GOAWAY. NO_ERROR: open streams finish; otherwise the connection ends now."""
        if self._terminated:
            return []
        if not self._goaway_sent:
            self._send_goaway(code, reason)
        if code != ErrorCode.NO_ERROR:
            return self._terminate(code, reason, by_peer=False, send_goaway=False)
        return []

    def _send_goaway(self, code: int, reason: str) -> None:
        self._goaway_sent = True
        self._served_up_to = self._last_peer_id
        text = reason.encode("utf-8", "replace")[: 4 * MAX_REASON_CHARS]
        body = _GOAWAY.pack(self._last_peer_id, code & 0xFFFFFFFF) + text
        self._frame(FrameType.GOAWAY, 0, 0, body[: self.peer.max_frame])

    def _terminate(
        self, code: int, reason: str, *, by_peer: bool, send_goaway: bool = True
    ) -> list[Event]:
        events: list[Event] = [
            StreamReset(sid, code, by_peer, retryable=False) for sid in sorted(self._streams)
        ]
        self._streams.clear()
        if send_goaway and not self._goaway_sent:
            self._send_goaway(code, reason)
        self._terminated = True
        self._in = bytearray()  # (rebound, not cleared: receive_data may hold a view of it)
        events.append(ConnectionTerminated(code, reason, by_peer))
        return events

    def _maybe_forget(self, stream_id: int, stream: _Stream) -> None:
        if not stream.local_open and not stream.remote_open:
            del self._streams[stream_id]
            self._note_idle_if_empty()

    def _note_idle_if_empty(self) -> None:
        if not self._streams and self._idle_since is None:
            self._idle_since = self._last_recv
            self._idle_reported = False

    # -- input -----------------------------------------------------------------------------

    def receive_data(self, data: bytes, now: float) -> list[Event]:
        """Bytes read from the socket -> events. Never raises."""
        if self._terminated:
            self.stats["ignored_after_close"] += 1
            return []
        self._in += data
        events: list[Event] = []
        view = memoryview(self._in)
        at = 0
        try:
            while len(view) - at >= HEADER_SIZE and not self._terminated:
                kind, flags, stream_id, length = HEADER.unpack_from(view, at)
                if length > self.config.max_frame:
                    raise _Violation(ErrorCode.FRAME_SIZE, f"frame of {length} bytes")
                if len(view) - at - HEADER_SIZE < length:
                    break
                body = bytes(view[at + HEADER_SIZE : at + HEADER_SIZE + length])
                at += HEADER_SIZE + length
                self.stats["frames_in"] += 1
                self._last_recv = now
                self._dispatch(kind, flags, stream_id, body, now, events)
        except _Violation as violation:
            self.stats["violations"] += 1
            self.stats["flow_control_violations"] += violation.code == ErrorCode.FLOW_CONTROL
            events.extend(self._terminate(violation.code, violation.reason, by_peer=False))
        finally:
            view.release()
        if self._terminated:
            self._in = bytearray()
        else:
            del self._in[:at]
        return events

    def receive_eof(self) -> list[Event]:
        """The peer closed its side of the socket (or the socket died)."""
        if self._terminated:
            return []
        code = ErrorCode.NO_ERROR if self.finished else ErrorCode.INTERNAL
        return self._terminate(
            code, "connection closed by the peer", by_peer=True, send_goaway=False
        )

    def _dispatch(
        self, kind: int, flags: int, stream_id: int, body: bytes, now: float, events: list[Event]
    ) -> None:
        if not self._hello_received:
            if kind != FrameType.HELLO:
                raise _Violation(ErrorCode.PROTOCOL, "first frame is not HELLO")
            self._on_hello(stream_id, body, events)
            return
        if kind == FrameType.HELLO:
            raise _Violation(ErrorCode.PROTOCOL, "second HELLO")
        if kind in (FrameType.PING, FrameType.PONG, FrameType.GOAWAY):
            if stream_id != 0:
                raise _Violation(ErrorCode.PROTOCOL, f"{FrameType(kind).name} on a stream")
            if kind == FrameType.GOAWAY:
                self._on_goaway(body, events)
            else:
                self._on_ping(kind, body, now, events)
        elif kind == FrameType.WINDOW:
            self._on_window(stream_id, body, events)
        elif kind in (FrameType.OPEN, FrameType.DATA, FrameType.RESET):
            if stream_id == 0 or stream_id > MAX_STREAM_ID:
                raise _Violation(
                    ErrorCode.PROTOCOL, f"{FrameType(kind).name} on stream {stream_id}"
                )
            if kind == FrameType.OPEN:
                self._on_open(flags, stream_id, body, events)
            elif kind == FrameType.DATA:
                self._on_data(flags, stream_id, body, events)
            else:
                self._on_reset(stream_id, body, events)
        else:
            self.stats["unknown_frames"] += 1

    def _on_hello(self, stream_id: int, body: bytes, events: list[Event]) -> None:
        if stream_id != 0 or len(body) < _HELLO.size:
            raise _Violation(ErrorCode.PROTOCOL, "malformed HELLO")
        version, max_frame, stream_window, conn_window, max_streams = _HELLO.unpack_from(body)
        if version != PROTOCOL_VERSION:
            raise _Violation(ErrorCode.PROTOCOL, f"channel version {version}, we speak 1")
        if not (
            FLOOR_MAX_FRAME <= max_frame <= MAX_FRAME_LIMIT
            and FLOOR_WINDOW <= stream_window <= MAX_WINDOW
            and FLOOR_WINDOW <= conn_window <= MAX_WINDOW
            and max_streams >= FLOOR_STREAMS
        ):
            raise _Violation(ErrorCode.PROTOCOL, "HELLO limits below the protocol floors")
        self.peer = Settings(max_frame, stream_window, conn_window, max_streams)
        self._hello_received = True
        self._conn_send += conn_window - FLOOR_WINDOW
        for sid, stream in self._streams.items():
            if self._ours(sid):
                stream.send_window += stream_window - FLOOR_WINDOW
        events.append(HelloReceived(self.peer))

    def _on_open(self, flags: int, stream_id: int, body: bytes, events: list[Event]) -> None:
        if self._ours(stream_id) or stream_id <= self._last_peer_id:
            raise _Violation(ErrorCode.PROTOCOL, f"OPEN of stream {stream_id} out of order")
        self._last_peer_id = stream_id
        if stream_id > self._served_up_to:
            self.stats["refused_streams"] += 1  # after our GOAWAY: the peer knows
            return
        if len(self._streams) - self._open_by_us() >= self.config.max_streams:
            raise _Violation(ErrorCode.PROTOCOL, f"over {self.config.max_streams} streams")
        end = bool(flags & FLAG_END)
        self._streams[stream_id] = _Stream(
            self.peer.stream_window, self.config.stream_window, remote_open=not end
        )
        self._idle_since = None
        events.append(StreamOpened(stream_id, body, end))

    def _take_window(self, stream: _Stream | None, stream_id: int, size: int) -> None:
        if size > self._conn_recv:
            raise _Violation(ErrorCode.FLOW_CONTROL, "data beyond the connection window")
        if stream is not None and size > stream.recv_window:
            raise _Violation(ErrorCode.FLOW_CONTROL, f"data beyond stream {stream_id}'s window")
        self._conn_recv -= size
        if stream is not None:
            stream.recv_window -= size

    def _on_data(self, flags: int, stream_id: int, body: bytes, events: list[Event]) -> None:
        stream = self._streams.get(stream_id)
        if stream is None:
            if not self._used(stream_id):
                raise _Violation(ErrorCode.PROTOCOL, f"DATA on stream {stream_id}, never opened")
            self._take_window(None, stream_id, len(body))  # closed here: drop, return window
            self.stats["dropped_data_bytes"] += len(body)
            self._delivered += len(body)
            self.acknowledge(stream_id, len(body))
            return
        if not stream.remote_open:
            raise _Violation(ErrorCode.PROTOCOL, f"DATA on stream {stream_id} after its END")
        self._take_window(stream, stream_id, len(body))
        end = bool(flags & FLAG_END)
        if not body and not end:
            return  # an empty frame tells nothing: no event (empty-frame floods stay cheap)
        self._delivered += len(body)
        events.append(DataReceived(stream_id, body, end))
        if end:
            stream.remote_open = False
            self._maybe_forget(stream_id, stream)

    def _on_reset(self, stream_id: int, body: bytes, events: list[Event]) -> None:
        if len(body) != _U32.size:
            raise _Violation(ErrorCode.FRAME_SIZE, "RESET body is not 4 bytes")
        if not self._used(stream_id):
            raise _Violation(ErrorCode.PROTOCOL, f"RESET of stream {stream_id}, never opened")
        if self._streams.pop(stream_id, None) is not None:
            (code,) = _U32.unpack(body)
            events.append(StreamReset(stream_id, code, True, retryable=code == ErrorCode.REFUSED))
            self._note_idle_if_empty()

    def _on_window(self, stream_id: int, body: bytes, events: list[Event]) -> None:
        if len(body) != _U32.size:
            raise _Violation(ErrorCode.FRAME_SIZE, "WINDOW body is not 4 bytes")
        (increment,) = _U32.unpack(body)
        if not 0 < increment <= MAX_WINDOW:
            raise _Violation(ErrorCode.PROTOCOL, f"WINDOW increment {increment}")
        if stream_id == 0:
            if self._conn_send + increment > MAX_WINDOW:
                raise _Violation(ErrorCode.FLOW_CONTROL, "connection window over 2^31-1")
            self._conn_send += increment
        else:
            if stream_id > MAX_STREAM_ID or not self._used(stream_id):
                raise _Violation(ErrorCode.PROTOCOL, f"WINDOW on stream {stream_id}, never opened")
            stream = self._streams.get(stream_id)
            if stream is None:
                return
            if stream.send_window + increment > MAX_WINDOW:
                raise _Violation(ErrorCode.FLOW_CONTROL, f"stream {stream_id} window over 2^31-1")
            stream.send_window += increment
        events.append(WindowOpened(stream_id))

    def _on_ping(self, kind: int, body: bytes, now: float, events: list[Event]) -> None:
        if len(body) != 8:
            raise _Violation(ErrorCode.FRAME_SIZE, "PING body is not 8 bytes")
        if kind == FrameType.PING:
            if len(self._out) > self.config.max_output_bytes:
                raise _Violation(ErrorCode.ENHANCE_YOUR_CALM, "PING flood, output not drained")
            self._frame(FrameType.PONG, 0, 0, body)
        elif self._ping_sent_at is not None and body == self._ping_seq.to_bytes(8, "big"):
            events.append(PingAcked(max(0.0, now - self._ping_sent_at)))
            self._ping_sent_at = None

    def _on_goaway(self, body: bytes, events: list[Event]) -> None:
        if len(body) < _GOAWAY.size:
            raise _Violation(ErrorCode.FRAME_SIZE, "GOAWAY body under 8 bytes")
        last, code = _GOAWAY.unpack_from(body)
        reason = body[_GOAWAY.size :].decode("utf-8", "replace")[:MAX_REASON_CHARS]
        self._goaway_received = True
        events.append(GoAwayReceived(last, code, reason))
        for sid in sorted(s for s in self._streams if self._ours(s) and s > last):
            del self._streams[sid]
            events.append(StreamReset(sid, ErrorCode.REFUSED, True, retryable=True))
        self._note_idle_if_empty()
        if code != ErrorCode.NO_ERROR:
            events.extend(self._terminate(code, reason, by_peer=True, send_goaway=False))

    # -- time ------------------------------------------------------------------------------

    def _awaiting_pong(self) -> bool:
        """A PING is out and nothing at all has come back since (any frame proves life)."""
        return self._ping_sent_at is not None and self._last_recv < self._ping_sent_at

    def get_timer(self) -> float | None:
        """When handle_timeout should next run (None: never, the connection is over)."""
        if self._terminated:
            return None
        c = self.config
        if self._awaiting_pong():
            assert self._ping_sent_at is not None
            due = self._ping_sent_at + c.ping_timeout_s
        else:
            due = self._last_recv + c.keepalive_s
        if self._idle_since is not None and not self._idle_reported:
            due = min(due, self._idle_since + c.idle_timeout_s)
        return due

    def handle_timeout(self, now: float) -> list[Event]:
        """Keepalive, dead-peer and idle checks due at ``now``."""
        if self._terminated:
            return []
        c = self.config
        events: list[Event] = []
        if self._awaiting_pong():
            assert self._ping_sent_at is not None
            if now - self._ping_sent_at >= c.ping_timeout_s:
                return self._terminate(ErrorCode.TIMEOUT, "no answer to PING", by_peer=False)
        elif now - self._last_recv >= c.keepalive_s:
            self._ping_sent_at = None  # any frame since proved the peer alive: a fresh PING
            self.ping(now)
        if self._idle_since is not None and not self._idle_reported:
            if now - self._idle_since >= c.idle_timeout_s:
                self._idle_reported = True
                events.append(IdleTimeout(now - self._idle_since))
        return events
