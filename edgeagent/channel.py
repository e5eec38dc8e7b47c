"""The agent-to-agent channel: one mutual-TLS connection per peer, many requests in flight.

How it works
------------
:class:`Channel` is the asyncio adapter around the sans-IO multiplexer
:class:`overlay.channel.Connection` (frames, streams, flow control, keepalive, GOAWAY) and the
TLS material of :mod:`edgeagent.mtls`:

- **Dialling.** :meth:`Channel.request` sends one request on a fresh stream of the pooled
  connection to that peer (dialled on first use: TCP, then TLS 1.3 with both certificates,
  then the peer's certificate must name the member we meant: :func:`mtls.check_peer`) and
  returns the reply. Concurrent requests to one peer share one dial. A peer that cannot be
  reached (or is refused) is not dialled again before a backoff (exponential with jitter,
  :data:`BACKOFF_MIN_S` .. :data:`BACKOFF_MAX_S`): requests meanwhile fail at once with
  :class:`ChannelUnavailable` ``retryable=True``, so the balancer picks another instance
  instead of queueing behind a dead node.
- **Serving.** The listener does the TLS handshake itself (``start_tls``, bounded by
  :data:`HANDSHAKE_TIMEOUT_S`) under :class:`edgeagent.stream_limits.Admission`'s caps (per
  source and in total; a connection still handshaking gives its slot to a newer one), so
  failed handshakes are counted and logged rate-limited, never logged by asyncio once each.
  A stream the peer opens is read to its END (bounded by :data:`MAX_MESSAGE_BYTES`) and
  given to the handler with the peer's verified identity; the handler's reply goes back on
  the stream.
- **Streamed replies** (CoAP Observe): :meth:`Channel.stream` sends a request the same way
  but returns a :class:`ChannelStream` whose :meth:`~ChannelStream.read` gives the reply's
  bytes as they arrive (``b""`` at END); :meth:`~ChannelStream.close` RESETs the stream if
  it is still open. A handler that returns an async iterator of bytes instead of bytes
  streams its parts on the stream and then END; a RESET from the peer (or the connection
  ending) cancels the handler's task, so its ``finally`` frees what it held. Unread bytes
  count against the same buffer budgets, at most :data:`MAX_MESSAGE_BYTES` per stream.
- **Failure.** A connection that ends (EOF, a protocol violation, a PING unanswered, GOAWAY)
  fails its requests with :class:`ChannelUnavailable`: ``retryable`` is true when the peer
  certainly never processed the request (a refused stream, a stream above the GOAWAY's last
  id, a connection that never opened), so even a non-idempotent request may go elsewhere.
  With no stream open for the multiplexer's idle timeout a connection is closed.
- **Writes.** Frames queued during one event-loop turn go out in one write at its end
  (:meth:`_Link.flush`): under load many requests or replies share one TLS record and one
  ``send`` (counted: ``writes``). The socket has TCP_NODELAY (asyncio's default).
- **One connection per direction.** Each side dials its own connection for its own requests
  and serves the peer's on the peer's connection (no simultaneous-open tie-break to get
  wrong; two connections per busy pair).

Timing uses the loop's monotonic clock; certificate validity uses ``wall`` (the agent's
trusted wall clock, see :mod:`edgeagent.mtls`).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import itertools
import logging
import random
import ssl
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from overlay import channel as mux
from overlay.pki import CertIdentity

from . import mtls
from .logs import fields
from .ratelimit import WarnLimiter
from .stream_limits import Admission

log = logging.getLogger("edgeagent.channel")

CONNECT_TIMEOUT_S = 5.0  # TCP connect plus TLS handshake, dialling
HANDSHAKE_TIMEOUT_S = 5.0  # TLS handshake of an inbound connection
MAX_INBOUND = 64  # inbound connections at once (members; a hostile host holds few slots)
MAX_INBOUND_PER_SOURCE = 4
MAX_MESSAGE_BYTES = 1 << 20  # one request or reply (a CoAP message with block-wise is far less)
LINK_BUFFER_BYTES = 2 << 20  # bytes of unfinished messages held for one connection
TOTAL_BUFFER_BYTES = 8 << 20  # ... and for all connections of the agent
MAX_SERVING = 256  # peers' requests being handled at once (more: REFUSED, retried elsewhere)
BACKOFF_MIN_S = 0.5
BACKOFF_MAX_S = 30.0
READ_CHUNK = 64 * 1024

Handler = Callable[[CertIdentity, bytes], Awaitable[bytes | AsyncIterator[bytes]]]


class ChannelUnavailable(Exception):
    """The request could not be completed over the channel; ``retryable``: never processed."""

    def __init__(self, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


@dataclass(frozen=True, slots=True)
class Peer:
    """A member to reach: its name and node id (who the certificate must name), its address."""

    name: str
    node_id: str | None
    host: str
    port: int

    @property
    def key(self) -> str:
        return self.node_id or self.name


@dataclass(slots=True)
class _Inbox:
    """A stream's received bytes until END (or its failure)."""

    chunks: list[bytes] = field(default_factory=list)
    size: int = 0
    done: asyncio.Future[bytes] | None = None
    queue: asyncio.Queue[bytes | ChannelUnavailable] | None = None  # a streamed reply


