"""The MQTT broker core (MQTT 3.1.1 and 5), sans-IO: packet values in, outputs out.

Theory of operation
-------------------
The adapter owns the sockets, the codec and the clock. It calls:

- ``connect(conn, now)`` when a transport is accepted (``conn`` is any hashable id it
  chooses), ``receive(conn, packet, now)`` for every decoded packet,
  ``connection_lost(conn, now)`` when the transport ends without a `Close` from us;
- ``handle_timeout(now)`` when ``next_deadline()`` is reached (None: nothing armed);
- ``publish_from_mesh(publish, sender, now)`` for a message another agent routed here,
  ``set_retained_from_mesh(...)`` / ``retained_items()`` to replicate retained messages.

Every call returns a list of outputs, in the order they must happen:

- `Send(conn, packet)`: encode at the connection's protocol level and write;
- `Close(conn, reason)`: flush what was sent, then close the transport. The broker has
  already forgotten the connection: later input for it is ignored, `connection_lost` for it
  is a no-op;
- `RouteOut(publish, sender, now, retain_stamp)`: a message was accepted here (from a
  client or a will); the mesh layer decides which agents need it. ``retain_stamp`` is the
  stamp the retained store gave it when ``publish.retain`` (else None).

Connections and sessions (MQTT 5 sections 3.1, 4.1). The first packet must be CONNECT
(else the connection is closed); a second CONNECT is a protocol error. A connection that
sends nothing for ``connect_timeout`` is closed. CONNECT is checked in this order: protocol
level, client id (empty -> an id is assigned: level 5 always, with
``assigned_client_identifier`` in CONNACK; level 4 only with clean session), enhanced
authentication (not supported), the ``authorize`` hook, the will, the session bound. A
client id already connected is taken over: the old connection gets DISCONNECT
SESSION_TAKEN_OVER (level 5) and is closed as an abnormal end (its will follows the rules
below). Clean start (level 4: clean session) discards any session held; otherwise it is
resumed and CONNACK says ``session_present``. A session is kept after its connection for
its expiry interval (level 5 ``session_expiry_interval``, 0xFFFFFFFF = forever; level 4:
0 for a clean session, else forever), both capped at ``max_session_expiry``.

Keep alive (3.1.2.10): a connection that sends nothing for 1.5 x its keep alive is closed
(level 5: DISCONNECT KEEP_ALIVE_TIMEOUT first) and its will published. A level 5 keep alive
above ``max_keep_alive`` (or 0 when the maximum is below 65,535) is lowered and announced
in ``server_keep_alive``.

Wills (3.1.2.5, 3.1.3.2.2): published on every end but a normal DISCONNECT: transport lost,
keep alive, protocol error, takeover, and DISCONNECT with reason DISCONNECT_WITH_WILL. A
level 5 will delay defers it to ``min(delay, session expiry)``; a reconnect to the session
before then cancels it. A will is published like a client's message (retained, routed out).

Routing (4.7, 4.8). Plain subscriptions live in one `SubscriptionTrie` keyed by client id;
shared ones (``$share/GROUP/FILTER``) in another, one `ShareGroup` per (filter, group). A message is
delivered once per session whose plain filters match, at the highest granted QoS of those
filters (never above the message's), with every matching subscription identifier, the
retain flag kept if any of them has retain_as_published, and skipped for the publisher
where a matching filter has no_local (then that filter does not count). Each matching share
group picks exactly one member (`shared.py`), round-robin in subscription order,
skipping members whose session has no connection; with no member connected, the member
whose turn it is queues it in its (persistent) session.
Retained messages are sent after SUBACK for plain filters (retain_handling 0 always, 1 only
for a new subscription, 2 never), never for shared ones.

Delivery (4.3, 4.9): QoS 0 goes out at once to a connected session. QoS 1 and 2 take a
packet id and a place in the inflight window (the client's ``receive_maximum``, capped at
``max_inflight``; ``level4_inflight`` at level 4); when the window is full, or the session
has no connection, the message waits in the session's bounded queue (`session.py`: oldest
QoS 0 dropped first). An acknowledgement frees a place and the queue drains in order.
Nothing is resent on a live connection (MQTT 5 forbids it); on session resume every
unacknowledged PUBLISH is resent with DUP set, and PUBREL for QoS 2 past PUBREC, before the
queue drains. QoS 2 is exactly-once in both directions: inbound, the message is delivered
on the first PUBLISH and its packet id held until PUBREL (a DUP of a held id is
acknowledged again, not delivered again; at most ``receive_maximum`` ids held, announced in
CONNACK); outbound, PUBLISH -> PUBREC -> PUBREL -> PUBCOMP. The message expiry interval
counts from acceptance here: an expired message is dropped from queues and the retained
store, and the interval sent is what remains.

Bounds (all in `BrokerConfig`, refusals counted in `BrokerStats`): connections, sessions,
client id length, subscriptions per session, topic levels, inbound QoS 2 ids, inflight and
queued messages and bytes per session, retained messages, bytes and tombstones. Invalid
input from a client is a protocol error that closes its connection (level 5: DISCONNECT
with the reason first); nothing a client sends raises.

PUBACK and PUBREC to a client always say SUCCESS: whether anyone subscribes is known only
across the mesh, so NO_MATCHING_SUBSCRIBERS is never sent. With ``hold_acks`` a QoS 1
PUBACK is not sent by the core: it rides in the message's `RouteOut` (``ack``, with
``persisted`` when a local persistent session took the message) and the adapter sends it
once the message is safe, so a crash of this agent before then makes the client resend
(QoS 1 at-least-once through the publisher's agent). The adapter must keep the PUBACKs of
one connection in the order of their PUBLISHes (MQTT 4.6). AUTH and topic aliases are not
supported (CONNACK advertises topic alias maximum 0).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Collection, Hashable, Iterable, Iterator
from dataclasses import dataclass, replace

from overlay.mqtt.packets import (
    MQTT5,
    MQTT311,
    NO_PROPERTIES,
    Connack,
    Connect,
    Disconnect,
    Packet,
    PacketType,
    Pingreq,
    Pingresp,
    Properties,
    Puback,
    Publish,
    Reason,
    Suback,
    Subscribe,
    Subscription,
    Unsuback,
    Unsubscribe,
    Will,
)
from overlay.mqtt.retained import Outcome, RetainedItem, RetainedStore, Stamp
from overlay.mqtt.session import (
    Delivery,
    Dropped,
    Inflight,
    InflightState,
    Message,
    Session,
    SubOptions,
)
from overlay.mqtt.shared import ShareGroup
from overlay.mqtt.timers import (
    ConnectDeadline,
    KeepAliveCheck,
    SessionExpiry,
    Timer,
    TimerHeap,
    WillDue,
)
from overlay.mqtt.topics import SHARE_PREFIX, SubscriptionTrie, parse_filter, valid_topic_name

ConnId = Hashable
BAD_AUTHENTICATION_METHOD = 0x8C  # MQTT 5 section 2.4
MAXIMUM_CONNECT_TIME = 0xA0
NEVER_EXPIRES = 0xFFFFFFFF  # MQTT 5 section 3.1.2.11.2
DEFAULT_RECEIVE_MAXIMUM = 65535  # MQTT 5 section 3.1.2.11.3: absent means 65,535


def allow_all(client_id: str, username: str | None, password: bytes | None) -> bool:
    """The default ``authorize`` hook: every client may connect."""
    return True


def time_stamp(now: float) -> Stamp:
    """The default retained stamp: the broker's clock (the mesh layer passes a hybrid clock)."""
    return now


