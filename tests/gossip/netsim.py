"""A tiny deterministic virtual network for the core's unit tests.

One heap of ``(time, seq, action)`` drives everything: datagram and stream
deliveries and each node's timer. After every call into a core its outputs are
flushed: datagrams are lost with probability ``loss`` or blocked by a
partition, otherwise delivered ``latency`` later; push-pull streams are
lossless but fail (``stream_failed``) across a partition; events are recorded
per node. Same seed, same run.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections.abc import Callable, Iterable
from typing import Any

from gossip.config import GossipConfig, lan
from gossip.core import Membership
from gossip.events import Event
from gossip.keyring import Keyring
from gossip.messages import Address, MemberState

KEY = bytes(range(32))
STREAM_FAIL_AFTER = 1.0  # seconds before a stream across a partition fails


def make_keyring(rng: random.Random, keys: Iterable[bytes] = (KEY,)) -> Keyring:
    """A keyring whose nonces come from ``rng`` (deterministic; tests only)."""
    return Keyring(list(keys), nonce_source=lambda n: rng.randbytes(n))


class NetSim:
    """N cores on a virtual network with loss, latency and partitions."""

    def __init__(self, seed: int = 0, *, loss: float = 0.0, latency: float = 0.002,
                 config: GossipConfig | None = None) -> None:
        self.rng = random.Random(seed)
        self.loss = loss
        self.latency = latency
        self.config = config or lan()
        self.now = 0.0
        self.nodes: dict[str, Membership] = {}
        self.addrs: dict[Address, str] = {}
        self.events: dict[str, list[Event]] = {}
        self.down: set[str] = set()
        self.groups: dict[str, int] = {}  # partition group per node; absent = 0
        self.blocked: set[tuple[str, str]] = set()  # one-way (src, dst) blocks
        self.delivered = 0
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._armed: dict[str, float | None] = {}

    # --- topology --------------------------------------------------------------

    def add(self, name: str, *, config: GossipConfig | None = None, keyring: Keyring | None = None,
            **kwargs: Any) -> Membership:
        """Create (or re-create, for a restart) a node; it is not joined."""
        if name in self.nodes:
            addr = self.nodes[name].addr
        else:
            addr = (f"10.0.0.{len(self.nodes) + 1}", 7946)
        core = Membership(name, addr, config or self.config, random.Random(self.rng.random()), self.now,
                          keyring=keyring or make_keyring(random.Random(self.rng.random())), **kwargs)
        self.nodes[name] = core
        self.addrs[addr] = name
        self.events.setdefault(name, [])
        self.down.discard(name)
        self._armed[name] = None
        self._flush(name)
        return core

    def join(self, name: str, seeds: Iterable[str]) -> None:
        self.nodes[name].join([self.nodes[s].addr for s in seeds], self.now)
        self._flush(name)

    def cluster(self, n: int, **kwargs: Any) -> list[str]:
        """``n`` nodes n0..n{n-1}, all joined through n0, run until converged."""
        names = [f"n{i}" for i in range(n)]
        for name in names:
            self.add(name, **kwargs)
        for name in names[1:]:
            self.join(name, ["n0"])
        self.run_until(lambda: self.converged(names), limit=60.0)
        return names

    def crash(self, name: str) -> None:
        self.down.add(name)

    def partition(self, *groups: Iterable[str]) -> None:
        self.groups = {name: i + 1 for i, group in enumerate(groups) for name in group}

    def heal(self) -> None:
        self.groups = {}
        self.blocked = set()

    def reachable(self, src: str, dst: str) -> bool:
        return (dst not in self.down and self.groups.get(src, 0) == self.groups.get(dst, 0)
                and (src, dst) not in self.blocked)

    # --- running ---------------------------------------------------------------

    def call(self, name: str, fn: Callable[[Membership], Any]) -> Any:
        """Run a command on a node at the current time and flush its outputs."""
        result = fn(self.nodes[name])
        self._flush(name)
        return result

    def run(self, duration: float) -> None:
        self.run_until(lambda: False, limit=duration)

    def run_until(self, cond: Callable[[], bool], limit: float) -> bool:
        """Advance time until ``cond()`` holds (checked after each step) or ``limit`` passes."""
        end = self.now + limit
        while True:
            if cond():
                return True
            if not self._heap or self._heap[0][0] > end:
                self.now = end
                return cond()
            when, _, action = heapq.heappop(self._heap)
            self.now = max(self.now, when)
            action()

    def _at(self, when: float, action: Callable[[], None]) -> None:
        heapq.heappush(self._heap, (when, next(self._seq), action))

    def _flush(self, name: str) -> None:
        core = self.nodes[name]
        for dst, data in core.datagrams_to_send():
            assert len(data) <= core.config.max_datagram_bytes
            self._send_datagram(name, core, dst, data)
        for dst, data in core.streams_to_send():
            self._send_stream(name, core, dst, data)
        while (event := core.next_event()) is not None:
            self.events[name].append(event)
        deadline = core.get_timer()
        if deadline is not None and deadline != self._armed.get(name):
            self._armed[name] = deadline
            self._at(deadline, lambda: self._fire(name, core, deadline))

    def _fire(self, name: str, core: Membership, deadline: float) -> None:
        if self.nodes.get(name) is not core or name in self.down:
            return
        if self._armed.get(name) == deadline:
            self._armed[name] = None
        core.handle_timeout(self.now)
        self._flush(name)

    def _send_datagram(self, src: str, core: Membership, dst: Address, data: bytes) -> None:
        dst_name = self.addrs.get(dst)
        if dst_name is None or not self.reachable(src, dst_name) or self.rng.random() < self.loss:
            return

        def deliver() -> None:
            target = self.nodes[dst_name]
            if dst_name in self.down or not self.reachable(src, dst_name):
                return
            self.delivered += 1
            target.receive(data, core.addr, self.now)
            self._flush(dst_name)

        self._at(self.now + self.latency, deliver)

    def _send_stream(self, src: str, core: Membership, dst: Address, data: bytes) -> None:
        dst_name = self.addrs.get(dst)

        def failed() -> None:
            if self.nodes.get(src) is core and src not in self.down:
                core.stream_failed(dst, self.now)
                self._flush(src)

        if dst_name is None or not self.reachable(src, dst_name) or not self.reachable(dst_name, src):
            self._at(self.now + STREAM_FAIL_AFTER, failed)
            return

        def request() -> None:
            if dst_name in self.down:
                self._at(self.now + STREAM_FAIL_AFTER, failed)
                return
            reply = self.nodes[dst_name].handle_stream(data, core.addr, self.now)
            self._flush(dst_name)
            if reply is None:
                self._at(self.now + self.latency, failed)
                return

            def answer() -> None:
                if self.nodes.get(src) is core and src not in self.down:
                    core.receive_stream_reply(reply, dst, self.now)
                    self._flush(src)

            self._at(self.now + self.latency, answer)

        self._at(self.now + self.latency, request)

    # --- views -------------------------------------------------------------------

    def view(self, name: str) -> dict[str, MemberState]:
        return {m.name: m.state for m in self.nodes[name].members()}

    def converged(self, names: Iterable[str]) -> bool:
        """Every listed node sees every listed node ALIVE."""
        names = list(names)
        want = set(names)
        for name in names:
            alive = {m.name for m in self.nodes[name].members() if m.state == MemberState.ALIVE}
            if not want <= alive:
                return False
        return True

    def events_of(self, name: str, kind: type) -> list[Any]:
        return [e for e in self.events[name] if isinstance(e, kind)]


# --- single-core helpers: talk to one core with hand-made messages -------------

AAD = b"edgeagent"


def seal(msgs: list[Any], keyring: Keyring | None = None, aad: bytes = AAD) -> bytes:
    """A sealed datagram carrying ``msgs``, as a peer would send it."""
    from gossip.codec import encode_datagram

    ring = keyring or make_keyring(random.Random(0))
    return ring.encrypt(encode_datagram(msgs), aad)


def sent(core: Membership, keyring: Keyring | None = None) -> list[tuple[Address, list[Any]]]:
    """Drain a core's datagrams and open them: ``[(dst, [messages])]``."""
    from gossip.codec import decode_datagram

    ring = keyring or make_keyring(random.Random(0))
    out = []
    for dst, data in core.datagrams_to_send():
        assert len(data) <= core.config.max_datagram_bytes
        out.append((dst, decode_datagram(ring.decrypt(data, AAD))))
    return out


def drain_events(core: Membership) -> list[Event]:
    events = []
    while (event := core.next_event()) is not None:
        events.append(event)
    return events