class _Link:
    """One TLS connection and its multiplexer; reads, timers and writes on the event loop."""

    def __init__(
        self,
        conn: mux.Connection,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        identity: CertIdentity,
        owner: Channel,
    ) -> None:
        self.conn, self.reader, self.writer = conn, reader, writer
        self.identity = identity
        self.owner = owner
        self.inboxes: dict[int, _Inbox] = {}
        self.buffered = 0  # bytes held in inboxes (bounded by LINK_BUFFER_BYTES)
        self.window = asyncio.Event()  # set when a send window opened
        self.slots = asyncio.Event()  # set when a stream ended (a slot may be free)
        self.going_away = False
        self.tasks: set[asyncio.Task[None]] = set()  # handlers serving the peer's requests
        self.serving: dict[int, asyncio.Task[None]] = {}  # ... by stream (a RESET cancels)
        self.runner: asyncio.Task[None]  # run(), set by Channel._start_link
        self.closed = asyncio.Event()
        self._flush_due = False

    @property
    def usable(self) -> bool:
        """New requests may use this connection (now, or when a stream slot frees)."""
        return not (self.going_away or self.conn.terminated or self.closed.is_set())

    def flush(self) -> None:
        """Write what the multiplexer queued at the end of this event-loop turn.

        Every request and reply of the turn then goes out in one TLS record and one
        ``send`` (and the peer wakes once for them all), not one of each per frame.
        """
        if not self._flush_due:
            self._flush_due = True
            asyncio.get_running_loop().call_soon(self.flush_now)

    def flush_now(self) -> None:
        self._flush_due = False
        data = self.conn.data_to_send()
        if data and not self.writer.is_closing():
            self.owner.stats["writes"] += 1
            self.writer.write(data)

    async def run(self) -> None:
        """Read and time until the connection is over, then fail what is left and close."""
        timer = asyncio.ensure_future(self._timer())
        try:
            while not self.conn.finished:
                try:
                    data = await self.reader.read(READ_CHUNK)
                except (OSError, ssl.SSLError):
                    data = b""
                if self._flush_due:  # our output is drained before input is judged (PING flood)
                    self.flush_now()
                now = asyncio.get_running_loop().time()
                events = self.conn.receive_data(data, now) if data else self.conn.receive_eof()
                self.dispatch(events)
                self.flush()
                if not data:
                    break
        finally:
            timer.cancel()
            self._fail_all("the channel connection closed")
            self.closed.set()
            self.slots.set()
            self.window.set()
            self.flush_now()  # a GOAWAY or RESET queued last goes out before the close
            self.writer.close()
            with contextlib.suppress(Exception):
                await self.writer.wait_closed()

    async def _timer(self) -> None:
        loop = asyncio.get_running_loop()
        while (due := self.conn.get_timer()) is not None:
            await asyncio.sleep(min(max(0.0, due - loop.time()), 5.0))
            self.dispatch(self.conn.handle_timeout(loop.time()))
            self.flush()
            if self.conn.finished:
                self.flush_now()
                self.writer.close()
                return

    def dispatch(self, events: list[mux.Event]) -> None:
        for event in events:
            match event:
                case mux.StreamOpened(stream_id, data, end):
                    self._on_opened(stream_id, data, end)
                case mux.DataReceived(stream_id, data, end):
                    self._on_data(stream_id, data, end)
                case mux.StreamReset(stream_id, code, _, retryable):
                    self._on_reset(stream_id, code, retryable)
                case mux.WindowOpened() | mux.HelloReceived():  # HELLO may grow send windows
                    self.window.set()
                case mux.IdleTimeout():
                    self.going_away = True
                    self.owner.stats["idle_closed"] += 1
                    self.dispatch(self.conn.close())
                case mux.GoAwayReceived():
                    self.going_away = True
                case mux.ConnectionTerminated(code, _, _):
                    self.going_away = True
                    if code != mux.ErrorCode.NO_ERROR:
                        self.owner.stats["connections_failed"] += 1
        if events:
            self.slots.set()
        if self.conn.terminated:
            self.window.set()

    def _on_opened(self, stream_id: int, data: bytes, end: bool) -> None:
        inbox = self.inboxes[stream_id] = _Inbox()
        self._append(stream_id, inbox, data, end)

    def _on_data(self, stream_id: int, data: bytes, end: bool) -> None:
        if data:
            self.conn.acknowledge(stream_id, len(data))
        inbox = self.inboxes.get(stream_id)
        if inbox is not None:
            self._append(stream_id, inbox, data, end)

    def _append(self, stream_id: int, inbox: _Inbox, data: bytes, end: bool) -> None:
        """Hold a stream's bytes until END, within the message and buffer limits."""
        over = inbox.size + len(data) > MAX_MESSAGE_BYTES
        if over or not self.owner.reserve(self, len(data)):
            self.owner.stats["oversized_messages" if over else "over_budget"] += 1
            self.conn.reset_stream(
                stream_id, mux.ErrorCode.CANCEL if over else mux.ErrorCode.REFUSED
            )
            why = "message too large" if over else "receive buffers full"
            self._finish(stream_id, ChannelUnavailable(why, retryable=not over))
            return
        inbox.size += len(data)
        if inbox.queue is not None:  # a streamed reply: hand over each part
            if data:
                inbox.queue.put_nowait(data)
            if end:
                self.inboxes.pop(stream_id, None)
                inbox.queue.put_nowait(b"")
            return
        inbox.chunks.append(data)
        if not end:
            return
        message = b"".join(inbox.chunks)
        self._release(self.inboxes.pop(stream_id))
        if inbox.done is None:  # the peer's request: serve it
            self._serve_soon(stream_id, message)
        elif not inbox.done.done():
            inbox.done.set_result(message)

    def _release(self, inbox: _Inbox, nbytes: int | None = None) -> None:
        n = inbox.size if nbytes is None else min(nbytes, inbox.size)
        self.owner.release(self, n)
        inbox.size -= n

    def _on_reset(self, stream_id: int, code: int, retryable: bool) -> None:
        retryable = retryable or code == mux.ErrorCode.REFUSED
        task = self.serving.get(stream_id)
        if task is not None:  # the peer gave up on a request we are serving
            task.cancel()
        self._finish(stream_id, ChannelUnavailable(f"stream reset ({code})", retryable=retryable))

    def _finish(self, stream_id: int, exc: ChannelUnavailable | None) -> None:
        """Drop a stream's inbox; fail its waiting request with ``exc`` (None: cancel it)."""
        inbox = self.inboxes.pop(stream_id, None)
        if inbox is None:
            return
        self._release(inbox)
        if inbox.queue is not None:
            inbox.queue.put_nowait(exc or ChannelUnavailable("cancelled", retryable=False))
        if inbox.done is not None and not inbox.done.done():
            if exc is None:
                inbox.done.cancel()
            else:
                inbox.done.set_exception(exc)

    def _fail_all(self, why: str) -> None:
        for stream_id in list(self.inboxes):
            self._finish(stream_id, ChannelUnavailable(why, retryable=False))
        for task in list(self.tasks):
            task.cancel()

    def _serve_soon(self, stream_id: int, request: bytes) -> None:
        if len(self.owner.serving_tasks) >= MAX_SERVING:
            self.owner.stats["serving_refused"] += 1
            self.conn.reset_stream(stream_id, mux.ErrorCode.REFUSED)  # retryable elsewhere
            return
        task = asyncio.ensure_future(self._serve(stream_id, request))
        self.tasks.add(task)
        self.serving[stream_id] = task
        self.owner.serving_tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        task.add_done_callback(lambda _t: self.serving.pop(stream_id, None))
        task.add_done_callback(self.owner.serving_tasks.discard)

    async def _serve(self, stream_id: int, request: bytes) -> None:
        self.owner.stats["served"] += 1
        try:
            reply = await self.owner.handler(self.identity, request)
        except Exception:
            log.exception("channel handler failed", extra=fields(peer=self.identity.name))
            self.conn.reset_stream(stream_id, mux.ErrorCode.INTERNAL)
            self.flush()
            return
        with contextlib.suppress(mux.ChannelError, ChannelUnavailable):
            if isinstance(reply, bytes):
                await self.send_all(stream_id, reply)
                return
            try:
                await self._send_parts(stream_id, reply)
            except (mux.ChannelError, ChannelUnavailable, asyncio.CancelledError):
                raise
            except Exception:
                log.exception(
                    "channel stream handler failed", extra=fields(peer=self.identity.name)
                )
                self.conn.reset_stream(stream_id, mux.ErrorCode.INTERNAL)
                self.flush()

    async def _send_parts(self, stream_id: int, parts: AsyncIterator[bytes]) -> None:
        """A streamed reply: each part as it comes, then END (closing the iterator always)."""
        self.owner.stats["streams_served"] += 1
        try:
            async for part in parts:
                await self.send_all(stream_id, part, end=False)
            await self.send_all(stream_id, b"")
        finally:
            aclose = getattr(parts, "aclose", None)
            if aclose is not None:
                await aclose()

    async def send_all(self, stream_id: int, data: bytes, end: bool = True) -> None:
        """Send ``data`` (and END) on ``stream_id``, waiting for window as needed."""
        sent = 0
        while True:
            sent += self.conn.send_data(stream_id, data[sent:], end=end)
            self.flush()
            if sent >= len(data):
                return
            self.window.clear()
            if self.conn.send_window(stream_id) == 0:
                await self.window.wait()
            if self.conn.terminated:
                raise ChannelUnavailable("the channel connection closed", retryable=False)

    async def _open(self, data: bytes, inbox: _Inbox) -> int:
        """Open a stream carrying the start of ``data`` (waiting for a free stream slot), with
        ``inbox`` for its reply; the rest of ``data`` is the caller's to send."""
        while not self.conn.can_open:
            if not self.usable:
                raise ChannelUnavailable("the channel connection is going away", retryable=True)
            self.slots.clear()
            await self.slots.wait()
        first = data[: mux.FLOOR_MAX_FRAME]
        try:
            stream_id = self.conn.open_stream(first, end=len(first) == len(data))
        except mux.ChannelError as exc:
            raise ChannelUnavailable(str(exc), retryable=True) from None
        self.inboxes[stream_id] = inbox
        self.flush()
        return stream_id

    async def request(self, data: bytes) -> bytes:
        """Send one request on a new stream and wait for its reply (the caller times out)."""
        done: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        stream_id = await self._open(data, _Inbox(done=done))
        try:
            if len(data) > mux.FLOOR_MAX_FRAME:
                await self.send_all(stream_id, data[mux.FLOOR_MAX_FRAME :])
            return await done
        except asyncio.CancelledError:
            self.conn.reset_stream(stream_id, mux.ErrorCode.CANCEL)
            self._finish(stream_id, None)
            self.flush()
            raise

    async def open_streamed(self, data: bytes) -> ChannelStream:
        """Send one request on a new stream; its reply is read part by part."""
        inbox = _Inbox(queue=asyncio.Queue())
        stream_id = await self._open(data, inbox)
        stream = ChannelStream(self, stream_id, inbox)
        try:
            if len(data) > mux.FLOOR_MAX_FRAME:
                await self.send_all(stream_id, data[mux.FLOOR_MAX_FRAME :])
        except BaseException:
            stream.close()
            raise
        return stream