@dataclass(frozen=True, slots=True)
class BrokerConfig:
    """Every bound and policy of the broker core; defaults follow mosquitto where it has one."""

    max_connections: int = 1024
    max_sessions: int = 4096  # connected and kept-offline sessions together
    connect_timeout: float = 10.0  # seconds from accept to CONNECT
    max_client_id_len: int = 128  # bytes of UTF-8 (MQTT 5 requires at least 23)
    max_keep_alive: int = 65535  # seconds; a level 5 client asking more is lowered
    keep_alive_factor: float = 1.5  # MQTT 5 section 3.1.2.10
    max_session_expiry: int = 7 * 24 * 3600  # seconds a disconnected session is kept at most
    receive_maximum: int = 64  # inbound QoS 2 ids held per connection (advertised)
    max_inflight: int = 100  # outbound QoS 1/2 window cap (the client's receive maximum)
    level4_inflight: int = 20  # level 4 has no receive maximum: mosquitto's max_inflight
    max_queued_messages: int = 1000  # per session (mosquitto max_queued_messages)
    max_queued_bytes: int = 1 << 20  # per session
    max_subscriptions_per_session: int = 100
    max_topic_levels: int = 32
    max_qos: int = 2
    max_retained_messages: int = 10_000
    max_retained_bytes: int = 16 << 20
    max_retained_tombstones: int = 1024
    authorize: Callable[[str, str | None, bytes | None], bool] = allow_all
    retain_stamp: Callable[[float], Stamp] = time_stamp
    # Which share groups this broker serves for a message accepted here on a topic (None:
    # all of them). The mesh layer sets it so a group spanning agents gets a message once.
    share_here: Callable[[str], Collection[str] | None] | None = None
    # This node's policy (overlay.mqtt.permissions), asked per PUBLISH topic and SUBSCRIBE
    # filter of a local client; None: everything allowed. A refusal: "not authorized".
    may_publish: Callable[[str], bool] | None = None
    may_subscribe: Callable[[str], bool] | None = None
    # This node's policy rate limit: a token for one local client's PUBLISH (False: over the
    # limit, "quota exceeded"); None: no limit.
    publish_quota: Callable[[], bool] | None = None
    # Hold back a client's QoS 1 PUBACK: it travels in `RouteOut.ack` and the adapter sends it
    # once the message is safe (other agents have it, local persistent sessions are saved).
    hold_acks: bool = False

    def __post_init__(self) -> None:
        positive = (
            "max_connections", "max_sessions", "connect_timeout", "max_client_id_len",
            "keep_alive_factor", "receive_maximum", "max_inflight", "level4_inflight",
            "max_topic_levels",
        )  # fmt: skip
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"BrokerConfig.{name} must be > 0, got {getattr(self, name)!r}")
        if not 0 <= self.max_qos <= 2:
            raise ValueError(f"BrokerConfig.max_qos must be 0, 1 or 2, got {self.max_qos!r}")
        if not (self.max_inflight <= 65535 and self.receive_maximum <= 65535):
            raise ValueError("BrokerConfig.max_inflight and receive_maximum must be <= 65535")


@dataclass(frozen=True, slots=True)
class Send:
    conn: ConnId
    packet: Packet


@dataclass(frozen=True, slots=True)
class Close:
    conn: ConnId
    reason: int


@dataclass(frozen=True, slots=True)
class RouteOut:
    publish: Publish
    sender: str
    now: float
    retain_stamp: Stamp | None = None
    # With `BrokerConfig.hold_acks`: the PUBACK owed to the publishing client, to send once
    # the message is safe (None: nothing is owed, or it was sent already).
    ack: Send | None = None
    # The message went (queued or sent) to a session that outlives its connection here.
    persisted: bool = False


@dataclass(frozen=True, slots=True)
class Owed:
    """With `BrokerConfig.hold_acks`: a PUBACK that waits for nothing but must not pass the
    client's earlier held ones (MQTT 4.6: acknowledgements in the order of the PUBLISHes);
    the PUBACK of a publish the policy refused."""

    ack: Send


Output = Send | Close | RouteOut | Owed


