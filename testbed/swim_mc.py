"""A Monte-Carlo model of the SWIM protocol as our core runs it -- a model, not the core.

Why: the simulator (``testbed/sim.py``) runs the real core, one mutable member record per
(node, member): ~215-240 bytes each, ~21 GB at N = 10,000. This model keeps a few numbers per
node instead and replays only what decides the two figures the scaling benchmark reports
(``testbed/bench/scaling.py``), so it reaches N = 10,000 in seconds. It is validated against
the real core at the sizes both can run (the benchmark reports the agreement); beyond those
its rows are labelled as the model's.

What it models, with the real config and the core's own formulas:

- **Dissemination of one update** in a settled cluster (nothing queued, every gossip ticker
  parked). The origin queues it; every holder may send it ``retransmit_limit(
  retransmit_mult, N)`` times (``broadcast_queue.retransmit_limit``, as the core computes it
  from its member count), each send spending one: on gossip ticks (``gossip_nodes`` distinct
  random other members per tick, every ``gossip_interval`` on the node's own random phase)
  and piggybacked on every probe ping and ack the holder sends. A node that learns it ticks
  at once (the parked ticker re-armed on its old phase, late, so due now:
  ``Membership._wake_gossip``), then on its phase. A ping that brings the update is answered
  by an ack that already carries it (the core answers pings last). Probes: every node pings
  one random other member every ``probe_interval`` on its own phase and is acked.
  Datagrams take ``latency +/- jitter`` (uniform), none is lost. Measured as in
  ``testbed.bench.gossip``: per node, set_state to first receipt; the nearest-rank 99th
  percentile and the maximum.
- **Steady bandwidth** in a window: the probe pings and acks every node sends in it, each
  sized by encoding it with the real codec (``codec.encode_datagram`` plus the keyring's
  ``OVERHEAD``; names and addresses as the simulator gives them; the header counter
  estimated as two datagrams per probe interval since start, plus the start-up
  announcement's sends), and the digest push-pulls (the first one uniform in
  ``[0, push_pull_interval)`` of the start, then every ``push_pull_scale(...)`` jittered
  x0.5..1.5 as ``Membership._on_push_pull_tick`` does; a settled exchange is a summary of two
  hashes and an empty reply, both encoded with ``codec.encode_frame``).

What it leaves out, on purpose: loss, failures, suspicion and Lifeguard (the benchmark runs
without them), ping-reqs, the start-up announcements themselves (drained seconds after the
start: the window must begin later; ``settle`` >= 10 s), push-pulls during a dissemination
(one per node every minutes: they cannot matter within a second), CPU time (the simulator
has none either), and probe lists (a uniform random target instead of the shuffled
round-robin: the same rate, and a second is too short for the order to matter).
"""

from __future__ import annotations

import heapq
import math
import random
from dataclasses import dataclass
from functools import lru_cache

from gossip.broadcast_queue import retransmit_limit
from gossip.codec import HASH_BYTES, DatagramHeader, destination_tag, encode_datagram, encode_frame
from gossip.config import GossipConfig
from gossip.core import push_pull_scale
from gossip.keyring import OVERHEAD
from gossip.messages import Ack, Address, Ping, PushPull, Summary
from testbed.bench.stats import nearest_rank
from testbed.sim import GOSSIP_PORT

MIN_SETTLE = 10.0  # s: the start-up announcements must have drained before the window
DISSEMINATION_HORIZON = 60.0  # s after the update: stop looking (it took < 1 s up to N=10^4)
HASH = bytes(HASH_BYTES)  # a digest summary hash (its value does not change its size)

_GOSSIP, _PROBE, _DGRAM = 0, 1, 2


@dataclass(frozen=True)
class ModelRun:
    """One run of the model (same fields as the core's :class:`testbed.bench.gossip.RunResult`)."""

    dissemination_p99: float | None
    dissemination_max: float | None
    dissemination_missing: int
    bytes_per_node_s: float
    sends: int  # update-carrying datagrams sent during the dissemination


def sim_name(i: int, n: int) -> str:
    """Node ``i``'s name in a simulated cluster of ``n`` (``Simulator.add_cluster``)."""
    return f"n{i:0{max(3, len(str(n - 1)))}d}"


