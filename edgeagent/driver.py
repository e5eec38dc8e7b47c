"""The gossip driver: a thin asyncio adapter around the sans-IO membership core, on its own thread.

How it works. :meth:`GossipDriver.start` spawns one thread running its own event loop. That
loop alone owns the core and two sockets bound to the same port: a non-blocking UDP socket for
datagrams and a TCP listener for push-pull streams. Every input (a datagram batch, a stream, a
timer, a command) ends in :meth:`GossipDriver._after_input`, which sends the datagrams the core
queued, opens the streams it asked for, hands its events to the application and re-arms the one
timer at ``core.get_timer()``.

Datagrams: the reader callback drains every readable datagram (up to :data:`MAX_DRAIN`) before
it returns, so a timer that fell due meanwhile runs after the inbox is empty: a probe never
times out while its ack waits in the socket buffer. A sender whose datagrams keep failing
validation (one of the core's refusal counters grew) runs out of its budget and is then read
only a few times a second (:class:`edgeagent.ratelimit.SenderBudget`; the rest dropped unread,
counted, one warning a minute), so its flood cannot starve the pings and acks of the others.
For :data:`~edgeagent.ratelimit.TAINT_S` after a datagram of it failed validation (and while it
is limited) a sender is *tainted*: its datagrams are
read but queued (at most :data:`MAX_BACKLOG`, the oldest shed and counted with the limited
ones) and handled :data:`BACKLOG_SLICE` s per turn of the loop, after the clean senders'
datagrams of the same drain, so a ping queued behind a flood is answered at once.

Streams: one push-pull per TCP connection, in the format of :mod:`edgeagent.streams` (a
sealed header is read and opened before any body, within a short header timeout; the body is
bounded by the frame limit, ``max_stream_bytes``, and by ``stream_timeout``). Before a byte is
read, :class:`edgeagent.stream_limits.Admission` decides whether the connection is served
(per-source and total caps; an idle unauthenticated connection gives its slot to a newcomer);
request bodies in flight share one budget, and our own push-pulls are capped too. Every drop
is counted in :class:`DriverStats` and logged, rate-limited, by reason.

Threads (DESIGN principle 2): the application's loop never touches the core. It sends commands
(callables run on the gossip thread with ``(core, now)``) through a thread-safe queue, woken by
``call_soon_threadsafe``, and gets the result back in a ``concurrent.futures.Future``; the
driver hands events and immutable :class:`View` snapshots to the application's loop through
an :class:`edgeagent.bridge.UpdateBridge`: the latest view and a bounded queue of events,
oldest dropped and counted (``events_dropped``) when the application's loop stalls. Nothing
mutable is shared, so a blocked application loop delays only the application (and costs
bounded memory): probes, acks and timers keep running here.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import logging
import queue
import socket
import sys
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Generic, Protocol, TypeVar

from gossip.config import MAX_DATAGRAM_BYTES, MAX_STREAM_BYTES
from gossip.errors import RemoteError
from gossip.events import Event, Member
from gossip.messages import Address

from . import streams
from .advertise import make_dual_stack, socket_address, unmap, wants_dual_stack
from .bridge import UpdateBridge
from .ratelimit import SenderBudget, WarnLimiter
from .stream_limits import MAX_OUTBOUND_STREAMS, Admission, DropLog, inbound_budget
from .streams import HEADER_TIMEOUT, Served, StreamAuth, StreamSettings
from .undecryptable import (
    DATAGRAM,
    NOTHING_UNDECRYPTABLE,
    STREAM,
    UndecryptableLog,
    UndecryptableReport,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

MAX_DRAIN = 256  # datagrams read per readiness callback; bounds one turn of the loop
FAST_SWITCH_INTERVAL_S = 0.0005  # the GIL switch interval while hostile senders are read
FAST_HOLD_S = 10.0  # ... and for this long after the last of their datagrams
MAX_BACKLOG = 1024  # tainted senders' datagrams read but not yet handled; the oldest are shed
BACKLOG_SLICE = 0.005  # s of handling them per turn of the loop, before reading the socket again
STREAM_TIMEOUT = 10.0  # connect / read-a-body deadline: memberlist DefaultLANConfig TCPTimeout
VIEW_INTERVAL = 1.0  # seconds between unsolicited View snapshots while metrics are served
# ... and without metrics: nothing then reads the counters between events but the forged-input
# log (a new incarnation, which the main loop saves, gets its View at once: _after_input), and
# each snapshot woke the main loop and every listener; at 1 s it was ~0.03 % of a core of a
# settled agent (N = 20, issue 13).
IDLE_VIEW_INTERVAL = 5.0
MIN_VIEW_GAP = 0.05  # s: events closer than this after a View wait for the next one (a View
# snapshots every member: one per event batch cost ~17 ms each with 5,000 phantoms, issue 14)
UDP_BUFFER_BYTES = 1 << 22  # SO_RCVBUF / SO_SNDBUF request, capped by net.core.[rw]mem_max


# DriverStats field counting each drop reason (stream_limits.DESCRIPTIONS, streams.Served).
_DROP_STATS = {
    "unauthenticated": "stream_headers_rejected",
    "header_timeout": "stream_headers_late",
    "oversized": "frames_oversized",
    "over_budget": "streams_over_budget",
    "per_source": "streams_per_source",
    "inbound_limit": "streams_rejected",
    "evicted": "streams_evicted",
    "outbound_limit": "streams_out_rejected",
    "failed": "stream_errors",
}


def stream_drops(driver_stats: Mapping[str, int]) -> dict[str, int]:
    """Dropped push-pull streams by reason (the keys of ``_DROP_STATS``), from a View's
    ``driver_stats``: what ``edgeagent status`` shows."""
    return {reason: int(driver_stats.get(stat, 0)) for reason, stat in _DROP_STATS.items()}


class Core(Protocol):
    """What the driver needs from a membership core (``gossip.core.Membership``)."""

    def receive(self, data: bytes, src: Address, now: float) -> None: ...
    def handle_stream(self, data: bytes, src: Address, now: float) -> bytes | None: ...
    def receive_stream_reply(self, data: bytes, src: Address, now: float) -> None: ...
    def stream_failed(self, dst: Address, now: float) -> None: ...
    def handle_timeout(self, now: float) -> None: ...
    def get_timer(self) -> float | None: ...
    def datagrams_to_send(self) -> list[tuple[Address, bytes]]: ...
    def streams_to_send(self) -> list[tuple[Address, bytes]]: ...
    def next_event(self) -> Event | None: ...
    def members(self) -> Iterable[Member]: ...

    @property
    def local_member(self) -> Member: ...
    @property
    def incarnation(self) -> int: ...
    @property
    def health_score(self) -> int: ...
    @property
    def pending_broadcasts(self) -> int: ...
    @property
    def recent_probe_rtts(self) -> tuple[tuple[int, float], ...]: ...
    @property
    def stats(self) -> Any: ...


C = TypeVar("C", bound=Core)


class DriverStopped(RuntimeError):
    """A command was sent to a driver that is not running."""


@dataclass(slots=True)
class DriverStats:
    """Counters kept by the driver itself (the core counts what it decodes)."""

    datagrams_oversized: int = 0  # longer than max_datagram_bytes: dropped unread
    send_errors: int = 0  # sendto failed (buffer full, unreachable)
    streams_in: int = 0  # inbound connections admitted
    streams_out: int = 0  # our push-pulls started
    streams_rejected: int = 0  # every inbound slot held an authenticated stream
    streams_per_source: int = 0  # over MAX_INBOUND_PER_SOURCE from one address
    streams_evicted: int = 0  # unauthenticated connections closed to make room
    stream_headers_late: int = 0  # no whole header within the header timeout
    stream_headers_rejected: int = 0  # the header did not open: no key, other cluster, garbage
    frames_oversized: int = 0  # the header named a body above the frame limit
    streams_over_budget: int = 0  # the bytes-in-flight budget could not hold the body
    streams_out_rejected: int = 0  # over MAX_OUTBOUND_STREAMS of our own
    stream_errors: int = 0  # short or late bodies, resets, failed outbound push-pulls
    datagrams_limited: int = 0  # dropped unread: their sender keeps failing validation (ratelimit)
    senders_limited: int = 0  # times a sender ran out of its budget for bad datagrams
    gil_fast_periods: int = 0  # times the short GIL switch interval went on (hostile senders)
    remote_errors: int = 0  # RemoteError raised by the core (normally it counts them itself)
    internal_errors: int = 0  # any other exception from the core: a bug, logged
    events_dropped: int = 0  # events the stalled main loop never saw (bridge queue full)


_DRIVER_STATS_FIELDS = tuple(f.name for f in dataclasses.fields(DriverStats))


@dataclass(frozen=True, slots=True)
class View:
    """An immutable snapshot of the core, taken on the gossip thread."""

    local: Member
    members: tuple[Member, ...]
    incarnation: int
    health_score: int
    pending_broadcasts: int
    core_stats: Mapping[str, int]
    probe_rtts: tuple[tuple[int, float], ...]  # (sample number, seconds), see Membership
    driver_stats: Mapping[str, int]
    taken_at: float  # the gossip loop's clock (time.monotonic)
    undecryptable: UndecryptableReport = NOTHING_UNDECRYPTABLE  # input that failed to decrypt


def _stats_dict(stats: Any) -> dict[str, int]:
    as_dict = getattr(stats, "as_dict", None)
    if callable(as_dict):  # gossip.stats.Stats: its per-kind counters flattened
        return {str(k): v for k, v in as_dict().items() if isinstance(v, int)}
    if dataclasses.is_dataclass(stats) and not isinstance(stats, type):
        return {k: v for k, v in dataclasses.asdict(stats).items() if isinstance(v, int)}
    if isinstance(stats, Mapping):
        return {str(k): v for k, v in stats.items() if isinstance(v, int)}
    return {}


def _counters(driver_stats: DriverStats) -> dict[str, int]:
    """The driver's counters as a dict: all ints, so a shallow copy (``dataclasses.asdict``
    recursed into every field and was half the cost of the once-a-second view, issue 13)."""
    return {name: getattr(driver_stats, name) for name in _DRIVER_STATS_FIELDS}


def take_view(
    core: Core,
    driver_stats: DriverStats,
    now: float,
    undecryptable: UndecryptableReport = NOTHING_UNDECRYPTABLE,
) -> View:
    """Snapshot ``core`` (call on the gossip thread only)."""
    return View(
        local=core.local_member,
        members=tuple(core.members()),
        incarnation=core.incarnation,
        health_score=core.health_score,
        pending_broadcasts=core.pending_broadcasts,
        core_stats=MappingProxyType(_stats_dict(core.stats)),
        probe_rtts=core.recent_probe_rtts,
        driver_stats=MappingProxyType(_counters(driver_stats)),
        taken_at=now,
        undecryptable=undecryptable,
    )


def _decrypt_errors(core: Core) -> int:
    """The core's count of inputs that failed to decrypt (0 for a core that does not count)."""
    stats = core.stats
    count = (
        stats.get("decrypt_errors", 0)
        if isinstance(stats, Mapping)
        else getattr(stats, "decrypt_errors", 0)
    )
    return int(count)


