"""Failure detection: the probe round, ping / ack / nack / ping-req and relays.

How it works (SWIM 4.1-4.3 with Lifeguard, memberlist state.go probeNode):
every ``probe_interval`` (a :class:`~gossip.timers.ProbeTick`) the next member
of a shuffled round-robin list is pinged, with its Suspect piggybacked if it is
suspect (the buddy system). One probe runs at a time; a tick that comes while
one runs is kept and starts the next probe as soon as it ends (Go's ticker
buffers one tick). No ack within the probe timeout (``ProbeTimeout``) ->
PingReq through ``indirect_checks`` random alive members, asking for nacks.
No ack by the end of the probe interval (``ProbeEnd``) -> the member is
suspected. Both waits are stretched by the Local Health Multiplier, which the
outcome moves as memberlist does: -1 for an ack; for a failure, +1 per missing
nack (or +1 if none were asked for). A member asked to relay pings the target
under a sequence number of its own and forwards the ack, or nacks the origin
when its own probe timeout passes (``RelayTimeout``).

The buddy re-check (``Recheck``) is one more direct ping carrying the Suspect,
halfway through the shortest suspicion timeout; its answer is read like any
datagram (the suspect's ack carries its current Alive).

The prober owns the probe list, the probe in flight, the sequence numbers and
the table of awaited acks. It sends through the core (which piggybacks
broadcasts), arms timers on the core's heap and reports a failed probe through
the ``suspect`` callback.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable

from .awareness import Awareness
from .codec import MAX_UINT64
from .config import GossipConfig
from .members import ALIVE, SUSPECT, MemberTable, Node
from .messages import Ack, Address, Alive, Message, Nack, Ping, PingReq, Suspect
from .stats import Stats
from .suspicion import Suspicion
from .timers import ProbeEnd, ProbeTick, ProbeTimeout, RelayTimeout, Timer, next_tick

PROBE_RTT_SAMPLES = 64  # recent probe round-trip times kept for metrics

Send = Callable[[Address, str, list[Message]], None]  # (address, member name there, messages)
Schedule = Callable[[float, Timer], None]
SuspectMember = Callable[[Suspect, float], None]


class _Probe:
    """The probe in flight (one at a time)."""

    __slots__ = ("node", "seq", "sent_at", "expected_nacks", "nacks")

    def __init__(self, node: Node, seq: int, sent_at: float) -> None:
        self.node = node
        self.seq = seq
        self.sent_at = sent_at
        self.expected_nacks = 0
        self.nacks = 0


class _Relay:
    """A ping we send for someone else's PingReq: forward the ack, or nack."""

    __slots__ = ("nack", "origin", "origin_name", "origin_seq", "target")

    def __init__(self, origin: Address, origin_name: str, origin_seq: int, nack: bool, target: str) -> None:
        self.origin = origin
        self.origin_name = origin_name
        self.origin_seq = origin_seq
        self.nack = nack
        self.target = target


def _unscaled(timeout: float) -> float:
    return timeout