def sim_addr(i: int) -> Address:
    """Node ``i``'s address in the simulator (``Simulator.add_node``)."""
    return (f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}", GOSSIP_PORT)


@lru_cache(maxsize=1 << 16)
def _tag(name: str) -> int:
    return destination_tag(name)


class _Sizes:
    """Sealed sizes of the model's datagrams and frames, from the real codec."""

    def __init__(self, config: GossipConfig, n: int) -> None:
        self.names = [sim_name(i, n) for i in range(n)]
        self.addrs = [sim_addr(i) for i in range(n)]
        me, peer = self.names[0], self.names[-1]
        summary = Summary(HASH, HASH)
        request = PushPull(me, False, False, (), (), summary=summary, epoch=0)
        reply = PushPull(peer, False, True, (), (), None, None, 0)
        self.push_pull_request = len(encode_frame(request)) + OVERHEAD
        self.push_pull_reply = len(encode_frame(reply)) + OVERHEAD

    def ping(self, src: int, dst: int, counter: int, seq: int) -> int:
        name, to = self.names[src], self.names[dst]
        header = DatagramHeader(name, 0, counter, _tag(to))
        return len(encode_datagram([Ping(seq, to, name, self.addrs[src])], header)) + OVERHEAD

    def ack(self, src: int, dst: int, counter: int, seq: int) -> int:
        header = DatagramHeader(self.names[src], 0, counter, _tag(self.names[dst]))
        return len(encode_datagram([Ack(seq, self.names[src])], header)) + OVERHEAD


