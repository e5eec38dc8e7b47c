"""One client's session state: subscriptions, messages in flight, the offline queue.

A session outlives its connections (MQTT 5 section 4.1): while it exists it keeps the
client's subscriptions, the QoS 1 and 2 messages sent to it and not yet acknowledged
(`Session.inflight`, in send order, at most the client's receive maximum), the QoS 2 packet
ids received from it and not yet released (`Session.incoming_qos2`), and the messages that
could not be sent (`Session.queue`: offline, or the inflight window full). The broker moves
messages between the queue and the window; this module only keeps them and their bounds.

Queue bounds: at most ``max_messages`` and ``max_bytes`` per session. When a message does not
fit, the oldest queued QoS 0 message is dropped first (it carries no promise); if none is
left, the new message is dropped (a QoS 1/2 promise already queued is kept over a new one).
`Session.enqueue` says what it dropped so the broker counts it.

Packet ids (2.2.1) are allocated per session from a counter that wraps at 65,535, skipping
ids still in flight; the window is never over 65,535, so one is always free.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field
from enum import Enum

from overlay.mqtt.packets import NO_PROPERTIES, Properties, Publish, Subscription, Will

MAX_PACKET_ID = 65535
MESSAGE_OVERHEAD = 64  # bytes charged per queued message besides topic and payload


@dataclass(frozen=True, slots=True)
class Message:
    """An accepted application message, as the broker routes it."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    properties: Properties
    created: float  # `now` when accepted here (message expiry counts from it)
    sender: str | None  # the publishing client id here; None from the mesh or a will

    def cost(self) -> int:
        return MESSAGE_OVERHEAD + len(self.topic.encode()) + len(self.payload)


@dataclass(frozen=True, slots=True)
class Delivery:
    """A message for one session: its QoS, retain flag and subscription ids already decided."""

    message: Message
    qos: int
    retain: bool
    subscription_ids: tuple[int, ...] = ()

    def cost(self) -> int:
        return self.message.cost()


class InflightState(Enum):
    AWAIT_PUBACK = "puback"  # QoS 1 PUBLISH sent
    AWAIT_PUBREC = "pubrec"  # QoS 2 PUBLISH sent
    AWAIT_PUBCOMP = "pubcomp"  # QoS 2 PUBREL sent


@dataclass(slots=True)
class Inflight:
    publish: Publish
    state: InflightState


@dataclass(frozen=True, slots=True)
class SubOptions:
    """A subscription as held: the SUBSCRIBE entry and the subscription id it came with."""

    subscription: Subscription
    group: str | None
    topic_filter: str  # without the $share/GROUP/ prefix
    identifier: int | None = None


class Dropped(Enum):
    NOTHING = "nothing"
    OLDEST_QOS0 = "oldest_qos0"
    NEW = "new"


@dataclass(slots=True)
class Session:
    """What the broker keeps for one client id (see the module docstring)."""

    client_id: str
    protocol_level: int
    max_messages: int
    max_bytes: int
    expiry_interval: float = 0.0  # seconds kept after the connection ends
    expires_at: float = 0.0  # when a disconnected session ends
    conn: object | None = None  # the connection now attached, if any
    generation: int = 0  # bumped on every attach and detach: stale timers are ignored
    subscriptions: dict[str, SubOptions] = field(default_factory=dict)  # by full filter text
    inflight: OrderedDict[int, Inflight] = field(default_factory=OrderedDict)
    incoming_qos2: set[int] = field(default_factory=set)
    queue: deque[Delivery] = field(default_factory=deque)
    queued_bytes: int = 0
    send_window: int = 20  # the client's receive maximum
    will: Will | None = None
    will_properties: Properties = NO_PROPERTIES
    _next_id: int = 0

    def allocate_packet_id(self) -> int:
        """The next packet id not in flight (the window never holds all 65,535)."""
        for _ in range(MAX_PACKET_ID):
            self._next_id = self._next_id % MAX_PACKET_ID + 1
            if self._next_id not in self.inflight:
                return self._next_id
        raise RuntimeError("every packet id is in flight")  # the window bound forbids it

    def window_open(self) -> bool:
        return len(self.inflight) < self.send_window

    def enqueue(self, delivery: Delivery) -> Dropped:
        """Queue within the bounds; what had to be dropped to keep them (module docstring)."""
        cost = delivery.cost()
        if cost > self.max_bytes or self.max_messages == 0:
            return Dropped.NEW
        dropped = Dropped.NOTHING
        while len(self.queue) >= self.max_messages or self.queued_bytes + cost > self.max_bytes:
            if not self._drop_oldest_qos0():
                return Dropped.NEW
            dropped = Dropped.OLDEST_QOS0
        self.queue.append(delivery)
        self.queued_bytes += cost
        return dropped

    def _drop_oldest_qos0(self) -> bool:
        for i, queued in enumerate(self.queue):
            if queued.qos == 0:
                del self.queue[i]
                self.queued_bytes -= queued.cost()
                return True
        return False

    def dequeue(self) -> Delivery:
        delivery = self.queue.popleft()
        self.queued_bytes -= delivery.cost()
        return delivery

    def clear_queue(self) -> None:
        self.queue.clear()
        self.queued_bytes = 0
