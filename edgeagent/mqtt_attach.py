"""Attach mode: bridge chosen topic filters between the agent's broker and an existing broker.

``[mqtt] attach = "HOST:PORT"`` and ``attach_topics`` (see ``config/mqtt_extra.py``). The
agent connects to that broker (a site mosquitto) as an MQTT 5 client with aiomqtt (imported
only here, and this module only when attach is configured), and is, on its own broker, one
more client: :class:`BridgeClient`, a connection without a socket that goes through the
broker's ordinary CONNECT / SUBSCRIBE / PUBLISH path (so the broker core needs nothing for
it). Messages there that match an ``out`` / ``both`` filter, from local clients or from the
mesh, are published to the attached broker; messages from the attached broker matching an
``in`` / ``both`` filter are published into the agent's broker, and so across the mesh.

Loop prevention, two mechanisms. (1) MQTT 5 no_local on both bridge subscriptions: the
attached broker does not send back what the agent published there, the agent's broker does
not hand the bridge client what it published itself. (2) An origin marker: every message the
bridge publishes, either way, carries the user property ``edgeagent-bridge = NODE``; a
message arriving with it is not bridged again (counted ``loops_dropped``). (2) covers what
(1) cannot see: two agents attached to the same broker, and a message that went into the
mesh from one bridge and reached another agent's bridge.

Inside the agent's broker the bridge uses QoS at most 1 (a QoS 2 filter is QoS 2 on the
attached broker, 1 in the agent). Outbound messages wait in a bounded queue while the
attached broker is away (:data:`MAX_PENDING`, the oldest dropped first, counted). A message
from the attached broker that a local client could not send (a topic or size past the
endpoint's :class:`~overlay.mqtt.packets.Limits`) is dropped and counted (``in_dropped``). The
client reconnects with exponential backoff (1 s doubling to 30 s, jittered) and logs one
line per outage. What this cannot guarantee is in docs/architecture.md ("Attach mode").
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import ssl
from collections import deque
from typing import TYPE_CHECKING, Any, Protocol

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties as PahoProperties
from paho.mqtt.subscribeoptions import SubscribeOptions

from overlay.mqtt.broker import Broker
from overlay.mqtt.codec import check_topic_name
from overlay.mqtt.packets import (
    MQTT5,
    Connect,
    PacketType,
    Properties,
    Puback,
    Publish,
    Subscribe,
    Subscription,
)
from overlay.mqtt.topics import filter_matches

from .config.schema import MqttAttach
from .errors import ConfigError
from .host import FeatureHost
from .logs import fields

if TYPE_CHECKING:
    from .features.mqtt import Endpoint

log = FeatureHost.logger("mqtt")
MARKER = "edgeagent-bridge"
MAX_PENDING = 1000  # outbound messages held while the attached broker is unreachable
BACKOFF_MIN, BACKOFF_MAX = 1.0, 30.0


def _marked(user_properties: Any) -> bool:
    return any(key == MARKER for key, _ in user_properties or ())


class BridgeOwner(Protocol):
    """What a :class:`BridgeClient` hands its packets to (attach mode, the uplink)."""

    def from_broker(self, publish: Publish) -> None: ...
    def later(self, packet: Any) -> None: ...


class BridgeClient:
    """A bridge as a client of the agent's broker: packets in and out as values.

    Shared by attach mode and the uplink (``features/uplink.py``): ``attach`` is the owner
    that takes the delivered messages; QoS 1 / 2 deliveries are acknowledged at once.
    """

    def __init__(self, attach: BridgeOwner, conn: int) -> None:
        self.attach = attach
        self.conn = conn
        self.transport = None
        self.paused = False
        self.peer = "attach"
        self.connected = False

    def write(self, packet: Any) -> None:
        if isinstance(packet, Publish):
            self.attach.from_broker(packet)
            if packet.qos == 1 and packet.packet_id is not None:
                self.attach.later(Puback(packet.packet_id))
            elif packet.qos == 2 and packet.packet_id is not None:
                self.attach.later(Puback(packet.packet_id, kind=PacketType.PUBREC))
        elif isinstance(packet, Puback) and packet.kind == PacketType.PUBREL:
            self.attach.later(Puback(packet.packet_id, kind=PacketType.PUBCOMP))

    def close(self) -> None:
        self.connected = False


class Attach:
    """The bridge to one attached broker: a client there, a client here."""

    def __init__(self, endpoint: Endpoint, config: MqttAttach, node: str = "agent") -> None:
        self.endpoint = endpoint
        self.config = config
        self.node = node
        self.client_id = f"edgeagent-attach-{node}"
        self.tls = attach_tls_context(config)  # None: plain TCP
        self.stats = {
            "in": 0,
            "out": 0,
            "loops_dropped": 0,
            "out_dropped": 0,
            "in_dropped": 0,
            "connects": 0,
        }
        self.pending: deque[Publish] = deque()
        self._wake = asyncio.Event()
        self._mqtt: aiomqtt.Client | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._ids = itertools.cycle(range(1, 65536))
        self._bridge: BridgeClient | None = None

    @property
    def broker(self) -> Broker:
        return self.endpoint.broker

    def start(self) -> None:
        self._join_broker()
        self._tasks = [
            asyncio.create_task(self._connect_loop(), name="mqtt-attach"),
            asyncio.create_task(self._send_loop(), name="mqtt-attach-out"),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []

    def status(self) -> dict[str, Any]:
        host, port = self.config.broker
        attached = self._mqtt is not None
        return {
            "broker": f"{host}:{port}",
            "attached": attached,
            "pending": len(self.pending),
            **self.stats,
        }

    # The agent's side.

    def _join_broker(self) -> None:
        bridge = self._bridge = BridgeClient(self, -1)  # no real connection has id <= 0
        self.endpoint.clients[bridge.conn] = bridge  # type: ignore[assignment]
        self.endpoint.run(None, lambda now: self.broker.connect(bridge.conn, now))
        connect = Connect(self.client_id, protocol_level=MQTT5, keep_alive=0)
        self._feed(connect)
        subs = tuple(
            Subscription(t.topic_filter, min(t.qos, 1), no_local=True, retain_as_published=True)
            for t in self.config.topics
            if t.outbound
        )
        if subs:
            self._feed(Subscribe(next(self._ids), subs))

    def _feed(self, packet: Any) -> None:
        bridge = self._bridge
        if bridge is None:
            return
        self.endpoint.run(None, lambda now: self.broker.receive(bridge.conn, packet, now))

    def later(self, packet: Any) -> None:
        """Answer the broker after its current call returns (no re-entry into it)."""
        asyncio.get_running_loop().call_soon(self._feed, packet)

    def from_broker(self, publish: Publish) -> None:
        """A message for the bridge subscription: queue it for the attached broker."""
        if _marked(publish.properties.user_properties):
            self.stats["loops_dropped"] += 1
            return
        if len(self.pending) >= MAX_PENDING:
            self.pending.popleft()
            self.stats["out_dropped"] += 1
        self.pending.append(publish)
        self._wake.set()

    def _inbound(self, message: aiomqtt.Message) -> None:
        """A message from the attached broker: into the agent's broker, marked."""
        props = message.properties
        if _marked(getattr(props, "UserProperty", None) if props is not None else None):
            self.stats["loops_dropped"] += 1
            return
        payload = message.payload
        if isinstance(payload, str):
            payload = payload.encode()
        elif not isinstance(payload, (bytes, bytearray)):
            payload = b"" if payload is None else str(payload).encode()
        limits = self.endpoint.limits
        topic = message.topic.value
        if len(payload) + len(topic) > limits.max_packet_bytes or check_topic_name(topic, limits):
            self.stats["in_dropped"] += 1  # what a local client could not send either
            return
        qos = min(message.qos, 1)
        self.stats["in"] += 1
        self._feed(
            Publish(
                topic=topic,
                payload=bytes(payload),
                qos=qos,
                retain=message.retain,
                packet_id=next(self._ids) if qos else None,
                properties=Properties(user_properties=((MARKER, self.node),)),
            )
        )

    # The attached broker's side.

    async def _connect_loop(self) -> None:
        delay, warned = BACKOFF_MIN, False
        host, port = self.config.broker
        while True:
            try:
                async with aiomqtt.Client(
                    host, port, identifier=self.client_id, protocol=aiomqtt.ProtocolVersion.V5,
                    keepalive=30, timeout=10, tls_context=self.tls,
                    username=self.config.username, password=self.config.password,
                ) as client:  # fmt: skip
                    await self._subscribe(client)
                    self._mqtt, delay, warned = client, BACKOFF_MIN, False
                    self.stats["connects"] += 1
                    self._wake.set()
                    log.info("mqtt attached", extra=fields(broker=f"{host}:{port}"))
                    async for message in client.messages:
                        self._inbound(message)
            except aiomqtt.MqttError as exc:
                if not warned:
                    log.warning(
                        "mqtt attach: broker unreachable, retrying with backoff",
                        extra=fields(broker=f"{host}:{port}", error=str(exc)),
                    )
                    warned = True
            finally:
                self._mqtt = None
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))
            delay = min(delay * 2, BACKOFF_MAX)

    async def _subscribe(self, client: aiomqtt.Client) -> None:
        for topic in self.config.topics:
            if topic.inbound:
                options = SubscribeOptions(qos=topic.qos, noLocal=True, retainAsPublished=True)
                await client.subscribe(topic.topic_filter, options=options)

    async def _send_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self.pending and self._mqtt is not None:
                publish = self.pending[0]
                if not await self._send(self._mqtt, publish):
                    break  # the connection went; the message waits for the next one
                self.pending.popleft()

    async def _send(self, client: aiomqtt.Client, publish: Publish) -> bool:
        props = PahoProperties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.UserProperty = [*publish.properties.user_properties, (MARKER, self.node)]
        qos = next(
            (
                t.qos
                for t in self.config.topics
                if t.outbound and filter_matches(t.topic_filter, publish.topic)
            ),
            publish.qos,
        )
        try:
            await client.publish(
                publish.topic, publish.payload, qos=qos, retain=publish.retain, properties=props,
                timeout=10,
            )  # fmt: skip
        except aiomqtt.MqttError:
            return False
        self.stats["out"] += 1
        return True


def attach_tls_context(config: MqttAttach) -> ssl.SSLContext | None:
    """The client context for ``[mqtt] attach_tls_*`` (None without ``attach_tls_ca``): TLS
    >= 1.2, the broker's certificate verified against the CA and its name (or IP) checked
    against the ``attach`` host. A file that does not load is a ConfigError naming the key."""
    if config.tls_ca is None:
        return None
    try:
        context = ssl.create_default_context(cafile=str(config.tls_ca))
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise ConfigError(f"mqtt.attach_tls_ca: cannot load {config.tls_ca}: {exc}") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if config.tls_cert is not None:
        try:
            context.load_cert_chain(config.tls_cert, config.tls_key)
        except (ssl.SSLError, OSError, ValueError) as exc:
            raise ConfigError(
                f"mqtt.attach_tls_cert / mqtt.attach_tls_key: cannot load {config.tls_cert} "
                f"with {config.tls_key}: {exc}"
            ) from None
    return context