class ProtocolModel:
    """``n`` nodes started together at t = 0, already converged (as the warm-started simulator)."""

    def __init__(
        self, config: GossipConfig, n: int, seed: int | str, *, latency: float = 0.001,
        jitter: float = 0.0005,
    ) -> None:  # fmt: skip
        if n < 2:
            raise ValueError("the model needs at least 2 nodes")
        self.config = config
        self.n = n
        self.latency = latency
        self.jitter = jitter
        self.rng = random.Random(seed)
        rand = self.rng.random
        self.probe_phase = [rand() * config.probe_interval for _ in range(n)]
        self.gossip_phase = [rand() * config.gossip_interval for _ in range(n)]
        self.limit = retransmit_limit(config.retransmit_mult, n)

    def _delay(self) -> float:
        delay = self.latency
        if self.jitter > 0.0:
            delay += self.jitter * (2.0 * self.rng.random() - 1.0)
        return max(0.0, delay)

    def _other(self, i: int) -> int:
        j = int(self.rng.random() * (self.n - 1))
        return j + 1 if j >= i else j

    def _targets(self, i: int, k: int) -> list[int]:
        k = min(k, self.n - 1)
        picked: list[int] = []
        while len(picked) < k:
            j = self._other(i)
            if j not in picked:
                picked.append(j)
        return picked

    # ---------------------------------------------------------------- bandwidth

    def steady_bytes_per_node_s(self, t0: float, window: float) -> float:
        """Every byte sent in ``[t0, t0 + window)`` (pings, acks, push-pulls) / (n x window)."""
        if t0 < MIN_SETTLE:
            raise ValueError(f"the model's window must start after {MIN_SETTLE:g} s (announcements)")
        sizes = _Sizes(self.config, self.n)
        end = t0 + window
        interval = self.config.probe_interval
        total = 0
        for i in range(self.n):
            first = self.probe_phase[i]
            m = max(0, math.ceil((t0 - first) / interval - 1e-12))
            while (at := first + m * interval) < end:
                seq = m + 1  # probe sequence numbers start at 1
                counter = 2 * m + self.limit  # estimated datagrams sent so far (see module doc)
                j = self._other(i)
                total += sizes.ping(i, j, counter, seq)
                if at + self._delay() < end:
                    total += sizes.ack(j, i, 2 * m + self.limit, seq)
                m += 1
        total += self._push_pull_bytes(sizes, t0, end)
        return total / (self.n * window)

    def _push_pull_bytes(self, sizes: _Sizes, t0: float, end: float) -> int:
        config, rand = self.config, self.rng.random
        scaled = push_pull_scale(config.push_pull_interval, self.n)
        total = 0
        for _ in range(self.n):
            at = rand() * config.push_pull_interval
            while at < end:
                if at >= t0:
                    total += sizes.push_pull_request
                    if at + self.latency < end:
                        total += sizes.push_pull_reply
                at += scaled * (0.5 + rand())
        return total

    # ------------------------------------------------------------ dissemination

    def disseminate(self, t_update: float) -> tuple[list[float], int, int]:
        """One update from a random node at ``t_update``: (delays of the others, never
        reached, update-carrying sends)."""
        n, config = self.n, self.config
        gi, pi, k = config.gossip_interval, config.probe_interval, config.gossip_nodes
        heap: list[tuple[float, int, int, int, int, int]] = []  # time, seq, kind, node, a, b
        seq = 0

        def push(at: float, kind: int, node: int, a: int = 0, b: int = 0) -> None:
            nonlocal seq
            seq += 1
            heapq.heappush(heap, (at, seq, kind, node, a, b))

        for i, phase in enumerate(self.probe_phase):
            push(phase + pi * math.ceil((t_update - phase) / pi), _PROBE, i)
        informed: list[float | None] = [None] * n
        left = [0] * n
        state = {"reached": 0, "left": 0, "flying": 0, "sends": 0}

        def inform(i: int, now: float) -> None:
            informed[i] = now
            left[i] = self.limit
            state["reached"] += 1
            state["left"] += self.limit
            push(now, _GOSSIP, i)  # the parked ticker, re-armed late: due at once

        def send(src: int, dst: int, now: float, ping: bool) -> None:
            carries = left[src] > 0
            if carries:
                left[src] -= 1
                state["left"] -= 1
                state["flying"] += 1
                state["sends"] += 1
            if carries or ping:
                push(now + self._delay(), _DGRAM, dst, src, carries | (ping << 1))

        origin = int(self.rng.random() * n)
        inform(origin, t_update)
        horizon = t_update + DISSEMINATION_HORIZON
        while heap and state["reached"] < n and (state["left"] or state["flying"]):
            now, _, kind, i, a, b = heapq.heappop(heap)
            if now > horizon:
                break
            if kind == _PROBE:
                push(now + pi, _PROBE, i)
                send(i, self._other(i), now, True)
            elif kind == _GOSSIP:
                if left[i] == 0:
                    continue  # nothing queued: the ticker parks
                phase = self.gossip_phase[i]
                push(phase + gi * (math.floor((now - phase) / gi + 1e-9) + 1), _GOSSIP, i)
                for j in self._targets(i, k):
                    if left[i] == 0:
                        break
                    send(i, j, now, False)
            else:  # a datagram reaches i from a
                if b & 1:
                    state["flying"] -= 1
                    if informed[i] is None:
                        inform(i, now)
                if b & 2:  # a ping: answered last, so the ack carries what it brought
                    send(i, a, now, False)
        delays = [t - t_update for j, t in enumerate(informed) if t is not None and j != origin]
        return delays, n - 1 - len(delays), state["sends"]


def run_model(
    config: GossipConfig, n: int, seed: int | str, *, settle: float, duration: float,
    latency: float = 0.001, jitter: float = 0.0005,
) -> ModelRun:  # fmt: skip
    """The scaling benchmark's scenario on the model: window ``[settle, settle + W)`` with
    ``W = duration / 3``, the update at its end (as ``testbed.bench.gossip.run_once``)."""
    model = ProtocolModel(config, n, seed, latency=latency, jitter=jitter)
    window = duration / 3.0
    bytes_per_node_s = model.steady_bytes_per_node_s(settle, window)
    delays, missing, sends = model.disseminate(settle + window)
    p99 = nearest_rank(delays, 99.0)
    if p99 is not None and len(delays) < math.ceil(0.99 * (n - 1)):
        p99 = None
    return ModelRun(
        dissemination_p99=p99,
        dissemination_max=max(delays) if delays and missing == 0 else None,
        dissemination_missing=missing,
        bytes_per_node_s=bytes_per_node_s,
        sends=sends,
    )
