"""The membership core: SWIM + Lifeguard, sans-IO (memberlist semantics).

Theory of operation
-------------------
Inputs are datagrams (``receive``), push-pull stream frames
(``handle_stream`` / ``receive_stream_reply`` / ``stream_failed``), timers
(``handle_timeout``) and commands (``join``, ``leave``, ``set_meta``,
``set_state``, ``delete_state``, ``broadcast``). Outputs are sealed datagrams
and stream frames to send, events, and the next deadline. Time is always the
caller's ``now``; randomness comes from the injected ``random.Random``. Timers
are data (``timers.py``): one frozen type per kind on one heap, dispatched by
type; a timer that no longer matches the state it was armed for is ignored
when it fires.

The core is a few concepts, one module each: the member table and the one
rule for which news about a member wins (``members.py``), probing
(``probe.py``), timers (``timers.py``), suspicion (``suspicion.py``), local
health (``awareness.py``), the broadcast queue (``broadcast_queue.py``) and
replicated state (``state_store.py``). This module wires them: it decodes
input, applies membership news through ``members.can_change``, disseminates
and runs anti-entropy.

Members and their states (memberlist state.go)::

    ALIVE --probe fails / Suspect--> SUSPECT --suspicion timeout / Dead--> DEAD
    SUSPECT --Alive with higher incarnation--> ALIVE        (refuted)
    any --Dead sent by the member itself--> LEFT              (graceful leave)
    DEAD / LEFT --Alive with higher incarnation--> ALIVE      (restart / rejoin)
    DEAD / LEFT --dead_member_ttl--> forgotten                (reaped)

Only a member raises its own incarnation: to refute a Suspect or Dead about
itself, or to announce new metadata. An Alive about our name from another
address is not refuted but reported once per address (``NameConflict``, as
memberlist's NotifyConflict): the application decides who keeps the name. Whether an update about another member
applies is decided in one place, ``members.can_change`` (its docstring has the
table): newer (Alive) or not older (Suspect, Dead) than what we hold; LEFT is
never turned into DEAD.

Failure detection (SWIM 4.1-4.3 with Lifeguard, ``probe.py``): every ``probe_interval`` the
next member of a shuffled round-robin list is pinged (with the Suspect
piggybacked if it is suspect: the buddy system). No ack within the probe
timeout -> PingReq through ``indirect_checks`` random alive members, asking for
nacks. No ack by the end of the probe interval -> Suspect. Both waits are
stretched by the Local Health Multiplier (``awareness.py``), which the probe's
outcome moves exactly as memberlist probeNode does. A suspicion lasts between
``min`` and ``max`` and shrinks with independent confirmations
(``suspicion.py``); then the member is declared DEAD.

Dissemination: every change is queued in a transmit-limited broadcast queue
(``broadcast_queue.py``) and piggybacked on every datagram we send, within the
byte budget; every ``gossip_interval`` the queue is also sent to
``gossip_nodes`` random members. User broadcasts have their own queue, fill the
space membership updates leave, and are re-broadcast by every receiver once.

Anti-entropy: push-pull with a random alive member every scaled
``push_pull_interval``, as a digest exchange (``digest.py``: hashes first,
then only the records and entries the other side lacks); Serf-style reconnect
with a random DEAD or LEFT member (and the join seeds when we are alone) every
``reconnect_interval``, so partitions heal with no operator and a forged leave
does not stick.

Owner-signed state (``signing.py``): given a ``signer`` the core publishes
its credential under ``signing.CREDENTIAL_KEY`` and signs every entry it
stamps; given a ``verifier`` it applies a remote entry only if its owner
signed it (unknown credential: held, bounded by ``HELD_MAX``, and asked of
the owner by a push-pull: credentials are not gossiped), and re-stamps its
own map only for entries about itself that it signed.

Where we differ from memberlist, on purpose:

- the probe timeout is stretched by the LHM too (memberlist stretches only the
  probe interval), as in the Lifeguard paper;
- buddy re-check: halfway through the minimum suspicion timeout we ping the
  suspect once more, carrying the Suspect; a member answering a Suspect or
  Dead about an incarnation it already refuted puts its current Alive on the
  ack. Without it, a member that missed every copy of a refutation declares a
  live member dead (seen at 5% loss, and with starved members);
- a Suspect at a higher incarnation than the suspicion we hold restarts the
  suspicion (memberlist counts it as a confirmation of the refuted one);
- a member still suspecting (or probing through us) one we hold DEAD or LEFT
  missed every copy of the news: we send it our Suspect, a confirmation, or the
  member's own leave (``_tell_gone``, once per member per probe interval);
- a push-pull merges before it replies, so the reply carries any refutation;
  a DEAD member that announces its leave is recorded LEFT;
- of the members a push-pull teaches us, at most ``MERGE_REBROADCAST_MAX`` are
  re-broadcast (memberlist: all), and none from a join exchange: instead a joiner
  push-pulls once more with a random member ``JOIN_SETTLE_GOSSIP_INTERVALS`` later
  (``SettleTick``); the push-pull period is jittered +-50%;
- a leave is also sent straight to ``LEAVE_DIRECT_FANOUT`` live members, and a
  member that is itself leaving still records and forwards others' leaves
  (several members stopped at once were otherwise recorded DEAD);
- a member first heard of as DEAD or LEFT in a push-pull is recorded (memberlist
  ignores it) so a joiner learns a down member's replicated state; names we
  reaped are remembered and not taken back;
- push-pull is a digest exchange (memberlist: full state both ways); the
  gossip ticker parks while nothing is queued;
- a state update about a member not known yet is kept briefly (bounded) and
  applied when its Alive arrives; ``set_state`` of an unchanged value is a no-op.
- members heard of but never heard from are capped, verified by ping and
  dropped when they do not answer (``verify.py``); in a flood of them a
  verified member others report DEAD or LEFT is re-checked at once by a
  ping carrying the news, and unverified ones that go DEAD or LEFT are
  forgotten at once.
- anti-replay (memberlist has none): every datagram carries a header (sender,
  boot epoch, counter, destination tag; ``codec.DatagramHeader``) that the
  receiver checks (``replay.py``) before reading a message; a reaped name
  keeps its last incarnation, and only a higher one or the member itself
  brings it back.
"""

from __future__ import annotations

import math
import random
from collections import OrderedDict, deque
from collections.abc import Iterable

from . import digest
from .awareness import Awareness
from .broadcast_queue import (
    PRIORITY_MEMBERSHIP,
    PRIORITY_STATE,
    PRIORITY_USER,
    BroadcastQueue,
    retransmit_limit,
)
from .codec import (
    DATAGRAM_HEADER_BYTES,
    FRAME_HEADER_BYTES,
    MAX_COUNTER,
    MAX_COUNTER_STEP,
    MAX_SIG_BYTES,
    MAX_TAG,
    MAX_UINT64,
    DatagramHeader,
    counter_step,
    decode_datagram,
    decode_push_pull,
    destination_tag,
    encode_datagram,
    encode_frame,
    encoded_size,
    header_size,
    owner_states_size,
    record_size,
)
from .config import GossipConfig
from .errors import BroadcastTooLarge, CounterExhausted, DecryptError, LocalError, RemoteError
from .events import (
    Event,
    Member,
    MemberAlive,
    MemberFailed,
    MemberJoined,
    MemberLeft,
    MemberReaped,
    MemberSuspected,
    MemberUpdated,
    NameConflict,
    StateChanged,
    UserMessage,
)
from .keyring import OVERHEAD, Keyring
from .members import ALIVE, DEAD, LEFT, SUSPECT, MemberTable, Node, can_change
from .messages import (
    Ack,
    Address,
    Alive,
    Dead,
    MemberRecord,
    MemberState,
    Message,
    Nack,
    Ping,
    PingReq,
    PushPull,
    StateEntry,
    StateUpdate,
    StateValue,
    Summary,
    Suspect,
    UserBroadcast,
    Want,
)
from .probe import Prober
from .replay import ReplayGuard
from .signing import CREDENTIAL_KEY, StateSigner, StateVerifier, canonical_alive, canonical_entry
from .state_store import StateStore, entry_memory
from .stats import Stats
from .suspicion import Suspicion, suspicion_timeout
from .timers import (
    GossipTick,
    ProbeEnd,
    ProbeTick,
    ProbeTimeout,
    PushPullTick,
    Reap,
    Recheck,
    ReconnectTick,
    RelayTimeout,
    SettleTick,
    SuspicionTimeout,
    Timer,
    TimerHeap,
    next_tick,
)
from .verify import UNVERIFIED_GONE_TTL, UNVERIFIED_PRESSURE_DIVISOR, Verifier

PUSH_PULL_SCALE_THRESHOLD = 32  # memberlist pushPullScaleThreshold: scale push-pull above this size
USER_DEDUP_CAPACITY = 8192  # (origin, seq) pairs remembered to deliver each user broadcast once
# leave() sends the leave straight to this many random live members besides
# queueing it (ours; memberlist relies on the queue and a broadcast timeout).
LEAVE_DIRECT_FANOUT = 8