class ChannelStream:
    """A streamed reply being received (see :meth:`Channel.stream`)."""

    def __init__(self, link: _Link, stream_id: int, inbox: _Inbox) -> None:
        self._link, self.stream_id, self._inbox = link, stream_id, inbox
        assert inbox.queue is not None
        self._queue = inbox.queue
        self.ended = False

    async def read(self) -> bytes:
        """The next bytes of the reply; ``b""`` once it ended. Raises ChannelUnavailable."""
        if self.ended:
            return b""
        item = await self._queue.get()
        if isinstance(item, ChannelUnavailable):
            self.ended = True
            raise item
        self._link._release(self._inbox, len(item))
        self.ended = not item
        return item

    def close(self) -> None:
        """Stop receiving: RESET the stream if it is still open; free what is buffered."""
        self.ended = True
        link = self._link
        if self.stream_id in link.inboxes:
            link.conn.reset_stream(self.stream_id, mux.ErrorCode.CANCEL)
            link.flush()
        link.inboxes.pop(self.stream_id, None)
        link._release(self._inbox)


class Channel:
    """The pool of channel connections of one agent, and its listener."""

    def __init__(
        self,
        tls: mtls.ChannelTls,
        handler: Handler,
        *,
        wall: Callable[[], dt.datetime] | None = None,
        config: mux.ChannelConfig | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.tls = tls
        self.handler = handler
        self.wall = wall or (lambda: dt.datetime.now(dt.UTC))
        self.config = config or mux.ChannelConfig()
        self.rng = rng or random.Random()
        self.stats: Counter[str] = Counter()
        self._links: dict[str, _Link] = {}
        self._dialing: dict[str, asyncio.Future[_Link]] = {}
        self._backoff: dict[str, tuple[int, float]] = {}  # key -> (failures, not before)
        self._inbound: set[_Link] = set()
        self._admission = Admission(MAX_INBOUND, MAX_INBOUND_PER_SOURCE)
        self._handshaking: dict[int, asyncio.Task[None]] = {}
        self._conn_ids = itertools.count(1)
        self._server: asyncio.Server | None = None
        self._warnings = WarnLimiter(log)  # one per reason a minute, with the count suppressed
        self.serving_tasks: set[asyncio.Task[None]] = set()
        self._buffered = 0

    def reserve(self, link: _Link, nbytes: int) -> bool:
        """Take ``nbytes`` of receive buffer for ``link``; False when a budget is full."""
        if (
            link.buffered + nbytes > LINK_BUFFER_BYTES
            or self._buffered + nbytes > TOTAL_BUFFER_BYTES
        ):
            return False
        link.buffered += nbytes
        self._buffered += nbytes
        return True

    def release(self, link: _Link, nbytes: int) -> None:
        link.buffered -= nbytes
        self._buffered -= nbytes

    # -- dialling --------------------------------------------------------------------------

    async def request(self, peer: Peer, data: bytes, timeout: float) -> bytes:
        """Send ``data`` to ``peer``'s handler and return its reply.

        Raises ChannelUnavailable (``retryable``: the peer never saw it) or TimeoutError.
        """
        if len(data) > MAX_MESSAGE_BYTES:
            raise ValueError(f"request of {len(data)} bytes over {MAX_MESSAGE_BYTES}")
        async with asyncio.timeout(timeout):
            link = await self._link(peer)
            self.stats["requests"] += 1
            return await link.request(data)

    async def stream(self, peer: Peer, data: bytes, timeout: float) -> ChannelStream:
        """Send ``data`` to ``peer``'s handler; its reply comes part by part (Observe).

        ``timeout`` bounds dialling and sending only. Raises like :meth:`request`.
        """
        if len(data) > MAX_MESSAGE_BYTES:
            raise ValueError(f"request of {len(data)} bytes over {MAX_MESSAGE_BYTES}")
        async with asyncio.timeout(timeout):
            link = await self._link(peer)
            self.stats["streams"] += 1
            return await link.open_streamed(data)

    async def _link(self, peer: Peer) -> _Link:
        link = self._links.get(peer.key)
        if link is not None and link.usable:
            return link
        failures, not_before = self._backoff.get(peer.key, (0, 0.0))
        if asyncio.get_running_loop().time() < not_before:
            self.stats["backoff_refusals"] += 1
            raise ChannelUnavailable(
                f"{peer.name}: backing off after {failures} failures", retryable=True
            )
        pending = self._dialing.get(peer.key)
        if pending is None:
            key = peer.key
            pending = self._dialing[key] = asyncio.ensure_future(self._dial(peer))
            pending.add_done_callback(lambda _f: self._dialing.pop(key, None))
        return await asyncio.shield(pending)

    async def _dial(self, peer: Peer) -> _Link:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                reader, writer = await asyncio.open_connection(
                    peer.host, peer.port, ssl=self.tls.client, server_hostname=""
                )
        except ssl.SSLCertVerificationError as exc:  # a certificate not of the mesh CA
            self._failed(peer, "refused_peers", f"refused {peer.name} at {peer.host}: {exc}")
            raise ChannelUnavailable(f"{peer.name}: {exc}", retryable=True) from None
        except (OSError, TimeoutError) as exc:
            self._failed(peer, "connect_failures", f"cannot reach {peer.name}: {exc or 'timeout'}")
            raise ChannelUnavailable(f"{peer.name}: {exc or 'timeout'}", retryable=True) from None
        try:
            identity = mtls.peer_identity(
                writer.get_extra_info("ssl_object"), self.tls.ca_cert, self.wall()
            )
            mtls.check_peer(identity, peer.name, peer.node_id)
        except mtls.PeerRefused as exc:
            writer.close()
            self._failed(peer, "refused_peers", f"refused {peer.name} at {peer.host}: {exc}")
            raise ChannelUnavailable(f"{peer.name}: {exc}", retryable=True) from None
        self._backoff.pop(peer.key, None)
        conn = mux.Connection(client=True, now=loop.time(), config=self.config)
        link = self._links[peer.key] = self._start_link(conn, reader, writer, identity, peer.key)
        self.stats["connections_dialled"] += 1
        return link

    def _failed(self, peer: Peer, counter: str, message: str) -> None:
        self.stats[counter] += 1
        now = asyncio.get_running_loop().time()
        failures = self._backoff.get(peer.key, (0, 0.0))[0] + 1
        delay = min(BACKOFF_MAX_S, BACKOFF_MIN_S * 2 ** (failures - 1))
        self._backoff[peer.key] = (failures, now + delay * self.rng.uniform(0.5, 1.0))
        self._warnings.warn(counter, now, message, reason=counter, peer=peer.name)

    def _start_link(
        self,
        conn: mux.Connection,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        identity: CertIdentity,
        key: str | None,
    ) -> _Link:
        link = _Link(conn, reader, writer, identity, self)
        link.flush()  # our HELLO
        link.runner = asyncio.ensure_future(link.run())
        link.runner.add_done_callback(lambda _t: self._link_closed(link, key))
        if key is None:
            self._inbound.add(link)
        return link

    def _link_closed(self, link: _Link, key: str | None) -> None:
        if key is not None and self._links.get(key) is link:
            del self._links[key]
        self._inbound.discard(link)

    # -- serving ---------------------------------------------------------------------------

    async def serve(self, host: str, port: int) -> tuple[str, int]:
        """Listen on ``host:port`` (0: any free port); returns the bound address."""
        self._server = await asyncio.start_server(self._accept, host, port)
        bound = self._server.sockets[0].getsockname()
        return bound[0], bound[1]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        source = str(writer.get_extra_info("peername", ("?", 0))[0])
        conn_id = next(self._conn_ids)
        decision = self._admission.admit(conn_id, source)
        loop = asyncio.get_running_loop()
        if not decision.admitted:
            self.stats[f"inbound_{decision.reason}"] += 1
            reason = f"inbound_{decision.reason}"
            self._warnings.warn(
                reason, loop.time(), "refused a channel connection", reason=reason, source=source
            )
            writer.close()
            return
        if decision.evict is not None and decision.evict in self._handshaking:
            self.stats["inbound_evicted"] += 1
            self._handshaking[decision.evict].cancel()
        task = asyncio.current_task()
        assert task is not None
        self._handshaking[conn_id] = task
        try:
            identity = await self._handshake(writer, source)
        except asyncio.CancelledError:
            writer.close()
            return
        finally:
            self._handshaking.pop(conn_id, None)
        if identity is None:
            self._admission.release(conn_id)
            return
        self._admission.authenticated(conn_id)
        conn = mux.Connection(client=False, now=loop.time(), config=self.config)
        link = self._start_link(conn, reader, writer, identity, None)
        link.runner.add_done_callback(lambda _t: self._admission.release(conn_id))
        self.stats["connections_accepted"] += 1

    async def _handshake(self, writer: asyncio.StreamWriter, source: str) -> CertIdentity | None:
        """TLS on an accepted connection, then who the client's certificate names (or None)."""
        now = asyncio.get_running_loop().time()
        try:
            await writer.start_tls(self.tls.server, ssl_handshake_timeout=HANDSHAKE_TIMEOUT_S)
            return mtls.peer_identity(
                writer.get_extra_info("ssl_object"), self.tls.ca_cert, self.wall()
            )
        except (OSError, TimeoutError, ssl.SSLError, mtls.PeerRefused) as exc:
            self.stats["inbound_refused"] += 1
            self._warnings.warn(
                "inbound_refused",
                now,
                "refused a channel connection: no valid certificate of this mesh's CA",
                reason="inbound_refused",
                source=source,
                error=str(exc) or type(exc).__name__,
            )
            writer.close()
            return None

    async def close(self) -> None:
        """Stop listening, send GOAWAY on every connection, wait briefly, close them."""
        if self._server is not None:
            self._server.close()
        links = [*self._links.values(), *self._inbound]
        for link in links:
            link.dispatch(link.conn.close())
            link.flush()
        for task in list(self._handshaking.values()):
            task.cancel()
        if links:
            await asyncio.wait([link.runner for link in links], timeout=1.0)
        for link in links:
            link.flush_now()
            link.writer.close()
            link.runner.cancel()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)

    def status(self) -> dict[str, int]:
        """Counters and connection counts (``edgeagent status``, metrics)."""
        return {"outbound": len(self._links), "inbound": len(self._inbound), **self.stats}
