"""A deterministic network simulator that runs many gossip cores on virtual time.

How it works: one binary heap of timestamped entries drives everything; there
is no fixed tick. An entry is a core timer, a datagram arriving, a push-pull
stream request / reply / connect failure arriving, a scheduled callback, or the
end of a graceful leave. Popping an entry sets ``now``, feeds the one core it
concerns, then *flushes* that core: its datagrams and stream messages are put
on the virtual network (each one drawing loss, latency and jitter from the
single network ``random.Random``), its events go to the ``on_event`` hooks, and
its timer is re-armed only when ``get_timer()`` changed. Stale timer entries
are skipped lazily when popped (each carries the deadline it was armed for and
the node's generation, bumped on crash / restart).

Everything is derived from one seed: the network RNG, each core's own
``random.Random``, each keyring's nonce source and the cluster key. Same seed,
same calls -> the same event trace, byte for byte (``tests/gossip/
test_seed_traces.py`` holds the core to it).

For tests: ``record_events=True`` keeps every node's events (``events_of``);
``wait_for(cond, timeout)`` runs until a condition holds; ``converged(names)``
checks a subset; each node's keyring is ``sim.nodes[name].keyring`` (key
rotation). The single-core helpers at the end (``make_keyring``, ``seal``,
``sent``, ``drain_events``) talk to one core with hand-made datagrams.

Network model:

- Datagrams (UDP): lost with the link's (or the global) loss probability,
  delayed by latency +/- uniform jitter; dropped when the sender may not reach
  the receiver (partition or one-way block) or nobody is alive at the address.
  Every datagram counts against its sender when sent, lost or not.
- Streams (TCP, push-pull): no loss, latency each way. A request across a
  partition or block (either direction, TCP needs both) or to a dead address
  fails at the sender after ``connect_timeout``. The reply goes back to the
  same incarnation of the requester only.
- A starved node reads each incoming datagram late by a uniform draw in
  ``[lo, hi]`` per packet, while its timers fire on time (a CPU-starved
  process whose socket buffer is read late).
- ``crash`` stops a node cold (no timers, no delivery). ``restart`` makes a new
  core under the same name and address with incarnation ``old + 1`` and joins
  it to live nodes, with a higher boot epoch (the node's generation), as the
  agent's persisted epoch would be. ``leave`` calls ``core.leave`` and keeps the node running
  for ``linger`` seconds so the leave spreads, then stops it.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from gossip.codec import DatagramHeader, decode_datagram, destination_tag, encode_datagram
from gossip.config import GossipConfig
from gossip.events import Event, Member
from gossip.keyring import Keyring
from gossip.messages import Address, MemberState, Message

GOSSIP_PORT = 7946  # memberlist's default bind port, used for every virtual address
DEFAULT_CONNECT_TIMEOUT = 1.0  # seconds before a stream to an unreachable peer fails
DEFAULT_LEAVE_LINGER = 2.0  # seconds a leaving node keeps gossiping before it stops
MAX_TIMER_REFIRES = 1000  # same node's timer firing this often at one instant = core bug

# Heap entry kinds. An entry is (time, seq, kind, node, a, b); seq keeps order total.
_TIMER = 0  # a = generation, b = deadline armed
_DGRAM = 1  # a = source address, b = sealed bytes
_STREAM_REQ = 2  # a = (source node, its generation), b = sealed bytes
_STREAM_REPLY = 3  # a = generation of the requester, b = (replier address, sealed bytes)
_STREAM_FAIL = 4  # a = generation of the requester, b = destination address
_CALL = 5  # b = callable with no arguments
_STOP = 6  # a = generation (end of a graceful leave)


class CoreLike(Protocol):
    """The part of ``gossip.core.Membership`` the simulator drives."""

    @property
    def incarnation(self) -> int: ...

    def members(self) -> list[Member]: ...
    def join(self, seeds: Sequence[Address], now: float) -> Any: ...
    def leave(self, now: float) -> Any: ...
    def receive(self, data: bytes, src: Address, now: float) -> Any: ...
    def handle_stream(self, data: bytes, src: Address, now: float) -> bytes | None: ...
    def receive_stream_reply(self, data: bytes, src: Address, now: float) -> Any: ...
    def stream_failed(self, dst: Address, now: float) -> Any: ...
    def handle_timeout(self, now: float) -> Any: ...
    def get_timer(self) -> float | None: ...
    def datagrams_to_send(self) -> list[tuple[Address, bytes]]: ...
    def streams_to_send(self) -> list[tuple[Address, bytes]]: ...
    def next_event(self) -> Event | None: ...


CoreFactory = Callable[..., CoreLike]
EventHook = Callable[[float, str, Event], None]
WireTap = Callable[[float, str, Address, bytes, str], None]


class SimulationError(RuntimeError):
    """The simulation cannot go on (misuse, or a core that never advances its timer)."""


@dataclass(frozen=True, slots=True)
class Link:
    """Overrides for one direction of one link; None keeps the global value."""

    loss: float | None = None
    latency: float | None = None
    jitter: float | None = None


class SimNode:
    """One simulated host: a core, an address, and what it has sent."""

    __slots__ = (
        "name",
        "index",
        "addr",
        "core",
        "keyring",
        "alive",
        "status",
        "generation",
        "timer_at",
        "starve",
        "group",
        "datagrams_sent",
        "datagram_bytes_sent",
        "streams_sent",
        "stream_bytes_sent",
        "datagrams_received",
        "_refire_at",
        "_refires",
    )

    def __init__(self, name: str, index: int, addr: Address, core: CoreLike, keyring: Keyring) -> None:
        self.name = name
        self.index = index
        self.addr = addr
        self.core = core
        self.keyring = keyring  # the core's own keyring (install / use / remove rotate keys)
        self.alive = True
        self.status = "up"  # "up" | "leaving" | "left" | "crashed"
        self.generation = 0
        self.timer_at: float | None = None
        self.starve: tuple[float, float] | None = None
        self.group = 0
        self.datagrams_sent = 0
        self.datagram_bytes_sent = 0
        self.streams_sent = 0  # requests and replies
        self.stream_bytes_sent = 0
        self.datagrams_received = 0
        self._refire_at = -1.0
        self._refires = 0

    @property
    def bytes_sent(self) -> int:
        """Every sealed byte this node put on the wire, datagrams and streams."""
        return self.datagram_bytes_sent + self.stream_bytes_sent

    def __repr__(self) -> str:
        return f"SimNode({self.name!r}, {self.addr}, {self.status})"


def _default_factory(*args: Any, **kwargs: Any) -> CoreLike:
    from gossip.core import Membership  # imported late: the simulator also drives stand-ins

    core: CoreLike = Membership(*args, **kwargs)
    return core


class Simulator:
    """Many gossip cores on one virtual network and one virtual clock."""

    def __init__(
        self,
        seed: int | str,
        config: GossipConfig,
        *,
        latency: float = 0.001,
        jitter: float = 0.0005,
        loss: float = 0.0,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        core_factory: CoreFactory = _default_factory,
        record_events: bool = False,
    ) -> None:
        self.seed = seed
        self.config = config
        self.latency = latency
        self.jitter = jitter
        self.loss = loss
        self.connect_timeout = connect_timeout
        self.rng = random.Random(seed)
        self.key = self.rng.randbytes(32)
        self.nodes: dict[str, SimNode] = {}
        self.now = 0.0
        self.max_datagram_bytes = 0
        self.datagrams_lost = 0  # random loss
        self.datagrams_blocked = 0  # partition or one-way block
        self.datagrams_undeliverable = 0  # nobody alive at the address
        self.streams_failed = 0
        self._factory = core_factory
        self._by_addr: dict[Address, SimNode] = {}
        self._heap: list[tuple[Any, ...]] = []
        self._seq = 0
        self._hooks: list[EventHook] = []
        self._taps: list[WireTap] = []
        self._links: dict[tuple[int, int], Link] = {}
        self._blocked: set[tuple[int, int]] = set()
        # Every node's events, in order, when recording (restarts continue the list).
        self.events: dict[str, list[Event]] = {}
        if record_events:
            self.on_event(self._record_event)

    # ----------------------------------------------------------------- hooks

    def on_event(self, callback: EventHook) -> None:
        """Call ``callback(now, node_name, event)`` for every event of every core."""
        self._hooks.append(callback)

    def on_datagram(self, callback: WireTap) -> None:
        """Call ``callback(now, src_name, dst_addr, sealed, fate)`` for every datagram sent.

        ``fate`` is "delivered" (scheduled for delivery), "lost", "blocked" or
        "undeliverable". For debugging cores: open ``sealed`` with ``sim.key``.
        """
        self._taps.append(callback)

    def schedule(self, at: float, fn: Callable[[], Any]) -> None:
        """Run ``fn()`` at virtual time ``at`` (read ``sim.now`` inside it)."""
        self._push(max(at, self.now), _CALL, None, None, fn)

    def call(self, name: str, fn: Callable[[Any, float], Any]) -> Any:
        """Run ``fn(core, now)`` on a live node now, then flush its outputs."""
        node = self._live(name)
        result = fn(node.core, self.now)
        self._flush(node)
        return result

    # ------------------------------------------------------------ membership

    def add_node(
        self,
        name: str,
        *,
        join: Iterable[str] = (),
        meta: bytes = b"",
        config: GossipConfig | None = None,
    ) -> SimNode:
        """Start a node now and join it to the named nodes (none: it stands alone)."""
        if name in self.nodes:
            raise SimulationError(f"node {name!r} already exists")
        index = len(self.nodes)
        addr = (f"10.{(index >> 16) & 255}.{(index >> 8) & 255}.{index & 255}", GOSSIP_PORT)
        core, keyring = self._make_core(name, addr, 0, meta, config)
        node = SimNode(name, index, addr, core, keyring)
        self.nodes[name] = node
        self._by_addr[addr] = node
        self._join(node, join)
        return node

    def add_cluster(
        self,
        count: int,
        *,
        prefix: str = "n",
        seeds: int = 3,
        spacing: float = 0.01,
        meta: bytes = b"",
        width: int | None = None,
    ) -> list[SimNode]:
        """Add ``count`` nodes, ``spacing`` seconds apart, each joining up to ``seeds``
        random nodes already added (cheap bootstrap for large clusters).

        Names are ``prefix`` + the index, zero-padded to ``width`` digits (default:
        at least 3). Run the simulator afterwards to let the cluster converge.
        """
        if width is None:
            width = max(3, len(str(count - 1)))
        added: list[SimNode] = []
        start = self.now
        end = start
        for i in range(count):
            name = f"{prefix}{i:0{width}d}"
            at = start + i * spacing
            if at > self.now:
                self.run_until(at)
            earlier = [n.name for n in added if n.alive]
            join = self.rng.sample(earlier, min(seeds, len(earlier)))
            added.append(self.add_node(name, join=join, meta=meta))
            end = at
        self.run_until(end)
        return added

    def add_converged_cluster(
        self, count: int, *, prefix: str = "n", meta: bytes = b"", width: int | None = None
    ) -> list[SimNode]:
        """Add ``count`` nodes now that already know each other: a warm start.

        Each core's member table is filled directly with every other member ALIVE at
        incarnation 0 and verified, through the core's own path for a verified Alive
        (``Membership._add_node``: the table, and a random place in the probe list), as
        after a settled bootstrap; no join storm is simulated (that is O(N^2) deliveries,
        hours of CPU at N = 10,000). What is not skipped: every core still has its own
        Alive queued from its start (a few seconds of gossip drain it) and its tickers
        staggered from now, so run some settle time before measuring. Names as in
        :meth:`add_cluster`. Needs the real core (``gossip.core.Membership``).
        """
        from gossip.messages import Alive  # the record a verified member arrives as

        if width is None:
            width = max(3, len(str(count - 1)))
        added = [self.add_node(f"{prefix}{i:0{width}d}", meta=meta) for i in range(count)]
        alives = [Alive(n.name, n.core.incarnation, n.addr, meta) for n in added]
        now = self.now
        for node in added:
            add = getattr(node.core, "_add_node", None)
            if add is None:
                raise SimulationError("add_converged_cluster needs gossip.core.Membership cores")
            me = node.name
            for alive in alives:
                if alive.name != me and add(alive, now, True) is None:
                    raise SimulationError(f"{me}: member table full (config.max_members)")
            self._flush(node)
        return added

    def converge_cluster(self, count: int, *, timeout: float = 60.0, **kwargs: Any) -> list[str]:
        """:meth:`add_cluster` (``kwargs`` go there), then run until :meth:`converged`.

        Returns the names; raises SimulationError if ``timeout`` passes first.
        """
        names = [node.name for node in self.add_cluster(count, **kwargs)]
        if not self.run_until_converged(timeout):
            raise SimulationError(f"{count} nodes did not converge within {timeout} s")
        return names

    def crash(self, name: str) -> None:
        """Stop a node cold: no timers fire, nothing is delivered to it."""
        node = self._live(name)
        self._stop(node, "crashed")

    def restart(
        self,
        name: str,
        *,
        join: Iterable[str] | None = None,
        meta: bytes = b"",
        incarnation: int | None = None,
    ) -> SimNode:
        """Replace a stopped node's core: same name and address, incarnation old + 1
        (or ``incarnation``: a restart that lost its own, say).

        It joins ``join`` or, by default, one live node picked at random.
        """
        node = self.nodes[name]
        if node.alive:
            raise SimulationError(f"node {name!r} is running; crash or leave it first")
        if incarnation is None:
            incarnation = node.core.incarnation + 1
        node.core, node.keyring = self._make_core(
            name, node.addr, incarnation, meta, None, epoch=node.generation + 1
        )
        node.alive = True
        node.status = "up"
        node.generation += 1
        node.timer_at = None
        if join is None:
            live = [n.name for n in self.nodes.values() if n.alive and n is not node]
            join = self.rng.sample(live, min(1, len(live)))
        self._join(node, join)
        return node

    def leave(self, name: str, *, linger: float = DEFAULT_LEAVE_LINGER) -> None:
        """Graceful leave: ``core.leave`` now, keep running ``linger`` seconds, then stop."""
        node = self._live(name)
        node.status = "leaving"
        node.core.leave(self.now)
        self._flush(node)
        self._push(self.now + linger, _STOP, node, node.generation, None)

    # ---------------------------------------------------------------- faults

    def set_link(
        self,
        a: str,
        b: str,
        *,
        loss: float | None = None,
        latency: float | None = None,
        jitter: float | None = None,
        both_ways: bool = True,
    ) -> None:
        """Override loss / latency / jitter on the link a -> b (and b -> a)."""
        link = Link(loss, latency, jitter)
        ia, ib = self.nodes[a].index, self.nodes[b].index
        self._links[(ia, ib)] = link
        if both_ways:
            self._links[(ib, ia)] = link

    def clear_links(self) -> None:
        """Drop every per-link override."""
        self._links.clear()

    def partition(self, groups: Iterable[Iterable[str]]) -> None:
        """Split the network: nodes in different groups cannot reach each other.

        Nodes not named in any group form one more group together.
        """
        for node in self.nodes.values():
            node.group = 0
        for gid, group in enumerate(groups, start=1):
            for name in group:
                self.nodes[name].group = gid

    def block(self, a: str, b: str) -> None:
        """Drop every datagram from a to b (one direction); streams either way fail."""
        self._blocked.add((self.nodes[a].index, self.nodes[b].index))

    def heal(self) -> None:
        """Remove every partition and one-way block."""
        for node in self.nodes.values():
            node.group = 0
        self._blocked.clear()

    def starve(self, name: str, lo: float = 0.5, hi: float = 2.5) -> None:
        """The node reads each incoming datagram ``uniform(lo, hi)`` seconds late."""
        if not 0 <= lo <= hi:
            raise SimulationError("starve needs 0 <= lo <= hi")
        self.nodes[name].starve = (lo, hi)

    def unstarve(self, name: str) -> None:
        """The node reads its datagrams on time again."""
        self.nodes[name].starve = None

    # ------------------------------------------------------------------ time

    def run_for(self, dt: float) -> None:
        """Advance virtual time by ``dt`` seconds."""
        self.run_until(self.now + dt)

    def run_until(self, t: float) -> None:
        """Process every entry due at or before ``t``; then ``now == t``."""
        heap = self._heap
        pop = heapq.heappop
        flush = self._flush
        while heap and heap[0][0] <= t:
            when, _, kind, node, a, b = pop(heap)
            self.now = when
            if kind == _DGRAM:
                if node.alive:
                    node.datagrams_received += 1
                    node.core.receive(b, a, when)
                    flush(node)
            elif kind == _TIMER:
                if node.generation == a and node.timer_at == b and node.alive:
                    self._check_refire(node, when)
                    node.timer_at = None
                    node.core.handle_timeout(when)
                    flush(node)
            elif kind == _STREAM_REQ:
                self._deliver_stream(node, a, b)
            elif kind == _STREAM_REPLY:
                if node.generation == a and node.alive:
                    node.core.receive_stream_reply(b[1], b[0], when)
                    flush(node)
            elif kind == _STREAM_FAIL:
                if node.generation == a and node.alive:
                    node.core.stream_failed(b, when)
                    flush(node)
            elif kind == _CALL:
                b()
            elif kind == _STOP:
                if node.generation == a and node.alive:
                    self._stop(node, "left")
        if t > self.now:
            self.now = t

    # --------------------------------------------------------------- queries

    def live_nodes(self) -> list[SimNode]:
        """Nodes currently running (up or leaving), in the order they were added."""
        return [n for n in self.nodes.values() if n.alive]

    def view(self, name: str) -> dict[str, MemberState]:
        """Member name -> state, as ``name``'s core sees it."""
        return {m.name: m.state for m in self.nodes[name].core.members()}

    def converged(self, names: Iterable[str] | None = None) -> bool:
        """Every running node sees exactly the running nodes as ALIVE (itself included).

        With ``names``: every named node sees at least the named nodes ALIVE.
        """
        if names is not None:
            want = set(names)
            return all(
                want <= {m.name for m in self.nodes[n].core.members() if m.state == MemberState.ALIVE}
                for n in want
            )
        running = [n for n in self.nodes.values() if n.alive]
        live = {n.name for n in running}
        count = len(live)
        for node in running:  # cheap pre-check; num_alive may or may not count the node itself
            if getattr(node.core, "num_alive", count) not in (count, count - 1):
                return False
        for node in running:
            alive = {m.name for m in node.core.members() if m.state == MemberState.ALIVE}
            alive.add(node.name)
            if alive != live:
                return False
        return True

    def wait_for(self, cond: Callable[[], bool], timeout: float) -> bool:
        """Run until ``cond()`` holds (checked after each instant at which anything
        happened) or ``timeout`` elapses; returns the last ``cond()``."""
        end = self.now + timeout
        heap = self._heap
        while not cond():
            if not heap or heap[0][0] > end:
                self.run_until(end)
                return cond()
            self.run_until(heap[0][0])
        return True

    def events_of(self, name: str, kind: type | None = None) -> list[Any]:
        """``name``'s events (of type ``kind``), oldest first; needs ``record_events``."""
        events = self.events.get(name, [])
        return [e for e in events if kind is None or isinstance(e, kind)]

    def run_until_converged(self, timeout: float, *, step: float = 1.0) -> bool:
        """Run until :meth:`converged` (checked every ``step`` s) or ``timeout`` elapses."""
        end = self.now + timeout
        while not self.converged():
            if self.now >= end:
                return False
            self.run_until(min(end, self.now + step))
        return True

    def totals(self) -> dict[str, int]:
        """Sums of the per-node counters over every node ever added."""
        nodes = self.nodes.values()
        return {
            "datagrams_sent": sum(n.datagrams_sent for n in nodes),
            "datagram_bytes_sent": sum(n.datagram_bytes_sent for n in nodes),
            "streams_sent": sum(n.streams_sent for n in nodes),
            "stream_bytes_sent": sum(n.stream_bytes_sent for n in nodes),
            "datagrams_received": sum(n.datagrams_received for n in nodes),
            "datagrams_lost": self.datagrams_lost,
            "datagrams_blocked": self.datagrams_blocked,
            "datagrams_undeliverable": self.datagrams_undeliverable,
            "streams_failed": self.streams_failed,
            "max_datagram_bytes": self.max_datagram_bytes,
        }

    # -------------------------------------------------------------- internals

    def _push(self, when: float, kind: int, node: SimNode | None, a: Any, b: Any) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (when, self._seq, kind, node, a, b))

    def _live(self, name: str) -> SimNode:
        node = self.nodes[name]
        if not node.alive:
            raise SimulationError(f"node {name!r} is not running ({node.status})")
        return node

    def _record_event(self, now: float, name: str, event: Event) -> None:
        self.events.setdefault(name, []).append(event)

    def _make_core(
        self,
        name: str,
        addr: Address,
        incarnation: int,
        meta: bytes,
        config: GossipConfig | None,
        epoch: int = 0,
    ) -> tuple[CoreLike, Keyring]:
        core_rng = random.Random(self.rng.getrandbits(64))
        nonces = random.Random(self.rng.getrandbits(64))
        keyring = Keyring([self.key], nonce_source=nonces.randbytes)
        core = self._factory(
            name,
            addr,
            config or self.config,
            core_rng,
            self.now,
            keyring=keyring,
            incarnation=incarnation,
            meta=meta,
            epoch=epoch,
        )
        return core, keyring

    def _join(self, node: SimNode, join: Iterable[str]) -> None:
        seeds = [self.nodes[s].addr for s in join if s != node.name]
        if seeds:
            node.core.join(seeds, self.now)
        self._flush(node)

    def _stop(self, node: SimNode, status: str) -> None:
        node.alive = False
        node.status = status
        node.generation += 1
        node.timer_at = None

    def _check_refire(self, node: SimNode, when: float) -> None:
        if when == node._refire_at:
            node._refires += 1
            if node._refires > MAX_TIMER_REFIRES:
                raise SimulationError(
                    f"{node.name}: timer keeps firing at t={when} (get_timer() does not advance)"
                )
        else:
            node._refire_at = when
            node._refires = 0

    def _flush(self, node: SimNode) -> None:
        """Put a core's outputs on the network, hand out its events, re-arm its timer."""
        core = node.core
        now = self.now
        for addr, data in core.datagrams_to_send():
            self._send_datagram(node, addr, data, now)
        streams = core.streams_to_send()
        for addr, data in streams:
            self._send_stream(node, addr, data, now)
        event = core.next_event()
        if event is not None:
            hooks = self._hooks
            name = node.name
            while event is not None:
                for hook in hooks:
                    hook(now, name, event)
                event = core.next_event()
        if not node.alive or node.core is not core:
            return  # a hook stopped or replaced it
        deadline = core.get_timer()
        if deadline != node.timer_at:
            node.timer_at = deadline
            if deadline is not None:
                self._seq += 1
                heapq.heappush(
                    self._heap,
                    (
                        deadline if deadline > now else now,
                        self._seq,
                        _TIMER,
                        node,
                        node.generation,
                        deadline,
                    ),
                )

    def _send_datagram(self, src: SimNode, addr: Address, data: bytes, now: float) -> None:
        size = len(data)
        src.datagrams_sent += 1
        src.datagram_bytes_sent += size
        if size > self.max_datagram_bytes:
            self.max_datagram_bytes = size
        dst = self._by_addr.get(addr)
        if dst is None or not dst.alive:
            self.datagrams_undeliverable += 1
            if self._taps:
                self._tap(src, addr, data, "undeliverable")
            return
        if src.group != dst.group or (self._blocked and (src.index, dst.index) in self._blocked):
            self.datagrams_blocked += 1
            if self._taps:
                self._tap(src, addr, data, "blocked")
            return
        loss, latency, jitter = self.loss, self.latency, self.jitter
        if self._links:
            link = self._links.get((src.index, dst.index))
            if link is not None:
                loss = loss if link.loss is None else link.loss
                latency = latency if link.latency is None else link.latency
                jitter = jitter if link.jitter is None else link.jitter
        rng = self.rng
        if loss > 0.0 and rng.random() < loss:
            self.datagrams_lost += 1
            if self._taps:
                self._tap(src, addr, data, "lost")
            return
        delay = latency
        if jitter > 0.0:
            delay += jitter * (2.0 * rng.random() - 1.0)
            if delay < 0.0:
                delay = 0.0
        if dst.starve is not None:
            lo, hi = dst.starve
            delay += lo + (hi - lo) * rng.random()
        self._seq += 1
        heapq.heappush(self._heap, (now + delay, self._seq, _DGRAM, dst, src.addr, data))
        if self._taps:
            self._tap(src, addr, data, "delivered")

    def _tap(self, src: SimNode, addr: Address, data: bytes, fate: str) -> None:
        for tap in self._taps:
            tap(self.now, src.name, addr, data, fate)

    def _reachable_both_ways(self, a: SimNode, b: SimNode) -> bool:
        if a.group != b.group:
            return False
        return not self._blocked or (
            (a.index, b.index) not in self._blocked and (b.index, a.index) not in self._blocked
        )

    def _stream_latency(self, src: SimNode, dst: SimNode) -> float:
        latency = self.latency
        if self._links:
            link = self._links.get((src.index, dst.index))
            if link is not None and link.latency is not None:
                latency = link.latency
        return latency

    def _send_stream(self, src: SimNode, addr: Address, data: bytes, now: float) -> None:
        src.streams_sent += 1
        src.stream_bytes_sent += len(data)
        dst = self._by_addr.get(addr)
        if dst is None or not dst.alive or not self._reachable_both_ways(src, dst):
            self.streams_failed += 1
            self._push(now + self.connect_timeout, _STREAM_FAIL, src, src.generation, addr)
            return
        self._push(
            now + self._stream_latency(src, dst), _STREAM_REQ, dst, (src, src.generation), data
        )

    def _deliver_stream(self, dst: SimNode, origin: tuple[SimNode, int], data: bytes) -> None:
        src, generation = origin
        now = self.now
        if src.generation != generation or not src.alive:
            return  # the requester died meanwhile; its connection is gone
        if not dst.alive:
            self.streams_failed += 1
            self._push(now + self.connect_timeout, _STREAM_FAIL, src, generation, dst.addr)
            return
        reply = dst.core.handle_stream(data, src.addr, now)
        if reply is not None:
            dst.streams_sent += 1
            dst.stream_bytes_sent += len(reply)
            self._push(
                now + self._stream_latency(dst, src),
                _STREAM_REPLY,
                src,
                generation,
                (dst.addr, reply),
            )
        else:  # the peer closed the connection without answering
            self._push(
                now + self._stream_latency(dst, src), _STREAM_FAIL, src, generation, dst.addr
            )
        self._flush(dst)