# Alives learned from a push-pull are re-broadcast as memberlist does (they may be
# news: the other side's refutations after a partition), but after everything
# else.
PRIORITY_MERGED = PRIORITY_USER + 1
# memberlist also re-broadcasts every member that is merely new to *us*: a joiner
# re-gossips the whole cluster (N updates x RetransmitMult*log10 N sends). That
# flood is what repairs joins that overlapped and missed each other's Alive, but
# at N = 1000 it dwarfs everything else. We re-broadcast the push-pull's sender
# and a random sample of at most this many of the others: identical to
# memberlist up to this size, bounded beyond.
MERGE_REBROADCAST_MAX = 32
# A join exchange re-broadcasts none of them (issue 13): after a site-wide power cut every
# joiner learnt the whole cluster from its seed and re-gossiped it: 145 sends per Alive at
# N = 20 in the simulator instead of 82. What that flood repaired -- joins that overlapped
# and missed each other's Alive -- one more push-pull with a random member, this many gossip
# intervals after our join (1 s on LAN), repairs at the cost of one digest exchange.
JOIN_SETTLE_GOSSIP_INTERVALS = 5
# While members new to us keep arriving (others joining at the same time: a site-wide
# restart), the settle push-pull is repeated one interval later, JOIN_SETTLES times in all:
# the last one comes after the joins stopped and repairs what the epidemic missed (repeats
# heard now count as sends, broadcast_queue.py, so it misses a little more often).
JOIN_SETTLES = 3
# State updates held because their owner's credential is not known yet (signing.py):
# released when it arrives, the oldest dropped beyond this (anti-entropy repairs them).
HELD_MAX = 32
# A credential is not gossiped (each is ~600 B, and every member needed every one
# at startup): it travels in push-pulls, and a member that learns of a member
# without its credential (_fetch_uncredentialed), or holds an update whose
# owner's credential it lacks, asks the owner for that map at once, at most once
# per CREDENTIAL_FETCH_RETRY seconds per owner and for CREDENTIAL_FETCH_MAX owners
# at a time (beyond: the periodic push-pull brings it).
CREDENTIAL_FETCH_RETRY = 2.0
CREDENTIAL_FETCH_MAX = 64
# A member we do not know that sends us datagrams, or whose state a member gossips to us:
# the epidemic that spread its Alive may have missed us (gossip's residue, likelier since
# repeats heard count as sends, broadcast_queue.py). Gossip brings a new member within a second or two;
# after UNKNOWN_SENDER_GRACE we ask the sender for its record (a Want, not a full
# push-pull), at most once per grace, UNKNOWN_SENDER_ASKS times, for at most
# UNKNOWN_SENDERS_MAX members at a time: a key holder inventing senders costs a few
# bounded connections, not a stream of them.
UNKNOWN_SENDER_GRACE = 2.0
# The first value of a key is news of a start (sent with feedback, broadcast_queue.py)
# only while its owner is this new to us: a starting agent publishes its claims and key
# fingerprint in its first seconds. A key first published later (a service registered on
# a settled mesh) is an ordinary update and goes out the full retransmit limit, so it
# reaches every member in the first burst, not at the next push-pull.
START_NEWS_S = 10.0
UNKNOWN_SENDER_ASKS = 3
UNKNOWN_SENDERS_MAX = 64
# State updates about members we do not know yet are kept this long, at most
# this many and this much memory (state_store.entry_memory), then dropped: a
# member's first update can overtake its Alive by a gossip hop or two.
PENDING_STATE_TTL = 10.0
PENDING_STATE_MAX = 256
PENDING_STATE_MEMORY = 256 * 1024
# Alive signature checks remembered (verdicts by credential, signed bytes and signature),
# so an Alive heard again from several peers is verified once.
ALIVE_VERDICTS_MAX = 1024


# Kept state updates of members not known yet: (owner, key) -> (update, expiry).
_Pending = OrderedDict[tuple[str, str], tuple[StateUpdate, float]]
# Stats.KINDS name of each datagram message type.
_KIND: dict[type, str] = {
    Ping: "ping", Ack: "ack", Nack: "nack", PingReq: "ping_req", Alive: "alive", Suspect: "suspect",
    Dead: "dead", StateUpdate: "state", UserBroadcast: "user",
}
# Anti-replay windows beyond one per member and one per remembered reaped name
# (both bounded by max_members): room for senders heard of but not (yet) members.
REPLAY_SPARE_SENDERS = 64


class InvalidArgument(LocalError, ValueError):
    """A command argument is malformed (e.g. a state value msgpack cannot carry)."""


def _record(node: Node) -> MemberRecord:
    return MemberRecord(node.name, node.addr, node.incarnation, node.state, node.meta, node.sig)


def push_pull_scale(interval: float, n: int) -> float:
    """memberlist pushPullScale: stretch the push-pull interval for clusters above 32."""
    if n <= PUSH_PULL_SCALE_THRESHOLD:
        return interval
    multiplier = math.ceil(math.log2(n) - math.log2(PUSH_PULL_SCALE_THRESHOLD)) + 1
    return interval * multiplier