@dataclass(slots=True)
class BrokerStats:
    """Counters; every refusal and drop has one."""

    connections_accepted: int = 0
    connections_refused: int = 0  # over max_connections at accept
    connects_refused: int = 0  # CONNACK with a failure reason
    connect_timeouts: int = 0
    sessions_created: int = 0
    sessions_resumed: int = 0
    sessions_expired: int = 0
    sessions_refused: int = 0  # over max_sessions
    takeovers: int = 0
    keepalive_timeouts: int = 0
    protocol_errors: int = 0
    wills_published: int = 0
    publishes_received: int = 0
    publishes_denied: int = 0  # by the policy's mqtt.permissions
    publishes_limited: int = 0  # by the policy's rate_limits
    publishes_from_mesh: int = 0
    mesh_publishes_refused: int = 0
    publishes_sent: int = 0
    resent: int = 0  # PUBLISH / PUBREL resent on session resume
    qos2_duplicates: int = 0
    queued: int = 0
    queue_dropped_qos0: int = 0
    queue_dropped_new: int = 0
    expired: int = 0
    unknown_acks: int = 0
    packets_after_close: int = 0
    subscriptions_refused: int = 0
    subscriptions_denied: int = 0  # by the policy's mqtt.permissions
    retained_set: int = 0
    retained_cleared: int = 0
    retained_refused: int = 0
    retained_stale: int = 0


@dataclass(slots=True)
class _Conn:
    conn: ConnId
    serial: int
    last_rx: float
    session: Session | None = None
    keep_alive: float = 0.0
    level: int = MQTT311
    connect_expiry_zero: bool = True  # v5: DISCONNECT may not raise an expiry of 0


class _Violation(Exception):
    """A client broke the protocol: close its connection with this reason."""

    def __init__(self, reason: int) -> None:
        super().__init__(reason)
        self.reason = reason