class Prober:
    """Probing for one core. See the module docstring."""

    def __init__(
        self,
        config: GossipConfig,
        table: MemberTable,
        awareness: Awareness,
        rng: random.Random,
        stats: Stats,
        *,
        send: Send,
        schedule: Schedule,
        suspect: SuspectMember,
    ) -> None:
        self._config = config
        self._lifeguard = config.lifeguard
        self._table = table
        self._awareness = awareness
        self._rng = rng
        self._stats = stats
        self._send = send
        self._schedule = schedule
        self._suspect = suspect
        self._list: list[Node] = []
        self._index = 0
        self._probe: _Probe | None = None
        self._pending = False  # a probe tick came while a probe was running
        self._acks: dict[int, _Probe | _Relay] = {}
        self._seq = 0
        self.stopped = False  # we left: no more probes
        # Round-trip times of successful probes, numbered so a reader can tell new from seen.
        self.rtts: deque[tuple[int, float]] = deque(maxlen=PROBE_RTT_SAMPLES)
        self._rtt_count = 0

    def add(self, node: Node) -> None:
        """A new member: insert it at a random place in the probe list (memberlist
        aliveNode; appending would put every new member at the end of the round)."""
        plist = self._list
        plist.append(node)
        offset = int(self._rng.random() * len(plist))
        plist[offset], plist[-1] = plist[-1], plist[offset]

    def next_seq(self) -> int:
        self._seq = (self._seq + 1) & MAX_UINT64  # wraps: only recent numbers are awaited
        return self._seq

    def stop(self) -> None:
        """We left: drop the probe in flight and start no more."""
        self.stopped = True
        self._finish()

    # ------------------------------------------------------------ the probe round

    def on_tick(self, deadline: float, now: float) -> None:
        if self.stopped:
            return
        self._schedule(next_tick(deadline, self._config.probe_interval, now), ProbeTick())
        if self._probe is not None:
            self._pending = True  # Go's ticker buffers one tick
            return
        self._start(now)

    def _next_target(self) -> Node | None:
        plist = self._list
        for _ in range(2 * len(plist) + 2):
            if self._index >= len(plist):
                # End of a round: reshuffle the members worth probing.
                plist = self._list = [n for n in self._table.others if n.state <= SUSPECT]
                self._rng.shuffle(plist)
                self._index = 0
                if not plist:
                    return None
            node = plist[self._index]
            self._index += 1
            if node.index >= 0 and node.state <= SUSPECT:
                return node
        return None

    def _start(self, now: float) -> None:
        node = self._next_target()
        if node is None:
            return
        config = self._config
        scale = self._awareness.scale if self._lifeguard else _unscaled
        me = self._table.me
        probe = self._probe = _Probe(node, self.next_seq(), now)
        self._acks[probe.seq] = probe
        self._stats.probes += 1
        msgs: list[Message] = [Ping(probe.seq, node.name, me.name, me.addr)]
        if node.state == SUSPECT and self._lifeguard:
            # Buddy system: tell the suspect so it can refute at once.
            msgs.append(Suspect(node.name, node.incarnation, me.name))
        self._send(node.addr, node.name, msgs)
        self._schedule(now + scale(config.probe_timeout), ProbeTimeout(probe.seq))
        self._schedule(now + scale(config.probe_interval), ProbeEnd(probe.seq))

    def on_timeout(self, seq: int, now: float) -> None:
        probe = self._probe
        if probe is None or probe.seq != seq:
            return
        target = probe.node
        me = self._table.me
        relays = self._table.k_random(
            self._config.indirect_checks, lambda n: n is not target and n.state == ALIVE, self._rng
        )
        nack = self._lifeguard
        for relay in relays:
            self._send(relay.addr, relay.name, [PingReq(seq, target.name, target.addr, me.name, me.addr, nack)])
        probe.expected_nacks = len(relays) if nack else 0

    def on_end(self, seq: int, now: float) -> None:
        probe = self._probe
        if probe is None or probe.seq != seq:
            return
        self._stats.probe_failures += 1
        if self._lifeguard:
            # memberlist probeNode: missing nacks mean *we* may be the problem.
            if probe.expected_nacks > 0:
                self._awareness.apply_delta(max(0, probe.expected_nacks - probe.nacks))
            else:
                self._awareness.apply_delta(1)
        self._finish()
        node = probe.node
        if node.index >= 0:
            self._suspect(Suspect(node.name, node.incarnation, self._table.me.name), now)
        self._resume(now)

    def _finish(self) -> None:
        if self._probe is not None:
            self._acks.pop(self._probe.seq, None)
            self._probe = None

    def _resume(self, now: float) -> None:
        if self._pending and not self.stopped:
            self._pending = False
            self._start(now)

    # ------------------------------------------------------------ answers and relays

    def on_ping(self, msg: Ping, src: Address, current: Alive | None) -> None:
        """Ack a ping meant for us, adding ``current`` (our Alive) if given: the
        core passes it when the datagram accused an incarnation we already refuted."""
        if msg.target != self._table.me.name:
            self._stats.dropped += 1  # meant for whoever had this address before us
            return
        reply: list[Message] = [Ack(msg.seq, msg.target)]
        if current is not None:
            reply.append(current)
        self._send(src, msg.source, reply)

    def on_ack(self, msg: Ack, now: float) -> None:
        handler = self._acks.pop(msg.seq, None)
        if handler is None:
            return  # late or unknown
        if isinstance(handler, _Probe):
            self._rtt_count += 1
            self.rtts.append((self._rtt_count, now - handler.sent_at))
            if self._lifeguard:
                self._awareness.apply_delta(-1)
            self._probe = None
            self._resume(now)
        else:
            self._send(handler.origin, handler.origin_name, [Ack(handler.origin_seq, self._table.me.name)])

    def on_nack(self, msg: Nack) -> None:
        probe = self._probe
        if probe is not None and probe.seq == msg.seq and probe.nacks < probe.expected_nacks:
            probe.nacks += 1

    def on_ping_req(self, msg: PingReq, src: Address, now: float) -> None:
        me = self._table.me
        seq = self.next_seq()
        self._acks[seq] = _Relay(src, msg.source, msg.seq, msg.nack, msg.target)
        self._send(msg.target_addr, msg.target, [Ping(seq, msg.target, me.name, me.addr)])
        self._schedule(now + self._config.probe_timeout, RelayTimeout(seq))

    def on_relay_timeout(self, seq: int) -> tuple[str, str] | None:
        """Our ping for someone's PingReq got no ack: nack if asked to. Returns (target,
        origin) of the relay that timed out, None for a relay already answered."""
        relay = self._acks.get(seq)
        if not isinstance(relay, _Relay):
            return None
        del self._acks[seq]
        if relay.nack:
            self._send(relay.origin, relay.origin_name, [Nack(relay.origin_seq, self._table.me.name)])
        return relay.target, relay.origin_name

    # ------------------------------------------------------------ buddy re-check

    def recheck_time(self, susp: Suspicion) -> float:
        """Halfway through the shortest possible suspicion: late enough for the
        refutation epidemic to have passed us by, early enough for a slow
        member's answer to arrive in time. Never after the deadline itself."""
        halfway = susp.start + susp.min_timeout / 2
        return min(halfway, susp.deadline - self._config.probe_timeout)

    def on_recheck(self, node: Node, susp: Suspicion, now: float) -> None:
        """Buddy re-check (our addition to memberlist): one direct ping, carrying the
        suspicion, halfway through the shortest suspicion timeout.

        A member that already refuted answers with its current Alive on the ack
        (see :meth:`on_ping`). This catches the one case the epidemic misses: a
        member that heard the Suspect but none of the refutation's
        ``RetransmitMult * log10 N`` copies (about e**-7.5 per member at 5% loss
        and N < 100) would otherwise declare a live member dead.
        """
        if node.suspicion is not susp or node.state != SUSPECT or susp.rechecked:
            return
        if self.recheck_time(susp) > now:
            return  # a stale re-check timer; the live one comes later
        susp.rechecked = True
        me = self._table.me
        ping = Ping(self.next_seq(), node.name, me.name, me.addr)
        self._send(node.addr, node.name, [ping, Suspect(node.name, node.incarnation, me.name)])