class Membership:
    """One member of a SWIM + Lifeguard cluster, sans-IO. See the module docstring."""

    def __init__(
        self,
        name: str,
        addr: Address,
        config: GossipConfig,
        rng: random.Random,
        now: float,
        *,
        keyring: Keyring,
        incarnation: int = 0,
        meta: bytes = b"",
        state_version: int = 0,
        signer: StateSigner | None = None,
        verifier: StateVerifier | None = None,
        epoch: int = 0,
    ) -> None:
        if len(meta) > config.max_meta_bytes:
            raise BroadcastTooLarge(f"metadata is {len(meta)} bytes; at most {config.max_meta_bytes}")
        self.name = name
        self.addr = addr
        self.config = config
        self.stats = Stats()
        self._rng = rng
        self._keyring = keyring
        self._aad = config.cluster_name.encode()
        # Plaintext bytes the messages of one datagram may take.
        header = self._init_replay(name, epoch, config.max_members)
        self._budget = config.max_datagram_bytes - OVERHEAD - DATAGRAM_HEADER_BYTES - header
        self._lifeguard = config.lifeguard
        self._awareness = Awareness(config.awareness_max_multiplier)

        self._me = Node(name, addr, incarnation, ALIVE, meta, now)
        self._table = MemberTable(self._me)
        self._timers = TimerHeap()
        self._prober = Prober(
            config,
            self._table,
            self._awareness,
            rng,
            self.stats,
            send=self._send,
            schedule=self._timers.schedule,
            suspect=self._on_probe_failed,
        )
        self._verifier = Verifier(config.probe_interval, config.max_members)
        self._left = False
        # Reaped names -> last incarnation, oldest first, at most max_members (see _on_alive).
        self._reaped: dict[str, int] = {}
        self._stale_accusation = False  # this datagram accused an older incarnation of us
        self._rx_sender: str | None = None  # the member whose datagram is being read
        self._conflicts: set[Address] = set()  # addresses that claimed our name, reported once

        self._queue = BroadcastQueue(config.max_broadcast_queue)
        self._user_queue = BroadcastQueue(config.max_user_broadcast_queue)
        self._limit_cache: tuple[int, int] = (-1, 0)
        self._suspicion_cache: dict[int, float] = {}
        self._init_signing(signer, verifier)
        self._store = StateStore(
            name, config.max_state_bytes, state_version, max_memory=config.max_state_memory,
            max_total_memory=config.max_total_state_memory,
            sign=self._sign_entry if signer is not None else None,
        )  # fmt: skip
        self._store_seen = (0, 0)  # the store's (rejected, out_of_range) already counted
        self._user_seq = rng.getrandbits(40)  # fresh per life, so a restart is not taken for a duplicate
        self._user_seen: OrderedDict[tuple[str, int], None] = OrderedDict()
        self._pending_state: _Pending = OrderedDict()  # updates of members not known yet, oldest first

        self._seeds: list[Address] = []
        self._pending_streams: dict[Address, int] = {}
        self._followups: dict[Address, int] = {}  # digest follow-up requests awaiting a reply
        self._gossip_parked: float | None = None  # the idle gossip ticker's last deadline
        self._pending_memory = 0  # entry_memory of _pending_state
        self._datagrams: list[tuple[Address, bytes]] = []
        self._streams: list[tuple[Address, bytes]] = []
        self._events: deque[Event] = deque()

        self._announce()
        self._start_tickers(now)

    def _init_signing(self, signer: StateSigner | None, verifier: StateVerifier | None) -> None:
        """Owner-signed state and Alives (signing.py): our key, and the trust anchor that
        checks others'."""
        self._signer = signer
        self._state_verifier = verifier
        self._held: deque[StateUpdate] = deque()
        self._own_alive_key: tuple[int, Address, bytes] | None = None  # what _own_alive_sig signs
        self._own_alive_sig = b""
        self._alive_verdicts: OrderedDict[tuple[bytes, bytes, bytes], bool] = OrderedDict()
        self._fetched: dict[str, float] = {}  # owner -> when we last asked it for its credential
        self._uncredentialed: list[str] = []  # members new to us this input (fetch_uncredentialed)
        self._unknown_senders: dict[str, tuple[float, int, Address]] = {}  # member -> (noted, asks, whom to ask)
        self._rx_src: Address | None = None  # the address of the datagram being read
        self._settle_armed = False  # the SettleTicks after our first join exchange
        self._settles_left = 0  # SettleTicks still allowed (JOIN_SETTLES)
        self._learnt_since_settle = False  # a member new to us since the last SettleTick

    def _start_tickers(self, now: float) -> None:
        """memberlist staggers each ticker randomly so members do not synchronise."""
        config, rng, schedule = self.config, self._rng, self._timers.schedule
        schedule(now + rng.random() * config.probe_interval, ProbeTick())
        schedule(now + rng.random() * config.gossip_interval, GossipTick())
        schedule(now + rng.random() * config.push_pull_interval, PushPullTick())
        schedule(now + rng.random() * config.reconnect_interval, ReconnectTick())

    def _announce(self) -> None:
        """Announce ourselves: the first datagrams to any peer carry it (and our credential)."""
        me = self._me
        announce = self._own_alive(me.incarnation, me.meta)
        self._check_fits(announce)  # a bad name or address is the caller's error
        self._enqueue(announce, me.name, PRIORITY_MEMBERSHIP)
        if self._signer is not None:
            # Our credential first (version 1): receivers need it to verify everything else
            # we say. Not gossiped: it goes in push-pulls and to members that ask for it.
            update = self._store.set_local(CREDENTIAL_KEY, self._signer.credential)
            self._check_fits(update)  # it must travel in one datagram too (older peers gossip it)
    def _init_replay(self, name: str, epoch: int, max_members: int) -> int:
        """Anti-replay state (replay.py); returns the most bytes our DatagramHeader takes.

        Our boot epoch (higher on every start: the caller keeps it), the next datagram's
        counter, the tag datagrams addressed to us carry, and every sender's window.
        """
        self._epoch = epoch
        self._counter = 0
        self._tag = destination_tag(name)
        self._replay = ReplayGuard(2 * max_members + REPLAY_SPARE_SENDERS)
        try:
            return header_size(DatagramHeader(name, epoch, MAX_UINT64, MAX_TAG))
        except ValueError as exc:  # a bad name or epoch is the caller's error
            raise InvalidArgument(str(exc)) from None

    # ------------------------------------------------------------------ reading

    @property
    def incarnation(self) -> int:
        """Our own incarnation number."""
        return self._me.incarnation

    @property
    def health_score(self) -> int:
        """Lifeguard Local Health Multiplier score, 0 .. awareness_max_multiplier - 1."""
        return self._awareness.score

    @property
    def num_alive(self) -> int:
        """Members in state ALIVE, ourselves included (unless we left)."""
        return self._table.counts[ALIVE] + (0 if self._left else 1)

    @property
    def recent_probe_rtts(self) -> tuple[tuple[int, float], ...]:
        """The last successful probes' round-trip times as ``(sample number, seconds)``.

        Sample numbers only grow; a reader keeps the last one it saw and takes
        the newer ones (at most ``probe.PROBE_RTT_SAMPLES`` are kept).
        """
        return tuple(self._prober.rtts)

    @property
    def local_member(self) -> Member:
        """Our own record."""
        return self._me.snapshot()

    @property
    def pending_broadcasts(self) -> int:
        """Updates still waiting to be (re)transmitted; a leaving driver waits for 0."""
        return len(self._queue) + len(self._user_queue)

    def members(self) -> list[Member]:
        """Every member we know, ourselves included, dead and left ones until reaped."""
        return [n.snapshot() for n in self._table.by_name.values()]

    def member(self, name: str) -> Member | None:
        """One member by name, or None."""
        node = self._table.get(name)
        return node.snapshot() if node is not None else None

    def state_of(self, owner: str) -> dict[str, StateValue]:
        """``owner``'s replicated map as known here."""
        return self._store.values(owner)

    # ----------------------------------------------------------------- outputs

    def datagrams_to_send(self) -> list[tuple[Address, bytes]]:
        """Drain the sealed datagrams to send, each <= ``max_datagram_bytes``."""
        out, self._datagrams = self._datagrams, []
        return out

    def streams_to_send(self) -> list[tuple[Address, bytes]]:
        """Drain the sealed push-pull requests to send; each expects one reply."""
        out, self._streams = self._streams, []
        return out

    def next_event(self) -> Event | None:
        """The next event, or None."""
        return self._events.popleft() if self._events else None

    def get_timer(self) -> float | None:
        """The earliest pending deadline (possibly of a timer that turns out stale)."""
        return self._timers.next_deadline()

    # ---------------------------------------------------------------- commands

    def join(self, seeds: Iterable[Address], now: float) -> None:
        """Push-pull (join) with every seed; seeds are retried while we are alone."""
        for seed in seeds:
            seed = (seed[0], seed[1])
            if seed == self.addr:
                continue
            if seed not in self._seeds:
                self._seeds.append(seed)
            self._request_push_pull(seed, join=True)

    def join_once(self, addr: Address, now: float) -> None:
        """Push-pull (join) with ``addr`` once; unlike :meth:`join` it is not kept as a seed
        (mDNS discoveries: the caller owns retries and their backoff)."""
        addr = (addr[0], addr[1])
        if addr != self.addr:
            self._request_push_pull(addr, join=True)

    def leave(self, now: float) -> None:
        """Leave gracefully: broadcast Dead about ourselves, sent by ourselves (LEFT everywhere)."""
        if self._left:
            return
        self._left = True
        me = self._me
        me.state = LEFT
        me.state_change = now
        self._prober.stop()
        leave = Dead(me.name, me.incarnation, me.name)
        # Tell up to LEAVE_DIRECT_FANOUT live members at once, not only the next
        # gossip targets: when several members leave together, piggybacking
        # alone can hand every copy to members that are themselves stopping,
        # and the one that stays records the leavers DEAD instead of LEFT.
        # Queued only afterwards, so these datagrams do not carry it twice.
        for node in self._table.k_random(LEAVE_DIRECT_FANOUT, lambda n: n.state <= SUSPECT, self._rng):
            self._send(node.addr, node.name, [leave])
        self._enqueue(leave, me.name, PRIORITY_MEMBERSHIP)

    def set_meta(self, meta: bytes, now: float) -> None:
        """Change our metadata (raises BroadcastTooLarge beyond ``max_meta_bytes``)."""
        if len(meta) > self.config.max_meta_bytes:
            raise BroadcastTooLarge(f"metadata is {len(meta)} bytes; at most {self.config.max_meta_bytes}")
        me = self._me
        if me.incarnation >= MAX_COUNTER:
            raise CounterExhausted("incarnation at its maximum; restart with a new name")
        announce = self._own_alive(me.incarnation + 1, meta)
        self._check_fits(announce)
        me.incarnation += 1
        me.meta = meta
        me.sig = announce.sig
        self._enqueue(announce, me.name, PRIORITY_MEMBERSHIP)

    def set_state(self, key: str, value: StateValue, now: float) -> None:
        """Set a key of our replicated map and spread it.

        Raises BroadcastTooLarge if the map would exceed ``max_state_bytes`` or
        the entry can never fit a datagram, InvalidArgument for a value the
        wire cannot carry.
        """
        self._reserved(key)
        # Sized with a maximal signature when we sign: the entry must fit a datagram with it.
        sig = bytes(MAX_SIG_BYTES) if self._signer is not None else b""
        self._check_fits(StateUpdate(self.name, self._store.version + 1, key, value, sig=sig))
        if self._store.unchanged(key, value):
            return  # the same value again: no new version, nothing to spread
        update = self._store.set_local(key, value)
        self._enqueue(update, (self.name, key), PRIORITY_STATE)

    def rebroadcast_state(self, key: str, now: float) -> None:
        """Spread our current entry for ``key`` again, at the same version.

        Members that hold it drop the copy and do not pass it on; members that
        lack it (the other side of a healed partition) take it and spread it.
        """
        update = self._store.local_update(key)
        if update is not None and not self._left:
            self._enqueue(update, (self.name, key), PRIORITY_STATE)

    def delete_state(self, key: str, now: float) -> None:
        """Delete a key of our replicated map (a tombstone spreads)."""
        self._reserved(key)
        update = self._store.delete_local(key)
        if update is not None:
            self._enqueue(update, (self.name, key), PRIORITY_STATE)

    def _reserved(self, key: str) -> None:
        if key == CREDENTIAL_KEY:
            raise InvalidArgument(f"state key {CREDENTIAL_KEY!r} is reserved for the credential")

    def _sign_entry(self, key: str, version: int, value: StateValue, deleted: bool) -> bytes:
        assert self._signer is not None
        cluster = self.config.cluster_name
        return self._signer.sign(canonical_entry(cluster, self.name, key, version, value, deleted))

    def broadcast(self, payload: bytes, now: float) -> None:
        """Spread ``payload`` to every member once (UserMessage events there, not here)."""
        msg = UserBroadcast(self.name, self._user_seq, payload)
        size = self._check_fits(msg)
        self._user_seq = (self._user_seq + 1) & MAX_UINT64
        self._remember_user((msg.origin, msg.seq))
        self._user_queue.push(msg, key=(msg.origin, msg.seq), priority=PRIORITY_USER, size=size)
        self._wake_gossip()

    def _check_fits(self, msg: Message) -> int:
        try:
            size = encoded_size(msg)
        except ValueError as exc:  # BroadcastTooLarge is a LocalError and passes through
            raise InvalidArgument(str(exc)) from None
        if size > self._budget:
            raise BroadcastTooLarge(f"{type(msg).__name__} of {size} bytes can never fit a datagram")
        return size

    # ------------------------------------------------------------------ inputs

    def receive(self, data: bytes, src: Address, now: float) -> None:
        """One sealed datagram from ``src``. Bad input is dropped and counted."""
        stats = self.stats
        stats.datagrams_in += 1
        stats.bytes_in += len(data)
        try:
            header, msgs = decode_datagram(self._keyring.decrypt(data, self._aad))
        except RemoteError as exc:
            self._count_error(exc)
            return
        if not self._fresh(header):
            return
        self._rx_sender, self._rx_src = header.sender, src
        for msg in msgs:
            stats.count(False, _KIND[type(msg)], encoded_size(msg))
        pings: list[Ping] = []
        for msg in msgs:
            # Answer pings last so the ack carries whatever this datagram made us
            # say (a refutation of a piggybacked Suspect, most of all).
            if type(msg) is Ping:
                pings.append(msg)
            else:
                self._dispatch(msg, src, now)
            if type(msg) is Ping or type(msg) is Ack or type(msg) is Nack or type(msg) is PingReq:
                self._heard_from(msg.source, src)
        self._rx_sender = None
        for ping in pings:
            self._prober.on_ping(ping, src, self._current_alive())
        self._stale_accusation = False
        if self._uncredentialed:
            self._fetch_uncredentialed(now)
        if header.sender not in self._table.by_name:
            self._unknown_member(header.sender, src, now)

    def _unknown_member(self, name: str, ask: Address, now: float) -> None:
        """Someone spoke of (or as) ``name``, a member we do not know; ``ask`` knows it.

        Noted, and asked for the member's record on a probe tick if gossip has not
        brought it within UNKNOWN_SENDER_GRACE (see the constant)."""
        seen = self._unknown_senders
        if name not in seen and name != self.name and len(seen) < UNKNOWN_SENDERS_MAX:
            seen[name] = (now, 0, ask)

    def _ask_unknown(self, now: float) -> None:
        """Probe tick: ask for the record of each member still unknown after the grace,
        once per grace, UNKNOWN_SENDER_ASKS times at most (then push-pull's to repair)."""
        seen = self._unknown_senders
        by_name = self._table.by_name
        for name, (noted, asks, ask) in list(seen.items()):
            if name in by_name or self._left or asks >= UNKNOWN_SENDER_ASKS:
                del seen[name]
            elif now - noted >= (asks + 1) * UNKNOWN_SENDER_GRACE:
                seen[name] = (noted, asks + 1, ask)
                self.stats.unknown_sender_asks += 1
                want = Want((name,), ((name, self._store.held(name)),))
                msg = PushPull(self.name, False, False, (), (), want=want, epoch=self._epoch)
                self._start_stream(ask, self._seal_frame(msg, False, False))

    def _fresh(self, header: DatagramHeader) -> bool:
        """Anti-replay (replay.py): False, and counted, for a datagram addressed to another
        member (``dropped``: misdirected or re-addressed) or seen before or from an older life
        of its sender (``replayed``)."""
        if header.to != self._tag:
            self.stats.dropped += 1
            return False
        if self._replay.accept(header.sender, header.epoch, header.counter):
            return True
        self.stats.replayed += 1
        return False

    def _dispatch(self, msg: Message, src: Address, now: float) -> None:
        # Pings are answered by ``receive``, last; the decoder yields no PushPull.
        match msg:
            case Ack():
                self._prober.on_ack(msg, now)
            case Nack():
                self._prober.on_nack(msg)
            case PingReq():
                self._prober.on_ping_req(msg, src, now)
            case Alive():
                if not self._left:
                    # An Alive from the member's own address is it speaking: verified.
                    self._on_alive(msg, now, PRIORITY_MEMBERSHIP, verified=msg.addr == src)
            case Suspect():
                if not self._left:
                    self._on_suspect(msg, now)
            case Dead():
                self._on_dead_msg(msg, now)
            case StateUpdate():
                self._on_state_update(msg, now)
            case UserBroadcast():
                self._on_user_broadcast(msg)

    def _heard_from(self, name: str, src: Address) -> None:
        """A message sent by ``name`` from ``src``: if that is its address, it is verified."""
        node = self._table.get(name)
        if node is not None and not node.verified and node.addr == src:
            self._table.verify(node)

    def _current_alive(self) -> Alive | None:
        """Our Alive, to put on an ack when the pinger still accuses an incarnation
        we already refuted: it missed our Alive (memberlist ignores this)."""
        if self._stale_accusation and self._lifeguard and not self._left:
            return self._own_alive(self._me.incarnation, self._me.meta)
        return None

    def handle_stream(self, data: bytes, src: Address, now: float) -> bytes | None:
        """A sealed push-pull request; returns the sealed reply (None if it was bad)."""
        self.stats.streams_in += 1
        self.stats.bytes_in += len(data)
        self.stats.stream_bytes_in += len(data)
        remote = self._open_frame(data)
        if remote is None:
            return None
        if remote.reply:
            self.stats.dropped += 1
            return None
        # Merge before answering (memberlist answers first): a member we held as
        # dead then refutes at once, and the reply already carries the refutation.
        self._merge(remote, now, src[0])
        if remote.summary is None and remote.want is None:
            reply = self._sealed_state(join=remote.join, reply=True)  # a full-state request
        else:
            reply = self._seal_frame(self._digest_answer(remote, reply=True), remote.join, True)
        self.stats.bytes_out += len(reply)
        self.stats.stream_bytes_out += len(reply)
        return reply

    def receive_stream_reply(self, data: bytes, src: Address, now: float) -> None:
        """The sealed reply to a push-pull request we sent to ``src``."""
        self.stats.stream_replies_in += 1
        self.stats.bytes_in += len(data)
        self.stats.stream_bytes_in += len(data)
        if not self._end_stream(src):
            self.stats.dropped += 1
            return
        remote = self._open_frame(data)
        if remote is None:
            return
        if not remote.reply:
            self.stats.dropped += 1
            return
        self._merge(remote, now, src[0])
        if remote.join and not self._settle_armed:
            self._settle_armed = True
            self._settles_left, self._learnt_since_settle = JOIN_SETTLES, False
            settle = JOIN_SETTLE_GOSSIP_INTERVALS * self.config.gossip_interval
            self._timers.schedule(now + settle, SettleTick())
        followups = self._followups.get(src, 0)
        if followups:
            # The reply to a follow-up ends the exchange (bounds a peer's lists to one round).
            if followups == 1:
                del self._followups[src]
            else:
                self._followups[src] = followups - 1
            return
        if remote.want is not None or (
            remote.summary is not None and (remote.summary.members is not None or remote.summary.owners is not None)
        ):
            follow = self._digest_answer(remote, reply=False)
            if follow.members or follow.states or (follow.want is not None and follow.want != Want()):
                self._followups[src] = self._followups.get(src, 0) + 1
                self._start_stream(src, self._seal_frame(follow, False, False))

    def stream_failed(self, dst: Address, now: float) -> None:
        """Our push-pull request to ``dst`` could not be delivered (or got no reply)."""
        if self._end_stream(dst):
            self.stats.stream_failures += 1
            pending = self._pending_streams.get(dst, 0)
            if self._followups.get(dst, 0) > pending:
                if pending:
                    self._followups[dst] = pending
                else:
                    del self._followups[dst]

    def handle_timeout(self, now: float) -> None:
        """Run every timer due at or before ``now``."""
        while (due := self._timers.pop_due(now)) is not None:
            deadline, timer = due
            self._fire(timer, deadline, now)

    def _fire(self, timer: Timer, deadline: float, now: float) -> None:
        prober = self._prober
        match timer:
            case ProbeTick():
                prober.on_tick(deadline, now)
                if self._unknown_senders:
                    self._ask_unknown(now)
                if self._verifier and not self._left:
                    self._verifier.pressure(self._table.unverified, self._pressure_mark(), now)
                    for node in self._verifier.due_rechecks(now):
                        sender = node.name if node.state == LEFT else self.name
                        self._recheck_gone(node, Dead(node.name, node.incarnation, sender))
                    self._verifier.on_tick(
                        now, lambda node: self._verify_ping(node, now), lambda node: self._unverifiable(node, now)
                    )
            case ProbeTimeout(seq):
                prober.on_timeout(seq, now)
            case ProbeEnd(seq):
                prober.on_end(seq, now)
            case RelayTimeout(seq):
                lost = prober.on_relay_timeout(seq)
                if lost is not None:
                    self._relay_lost(lost[0], lost[1], now)
            case GossipTick():
                self._on_gossip_tick(deadline, now)
            case PushPullTick():
                self._on_push_pull_tick(deadline, now)
            case ReconnectTick():
                self._on_reconnect_tick(deadline, now)
            case SettleTick():  # a while after our join (JOIN_SETTLE_GOSSIP_INTERVALS)
                self._push_pull_random()
                self._settles_left -= 1
                if self._settles_left > 0 and self._learnt_since_settle:  # others were joining too
                    self._learnt_since_settle = False
                    settle = JOIN_SETTLE_GOSSIP_INTERVALS * self.config.gossip_interval
                    self._timers.schedule(now + settle, SettleTick())
            case SuspicionTimeout(node, susp):
                self._on_suspicion_timeout(node, susp, now)
            case Reap(node, stamp):
                self._on_reap(node, stamp)
            case Recheck(node, susp):
                prober.on_recheck(node, susp, now)

    # ------------------------------------------------------------ plumbing

    def _count_error(self, exc: RemoteError) -> None:
        if isinstance(exc, DecryptError):
            self.stats.decrypt_errors += 1
        else:
            self.stats.decode_errors += 1

    def _open_frame(self, data: bytes) -> PushPull | None:
        """Open a push-pull frame; its source's epoch is then the current one (streams are fresh)."""
        config = self.config
        try:
            plain = self._keyring.decrypt(data, self._aad)
            remote, cut = decode_push_pull(
                plain,
                config.max_stream_bytes,
                # What the store could take at most: no map is decoded only to be refused.
                config.max_state_memory,
                config.max_total_state_memory + config.max_state_memory,
            )
        except RemoteError as exc:
            self._count_error(exc)
            return None
        self.stats.state_rejected += cut
        self._count_frame(remote, len(plain), out=False)
        if remote.source != self.name:
            self._replay.sync(remote.source, remote.epoch)
        return remote

    def _count_frame(self, msg: PushPull, size: int, out: bool) -> None:
        """Split a push-pull frame's ``size`` plaintext bytes into records, entries and the rest."""
        members = sum(record_size(r) for r in msg.members)
        states = sum(owner_states_size(o, e) for o, e in msg.states)
        count = self.stats.count
        count(out, "push_pull_members", members, 0)
        count(out, "push_pull_state", states, 0)
        count(out, "push_pull_digest", size - members - states)

    def _end_stream(self, addr: Address) -> bool:
        pending = self._pending_streams.get(addr, 0)
        if pending <= 0:
            return False
        if pending == 1:
            del self._pending_streams[addr]
        else:
            self._pending_streams[addr] = pending - 1
        return True

    def _retransmit_limit(self) -> int:
        n = self._table.n_estimate()
        cached_n, limit = self._limit_cache
        if cached_n != n:
            limit = retransmit_limit(self.config.retransmit_mult, n)
            self._limit_cache = (n, limit)
        return limit

    def _enqueue(
        self, msg: Message, key: object, priority: int, known: tuple[str, ...] = (), feedback: bool = False
    ) -> None:
        """Queue ``msg`` for piggybacking; ``known``: members that hold it already (not sent to);
        ``feedback``: news of a start, sent fewer times as we hear it back (broadcast_queue.py)."""
        self._queue.push(msg, key=key, priority=priority, size=encoded_size(msg), known=known, feedback=feedback)
        self._wake_gossip()

    def _is_peer(self, name: str) -> bool:
        """``name`` is another member, ALIVE or SUSPECT (one that n_estimate counts)."""
        node = self._table.by_name.get(name)
        return node is not None and node is not self._me and node.state <= SUSPECT

    def _heard(self, key: object, msg: Message) -> None:
        """The datagram's sender sent us ``msg`` again: it holds the update queued under ``key``."""
        if self._rx_sender is not None:
            self._queue.heard(key, msg, self._rx_sender)

    def _holders(self, subject: str) -> tuple[str, ...]:
        """Who holds an update about ``subject`` we just received: it, and the datagram's sender."""
        sender = self._rx_sender
        return (subject,) if sender is None or sender == subject else (subject, sender)

    def _wake_gossip(self) -> None:
        """Something was queued: re-arm a parked gossip ticker on its old phase (due at once if late)."""
        parked = self._gossip_parked
        if parked is not None:
            self._gossip_parked = None
            self._timers.schedule(parked + self.config.gossip_interval, GossipTick())

    def _take_broadcasts(self, budget: int, to: str) -> list[Message]:
        limit = self._retransmit_limit()
        peers, live = self._table.n_estimate() - 1, self._is_peer
        msgs: list[Message] = self._queue.take(budget, limit, to, peers, live) if self._queue else []
        if self._user_queue:
            # User broadcasts fill what membership and state updates leave.
            budget -= sum(encoded_size(m) for m in msgs)
            msgs.extend(self._user_queue.take(budget, limit, to, peers, live))
        return msgs

    def _send(self, addr: Address, to: str, msgs: list[Message]) -> None:
        """Seal ``msgs`` plus as many piggybacked broadcasts as fit, queue for member ``to`` at ``addr``."""
        used = sum(encoded_size(m) for m in msgs)
        if used < self._budget:
            msgs.extend(self._take_broadcasts(self._budget - used, to))
        self._seal(addr, to, msgs)

    def _seal(self, addr: Address, to: str, msgs: list[Message]) -> None:
        count = self.stats.count
        for msg in msgs:
            count(True, _KIND[type(msg)], encoded_size(msg))
        header = DatagramHeader(self.name, self._epoch, self._counter, destination_tag(to))
        self._counter = min(self._counter + 1, MAX_UINT64)  # 2**64 datagrams: never reached
        sealed = self._keyring.encrypt(encode_datagram(msgs, header), self._aad)
        self._datagrams.append((addr, sealed))
        self.stats.datagrams_out += 1
        self.stats.bytes_out += len(sealed)

    def _request_push_pull(self, addr: Address, join: bool) -> None:
        """Start a digest push-pull (``digest.py``): a joiner lists what it holds, others hash it."""
        if join:
            me = self._me
            own = self._store.entries(self.name)
            msg = PushPull(
                self.name, True, False, (_record(me),), ((self.name, own),) if own else (),
                summary=digest.summary(self._table, self._store, True, True),
                epoch=self._epoch,
            )
        else:
            summary = digest.summary(self._table, self._store, False, False)
            msg = PushPull(self.name, False, False, (), (), summary=summary, epoch=self._epoch)
        self._start_stream(addr, self._seal_frame(msg, join, False))

    def _digest_answer(self, remote: PushPull, reply: bool) -> PushPull:
        """What to send back for a digest push-pull: what the peer lacks, our Want, our lists.

        For a reply (``reply``): our lists where the peer sent only a hash that differs.
        """
        table, store = self._table, self._store
        records: list[Node] = []
        states: digest.States = []
        want: Want | None = None
        mine: Summary | None = None
        s = remote.summary
        if s is not None:
            if s.members is not None:
                about_me = next((m for m in s.members if m.name == self.name), None)
                if about_me is not None and (about_me.state != ALIVE or about_me.incarnation > self._me.incarnation):
                    self._about_me(about_me.state, about_me.incarnation)  # refute now: the Alive goes below
                records = digest.records_lacking(table, s.members)
                if all(n is not self._me for n in records):
                    # Ours always goes when lists are compared: a peer listing "our" name may be
                    # another node that took it (the digest would call the two records equal).
                    records.append(self._me)
                names = digest.members_wanted(table, s.members, self._reaped)
            else:
                names = ()
            if s.owners is not None:
                states = digest.entries_lacking(store, s.owners, remote.source)
                owners = digest.owners_wanted(store, s.owners, self.name)
            else:
                owners = ()
            if s.members is not None or s.owners is not None:
                want = Want(names, owners)
            if reply:
                ours = digest.summary(table, store, False, False)
                lists_m = s.members is None and ours.members_hash != s.members_hash
                lists_o = s.owners is None and ours.states_hash != s.states_hash
                if lists_m or lists_o:
                    mine = digest.summary(table, store, lists_m, lists_o)
        if remote.want is not None:
            seen = {n.name for n in records}
            for name in remote.want.members:
                node = table.get(name)
                if node is not None and name not in seen:
                    seen.add(name)
                    records.append(node)
            have = {owner for owner, _ in states}
            states.extend(p for p in digest.entries_wanted(store, remote.want.owners) if p[0] not in have)
        if reply and want is not None and want == Want():
            want = None
        elif not reply and want is None:
            want = Want()  # a follow-up request: a Want, even empty, marks it a digest exchange
        return PushPull(
            self.name, remote.join, reply, tuple(_record(n) for n in records), tuple(states), mine, want,
            self._epoch,
        )

    def _seal_frame(self, msg: PushPull, join: bool, reply: bool) -> bytes:
        """Seal a digest push-pull; one over ``max_stream_bytes`` becomes a capped full state."""
        plain = encode_frame(msg)
        if len(plain) > self.config.max_stream_bytes - OVERHEAD:
            return self._sealed_state(join=join, reply=reply)
        self._count_frame(msg, len(plain), out=True)
        return self._keyring.encrypt(plain, self._aad)

    def _start_stream(self, addr: Address, frame: bytes) -> None:
        self._streams.append((addr, frame))
        self._pending_streams[addr] = self._pending_streams.get(addr, 0) + 1
        self.stats.streams_out += 1
        self.stats.bytes_out += len(frame)
        self.stats.stream_bytes_out += len(frame)

    def _sealed_state(self, join: bool, reply: bool) -> bytes:
        """Our full state as a sealed push-pull frame, never over ``max_stream_bytes``.

        Peers refuse a larger frame, so anti-entropy with us would fail for
        good; over the limit we send a capped frame instead (``_capped_state``).
        """
        members = tuple(_record(n) for n in self._table.by_name.values())
        msg = PushPull(self.name, join, reply, members, self._store.snapshot(), epoch=self._epoch)
        plain = encode_frame(msg)
        limit = self.config.max_stream_bytes - OVERHEAD
        if len(plain) > limit:
            self.stats.push_pull_capped += 1
            msg = self._capped_state(join, reply, limit - FRAME_HEADER_BYTES)
            plain = encode_frame(msg)
        self._count_frame(msg, len(plain), out=True)
        return self._keyring.encrypt(plain, self._aad)

    def _capped_state(self, join: bool, reply: bool, budget: int) -> PushPull:
        """The most important part of our state within ``budget`` bytes of records and maps.

        Us first, then live members before suspect, dead and left ones, each
        record followed by its owner's map when both fit. Within a state the
        order is shuffled, so successive capped frames carry different members
        and anti-entropy still reaches every one of them over time.
        """
        others = list(self._table.others)
        self._rng.shuffle(others)
        others.sort(key=lambda n: n.state)  # stable: shuffled within each state
        members: list[MemberRecord] = []
        states: list[tuple[str, tuple[StateEntry, ...]]] = []
        for node in [self._me, *others]:
            rec = _record(node)
            size = record_size(rec)
            if size > budget:
                continue
            budget -= size
            members.append(rec)
            entries = self._store.entries(node.name)
            if entries and (map_size := owner_states_size(node.name, entries)) <= budget:
                budget -= map_size
                states.append((node.name, entries))
        return PushPull(self.name, join, reply, tuple(members), tuple(states), epoch=self._epoch)

    def _emit(self, event: Event) -> None:
        self._events.append(event)

    # ------------------------------------------------------------ node table

    def _add_node(self, a: Alive, now: float, verified: bool = False) -> Node | None:
        """Add a member, within the table's ceilings (verify.py has the policy)."""
        table, stats = self._table, self.stats
        if not verified and (
            table.unverified >= max(1, self.config.max_members // 2) or self._verifier.refused(a.name, now)
        ):
            stats.unverified_refused += 1
            return None
        if len(table) >= self.config.max_members:
            victim = table.oldest_unverified() if verified else None
            if victim is None:
                stats.dropped += 1
                return None
            stats.unverified_evicted += 1
            self._forget(victim)
        node = table.add(a.name, a.addr, a.incarnation, a.meta, now, verified)
        node.sig = a.sig
        self._prober.add(node)
        self._learnt_since_settle = True
        if not verified:
            self._verifier.learned(node, now)
        return node

    def _forget(self, node: Node) -> None:
        """Drop a never-verified member (not remembered as reaped: if real, it comes back)."""
        self._table.remove(node)
        self._store.forget(node.name)
        self._replay.forget(node.name)
        self._emit(MemberReaped(node.snapshot()))

    def _pressure_mark(self) -> int:
        return self.config.max_members // UNVERIFIED_PRESSURE_DIVISOR

    def _verify_ping(self, node: Node, now: float) -> None:
        self.stats.verify_pings += 1
        ping = Ping(self._prober.next_seq(), node.name, self.name, self.addr)
        if self._verifier.flooded(now):
            self._seal(node.addr, node.name, [ping])  # no piggyback: retransmissions are not spent on phantoms
        else:
            self._send(node.addr, node.name, [ping])

    def _on_probe_failed(self, s: Suspect, now: float) -> None:
        """Our probe of ``s.name`` failed: suspect it, or in a flood drop it if never verified."""
        node = self._table.get(s.name)
        if node is not None and not node.verified and self._verifier.flooded(now):
            self._unverifiable(node, now)
        else:
            self._on_suspect(s, now)

    def _unverifiable(self, node: Node, now: float) -> None:
        """``node`` never answered its verification pings: drop it in a flood, else suspect it."""
        if self._verifier.pressure(self._table.unverified, self._pressure_mark(), now):
            self.stats.unverified_dropped += 1
            self._verifier.dropped(node.name, now)
            self._forget(node)
        else:
            self.stats.unverified_suspected += 1
            self._on_suspect(Suspect(node.name, node.incarnation, self.name), now)

    def _add_gone(self, r: MemberRecord, now: float) -> None:
        """Record a member first heard of as DEAD or LEFT (from a push-pull)."""
        node = self._add_node(Alive(r.name, r.incarnation, r.addr, r.meta, r.sig), now)
        if node is not None:
            self._mark_gone(node, LEFT if r.state == LEFT else DEAD, now)

    def _on_reap(self, node: Node, stamp: float) -> None:
        if node.index < 0 or node.state_change != stamp or node.state not in (DEAD, LEFT):
            return
        self._table.remove(node)
        self._store.forget(node.name)
        reaped = self._reaped
        reaped.pop(node.name, None)  # reaped again: now the newest
        reaped[node.name] = node.incarnation
        if len(reaped) > self.config.max_members:
            oldest = next(iter(reaped))
            del reaped[oldest]
            if oldest not in self._table.by_name:
                self._replay.forget(oldest)  # its replay window lives as long as the name
        self._emit(MemberReaped(node.snapshot()))

    # ------------------------------------------------------------ membership updates

    def _on_dead_msg(self, msg: Dead, now: float) -> None:
        # A member that is leaving still records and forwards other members'
        # leaves, so simultaneous leaves carry each other's news.
        if not self._left or (msg.sender == msg.name != self.name):
            self._on_dead(msg, now)

    def _refute(self, accused: int) -> None:
        """Beat an accusation about ourselves with a higher incarnation (memberlist refute)."""
        me = self._me
        inc = counter_step(max(me.incarnation, accused))  # never past what peers accept
        me.incarnation = inc
        self.stats.refutes += 1
        if self._lifeguard:
            self._awareness.apply_delta(1)  # being accused is a sign we are the slow one
        self._enqueue(self._own_alive(inc, me.meta), me.name, PRIORITY_MEMBERSHIP)

    def _own_alive(self, incarnation: int, meta: bytes) -> Alive:
        """Our Alive at ``incarnation``, signed when we sign (the signature is kept on our
        record for push-pulls, and reused while incarnation, address and meta stand)."""
        me = self._me
        if self._signer is None:
            return Alive(me.name, incarnation, me.addr, meta)
        key = (incarnation, me.addr, meta)
        if self._own_alive_key != key:
            data = canonical_alive(self.config.cluster_name, me.name, incarnation, me.addr, meta)
            self._own_alive_sig = self._signer.sign(data)
            self._own_alive_key = key
        if incarnation == me.incarnation:
            me.sig = self._own_alive_sig
        return Alive(me.name, incarnation, me.addr, meta, self._own_alive_sig)

    def _alive_authentic(self, a: Alive, credential: bytes) -> bool:
        """Whether ``credential`` (trusted for ``a.name``) signed ``a``; verdicts cached."""
        assert self._state_verifier is not None
        data = canonical_alive(self.config.cluster_name, a.name, a.incarnation, a.addr, a.meta)
        key = (credential, data, a.sig)
        verdicts = self._alive_verdicts
        verdict = verdicts.get(key)
        if verdict is None:
            verdict = bool(a.sig) and self._state_verifier.verify(a.name, credential, data, a.sig)
            verdicts[key] = verdict
            if len(verdicts) > ALIVE_VERDICTS_MAX:
                verdicts.popitem(last=False)
        if not verdict:
            self.stats.alive_forged += 1
        return verdict

    def _alive_refused(self, a: Alive) -> bool:
        """A verifier holds ``a.name``'s credential and it does not verify ``a`` (forged).
        No credential yet: taken unverified, as before signing (startup converges)."""
        if self._state_verifier is None:
            return False
        credential = self._credential_of(a.name)
        return credential is not None and not self._alive_authentic(a, credential)

    def _own_claim_forged(self, a: Alive) -> bool:
        """A claim of our name that our credential does not verify: the CA issues a name
        once, so nobody else can sign for it (a copy of our key can, and is a conflict)."""
        if self._state_verifier is None or self._signer is None:
            return False
        return not self._alive_authentic(a, self._signer.credential)

    def _about_me(self, state: MemberState, incarnation: int, a: Alive | None = None) -> None:
        """News about ourselves never replaces our record: refute what needs it."""
        me = self._me
        if incarnation < me.incarnation:
            if state != ALIVE:
                self._stale_accusation = True
            return
        if incarnation - me.incarnation > MAX_COUNTER_STEP:
            self.stats.out_of_range += 1  # forged: peers refuse it too (members.can_change)
            return
        if me.state == LEFT:
            return  # leave() marked us LEFT; we are not coming back in this life
        if a is not None and a.addr != me.addr and self._own_claim_forged(a):
            # Not signed by a holder of our certificate: no claim to the name. Dropped, not
            # outbid: a flood of them must not cost a signature (and awareness) each; members
            # that hold our credential refuse it too, the others are in the window every
            # member's unverified Alive is (before its credential arrives).
            return
        if a is not None and a.addr != me.addr:
            # Another address claims our name (memberlist NotifyConflict). Outbidding it would
            # make two live claimants flap for ever: report it once, the application decides.
            if a.addr not in self._conflicts and len(self._conflicts) < self.config.max_members:
                self._conflicts.add(a.addr)
                self._emit(NameConflict(a.name, a.addr, a.incarnation, a.meta))
            return
        if a is not None and incarnation == me.incarnation and a.meta == me.meta:
            return  # our own Alive, echoed back
        self._refute(incarnation)  # an accusation, or an earlier life speaking for us: outbid it

    def _on_alive(
        self, a: Alive, now: float, priority: int, spread_new: bool = True, verified: bool = False
    ) -> None:
        node = self._table.get(a.name)
        if node is None:
            # A reaped name is never re-learned as gone (_merge), and only a higher incarnation
            # or the member itself brings it back: a replayed or stale Alive revives nothing.
            if not verified and self._reaped.get(a.name, -1) >= a.incarnation:
                self.stats.replayed += 1
                return
            node = self._add_node(a, now, verified)
            if node is not None:
                if spread_new:
                    self._enqueue(a, a.name, priority, self._holders(a.name), feedback=True)
                self._emit(MemberJoined(node.snapshot()))
                self._apply_pending(a.name, now)
                if self._state_verifier is not None:
                    self._uncredentialed.append(a.name)
            return
        if node is self._me:
            self._about_me(ALIVE, a.incarnation, a)
            return
        if verified:
            self._table.verify(node)
        if not can_change(node.state, node.incarnation, ALIVE, a.incarnation):
            self._heard(a.name, a)
            return
        if self._alive_refused(a):
            return  # forged: it moves neither the address nor the incarnation
        node.suspicion = None
        old_state, old_meta, old_addr = node.state, node.meta, node.addr
        node.incarnation = a.incarnation
        node.meta = a.meta
        node.addr = a.addr
        node.sig = a.sig
        self._enqueue(a, a.name, priority, self._holders(a.name))
        if old_state != ALIVE:
            self._table.set_state(node, ALIVE, now)
        if old_state in (DEAD, LEFT):
            if not node.verified:
                self._verifier.learned(node, now)
            self._emit(MemberJoined(node.snapshot()))
            return
        if old_state == SUSPECT:
            self._emit(MemberAlive(node.snapshot()))
        if old_meta != a.meta or old_addr != a.addr:
            self._emit(MemberUpdated(node.snapshot()))

    def _suspicion_min(self, n: int) -> float:
        cached = self._suspicion_cache.get(n)
        if cached is None:
            cached = suspicion_timeout(self.config.suspicion_mult, n, self.config.probe_interval)
            self._suspicion_cache[n] = cached
        return cached

    def _on_suspect(self, s: Suspect, now: float) -> None:
        node = self._table.get(s.name)
        if node is None:
            return
        if node is self._me:
            self._about_me(SUSPECT, s.incarnation)
            return
        if not can_change(node.state, node.incarnation, SUSPECT, s.incarnation):
            susp = node.suspicion
            if susp is not None and s.incarnation == node.incarnation and susp.confirm(s.sender, now):
                # Already suspect: an independent confirmation. Pass it on so
                # confirmations flow even to members that already suspect.
                self._enqueue(s, s.name, PRIORITY_MEMBERSHIP)
                self._arm_suspicion(node, susp, now)
            elif node.state >= DEAD and s.incarnation <= node.incarnation:
                self._tell_gone(node, s.sender, now)
            return
        if node.state == SUSPECT:
            # A Suspect at a higher incarnation implies the member refuted the
            # suspicion we hold (we missed its Alive): that one is void, this
            # is a new one. memberlist counts it as a confirmation of the old
            # one and so can declare a member dead that refuted.
            node.suspicion = None
            node.incarnation = s.incarnation
            self._table.set_state(node, ALIVE, now)
            self._emit(MemberAlive(node.snapshot()))
        self._start_suspicion(node, s, now)

    def _start_suspicion(self, node: Node, s: Suspect, now: float) -> None:
        self._enqueue(s, s.name, PRIORITY_MEMBERSHIP)
        node.incarnation = s.incarnation
        self._table.set_state(node, SUSPECT, now)
        n = self._table.n_estimate()
        # k: confirmations expected; the nominal timeout is hit two probe
        # periods short of the multiplier (memberlist suspectNode).
        k = self.config.suspicion_mult - 2 if self._lifeguard else 0
        if n - 2 < k:
            k = 0
        min_timeout = self._suspicion_min(n)
        max_timeout = self.config.suspicion_max_timeout_mult * min_timeout
        susp = node.suspicion = Suspicion(s.sender, k, min_timeout, max_timeout, now)
        self._arm_suspicion(node, susp, now)
        self._emit(MemberSuspected(node.snapshot()))

    def _arm_suspicion(self, node: Node, susp: Suspicion, now: float) -> None:
        self._timers.schedule(susp.deadline, SuspicionTimeout(node, susp))
        if self._lifeguard:
            self._timers.schedule(max(now, self._prober.recheck_time(susp)), Recheck(node, susp))

    def _on_suspicion_timeout(self, node: Node, susp: Suspicion, now: float) -> None:
        if node.suspicion is not susp or node.state != SUSPECT or susp.deadline > now:
            return
        self._on_dead(Dead(node.name, node.incarnation, self.name), now)

    def _on_dead(self, d: Dead, now: float) -> None:
        node = self._table.get(d.name)
        if node is None:
            return
        if node is self._me:
            self._about_me(DEAD, d.incarnation)  # we are not leaving (leave() marks us LEFT)
            return
        # A Dead sent by the member itself is its graceful leave.
        state = LEFT if d.sender == d.name else DEAD
        if not can_change(node.state, node.incarnation, state, d.incarnation):
            return
        node.suspicion = None
        self._enqueue(d, d.name, PRIORITY_MEMBERSHIP)
        node.incarnation = d.incarnation
        self._mark_gone(node, state, now)
        if d.sender != self.name and node.verified and self._verifier.may_recheck(node, now):
            self._recheck_gone(node, d)

    def _relay_lost(self, target: str, origin: str, now: float) -> None:
        """Neither ``origin``'s probe nor our ping for it reached ``target``: if we hold it
        gone, ``origin`` is behind us."""
        gone = self._table.get(target)
        if gone is not None and gone.state >= DEAD:
            self._tell_gone(gone, origin, now)

    def _tell_gone(self, node: Node, to: str, now: float) -> None:
        """``to`` still suspects or probes ``node`` (its Suspect, or its PingReq that our own
        ping did not answer either), which we hold DEAD or LEFT: it may have missed every copy
        of the news (``RetransmitMult * log10 N`` sends, some spent on the dead member itself)
        and, nobody left to confirm its suspicion, wait out the longest one
        (``suspicion_max_timeout_mult`` x the shortest). Tell it directly, once per member per
        probe interval (our addition to memberlist).

        A death is told as our Suspect, an independent confirmation: it ends a suspicion
        older than the shortest timeout at once and shortens a younger one, so a live member
        still has time to refute (after a partition heals, the far side holds the near side
        dead; a Dead would kill live members the stale node just started to suspect). A
        leave is told as the member's own Dead: it is final anyway."""
        peer = self._table.get(to)
        if peer is None or peer is self._me or peer.state > SUSPECT:
            return
        if now < node.told + self.config.probe_interval:
            return  # bounded: a flood of stale Suspects costs at most this one datagram
        node.told = now
        self.stats.gone_told += 1
        if node.state == LEFT:
            news: Message = Dead(node.name, node.incarnation, node.name)
        else:
            news = Suspect(node.name, node.incarnation, self.name)
        self._send(peer.addr, peer.name, [news])

    def _recheck_gone(self, node: Node, news: Dead) -> None:
        """In a flood: forged? Tell ``node`` what we heard, with a ping: a live member refutes on the ack."""
        self.stats.verify_pings += 1
        ping = Ping(self._prober.next_seq(), node.name, self.name, self.addr)
        self._seal(node.addr, node.name, [ping, news])

    def _mark_gone(self, node: Node, state: MemberState, now: float) -> None:
        if not node.verified and self._verifier.flooded(now):
            self._unverifiable(node, now)  # in a flood, gone and never heard from: forget it now
            return
        self._table.set_state(node, state, now)
        ttl = self.config.dead_member_ttl
        if not node.verified:
            ttl = min(ttl, UNVERIFIED_GONE_TTL)  # only heard of: do not keep a phantom 24 h
        self._timers.schedule(now + ttl, Reap(node, now))
        self._emit(MemberLeft(node.snapshot()) if state == LEFT else MemberFailed(node.snapshot()))

    # ------------------------------------------------------------ replicated state and user messages

    def _on_state_update(self, msg: StateUpdate, now: float) -> None:
        if self._left:
            return
        if msg.owner == self.name:
            entry = StateEntry(msg.key, msg.version, msg.value, msg.deleted, msg.sig)
            self._assert_own_state((entry,))
            return
        if msg.owner not in self._table.by_name:
            self._keep_pending(msg, now)  # its Alive may be a hop behind: applied when it arrives
            if self._rx_sender is not None and self._rx_src is not None:
                self._unknown_member(msg.owner, self._rx_src, now)  # the sender knows the owner
            return
        if self._state_verifier is not None:
            if not self._store.is_newer(msg.owner, msg.key, msg.version):
                self._heard((msg.owner, msg.key), msg)
                return  # held already (or older): nothing to verify
            entry = StateEntry(msg.key, msg.version, msg.value, msg.deleted, msg.sig)
            verdict = self._authentic(msg.owner, entry, self._credential_of(msg.owner))
            if verdict is None:
                self._hold(msg)
            if not verdict:
                if msg.key != CREDENTIAL_KEY:
                    # None: no credential yet. False: maybe a newer one (re-enrolled) we lack.
                    self._fetch_credential(msg.owner, now)
                return
        first = (  # news of a start (broadcast_queue.py, START_NEWS_S)
            now - self._table.by_name[msg.owner].learned < START_NEWS_S and self._store.get(msg.owner, msg.key) is None
        )
        if self._store.apply(msg):
            if msg.key != CREDENTIAL_KEY:  # credentials travel by push-pull only
                self._enqueue(msg, (msg.owner, msg.key), PRIORITY_STATE, self._holders(msg.owner), feedback=first)
            self._emit(StateChanged(msg.owner, msg.key, msg.value, msg.version, msg.deleted))
            if msg.key == CREDENTIAL_KEY:
                self._release(msg.owner, now)
        else:
            self._heard((msg.owner, msg.key), msg)
        self._count_store()

    # --- owner signatures (signing.py)

    def _credential_of(self, owner: str) -> bytes | None:
        """The credential ``owner`` published, as held here (None: not known yet)."""
        entry = self._store.get(owner, CREDENTIAL_KEY)
        if entry is None or type(entry.value) is not bytes:
            return None
        return entry.value

    def _authentic(self, owner: str, entry: StateEntry, credential: bytes | None) -> bool | None:
        """Whether ``owner`` signed ``entry``: checked with the credential the entry carries
        (the credential entry itself) or else ``credential``. None when there is none yet."""
        assert self._state_verifier is not None
        if entry.key == CREDENTIAL_KEY and not entry.deleted:
            if type(entry.value) is not bytes:
                self.stats.state_forged += 1
                return False
            credential = entry.value
        if credential is None:
            return None
        data = self._canonical(owner, entry)
        if entry.sig and self._state_verifier.verify(owner, credential, data, entry.sig):
            return True
        self.stats.state_forged += 1
        return False

    def _canonical(self, owner: str, e: StateEntry) -> bytes:
        return canonical_entry(self.config.cluster_name, owner, e.key, e.version, e.value, e.deleted)

    def _hold(self, msg: StateUpdate) -> None:
        """Keep an update until its owner's credential arrives (bounded, oldest dropped)."""
        self.stats.state_unverified += 1
        held = self._held
        if len(held) >= HELD_MAX:
            held.popleft()
        held.append(msg)

    def _release(self, owner: str, now: float) -> None:
        """``owner``'s credential arrived: try the updates held for it again.

        A held update the same push-pull already brought (same version) is not gossiped
        on: every member that lacked the owner's credential asks the owner itself, as we
        did, from the moment it learns of it (_fetch_uncredentialed), and the members that
        held the credential verified the update when it reached them and spread it then.
        """
        self._fetched.pop(owner, None)
        mine = [m for m in self._held if m.owner == owner]
        if mine:
            self._held = deque(m for m in self._held if m.owner != owner)
            for msg in mine:
                held = self._store.get(owner, msg.key)
                if held is None or held.version != msg.version or held.sig != msg.sig:
                    self._on_state_update(msg, now)

    def _fetch_uncredentialed(self, now: float) -> None:
        """Ask each member new to us whose credential this input did not bring for its map."""
        names, self._uncredentialed = self._uncredentialed, []
        for name in names:
            if self._credential_of(name) is None:
                self._fetch_credential(name, now)

    def _fetch_credential(self, owner: str, now: float) -> None:
        """Ask ``owner`` for what we lack of its map (its credential first of all).

        A digest push-pull with only a Want: the owner answers with the entries
        missing from what we hold. Rate-limited per owner and bounded in owners;
        what is not asked for now comes with the periodic push-pull.
        """
        node = self._table.get(owner)
        if node is None or node is self._me or node.state != ALIVE:
            return
        asked = self._fetched
        last = asked.get(owner)
        if last is not None and now - last < CREDENTIAL_FETCH_RETRY:
            return
        if owner not in asked and len(asked) >= CREDENTIAL_FETCH_MAX:
            for name in [n for n, t in asked.items() if now - t >= CREDENTIAL_FETCH_RETRY]:
                del asked[name]
            if len(asked) >= CREDENTIAL_FETCH_MAX:
                return
        asked[owner] = now
        want = Want((), ((owner, self._store.held(owner)),))
        msg = PushPull(self.name, False, False, (), (), want=want, epoch=self._epoch)
        self._start_stream(node.addr, self._seal_frame(msg, False, False))

    def _authentic_own(self, entries: Iterable[StateEntry]) -> list[StateEntry]:
        """The entries about us that may make us re-stamp: those we really signed.

        An echo of an entry we hold (same version and signature) or an older one
        of a key we hold needs nothing and is left out unverified. The rest is
        checked with our credential, or with a credential of ours that came in the
        same batch (an earlier life's, after a re-enrollment). A forged entry about
        us must not make us re-stamp our map.
        """
        store = self._store
        entries = list(entries)
        if self._state_verifier is None:
            return entries
        credentials = [self._signer.credential] if self._signer is not None else []
        for e in entries:
            if e.key == CREDENTIAL_KEY and type(e.value) is bytes and e.value not in credentials:
                credentials.append(e.value)
        authentic: list[StateEntry] = []
        for e in entries:
            held = store.get(self.name, e.key)
            if held is not None and (
                held.version > e.version or (held.version == e.version and held.sig == e.sig)
            ):
                continue
            if self._signed_by_us(e, credentials):
                authentic.append(e)
        return authentic

    def _signed_by_us(self, e: StateEntry, credentials: list[bytes]) -> bool:
        assert self._state_verifier is not None
        if e.sig:
            data = self._canonical(self.name, e)
            if e.key == CREDENTIAL_KEY and not e.deleted:
                credentials = [e.value] if type(e.value) is bytes else []
            if any(self._state_verifier.verify(self.name, c, data, e.sig) for c in credentials):
                return True
        self.stats.state_forged += 1
        return False

    def _verified_map(self, owner: str, entries: tuple[StateEntry, ...]) -> list[StateEntry]:
        """The entries of ``owner``'s map (from a push-pull) that are newer and authentic,
        its credential first so the rest of the map can be checked with it."""
        store = self._store
        fresh = [e for e in entries if store.is_newer(owner, e.key, e.version)]
        fresh.sort(key=lambda e: e.key != CREDENTIAL_KEY)
        credential = self._credential_of(owner)
        out: list[StateEntry] = []
        for e in fresh:
            verdict = self._authentic(owner, e, credential)
            if verdict is None:
                self.stats.state_unverified += 1
            elif verdict:
                out.append(e)
                if e.key == CREDENTIAL_KEY:
                    credential = e.value if type(e.value) is bytes else None
        return out
    def _keep_pending(self, msg: StateUpdate, now: float) -> None:
        """Keep an update about a member we do not know yet, bounded in count, memory and time.

        A member's first state update races its Alive through the mesh; without
        this a member that got the update first dropped it and waited for
        anti-entropy. Oldest first out; expired after ``PENDING_STATE_TTL``.
        """
        pending = self._pending_state
        self._expire_pending(now)
        key = (msg.owner, msg.key)
        old = pending.pop(key, None)
        if old is not None:
            self._pending_memory -= entry_memory(old[0].key, old[0].value)
            if old[0].version > msg.version:
                msg = old[0]
        memory = entry_memory(msg.key, msg.value)
        if memory > PENDING_STATE_MEMORY:
            self.stats.dropped += 1
            return
        pending[key] = (msg, now + PENDING_STATE_TTL)
        self._pending_memory += memory
        self.stats.pending_state += 1
        while len(pending) > PENDING_STATE_MAX or self._pending_memory > PENDING_STATE_MEMORY:
            _, (dropped, _) = pending.popitem(last=False)
            self._pending_memory -= entry_memory(dropped.key, dropped.value)
            self.stats.dropped += 1

    def _expire_pending(self, now: float) -> None:
        pending = self._pending_state
        while pending:
            key, (msg, expires) = next(iter(pending.items()))
            if expires > now:
                break
            del pending[key]
            self._pending_memory -= entry_memory(msg.key, msg.value)
            self.stats.dropped += 1

    def _apply_pending(self, owner: str, now: float) -> None:
        """``owner`` just became known: apply what we kept of its state."""
        if not self._pending_state:
            return
        self._expire_pending(now)
        for key in [k for k in self._pending_state if k[0] == owner]:
            msg, _ = self._pending_state.pop(key)
            self._pending_memory -= entry_memory(msg.key, msg.value)
            self._on_state_update(msg, now)

    def _assert_own_state(self, entries: Iterable[StateEntry]) -> None:
        entries = self._authentic_own(entries)
        for update in self._store.reconcile_own(entries):
            self._enqueue(update, (self.name, update.key), PRIORITY_STATE)
        self._count_store()

    def _count_store(self) -> None:
        """Move the store's refusal counters into the stats."""
        store, stats = self._store, self.stats
        stats.state_rejected += store.rejected - self._store_seen[0]
        stats.out_of_range += store.out_of_range - self._store_seen[1]
        self._store_seen = (store.rejected, store.out_of_range)

    def _remember_user(self, key: tuple[str, int]) -> None:
        seen = self._user_seen
        seen[key] = None
        if len(seen) > USER_DEDUP_CAPACITY:
            seen.popitem(last=False)

    def _on_user_broadcast(self, msg: UserBroadcast) -> None:
        key = (msg.origin, msg.seq)
        if self._left or key in self._user_seen:
            return
        self._remember_user(key)
        if msg.origin == self.name:
            return
        self._emit(UserMessage(msg.origin, msg.payload))
        self._user_queue.push(msg, key=key, priority=PRIORITY_USER, size=encoded_size(msg))
        self._wake_gossip()

    # ------------------------------------------------------------ dissemination and anti-entropy

    def _on_gossip_tick(self, deadline: float, now: float) -> None:
        config = self.config
        if not self._queue and not self._user_queue:
            # Idle: no tick until something is queued (_wake_gossip), so a settled member
            # does not wake five times a second for nothing (memberlist's ticker runs on).
            self._gossip_parked = deadline
            return
        self._timers.schedule(next_tick(deadline, config.gossip_interval, now), GossipTick())
        dead_horizon = now - config.gossip_to_the_dead_time

        def worth_gossip(n: Node) -> bool:
            return n.state <= SUSPECT or (n.state == DEAD and n.state_change >= dead_horizon)

        for node in self._table.k_random(config.gossip_nodes, worth_gossip, self._rng):
            msgs = self._take_broadcasts(self._budget, node.name)
            if not msgs:
                continue
            self._seal(node.addr, node.name, msgs)

    def _on_push_pull_tick(self, deadline: float, now: float) -> None:
        if self._left:
            return
        interval = push_pull_scale(self.config.push_pull_interval, self._table.n_estimate())
        # Jittered +-50% (average unchanged): members started together would
        # otherwise push-pull in lockstep bursts for ever (memberlist relies on
        # start times differing).
        interval *= 0.5 + self._rng.random()
        self._timers.schedule(next_tick(deadline, interval, now), PushPullTick())
        self._push_pull_random()

    def _push_pull_random(self) -> None:
        """Push-pull with one random ALIVE member (the periodic one, and the SettleTick)."""
        if self._left:
            return
        peers = self._table.k_random(1, lambda n: n.state == ALIVE, self._rng)
        if peers:
            self._request_push_pull(peers[0].addr, join=False)

    def _on_reconnect_tick(self, deadline: float, now: float) -> None:
        if self._left:
            return
        self._timers.schedule(next_tick(deadline, self.config.reconnect_interval, now), ReconnectTick())
        counts = self._table.counts
        if counts[ALIVE] + counts[SUSPECT] == 0:
            for seed in self._seeds:
                self._request_push_pull(seed, join=True)
        # Left members are re-checked too (Serf reconnects only failed ones): a
        # forged leave must not stick. A live member answers the push-pull,
        # sees itself LEFT in it and refutes; a departed one fails the stream.
        num_gone = counts[DEAD] + counts[LEFT]
        if num_gone == 0:
            return
        # Serf reconnect: try a random gone member with probability gone / alive.
        if self._rng.random() > num_gone / (counts[ALIVE] + counts[SUSPECT] + 1):
            return
        picked = self._table.k_random(1, lambda n: n.state >= DEAD, self._rng)
        if picked:
            self._request_push_pull(picked[0].addr, join=False)

    def _merge(self, remote: PushPull, now: float, src_host: str) -> None:
        """Merge a remote full state (memberlist mergeState, plus replicated maps).

        The sender's own record is verified when it comes from the sender's host.
        """
        if self._left:
            return
        by_name = self._table.by_name
        me = self._me
        sender = by_name.get(remote.source)
        if sender is not None and sender is not me and sender.addr[0] == src_host:
            self._table.verify(sender)  # a digest push-pull may not carry the sender's record
        fresh: list[Alive] = []  # members new to us, not yet re-broadcast
        for r in remote.members:
            node = by_name.get(r.name)
            direct = r.name == remote.source and r.addr[0] == src_host
            if direct and node is not None:
                self._table.verify(node)
            if r.state == ALIVE:
                if node is not None and node is not me and not can_change(
                    node.state, node.incarnation, ALIVE, r.incarnation
                ):
                    continue  # nothing new: skip building the message
                alive = Alive(r.name, r.incarnation, r.addr, r.meta, r.sig)
                spread = node is not None or r.name == remote.source
                self._on_alive(alive, now, PRIORITY_MERGED, spread_new=spread, verified=direct)
                if not spread and r.name in by_name:
                    fresh.append(alive)
            elif node is None:
                # memberlist ignores a dead member it never knew. We record it
                # (DEAD or LEFT, reaped after dead_member_ttl) so that a node
                # joining while a member is down still learns its replicated
                # state: the overlay address allocator must see a dead owner's
                # block to keep it in quarantine. One we reaped ourselves is
                # not taken back, so a forgotten member does not circulate.
                if r.name not in self._reaped and r.name != self.name:
                    self._add_gone(r, now)
            elif r.state == LEFT:
                self._on_dead(Dead(r.name, r.incarnation, r.name), now)
            else:
                # A remote DEAD is only a suspicion here (memberlist mergeState).
                self._on_suspect(Suspect(r.name, r.incarnation, self.name), now)
        if remote.join:
            fresh = []  # see JOIN_SETTLE_GOSSIP_INTERVALS
        if len(fresh) > MERGE_REBROADCAST_MAX:
            fresh = self._rng.sample(fresh, MERGE_REBROADCAST_MAX)
        for alive in fresh:
            self._enqueue(alive, alive.name, PRIORITY_MERGED)
        self._merge_states(remote.states, now)
        if self._uncredentialed:
            self._fetch_uncredentialed(now)

    def _merge_states(
        self, states: tuple[tuple[str, tuple[StateEntry, ...]], ...], now: float
    ) -> None:
        by_name = self._table.by_name
        for owner, entries in states:
            if owner == self.name:
                self._assert_own_state(entries)
            elif owner in by_name:
                checked: Iterable[StateEntry] = entries
                if self._state_verifier is not None:
                    checked = self._verified_map(owner, entries)
                for e in self._store.merge(owner, checked):
                    self._emit(StateChanged(owner, e.key, e.value, e.version, e.deleted))
                    if e.key == CREDENTIAL_KEY:
                        self._release(owner, now)
            else:
                self.stats.dropped += 1
        self._count_store()