class Broker:
    """The broker core; see the module docstring."""

    def __init__(self, config: BrokerConfig | None = None, rng: random.Random | None = None):
        self.config = config or BrokerConfig()
        self.stats = BrokerStats()
        self._rng = rng or random.Random(0)
        self._conns: dict[ConnId, _Conn] = {}
        self._sessions: dict[str, Session] = {}
        self._subs: SubscriptionTrie[str, SubOptions] = SubscriptionTrie()
        self._shared: SubscriptionTrie[str, ShareGroup] = SubscriptionTrie()  # by group name
        # Bumped whenever a subscription is added or removed, so a caller can tell `filters()`
        # changed without building it (the mesh layer polls it).
        self.subscriptions_version = 0
        # Bumped when a QoS 1/2 message is queued for, sent to or acknowledged by a session
        # that outlives its connection: the session store saves when it (or the
        # subscriptions' version) moved, and the mesh acknowledges a batch only once saved.
        self.persist_version = 0
        self._timers = TimerHeap()
        self._serial = 0
        self.retained = RetainedStore(
            self.config.max_retained_messages,
            self.config.max_retained_bytes,
            self.config.max_retained_tombstones,
        )

    # ----------------------------------------------------------------- the adapter's API

    def connect(self, conn: ConnId, now: float) -> list[Output]:
        """A transport was accepted; CONNECT must follow within ``connect_timeout``."""
        if conn in self._conns:
            raise ValueError(f"connection {conn!r} is already open")
        if len(self._conns) >= self.config.max_connections:
            self.stats.connections_refused += 1
            return [Close(conn, Reason.SERVER_BUSY)]
        self._serial += 1
        self._conns[conn] = _Conn(conn, self._serial, now)
        self._arm(now + self.config.connect_timeout, ConnectDeadline(conn, self._serial))
        self.stats.connections_accepted += 1
        return []

    def receive(self, conn: ConnId, packet: Packet, now: float) -> list[Output]:
        """One decoded packet from a connection."""
        c = self._conns.get(conn)
        if c is None:
            self.stats.packets_after_close += 1
            return []
        c.last_rx = now
        out: list[Output] = []
        try:
            self._dispatch(c, packet, now, out)
        except _Violation as v:
            self.stats.protocol_errors += 1
            self._abort(c, v.reason, now, out)
        return out

    def connection_lost(self, conn: ConnId, now: float) -> list[Output]:
        """The transport ended (not after our `Close`): an abnormal end, the will is published."""
        c = self._conns.get(conn)
        out: list[Output] = []
        if c is not None:
            self._end(c, now, True, out)
        return out

    def handle_timeout(self, now: float) -> list[Output]:
        """Run every timer due at ``now``."""
        out: list[Output] = []
        for timer in self._timers.pop_due(now):
            self._on_timer(timer, now, out)
        return out

    def next_deadline(self) -> float | None:
        """When `handle_timeout` must next be called (may be early: stale timers are skipped)."""
        return self._timers.next_deadline()

    def publish_from_mesh(
        self,
        publish: Publish,
        sender: str | None,
        now: float,
        plain: bool = True,
        groups: Collection[str] | None = None,
    ) -> list[Output]:
        """Deliver a message another agent accepted; ``sender`` is its client id (no_local).

        Only local delivery: retained values travel by `set_retained_from_mesh`, and nothing
        is routed out again. ``plain``: deliver to plain subscriptions; ``groups``: the share
        groups this broker serves for the message (None: every one, as for a local publish).
        """
        if not valid_topic_name(publish.topic, self.config.max_topic_levels) or not (
            0 <= publish.qos <= 2
        ):
            self.stats.mesh_publishes_refused += 1
            return []
        self.stats.publishes_from_mesh += 1
        msg = Message(
            publish.topic, publish.payload, min(publish.qos, self.config.max_qos),
            publish.retain, publish.properties, now, sender,
        )  # fmt: skip
        out: list[Output] = []
        self._deliver(msg, now, out, plain, groups)
        return out

    def set_retained_from_mesh(
        self,
        topic: str,
        payload: bytes,
        qos: int,
        properties: Properties,
        stamp: Stamp,
        now: float,
    ) -> bool:
        """Apply a replicated retained value if ``stamp`` is newer than the one held."""
        if not valid_topic_name(topic, self.config.max_topic_levels) or not 0 <= qos <= 2:
            self.stats.mesh_publishes_refused += 1
            return False
        outcome = self.retained.merge(topic, payload, qos, stamp, now, properties)
        self._count_retained(outcome)
        return outcome in (Outcome.SET, Outcome.CLEARED)

    def retained_items(self) -> Iterator[RetainedItem]:
        """Every retained message and tombstone (empty payload) with its stamp."""
        return self.retained.items()

    def persistent_sessions(self) -> Iterator[Session]:
        """The sessions that outlive their connection (expiry > 0): what a restart must keep."""
        return (s for s in self._sessions.values() if s.expiry_interval > 0)

    def restore_session(
        self,
        client_id: str,
        protocol_level: int,
        expiry_interval: float,
        remaining: float,
        subscriptions: Iterable[tuple[Subscription, int | None]],
        deliveries: Iterable[Delivery],
        now: float,
    ) -> bool:
        """Bring back a saved offline session (agent restart); False if it cannot be had.

        Its subscriptions are indexed again (no retained messages are sent: the client is not
        connected) and its messages queued in order within the queue bounds; it expires
        ``remaining`` seconds from ``now``. A session already here (a client reconnected
        first) is kept as it is.
        """
        if client_id in self._sessions or len(self._sessions) >= self.config.max_sessions:
            return False
        s = Session(
            client_id, protocol_level,
            self.config.max_queued_messages, self.config.max_queued_bytes,
        )  # fmt: skip
        s.expiry_interval = self._cap_expiry(int(expiry_interval))
        if s.expiry_interval <= 0 or remaining <= 0:
            return False
        self._sessions[client_id] = s
        self.stats.sessions_created += 1
        for sub, identifier in subscriptions:
            self._subscribe_one(s, sub, identifier, now, [])
        for delivery in deliveries:
            self._send_or_queue(s, delivery, now, [])
        s.expires_at = now + min(remaining, s.expiry_interval)
        self._arm(s.expires_at, SessionExpiry(s.client_id, s.generation))
        return True

    def filters(self) -> set[str]:
        """The distinct filters subscribed here, shared ones as ``$share/G/F`` (a route table)."""
        return {text for s in self._sessions.values() for text in s.subscriptions}

    def session(self, client_id: str) -> Session | None:
        """The session held for a client id (for status and tests; do not mutate)."""
        return self._sessions.get(client_id)

    @property
    def connection_count(self) -> int:
        return len(self._conns)

    @property
    def session_count(self) -> int:
        return len(self._sessions)

    # ------------------------------------------------------------------- dispatch

    def _dispatch(self, c: _Conn, packet: Packet, now: float, out: list[Output]) -> None:
        if c.session is None:
            if not isinstance(packet, Connect):
                raise _Violation(Reason.PROTOCOL_ERROR)
            self._on_connect(c, packet, now, out)
            return
        s = c.session
        match packet:
            case Publish():
                self._on_publish(c, s, packet, now, out)
            case Puback():
                self._on_ack(c, s, packet, now, out)
            case Subscribe():
                self._on_subscribe(c, s, packet, now, out)
            case Unsubscribe():
                self._on_unsubscribe(c, s, packet, out)
            case Pingreq():
                out.append(Send(c.conn, Pingresp()))
            case Disconnect():
                self._on_disconnect(c, s, packet, now, out)
            case _:  # CONNECT again, AUTH, or a packet only a server sends
                raise _Violation(Reason.PROTOCOL_ERROR)

    def _abort(self, c: _Conn, reason: int, now: float, out: list[Output]) -> None:
        """Close for a protocol violation (level 5 says why first); the will is published."""
        if c.session is not None and c.level == MQTT5:
            out.append(Send(c.conn, Disconnect(reason)))
        out.append(Close(c.conn, reason))
        self._end(c, now, True, out)

    # ------------------------------------------------------------------- CONNECT

    def _on_connect(self, c: _Conn, p: Connect, now: float, out: list[Output]) -> None:
        refusal, client_id = self._check_connect(p)
        if refusal is None and client_id not in self._sessions:
            if len(self._sessions) >= self.config.max_sessions and not self._evict_for(now, out):
                self.stats.sessions_refused += 1
                refusal = Reason.SERVER_BUSY
        if refusal is not None:
            self.stats.connects_refused += 1
            if p.protocol_level in (MQTT311, MQTT5):
                out.append(Send(c.conn, Connack(False, refusal)))
            out.append(Close(c.conn, refusal))
            self._end(c, now, False, out)
            return
        old = self._sessions.get(client_id)
        if old is not None and old.conn is not None:
            self._take_over(old, now, out)
            old = self._sessions.get(client_id)  # a clean old session ended with its connection
        if old is not None and p.clean_start:
            self._end_session(old, now, out)
            old = None
        present = old is not None
        s = old or self._new_session(client_id, p)
        self._attach(c, s, p, now)
        out.append(Send(c.conn, self._connack(s, p, present, client_id)))
        if present:
            self.stats.sessions_resumed += 1
            self._resume(s, now, out)

    def _check_connect(self, p: Connect) -> tuple[int | None, str]:
        """The CONNACK refusal reason (None: accepted) and the client id to use."""
        if p.protocol_level not in (MQTT311, MQTT5):
            return Reason.UNSUPPORTED_PROTOCOL_VERSION, p.client_id
        client_id = p.client_id
        if not client_id:
            if p.protocol_level == MQTT311 and not p.clean_start:
                return Reason.CLIENT_ID_NOT_VALID, client_id
            client_id = self._assign_id()
        elif len(client_id.encode()) > self.config.max_client_id_len or "\0" in client_id:
            return Reason.CLIENT_ID_NOT_VALID, client_id
        if p.properties.authentication_method is not None:
            return BAD_AUTHENTICATION_METHOD, client_id
        if p.properties.receive_maximum == 0:
            return Reason.PROTOCOL_ERROR, client_id
        if not self.config.authorize(client_id, p.username, p.password):
            return Reason.BAD_USERNAME_OR_PASSWORD, client_id
        if p.will is not None:
            if not valid_topic_name(p.will.topic, self.config.max_topic_levels):
                return Reason.TOPIC_NAME_INVALID, client_id
            if p.will.qos > self.config.max_qos:
                return Reason.QOS_NOT_SUPPORTED, client_id
        return None, client_id

    def _assign_id(self) -> str:
        while True:
            client_id = f"auto-{self._rng.getrandbits(64):016x}"
            if client_id not in self._sessions:
                return client_id

    def _evict_for(self, now: float, out: list[Output]) -> bool:
        """At the session bound: end the offline session closest to expiry, if any."""
        offline = [s for s in self._sessions.values() if s.conn is None]
        if not offline:
            return False
        victim = min(offline, key=lambda s: (s.expires_at, s.client_id))
        self._expire_session(victim, now, out)
        return True

    def _new_session(self, client_id: str, p: Connect) -> Session:
        self.stats.sessions_created += 1
        s = Session(
            client_id, p.protocol_level,
            self.config.max_queued_messages, self.config.max_queued_bytes,
        )  # fmt: skip
        self._sessions[client_id] = s
        return s

    def _take_over(self, s: Session, now: float, out: list[Output]) -> None:
        old = self._conns.get(s.conn) if s.conn is not None else None
        if old is None:
            return
        self.stats.takeovers += 1
        if old.level == MQTT5:
            out.append(Send(old.conn, Disconnect(Reason.SESSION_TAKEN_OVER)))
        out.append(Close(old.conn, Reason.SESSION_TAKEN_OVER))
        self._end(old, now, True, out)

    def _attach(self, c: _Conn, s: Session, p: Connect, now: float) -> None:
        cfg = self.config
        c.session = s
        c.level = p.protocol_level
        s.conn = c.conn
        s.generation += 1
        s.protocol_level = p.protocol_level
        s.will = p.will
        if p.protocol_level == MQTT5:
            requested = p.properties.session_expiry_interval or 0
            c.connect_expiry_zero = requested == 0
            s.expiry_interval = self._cap_expiry(requested)
            receive_max = p.properties.receive_maximum or DEFAULT_RECEIVE_MAXIMUM
            s.send_window = min(receive_max, cfg.max_inflight)
        else:
            s.expiry_interval = 0 if p.clean_start else cfg.max_session_expiry
            s.send_window = cfg.level4_inflight
        c.keep_alive = float(self._keep_alive(p))
        if c.keep_alive > 0:
            self._arm(now + c.keep_alive * cfg.keep_alive_factor, KeepAliveCheck(c.conn, c.serial))

    def _cap_expiry(self, requested: int) -> int:
        if requested >= NEVER_EXPIRES:
            return self.config.max_session_expiry
        return min(requested, self.config.max_session_expiry)

    def _keep_alive(self, p: Connect) -> int:
        """The keep alive in force: the client's, lowered to the maximum at level 5."""
        cap = self.config.max_keep_alive
        if p.protocol_level == MQTT5 and (
            p.keep_alive > cap or (p.keep_alive == 0 and cap < 65535)
        ):
            return cap
        return p.keep_alive

    def _connack(self, s: Session, p: Connect, present: bool, client_id: str) -> Connack:
        if p.protocol_level != MQTT5:
            return Connack(present)
        cfg = self.config
        requested = p.properties.session_expiry_interval or 0
        keep_alive = self._keep_alive(p)
        props = Properties(
            assigned_client_identifier=client_id if not p.client_id else None,
            receive_maximum=cfg.receive_maximum if cfg.receive_maximum != 65535 else None,
            maximum_qos=cfg.max_qos if cfg.max_qos < 2 else None,
            session_expiry_interval=int(s.expiry_interval)
            if s.expiry_interval != requested
            else None,
            server_keep_alive=keep_alive if keep_alive != p.keep_alive else None,
        )
        return Connack(present, Reason.SUCCESS, props)

    # ------------------------------------------------------------------- ending

    def _end(self, c: _Conn, now: float, publish_will: bool, out: list[Output]) -> None:
        """Forget a connection; detach its session, publish or defer its will, maybe end it."""
        self._conns.pop(c.conn, None)
        s = c.session
        c.session = None
        if s is None or s.conn != c.conn:
            return
        s.conn = None
        s.generation += 1
        s.expires_at = now + s.expiry_interval
        will, s.will = s.will, None
        if will is not None and publish_will:
            delay = will.properties.will_delay_interval or 0
            if delay <= 0 or s.expiry_interval <= 0:
                self._publish_will(s.client_id, will, now, out)
            else:
                s.will = will
                if delay < s.expiry_interval:
                    self._arm(now + delay, WillDue(s.client_id, s.generation))
        if s.expiry_interval <= 0:
            self._drop_session(s)
        else:
            self._arm(s.expires_at, SessionExpiry(s.client_id, s.generation))

    def _publish_will(self, client_id: str, will: Will, now: float, out: list[Output]) -> None:
        self.stats.wills_published += 1
        props = replace(will.properties, will_delay_interval=None)
        msg = Message(will.topic, will.payload, will.qos, will.retain, props, now, client_id)
        self._accept(msg, now, out)

    def _expire_session(self, s: Session, now: float, out: list[Output]) -> None:
        self.stats.sessions_expired += 1
        self._end_session(s, now, out)

    def _end_session(self, s: Session, now: float, out: list[Output]) -> None:
        """A session ends (expiry, clean start, eviction): a deferred will is published now."""
        will, s.will = s.will, None
        if will is not None:
            self._publish_will(s.client_id, will, now, out)
        self._drop_session(s)

    def _drop_session(self, s: Session) -> None:
        for text, opts in s.subscriptions.items():
            self._unindex(s.client_id, text, opts)
        s.subscriptions.clear()
        if self._sessions.get(s.client_id) is s:
            del self._sessions[s.client_id]

    # ------------------------------------------------------------------- timers

    def _arm(self, when: float, timer: Timer) -> None:
        """Push a timer; drop stale ones when they outnumber the live bound (timers.py)."""
        self._timers.push(when, timer)
        if len(self._timers) > 2 * (2 * len(self._conns) + 2 * len(self._sessions)) + 64:
            self._timers.compact(self._live)

    def _live(self, timer: Timer) -> bool:
        """Whether a timer still matches the state it was armed for (at most 2 per conn/session)."""
        match timer:
            case ConnectDeadline(conn, serial) | KeepAliveCheck(conn, serial):
                c = self._conns.get(conn)
                return c is not None and c.serial == serial
            case WillDue(client_id, generation):
                s = self._sessions.get(client_id)
                return s is not None and s.generation == generation and s.will is not None
            case SessionExpiry(client_id, generation):
                s = self._sessions.get(client_id)
                return s is not None and s.generation == generation

    def _on_timer(self, timer: Timer, now: float, out: list[Output]) -> None:
        match timer:
            case ConnectDeadline(conn, serial):
                c = self._conns.get(conn)
                if c is not None and c.serial == serial and c.session is None:
                    self.stats.connect_timeouts += 1
                    out.append(Close(conn, MAXIMUM_CONNECT_TIME))
                    self._end(c, now, False, out)
            case KeepAliveCheck(conn, serial):
                c = self._conns.get(conn)
                if c is None or c.serial != serial or c.session is None or c.keep_alive <= 0:
                    return
                deadline = c.last_rx + c.keep_alive * self.config.keep_alive_factor
                if now < deadline:
                    self._arm(deadline, KeepAliveCheck(conn, serial))
                    return
                self.stats.keepalive_timeouts += 1
                self._abort(c, Reason.KEEP_ALIVE_TIMEOUT, now, out)
            case WillDue(client_id, generation):
                s = self._sessions.get(client_id)
                if s is not None and s.generation == generation and s.will is not None:
                    will, s.will = s.will, None
                    self._publish_will(client_id, will, now, out)
            case SessionExpiry(client_id, generation):
                s = self._sessions.get(client_id)
                if s is not None and s.generation == generation and s.conn is None:
                    self._expire_session(s, now, out)

    # ------------------------------------------------------------------- PUBLISH in

    def _on_publish(self, c: _Conn, s: Session, p: Publish, now: float, out: list[Output]) -> None:
        if p.properties.topic_alias is not None:
            raise _Violation(Reason.TOPIC_ALIAS_INVALID)
        if not valid_topic_name(p.topic, self.config.max_topic_levels):
            raise _Violation(Reason.TOPIC_NAME_INVALID)
        if p.qos > self.config.max_qos:
            raise _Violation(Reason.QOS_NOT_SUPPORTED)
        if not 0 <= p.qos <= 2 or (p.qos > 0) != (p.packet_id is not None):
            raise _Violation(Reason.PROTOCOL_ERROR)
        if p.properties.subscription_identifiers:
            raise _Violation(Reason.PROTOCOL_ERROR)  # 3.3.4: only a server sends them
        pid = p.packet_id or 0
        if p.qos == 2 and pid in s.incoming_qos2:
            self.stats.qos2_duplicates += 1
            out.append(Send(c.conn, Puback(pid, PacketType.PUBREC)))
            return
        if p.qos == 2 and len(s.incoming_qos2) >= self.config.receive_maximum:
            raise _Violation(Reason.RECEIVE_MAXIMUM_EXCEEDED)
        if self.config.may_publish is not None and not self.config.may_publish(p.topic):
            self.stats.publishes_denied += 1
            self._deny_publish(c, s, p, Reason.NOT_AUTHORIZED, out)
            return
        if self.config.publish_quota is not None and not self.config.publish_quota():
            self.stats.publishes_limited += 1
            self._deny_publish(c, s, p, Reason.QUOTA_EXCEEDED, out)
            return
        self.stats.publishes_received += 1
        ack: Send | None = None
        if p.qos == 1:
            ack = Send(c.conn, Puback(pid))
            if not self.config.hold_acks:
                out.append(ack)
                ack = None
        elif p.qos == 2:
            s.incoming_qos2.add(pid)
            out.append(Send(c.conn, Puback(pid, PacketType.PUBREC)))
        msg = Message(p.topic, p.payload, p.qos, p.retain, p.properties, now, s.client_id)
        self._accept(msg, now, out, ack)

    def _deny_publish(
        self, c: _Conn, s: Session, p: Publish, why: int, out: list[Output]
    ) -> None:
        """A PUBLISH the policy refuses: dropped; MQTT 5 learns ``why`` from the ack (0x87,
        0x97), 3.1.1 has no way to say it and gets the usual ack (as mosquitto's ACLs)."""
        pid = p.packet_id or 0
        reason = why if c.level == MQTT5 else Reason.SUCCESS
        if p.qos == 1:
            ack = Send(c.conn, Puback(pid, reason=reason))
            out.append(Owed(ack) if self.config.hold_acks else ack)
        elif p.qos == 2:
            if reason == Reason.SUCCESS:  # 3.1.1: the exchange goes on to PUBREL / PUBCOMP
                s.incoming_qos2.add(pid)
            out.append(Send(c.conn, Puback(pid, PacketType.PUBREC, reason)))

    def _accept(self, msg: Message, now: float, out: list[Output], ack: Send | None = None) -> None:
        """A message accepted here: retained store, local delivery, then routed out."""
        stamp: Stamp | None = None
        if msg.retain:
            stamp = self.config.retain_stamp(now)
            outcome = self.retained.put(msg.topic, msg.payload, msg.qos, stamp, now, msg.properties)
            self._count_retained(outcome)
        here = self.config.share_here
        version = self.persist_version
        self._deliver(msg, now, out, True, None if here is None else here(msg.topic))
        publish = Publish(msg.topic, msg.payload, msg.qos, msg.retain, properties=msg.properties)
        persisted = self.persist_version != version
        out.append(RouteOut(publish, msg.sender or "", now, stamp, ack, persisted))

    def _count_retained(self, outcome: Outcome) -> None:
        if outcome is Outcome.SET:
            self.stats.retained_set += 1
        elif outcome is Outcome.CLEARED:
            self.stats.retained_cleared += 1
        elif outcome is Outcome.REFUSED:
            self.stats.retained_refused += 1
        else:
            self.stats.retained_stale += 1

    # ------------------------------------------------------------------- routing

    def _deliver(
        self,
        msg: Message,
        now: float,
        out: list[Output],
        to_plain: bool = True,
        groups: Collection[str] | None = None,
    ) -> None:
        """Fan a message out to every matching session (module docstring: Routing)."""
        plain: dict[str, tuple[int, list[int], bool]] = {}
        for client_id, opts in self._subs.match_values(msg.topic) if to_plain else ():
            sub = opts.subscription
            if sub.no_local and client_id == msg.sender:
                continue
            qos, ids, rap = plain.get(client_id, (-1, [], False))
            if opts.identifier is not None:
                ids.append(opts.identifier)
            plain[client_id] = (max(qos, sub.qos), ids, rap or sub.retain_as_published)
        for client_id, (qos, ids, rap) in plain.items():
            s = self._sessions[client_id]
            d = Delivery(msg, min(qos, msg.qos), msg.retain and rap, tuple(sorted(ids)))
            self._send_or_queue(s, d, now, out)
        for name, group in self._shared.match_values(msg.topic):
            if groups is None or name in groups:
                self._deliver_shared(group, msg, now, out)

    def _deliver_shared(
        self, group: ShareGroup, msg: Message, now: float, out: list[Output]
    ) -> None:
        """One member of a share group (`shared.py`: connected members first, in turn)."""
        client_id, opts = group.pick(lambda cid: self._sessions[cid].conn is not None)
        ids = () if opts.identifier is None else (opts.identifier,)
        retain = msg.retain and opts.subscription.retain_as_published
        d = Delivery(msg, min(opts.subscription.qos, msg.qos), retain, ids)
        self._send_or_queue(self._sessions[client_id], d, now, out)

    # ------------------------------------------------------------------- delivery

    def _send_or_queue(self, s: Session, d: Delivery, now: float, out: list[Output]) -> None:
        if d.qos and s.expiry_interval > 0:
            self.persist_version += 1
        if s.conn is not None and (d.qos == 0 or (s.window_open() and not s.queue)):
            self._send(s, d, now, out)
            return
        dropped = s.enqueue(d)
        if dropped is Dropped.NEW:
            if d.qos == 0:
                self.stats.queue_dropped_qos0 += 1
            else:
                self.stats.queue_dropped_new += 1
            return
        self.stats.queued += 1
        if dropped is Dropped.OLDEST_QOS0:
            self.stats.queue_dropped_qos0 += 1

    def _send(self, s: Session, d: Delivery, now: float, out: list[Output]) -> None:
        """Send now (the session is connected and, for QoS > 0, the window has room)."""
        props = self._outgoing_properties(d, now)
        if props is None:
            self.stats.expired += 1
            return
        assert s.conn is not None
        pid = s.allocate_packet_id() if d.qos > 0 else None
        publish = Publish(d.message.topic, d.message.payload, d.qos, d.retain, False, pid, props)
        if pid is not None:
            state = InflightState.AWAIT_PUBACK if d.qos == 1 else InflightState.AWAIT_PUBREC
            s.inflight[pid] = Inflight(publish, state)
        self.stats.publishes_sent += 1
        out.append(Send(s.conn, publish))

    @staticmethod
    def _outgoing_properties(d: Delivery, now: float) -> Properties | None:
        """The properties to send, or None when the message expired (4.1 / 3.3.2.3.3)."""
        props = d.message.properties
        expiry = props.message_expiry_interval
        if expiry is not None:
            remaining = expiry - int(now - d.message.created)
            if remaining <= 0:
                return None
            expiry = remaining
        if props is NO_PROPERTIES and not d.subscription_ids:
            return props
        return replace(
            props,
            message_expiry_interval=expiry,
            subscription_identifiers=d.subscription_ids,
            topic_alias=None,
        )

    def _drain(self, s: Session, now: float, out: list[Output]) -> None:
        """Move queued messages into the window while it has room, in order."""
        while s.conn is not None and s.queue and (s.queue[0].qos == 0 or s.window_open()):
            self._send(s, s.dequeue(), now, out)

    def _resume(self, s: Session, now: float, out: list[Output]) -> None:
        """On session resume: resend every unacknowledged PUBLISH (DUP) or PUBREL, then drain."""
        assert s.conn is not None
        for pid, entry in s.inflight.items():
            self.stats.resent += 1
            if entry.state is InflightState.AWAIT_PUBCOMP:
                out.append(Send(s.conn, Puback(pid, PacketType.PUBREL)))
            else:
                entry.publish = replace(entry.publish, dup=True)
                out.append(Send(s.conn, entry.publish))
        self._drain(s, now, out)

    # ------------------------------------------------------------------- acknowledgements

    def _on_ack(self, c: _Conn, s: Session, p: Puback, now: float, out: list[Output]) -> None:
        pid = p.packet_id
        entry = s.inflight.get(pid)
        if p.kind is PacketType.PUBREL:
            if pid in s.incoming_qos2:
                s.incoming_qos2.discard(pid)
                out.append(Send(c.conn, Puback(pid, PacketType.PUBCOMP)))
            else:
                out.append(
                    Send(c.conn, Puback(pid, PacketType.PUBCOMP, Reason.PACKET_ID_NOT_FOUND))
                )
            return
        if (
            p.kind is PacketType.PUBREC
            and entry is not None
            and entry.state is not InflightState.AWAIT_PUBACK
        ):
            if p.reason >= 0x80:
                del s.inflight[pid]
                self._drain(s, now, out)
            else:
                entry.state = InflightState.AWAIT_PUBCOMP
                out.append(Send(c.conn, Puback(pid, PacketType.PUBREL)))
            return
        expected = {
            PacketType.PUBACK: InflightState.AWAIT_PUBACK,
            PacketType.PUBCOMP: InflightState.AWAIT_PUBCOMP,
        }.get(p.kind)
        if entry is None or entry.state is not expected:
            self.stats.unknown_acks += 1
            if p.kind is PacketType.PUBREC:
                out.append(Send(c.conn, Puback(pid, PacketType.PUBREL, Reason.PACKET_ID_NOT_FOUND)))
            return
        del s.inflight[pid]
        if s.expiry_interval > 0:
            self.persist_version += 1
        self._drain(s, now, out)

    # ------------------------------------------------------------------- SUBSCRIBE

    def _on_subscribe(
        self, c: _Conn, s: Session, p: Subscribe, now: float, out: list[Output]
    ) -> None:
        ids = p.properties.subscription_identifiers
        if not p.subscriptions or len(ids) > 1 or (ids and ids[0] <= 0):
            raise _Violation(Reason.PROTOCOL_ERROR)
        for sub in p.subscriptions:  # a protocol error applies none of the packet
            if not 0 <= sub.qos <= 2 or not 0 <= sub.retain_handling <= 2:
                raise _Violation(Reason.PROTOCOL_ERROR)
            if sub.no_local and c.level == MQTT5 and sub.topic_filter.startswith(SHARE_PREFIX):
                raise _Violation(Reason.PROTOCOL_ERROR)  # 3.8.3.1
        identifier = ids[0] if ids else None
        reasons: list[int] = []
        retained: list[Delivery] = []
        for sub in p.subscriptions:
            reasons.append(self._subscribe_one(s, sub, identifier, now, retained))
        out.append(Send(c.conn, Suback(p.packet_id, tuple(reasons))))
        for d in retained:
            self._send_or_queue(s, d, now, out)

    def _subscribe_one(
        self,
        s: Session,
        sub: Subscription,
        identifier: int | None,
        now: float,
        retained: list[Delivery],
    ) -> int:
        """Add or replace one subscription; its SUBACK reason. Retained messages go to ``retained``."""
        parsed = parse_filter(sub.topic_filter, self.config.max_topic_levels)
        if parsed is None:
            self.stats.subscriptions_refused += 1
            return Reason.TOPIC_FILTER_INVALID
        if self.config.may_subscribe is not None and not self.config.may_subscribe(
            sub.topic_filter
        ):
            self.stats.subscriptions_denied += 1
            return Reason.NOT_AUTHORIZED
        new = sub.topic_filter not in s.subscriptions
        if new and len(s.subscriptions) >= self.config.max_subscriptions_per_session:
            self.stats.subscriptions_refused += 1
            return Reason.QUOTA_EXCEEDED
        granted = min(sub.qos, self.config.max_qos)
        opts = SubOptions(replace(sub, qos=granted), parsed.group, parsed.topic_filter, identifier)
        s.subscriptions[sub.topic_filter] = opts
        self.subscriptions_version += 1
        if parsed.group is None:
            self._subs.insert(parsed.topic_filter, s.client_id, opts)
            if sub.retain_handling == 0 or (sub.retain_handling == 1 and new):
                retained.extend(self._retained_for(parsed.topic_filter, granted, identifier, now))
        else:
            group = self._shared.lookup(parsed.topic_filter, parsed.group)
            if group is None:
                group = ShareGroup()
                self._shared.insert(parsed.topic_filter, parsed.group, group)
            group.add(s.client_id, opts)
        return granted

    def _retained_for(
        self, topic_filter: str, granted: int, identifier: int | None, now: float
    ) -> Iterator[Delivery]:
        ids = () if identifier is None else (identifier,)
        for item in self.retained.matching(topic_filter):
            msg = Message(
                item.topic, item.payload, item.qos, True, item.properties, item.created, None
            )
            if Broker._outgoing_properties(Delivery(msg, 0, True), now) is None:
                self.retained.expire(item.topic)
                self.stats.expired += 1
                continue
            yield Delivery(msg, min(item.qos, granted), True, ids)

    def _on_unsubscribe(self, c: _Conn, s: Session, p: Unsubscribe, out: list[Output]) -> None:
        if not p.topic_filters:
            raise _Violation(Reason.PROTOCOL_ERROR)
        reasons: list[int] = []
        for text in p.topic_filters:
            opts = s.subscriptions.pop(text, None)
            if opts is None:
                reasons.append(Reason.NO_SUBSCRIPTION_EXISTED)
                continue
            self._unindex(s.client_id, text, opts)
            reasons.append(Reason.SUCCESS)
        out.append(Send(c.conn, Unsuback(p.packet_id, tuple(reasons))))

    def _unindex(self, client_id: str, text: str, opts: SubOptions) -> None:
        self.subscriptions_version += 1
        if opts.group is None:
            self._subs.remove(opts.topic_filter, client_id)
            return
        group = self._shared.lookup(opts.topic_filter, opts.group)
        if group is not None:
            group.remove(client_id)
            if not group:
                self._shared.remove(opts.topic_filter, opts.group)

    # ------------------------------------------------------------------- DISCONNECT

    def _on_disconnect(
        self, c: _Conn, s: Session, p: Disconnect, now: float, out: list[Output]
    ) -> None:
        expiry = p.properties.session_expiry_interval
        if expiry is not None and c.level == MQTT5:
            if c.connect_expiry_zero and expiry != 0:
                raise _Violation(Reason.PROTOCOL_ERROR)  # 3.14.2.2.2
            s.expiry_interval = self._cap_expiry(expiry)
        out.append(Close(c.conn, Reason.SUCCESS))
        self._end(c, now, c.level == MQTT5 and p.reason == Reason.DISCONNECT_WITH_WILL, out)


__all__ = [
    "Broker",
    "BrokerConfig",
    "BrokerStats",
    "Close",
    "ConnId",
    "Output",
    "RouteOut",
    "Send",
]