# The core's counters of input it refused: a datagram that moved one failed validation.
# Not the ceilings (unverified_refused, state_rejected): an honest member relaying what a
# flood taught it moves those too, and must not be limited for it.
_REFUSAL_STATS = ("decode_errors", "decrypt_errors", "out_of_range")


def _refusals(core: Core) -> int:
    """How much input the core has refused so far (a sum of its refusal counters)."""
    stats = core.stats
    if isinstance(stats, Mapping):
        return sum(int(stats.get(name, 0)) for name in _REFUSAL_STATS)
    return sum(int(getattr(stats, name, 0)) for name in _REFUSAL_STATS)


def _is_wildcard(host: str) -> bool:
    return host in ("", "0.0.0.0", "::")


class GossipDriver(Generic[C]):
    """Runs a membership core on real UDP and TCP sockets, on a dedicated thread.

    ``make_core(addr, now)`` builds the core on the gossip thread from the advertised address
    and that thread's clock.

    ``on_update(events, view)`` is called on ``main_loop`` after inputs that produced events,
    and every ``view_interval`` seconds with no events (:data:`IDLE_VIEW_INTERVAL`, or
    :data:`VIEW_INTERVAL` once :meth:`want_fresh_views`: fresh counters for metrics); a
    stalled main loop gets the latest view and at most ``max_queued_events`` events
    (:mod:`edgeagent.bridge`; the first may be an ``EventsDropped``).
    ``advertise`` is the address the core announces (port 0: the bound port); by default the
    bind address with the bound port. ``stream_auth`` seals and opens stream headers (the
    core's own keyring, so a rotation applies to both); ``max_stream_bytes`` is the frame limit
    (:func:`edgeagent.stream_limits.frame_limit` of the resolved config).
    """

    def __init__(
        self,
        make_core: Callable[[Address, float], C],
        bind: Address,
        *,
        main_loop: asyncio.AbstractEventLoop,
        on_update: Callable[[tuple[Event, ...], View], None],
        stream_auth: StreamAuth,
        advertise: Address | None = None,
        max_datagram_bytes: int = MAX_DATAGRAM_BYTES,
        max_stream_bytes: int = MAX_STREAM_BYTES,
        stream_timeout: float = STREAM_TIMEOUT,
        header_timeout: float = HEADER_TIMEOUT,
        max_queued_events: int | None = None,
    ) -> None:
        self._make_core = make_core
        self._bind = bind
        self._advertise = advertise
        self.view_interval = IDLE_VIEW_INTERVAL  # unsolicited View period (want_fresh_views)
        self._periodic: asyncio.TimerHandle | None = None
        self.bridge: UpdateBridge[View] = UpdateBridge(
            main_loop, on_update, max_events=max_queued_events
        )
        self._max_datagram = max_datagram_bytes
        self._auth = stream_auth
        self._stream_settings = StreamSettings(max_stream_bytes, stream_timeout, header_timeout)
        self._budget = streams.Budget(inbound_budget(max_stream_bytes))
        self._admission = Admission()
        self._drops = DropLog(log)
        self._commands: queue.SimpleQueue[
            tuple[Callable[[C, float], Any], concurrent.futures.Future[Any]]
        ] = queue.SimpleQueue()
        self._stats = DriverStats()
        self._undecryptable = UndecryptableLog()
        self._senders = SenderBudget(WarnLimiter(log))
        self._backlog: collections.deque[tuple[bytes, Address]] = collections.deque()
        self._backlog_scheduled = False
        self._fast, self._fast_until = False, 0.0
        self._default_switch = sys.getswitchinterval()
        self._pending_events: list[Event] = []  # not yet handed to the application
        self._publish_handle: asyncio.TimerHandle | None = None
        self._published_at = float("-inf")
        self._published_incarnation: int | None = None  # of the last View handed over
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._start_error: BaseException | None = None
        # Owned by the gossip thread once started:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._core: C | None = None
        self._udp: socket.socket | None = None
        self._server: asyncio.Server | None = None
        self._stopping: asyncio.Event | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_deadline: float | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._connections: dict[int, asyncio.Task[None]] = {}  # admitted, by Admission id
        self._next_connection = 0
        self._outbound = 0
        self._address: Address | None = None

    # -- application side (any thread) -------------------------------------------------------

    @property
    def address(self) -> Address:
        """The address the core advertises (known once :meth:`start` returned)."""
        if self._address is None:
            raise DriverStopped("driver not started")
        return self._address

    def start(self, timeout: float = 10.0) -> Address:
        """Bind the sockets, build the core and start the thread; return the advertised address.

        Raises ``OSError`` if the port cannot be bound.
        """
        self._thread = threading.Thread(target=self._thread_main, name="gossip", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError("gossip thread did not start")
        if self._start_error is not None:
            self._thread.join(timeout)
            raise self._start_error
        return self.address

    def call(self, fn: Callable[[C, float], T]) -> concurrent.futures.Future[T]:
        """Run ``fn(core, now)`` on the gossip thread; its result must be immutable."""
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        loop = self._loop
        if loop is None or loop.is_closed():
            future.set_exception(DriverStopped("gossip driver is not running"))
            return future
        self._commands.put((fn, future))
        try:
            loop.call_soon_threadsafe(self._run_commands)
        except RuntimeError:  # closed meanwhile; the closing thread may have failed it already
            with contextlib.suppress(concurrent.futures.InvalidStateError):
                future.set_exception(DriverStopped("gossip driver is not running"))
        return future

    async def acall(self, fn: Callable[[C, float], T]) -> T:
        """Await :meth:`call` from an asyncio loop."""
        return await asyncio.wrap_future(self.call(fn))

    async def snapshot(self) -> View:
        """A fresh :class:`View`, taken on the gossip thread."""
        return await self.acall(
            lambda core, now: take_view(core, self._stats, now, self._undecryptable.report())
        )

    def stop(self, timeout: float = 5.0) -> None:
        """Close the sockets and end the thread (no leave: send one first if wanted)."""
        loop, stopping = self._loop, self._stopping
        if loop is not None and stopping is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(stopping.set)
            except RuntimeError:
                pass
        if self._thread is not None:
            self._thread.join(timeout)
        if self._fast:  # the interval is the process's: give it back
            self._fast = False
            sys.setswitchinterval(self._default_switch)

    # -- gossip thread ---------------------------------------------------------------------

    def _thread_main(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve())
        except BaseException as exc:  # surfaced to start() if it happens before ready
            if not self._ready.is_set():
                self._start_error = exc
                self._ready.set()
            else:
                log.exception("gossip thread crashed")
        finally:
            loop.close()
            self._fail_pending_commands()  # commands queued while the loop was closing

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        udp, tcp = self._bind_sockets()
        self._udp = udp
        port = udp.getsockname()[1]
        host, adv_port = self._advertise if self._advertise is not None else (self._bind[0], 0)
        self._address = (host, adv_port or port)
        self._core = self._make_core(self._address, loop.time())
        self._server = await asyncio.start_server(self._serve_stream, sock=tcp)
        loop.add_reader(udp.fileno(), self._on_readable)
        self._ready.set()
        self._periodic = loop.call_later(self.view_interval, self._publish_periodic)
        self._after_input()
        try:
            await self._stopping.wait()
        finally:
            self._periodic.cancel()
            if self._publish_handle is not None:
                self._publish_handle.cancel()
            loop.remove_reader(udp.fileno())
            if self._timer is not None:
                self._timer.cancel()
            self._server.close()
            for task in list(self._tasks):
                task.cancel()
            if self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)
            udp.close()
            self._fail_pending_commands()

    def _bind_sockets(self) -> tuple[socket.socket, socket.socket]:
        host, port = self._bind
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        # With port 0 the kernel picks the UDP port; retry if TCP cannot have the same one.
        for _ in range(16 if port == 0 else 1):
            udp = socket.socket(family, socket.SOCK_DGRAM)
            tcp = socket.socket(family, socket.SOCK_STREAM)
            try:
                if wants_dual_stack(host):  # [::] reaches IPv4 peers too, or is refused
                    make_dual_stack(udp, self._bind)
                    make_dual_stack(tcp, self._bind)
                for sock, opt in ((udp, socket.SO_RCVBUF), (udp, socket.SO_SNDBUF)):
                    try:
                        sock.setsockopt(socket.SOL_SOCKET, opt, UDP_BUFFER_BYTES)
                    except OSError:
                        pass
                udp.setblocking(False)
                udp.bind((host, port))
                bound = udp.getsockname()[1]
                tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                tcp.bind((host, bound))
                tcp.listen(64)
                tcp.setblocking(False)
                return udp, tcp
            except OSError:
                udp.close()
                tcp.close()
                if port != 0:
                    raise
            except BaseException:
                udp.close()
                tcp.close()
                raise
        raise OSError(f"no port free for both UDP and TCP on {host}")

    def _now(self) -> float:
        assert self._loop is not None
        return self._loop.time()

    def _guard(self, fn: Callable[..., T], *args: Any) -> T | None:
        """Run one core input; a RemoteError is counted, anything else is a logged bug."""
        try:
            return fn(*args)
        except RemoteError:
            self._stats.remote_errors += 1
        except Exception:
            self._stats.internal_errors += 1
            log.exception("gossip core failed in %s", getattr(fn, "__name__", fn))
        return None

    def _feed(
        self, fn: Callable[[bytes, Address, float], T], data: bytes, src: Address, kind: str
    ) -> T | None:
        """Run one core input from ``src``; warn (rate-limited) if it failed to decrypt."""
        assert self._core is not None
        before, now = _decrypt_errors(self._core), self._now()
        result = self._guard(fn, data, src, now)
        if _decrypt_errors(self._core) != before:
            self._undecryptable.record(src, kind, now)
        return result

    def _hostile(self, now: float) -> None:
        """A tainted or limited sender's datagram: shorten the GIL switch interval.

        The gossip thread gives up the GIL at every recvfrom; while the main loop runs Python,
        getting it back takes up to the switch interval (5 ms by default), so under a flood
        the thread read ~200 datagrams a second and the kernel dropped the rest, pings
        included (issue 14). 0.5 ms bounds that wait, but costs the main loop forced
        switches on every request (the CoAP mesh's idle latency rose ~0.9 ms with it always
        on), so it holds only while hostile datagrams come, and :data:`FAST_HOLD_S` after."""
        self._fast_until = now + FAST_HOLD_S
        if not self._fast:
            self._fast = True
            self._stats.gil_fast_periods += 1
            sys.setswitchinterval(FAST_SWITCH_INTERVAL_S)

    def _calm(self, now: float) -> None:
        if self._fast and now >= self._fast_until:
            self._fast = False
            sys.setswitchinterval(self._default_switch)

    def _on_readable(self) -> None:
        assert self._udp is not None and self._core is not None
        udp, limit = self._udp, self._max_datagram
        senders, now, backlog = self._senders, self._now(), self._backlog
        for _ in range(MAX_DRAIN):
            try:
                data, src = udp.recvfrom(limit + 1)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:  # e.g. ICMP port unreachable reported on the socket
                continue
            if len(data) > limit:
                self._stats.datagrams_oversized += 1
                continue
            host = unmap(src[0])
            if not senders.admit(host, now):  # its sender keeps failing validation
                self._hostile(now)
                continue
            if senders.tainted(host, now):  # handled after the clean ones, shed if too many
                self._hostile(now)
                backlog.append((data, (host, src[1])))
                if len(backlog) > MAX_BACKLOG:
                    backlog.popleft()
                    senders.shed()
            else:
                self._receive(data, (host, src[1]), now)
        self._calm(now)
        self._drain_backlog()

    def _receive(self, data: bytes, src: Address, now: float) -> None:
        """One admitted datagram to the core; its outcome to the sender's budget."""
        core = self._core
        assert core is not None
        refused = _refusals(core)
        self._feed(core.receive, data, src, DATAGRAM)
        self._senders.outcome(src[0], _refusals(core) != refused, now)

    def _drain_backlog(self) -> None:
        """Handle tainted senders' datagrams for at most :data:`BACKLOG_SLICE` s, then let
        the loop read the socket (and answer the clean senders) before going on."""
        self._backlog_scheduled = False
        backlog, start = self._backlog, self._now()
        while backlog and (now := self._now()) - start < BACKLOG_SLICE:
            data, src = backlog.popleft()
            self._receive(data, src, now)
        if backlog:
            assert self._loop is not None
            self._backlog_scheduled = True
            self._loop.call_soon(self._drain_backlog_later)
        self._stats.datagrams_limited = self._senders.dropped
        self._stats.senders_limited = self._senders.limited
        self._after_input()

    def _drain_backlog_later(self) -> None:
        if self._backlog_scheduled:
            self._drain_backlog()

    def _on_timer(self) -> None:
        assert self._core is not None
        self._timer = None
        self._timer_deadline = None
        core, now = self._core, self._now()
        self._calm(now)
        self._guard(core.handle_timeout, now)
        self._after_input()

    def _run_commands(self) -> None:
        assert self._core is not None
        while True:
            try:
                fn, future = self._commands.get_nowait()
            except queue.Empty:
                break
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(self._core, self._now()))
            except BaseException as exc:
                future.set_exception(exc)
        self._after_input()

    def _fail_pending_commands(self) -> None:
        while True:
            try:
                _, future = self._commands.get_nowait()
            except queue.Empty:
                return
            with contextlib.suppress(concurrent.futures.InvalidStateError, RuntimeError):
                if future.set_running_or_notify_cancel():
                    future.set_exception(DriverStopped("gossip driver stopped"))

    def _after_input(self) -> None:
        """Flush every output of the core, then re-arm the timer."""
        core, loop = self._core, self._loop
        assert core is not None and loop is not None and self._udp is not None
        family = self._udp.family
        for dst, data in core.datagrams_to_send():
            try:
                self._udp.sendto(data, socket_address(dst, family))
            except OSError:
                self._stats.send_errors += 1
        for dst, data in core.streams_to_send():
            self._spawn(self._push_pull(dst, data))
        pending = self._pending_events
        while (event := core.next_event()) is not None:
            pending.append(event)
        # A new incarnation (a refutation) is persistent: the main loop saves it from the View,
        # so it gets one at once, event or not (not after IDLE_VIEW_INTERVAL).
        moved = core.incarnation != self._published_incarnation
        if (pending or moved) and self._publish_handle is None:
            wait = self._published_at + MIN_VIEW_GAP - loop.time()
            if wait <= 0:
                self._publish_pending()
            else:  # events in quick succession share one View (a snapshot of every member)
                self._publish_handle = loop.call_later(wait, self._publish_pending)
        deadline = core.get_timer()
        if deadline != self._timer_deadline or self._timer is None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._timer_deadline = deadline
            if deadline is not None:
                self._timer = loop.call_at(deadline, self._on_timer)

    def _publish_pending(self) -> None:
        if self._publish_handle is not None:
            self._publish_handle.cancel()
            self._publish_handle = None
        events, self._pending_events = tuple(self._pending_events), []
        self._publish(events)

    def _publish(self, events: tuple[Event, ...]) -> None:
        assert self._core is not None
        self._published_at = self._now()
        view = take_view(self._core, self._stats, self._now(), self._undecryptable.report())
        self._published_incarnation = view.incarnation
        self._stats.events_dropped += self.bridge.put(events, view)

    def _publish_periodic(self) -> None:
        assert self._loop is not None
        self._publish_pending()
        self._periodic = self._loop.call_later(self.view_interval, self._publish_periodic)

    def want_fresh_views(self) -> None:
        """Unsolicited views every VIEW_INTERVAL instead of IDLE_VIEW_INTERVAL (any thread).

        The next one is brought forward too: a feature that starts after the driver would
        otherwise see its first fresh counters only when the idle wait already armed ends.
        """
        self.view_interval = VIEW_INTERVAL
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # closed: the driver has stopped
                loop.call_soon_threadsafe(self._rearm_periodic)

    def _rearm_periodic(self) -> None:
        assert self._loop is not None
        if self._periodic is not None and not self._periodic.cancelled():
            self._periodic.cancel()
            self._periodic = self._loop.call_later(self.view_interval, self._publish_periodic)

    def _spawn(self, coro: Any) -> None:
        assert self._loop is not None
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve_stream(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        peer = writer.get_extra_info("peername")
        source = unmap(str(peer[0])) if peer else ""
        conn = self._next_connection
        self._next_connection += 1
        decision = self._admission.admit(conn, source)
        if not decision.admitted:
            self._drop(decision.reason or "inbound_limit", source)
            writer.close()
            return
        if decision.evict is not None:
            self._drop("evicted", decision.evict_source or "")
            evicted = self._connections.pop(decision.evict, None)
            if evicted is not None:
                evicted.cancel()
        task = asyncio.current_task()
        assert task is not None
        self._connections[conn] = task
        self._tasks.add(task)
        self._stats.streams_in += 1
        try:
            served = await streams.serve_stream(
                reader,
                writer,
                self._answer_stream,
                self._auth,
                self._stream_settings,
                budget=self._budget,
                authenticated=lambda: self._admission.authenticated(conn),
            )
        finally:
            self._admission.release(conn)
            self._connections.pop(conn, None)
            self._tasks.discard(task)
        if served is not Served.ANSWERED:
            self._drop(served.value, source)

    def _drop(self, reason: str, source: str) -> None:
        """Count one dropped stream under ``reason`` and log it (rate-limited)."""
        stat = _DROP_STATS[reason]
        setattr(self._stats, stat, getattr(self._stats, stat) + 1)
        self._drops.note(reason, source, self._now())

    def _answer_stream(self, frame: bytes, src: Address) -> bytes | None:
        assert self._core is not None
        reply = self._feed(self._core.handle_stream, frame, src, STREAM)
        self._after_input()
        return reply

    async def _push_pull(self, dst: Address, data: bytes) -> None:
        core = self._core
        assert core is not None
        if self._outbound >= MAX_OUTBOUND_STREAMS:
            self._drop("outbound_limit", dst[0])
            self._guard(core.stream_failed, dst, self._now())
            self._after_input()
            return
        self._outbound += 1
        self._stats.streams_out += 1
        host = self._bind[0]
        local_addr = None if _is_wildcard(host) else (host, 0)
        try:
            reply = await streams.exchange(
                dst, data, local_addr, self._auth, self._stream_settings
            )
        finally:
            self._outbound -= 1
        if reply is None:
            self._stats.stream_errors += 1
            self._guard(core.stream_failed, dst, self._now())
        else:
            self._feed(core.receive_stream_reply, reply, dst, STREAM)
        self._after_input()