# --- single-core helpers: talk to one core with hand-made datagrams ------------------

TEST_KEY = bytes(range(32))  # the key of make_keyring's default ring
TEST_AAD = b"edgeagent"  # GossipConfig.cluster_name, as the keyring's associated data
TEST_SENDER = "test-peer"  # the DatagramHeader sender of seal()'s datagrams


def make_keyring(rng: random.Random, keys: Iterable[bytes] = (TEST_KEY,)) -> Keyring:
    """A keyring whose nonces come from ``rng`` (deterministic; tests only)."""
    return Keyring(list(keys), nonce_source=rng.randbytes)


_seal_counter = itertools.count()  # one test sender whose every datagram is fresh


def seal(
    msgs: Sequence[Message],
    keyring: Keyring | None = None,
    aad: bytes = TEST_AAD,
    header: DatagramHeader | None = None,
    *,
    to: str | None = None,
) -> bytes:
    """A sealed datagram carrying ``msgs`` to the member named ``to``, as a peer would send it.

    Without ``header``, from :data:`TEST_SENDER` with a counter that grows on every call, so
    the receiver's anti-replay window takes each one as new; ``to`` is then required.
    """
    ring = keyring or make_keyring(random.Random(0))
    if header is None:
        if to is None:
            raise TypeError("seal() needs the receiver's name (to=...) or a header")
        header = DatagramHeader(TEST_SENDER, 0, next(_seal_counter), destination_tag(to))
    return ring.encrypt(encode_datagram(msgs, header), aad)


def sent(core: Any, keyring: Keyring | None = None) -> list[tuple[Address, list[Message]]]:
    """Drain a core's datagrams and open them: ``[(dst, [messages])]``."""
    ring = keyring or make_keyring(random.Random(0))
    out = []
    for dst, data in core.datagrams_to_send():
        assert len(data) <= core.config.max_datagram_bytes
        out.append((dst, decode_datagram(ring.decrypt(data, TEST_AAD))[1]))
    return out


def drain_events(core: CoreLike) -> list[Event]:
    """Every event a core has queued, oldest first."""
    events = []
    while (event := core.next_event()) is not None:
        events.append(event)
    return events
