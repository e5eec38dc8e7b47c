"""MQTT: the agent is the broker (MQTT 3.1.1 and 5) for the clients on its device.

How it works. The feature listens on TCP ``config.mqtt`` (``--mqtt``, ``[mqtt] listen``,
default ``0.0.0.0:1883``). Each accepted connection gets an :class:`asyncio.Protocol`
(:class:`_Client`) with its own :class:`overlay.mqtt.codec.Decoder`; every decoded packet
goes to the one sans-IO :class:`overlay.mqtt.broker.Broker`, and its outputs are carried out
in order by :meth:`Endpoint.run`: ``Send`` is encoded at the connection's protocol level and
written, ``Close`` closes the transport once what was written is flushed, ``RouteOut`` (a
message accepted here, for other agents) goes to :attr:`Endpoint.route_out`, a hook the mesh
routing sets (a no-op until then: the broker is local to this node). The broker's timers
(keep alive, connect timeout, session expiry, will delay) are one ``loop.call_at`` re-armed
after every call, at ``broker.next_deadline()``; the broker's clock is the loop's.

Hostile clients. A packet the decoder refuses is answered as MQTT says (a CONNACK with the
reason before CONNECT, a level-5 DISCONNECT with it after; level 4 just closes), counted in
``decode_errors`` and the connection closed: its will is published as for any abnormal end.
A client that does not read (its transport's write buffer above :data:`MAX_WRITE_BUFFER`)
is disconnected and counted (``slow_clients``); its persistent session, if any, keeps
queueing within the broker's bounds. Nothing a client sends can raise out of this module:
a bug in the broker closes that one connection with a logged error.

A port named with ``--mqtt`` that cannot be had is one ConfigError (exit 2); when the
default port is taken (mosquitto already runs on the device) the agent logs one line and
runs without the listener (see the docs: attach mode is the way to use that broker).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import functools
import itertools
import os
import ssl
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from overlay.mqtt.broker import Broker, BrokerConfig, Close, Output, Owed, RouteOut, Send
from overlay.mqtt.codec import Decoder, MqttDecodeError, encode
from overlay.mqtt.packets import MQTT5, MQTT311, Connack, Disconnect, Limits, Reason

from ..config.schema import MqttTls
from ..errors import ConfigError
from ..host import FeatureHost
from ..logs import fields
from ..ratelimit import WarnLimiter

if TYPE_CHECKING:
    from ..mqtt_attach import Attach
    from ..mqtt_mesh import MeshLink
    from ..mqtt_sessions import SessionStore

log = FeatureHost.logger("mqtt")
MAX_WRITE_BUFFER = 1 << 20  # bytes waiting for one client before it is cut off as too slow
MAX_HELD_ACKS = 4096  # PUBACKs held for one client; above, reading it pauses until half are out


class _HeldAck:
    """A PUBACK owed to a client, waiting for ``waiting`` conditions (mesh batches, a save)."""

    __slots__ = ("packet", "waiting", "unsafe")

    def __init__(self, packet: Any, waiting: int) -> None:
        self.packet, self.waiting, self.unsafe = packet, waiting, False


class _Client(asyncio.Protocol):
    """One client connection: bytes in to the endpoint, packets out to the transport."""

    def __init__(self, endpoint: Endpoint, conn: int, limits: Limits) -> None:
        self.endpoint = endpoint
        self.conn = conn
        self.decoder = Decoder(None, limits)
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.connected = False  # a successful CONNACK went out
        self.pending: list[bytes] = []  # encoded packets for the next flush (see write)
        self.paused = False  # reading paused: too many PUBACKs held (Endpoint._hold)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        self.endpoint.accepted(self)

    def data_received(self, data: bytes) -> None:
        self.endpoint.received(self, data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.endpoint.lost(self)

    def write(self, packet: Any) -> None:
        """Queue one packet's bytes; they go out with the others of this loop pass, one write.

        A burst of deliveries (a mesh batch, a client's packets in one read) is one
        ``transport.write`` (one send syscall, one TLS record run), not one per packet.
        """
        if self.transport is None or self.transport.is_closing():
            return
        self.pending.append(encode(packet, self.decoder.level or MQTT311))
        if len(self.pending) == 1:
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        if not self.pending:
            return
        data = self.pending[0] if len(self.pending) == 1 else b"".join(self.pending)
        self.pending.clear()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None:
            self.flush()  # what was written before the close goes out first (CONNACK, DISCONNECT)
            self.transport.close()


class Endpoint:
    """The broker core and the connections it serves; the asyncio side of it."""

    def __init__(self, broker: Broker, limits: Limits | None = None) -> None:
        self.broker = broker
        self.limits = limits or Limits()
        self.clients: dict[int, _Client] = {}
        # The mesh's hook: route a message out; returns what its PUBACK must wait for.
        self.route_out: Callable[[RouteOut], list[asyncio.Future[Any]]] = lambda out: []
        # The session store's "done once the next save is written" (None: nothing is saved).
        self.durable: Callable[[], asyncio.Future[Any]] | None = None
        self.stats = {
            "decode_errors": 0, "slow_clients": 0, "internal_errors": 0,
            "acks_held": 0, "acks_unsafe": 0, "reads_paused": 0,
        }  # fmt: skip
        self._held: dict[Any, collections.deque[_HeldAck]] = {}
        self.gated: list[_Client] | None = None  # a list: clients not served yet (open_gate)
        self._ids = itertools.count(1)
        self._timer: asyncio.TimerHandle | None = None
        self._deadline: float | None = None
        self._warn = WarnLimiter(log)

    def protocol(self) -> _Client:
        return _Client(self, next(self._ids), self.limits)

    @staticmethod
    def now() -> float:
        return asyncio.get_running_loop().time()

    def open_gate(self) -> None:
        """Serve the clients that connected while the gate was closed, and all later ones."""
        waiting, self.gated = self.gated, None
        for client in waiting or ():
            if client.transport is not None and not client.transport.is_closing():
                self.accepted(client)
                client.transport.resume_reading()

    def accepted(self, client: _Client) -> None:
        if self.gated is not None:  # not serving yet: not read until open_gate
            assert client.transport is not None
            client.transport.pause_reading()
            self.gated.append(client)
            return
        self.clients[client.conn] = client
        self.run(client, lambda now: self.broker.connect(client.conn, now))

    def received(self, client: _Client, data: bytes) -> None:
        if client.conn not in self.clients:
            return
        try:
            packets = client.decoder.feed(data)
        except MqttDecodeError as exc:
            for packet in exc.packets:
                self.run(client, functools.partial(self.broker.receive, client.conn, packet))
            self._refuse(client, exc)
            return
        for packet in packets:
            self.run(client, functools.partial(self.broker.receive, client.conn, packet))
        transport = client.transport
        if transport is not None and transport.get_write_buffer_size() > MAX_WRITE_BUFFER:
            self.stats["slow_clients"] += 1
            self._cut(client, "client does not read (write buffer full)")

    def lost(self, client: _Client) -> None:
        self._held.pop(client.conn, None)
        if self.clients.pop(client.conn, None) is not None:
            self.run(None, lambda now: self.broker.connection_lost(client.conn, now))

    def _refuse(self, client: _Client, exc: MqttDecodeError) -> None:
        """Answer a packet the decoder refused as MQTT says, then close (will published)."""
        self.stats["decode_errors"] += 1
        self._warn.warn(
            f"decode {client.peer.rsplit(':', 1)[0]}", self.now(),
            "mqtt: bad packet, connection closed",
            peer=client.peer, reason=exc.reason.name, why=exc.message,
        )  # fmt: skip
        with contextlib.suppress(Exception):
            if not client.connected:
                client.write(Connack(reason=exc.reason))
            elif client.decoder.level == MQTT5:
                client.write(Disconnect(reason=exc.reason))
        self._cut(client, None)

    def _cut(self, client: _Client, why: str | None) -> None:
        if why is not None:
            key = f"cut {client.peer.rsplit(':', 1)[0]}"
            self._warn.warn(key, self.now(), "mqtt: connection closed", peer=client.peer, why=why)
        client.close()
        self.lost(client)

    def run(self, client: _Client | None, call: Callable[[float], list[Output]]) -> None:
        """One broker call at the loop's time, then its outputs in order, then the timer."""
        try:
            outputs = call(self.now())
        except Exception:
            self.stats["internal_errors"] += 1
            log.exception("mqtt: broker error, connection closed")
            if client is not None:
                self._cut(client, None)
            return
        self.dispatch(outputs)
        self._arm()

    def dispatch(self, outputs: list[Output]) -> None:
        for out in outputs:
            if isinstance(out, Send):
                target = self.clients.get(out.conn)  # type: ignore[call-overload]
                if target is not None:
                    target.write(out.packet)
                    if isinstance(out.packet, Connack) and out.packet.reason == Reason.SUCCESS:
                        target.connected = True
            elif isinstance(out, Close):
                self._held.pop(out.conn, None)
                target = self.clients.pop(out.conn, None)  # type: ignore[call-overload]
                if target is not None:
                    target.close()
            elif isinstance(out, Owed):
                self._hold(out.ack, [])  # after the client's earlier held PUBACKs
            elif isinstance(out, RouteOut):
                waits = self.route_out(out)
                if out.ack is not None:
                    if out.persisted and self.durable is not None:
                        waits.append(self.durable())
                    self._hold(out.ack, waits)

    # -- held PUBACKs (BrokerConfig.hold_acks): sent once the message is safe, in order ------

    def _hold(self, ack: Send, waits: list[asyncio.Future[Any]]) -> None:
        target = self.clients.get(ack.conn)  # type: ignore[call-overload]
        if target is None:
            return  # gone: the client resends what it has no PUBACK for
        queue = self._held.get(ack.conn)
        if not waits and not queue:
            target.write(ack.packet)
            return
        self.stats["acks_held"] += 1
        held = _HeldAck(ack.packet, len(waits))
        if queue is None:
            queue = self._held[ack.conn] = collections.deque()
        queue.append(held)
        settled = functools.partial(self._settled, ack.conn, held)
        for future in waits:
            future.add_done_callback(settled)
        if not waits:
            self._release(ack.conn)
        elif len(queue) > MAX_HELD_ACKS and target.transport is not None and not target.paused:
            target.paused = True  # the client does not wait for its PUBACKs: stop reading it
            self.stats["reads_paused"] += 1
            target.transport.pause_reading()

    def _settled(self, conn: Any, held: _HeldAck, future: asyncio.Future[Any]) -> None:
        if future.cancelled():  # shutting down: the message may not be safe, so no PUBACK
            self._held.pop(conn, None)  # for it or after it; the client resends them
            return
        if future.exception() is not None or future.result() is False:
            held.unsafe = True
        held.waiting -= 1
        if held.waiting == 0:
            self._release(conn)

    def _release(self, conn: Any) -> None:
        """Send the PUBACKs at the head of a connection's queue that are no longer waiting."""
        queue = self._held.get(conn)
        target = self.clients.get(conn)
        if queue is None:
            return
        if target is None:
            del self._held[conn]  # closed: its PUBACKs are not owed any more
            return
        while queue and queue[0].waiting <= 0:
            held = queue.popleft()
            if held.unsafe:
                self.stats["acks_unsafe"] += 1
            target.write(held.packet)
        if not queue:
            del self._held[conn]
        if target.paused and len(queue) <= MAX_HELD_ACKS // 2 and target.transport is not None:
            target.paused = False
            target.transport.resume_reading()

    def _arm(self) -> None:
        deadline = self.broker.next_deadline()
        if deadline == self._deadline:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._deadline = deadline
        self._timer = None
        if deadline is not None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_at(deadline, self._fire)

    def _fire(self) -> None:
        self._timer = None
        self._deadline = None
        self.run(None, self.broker.handle_timeout)

    def close_all(self) -> None:
        self._held.clear()
        for client in self.gated or ():
            client.close()
        if self._timer is not None:
            self._timer.cancel()
        for client in list(self.clients.values()):
            client.close()
        self.clients.clear()

    def status(self) -> dict[str, Any]:
        stats = self.broker.stats
        return {
            "connections": self.broker.connection_count,
            "sessions": self.broker.session_count,
            **self.stats,
            **dataclasses.asdict(stats),
        }


class _CannotListen(Exception):
    """A listener could not be had; ``str()`` says why (the OS reason alone)."""


class Mqtt:
    """The MQTT listener of one agent and the broker behind it."""

    def __init__(self) -> None:
        self.endpoint: Endpoint | None = None
        self.mesh: MeshLink | None = None
        self.sessions: SessionStore | None = None
        self._servers: list[asyncio.Server] = []
        self.address: tuple[str, int] | None = None
        self.tls_address: tuple[str, int] | None = None
        self.attach: Attach | None = None
        self._serving: asyncio.Future[None] | None = None

    async def start(self, host: FeatureHost) -> None:
        assert host.config.mqtt is not None
        chan = host.feature("channel")  # on whenever this feature is, started before it
        if chan is not None and chan.channel is not None:
            from ..mqtt_mesh import MeshLink

            self.mesh = MeshLink(host, chan)
            config = BrokerConfig(
                share_here=self.mesh.share_here, retain_stamp=self.mesh.stamp, hold_acks=True
            )
        else:
            config = BrokerConfig(hold_acks=True)  # no channel: this node's clients only
        config = self._with_permissions(host, config)
        self.endpoint = Endpoint(Broker(config))
        self.endpoint.gated = []  # clients wait until the mesh is warm (_serve)
        from ..mqtt_sessions import SessionStore

        self.sessions = SessionStore(host.state_dir, self.endpoint.broker, host.saver.save)
        self.sessions.load()  # before the mesh publishes interest and clients connect
        self.sessions.start()
        self.endpoint.durable = self.sessions.durable_future
        if self.mesh is not None:
            self.mesh.durable = self.sessions.durable
            self.endpoint.route_out = self.mesh.route_out
            await self.mesh.start(self.endpoint.broker, self.endpoint.run)
        self.address = await self._listen(host)
        if host.config.mqtt_tls is not None:
            self.tls_address = await self._listen_tls(host.config.mqtt_tls)
        if host.config.mqtt_attach is not None:
            from ..mqtt_attach import Attach  # aiomqtt only when attach is configured

            self.attach = Attach(self.endpoint, host.config.mqtt_attach, host.config.name)
            self.attach.start()
        host.add_status(self.status_fields)
        host.register_command("mqtt", lambda request: self.status_fields())
        self._serving = asyncio.ensure_future(self._serve(host))

    async def _serve(self, host: FeatureHost) -> None:
        """Accept clients once the mesh is warm: an agent that just (re)started and routed a
        client's publish before it learned the others' interest would acknowledge it (held
        PUBACK with nothing to wait for) and lose it. The sockets are bound from the start
        (a port that cannot be had is a ConfigError); a connection accepted before then is not
        read until then (`Endpoint.open_gate`)."""
        if self.mesh is not None:
            await self.mesh.warm(bool(host.config.join))
        assert self.endpoint is not None
        self.endpoint.open_gate()

    def _with_permissions(self, host: FeatureHost, config: BrokerConfig) -> BrokerConfig:
        """With the policy feature on, its bundle's ``mqtt.permissions`` decide what this
        node's clients may publish and subscribe, and what a peer's messages may reach
        them (``MeshLink.may_publish``, by the peer's mTLS identity); its ``rate_limits``
        for this node bound its clients' publishes (one token each, shared with CoAP
        requests from this node); a new bundle applies to the next packet."""
        policy = host.feature("policy")
        if policy is None:
            return config
        from overlay.mqtt.permissions import TopicPermissions

        catalog = host.feature("services").catalog
        me = host.identity.name
        current = [TopicPermissions(())]
        policy.on_change(
            lambda bundle: current.__setitem__(
                0, TopicPermissions(bundle.permissions if bundle else ())
            )
        )

        def may_publish(node: str, topic: str) -> bool:
            perms = current[0]
            return not perms.entries or perms.may_publish(node, catalog.services_of(node), topic)

        def may_subscribe(topic_filter: str) -> bool:
            perms = current[0]
            return not perms.entries or perms.may_subscribe(
                me, catalog.services_of(me), topic_filter
            )

        if self.mesh is not None:
            self.mesh.may_publish = may_publish
        return dataclasses.replace(
            config,
            may_publish=lambda topic: may_publish(me, topic),
            may_subscribe=may_subscribe,
            publish_quota=lambda: policy.within_rate(me),
        )

    async def _listen(self, host: FeatureHost) -> tuple[str, int] | None:
        assert host.config.mqtt is not None
        where, port = host.config.mqtt
        try:
            address = await self._bind(where, port, None)
        except _CannotListen as exc:
            if host.config.mqtt_explicit:
                raise ConfigError(f"mqtt {where}:{port}: cannot listen: {exc}") from None
            log.warning(
                "mqtt: default port taken, no MQTT listener (set --mqtt HOST:PORT or off)",
                extra=fields(addr=f"{where}:{port}", error=str(exc)),
            )
            return None
        log.info("mqtt listening", extra=fields(addr=f"{where}:{address[1]}"))
        return address

    async def _listen_tls(self, tls: MqttTls) -> tuple[str, int]:
        """The TLS listener: same broker, TLS >= 1.2, client certificates if ``tls.ca``."""
        where, port = tls.listen
        try:
            address = await self._bind(where, port, tls_context(tls))
        except _CannotListen as exc:
            raise ConfigError(f"mqtt.tls_listen {where}:{port}: cannot listen: {exc}") from None
        log.info(
            "mqtt TLS listening",
            extra=fields(addr=f"{where}:{address[1]}", client_certs=tls.ca is not None),
        )
        return address

    async def _bind(self, where: str, port: int, context: ssl.SSLContext | None) -> tuple[str, int]:
        """One listener of the broker (plain, or TLS with ``context``); the address it got."""
        assert self.endpoint is not None
        loop = asyncio.get_running_loop()
        try:
            server = await loop.create_server(self.endpoint.protocol, where, port, ssl=context)
        except OSError as exc:  # asyncio's message repeats the address: say only why
            raise _CannotListen(os.strerror(exc.errno) if exc.errno else str(exc)) from None
        self._servers.append(server)
        return (where, int(server.sockets[0].getsockname()[1]))

    def status_fields(self) -> dict[str, Any]:
        where, tls = self.address, self.tls_address
        return {
            "mqtt": f"{where[0]}:{where[1]}" if where else None,
            "mqtt_tls": f"{tls[0]}:{tls[1]}" if tls else None,
            "mqtt_attach": self.attach.status() if self.attach else None,
            "mqtt_stats": {
                **(self.endpoint.status() if self.endpoint else {}),
                **(self.mesh.status() if self.mesh else {}),
                **(self.sessions.stats if self.sessions else {}),
            },
        }

    async def stop(self) -> None:
        if self._serving is not None:
            self._serving.cancel()
            with contextlib.suppress(BaseException):
                await self._serving
        if self.mesh is not None:
            await self.mesh.stop()
        if self.attach is not None:
            await self.attach.stop()
        for server in self._servers:
            server.close()
        self._servers.clear()
        if self.endpoint is not None:
            self.endpoint.close_all()
        if self.sessions is not None:
            await self.sessions.stop()


def tls_context(tls: MqttTls) -> ssl.SSLContext:
    """The server context for ``[mqtt] tls_*``; a file that does not load is a ConfigError."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(tls.cert, tls.key)
    except (ssl.SSLError, OSError, ValueError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(
            f"mqtt.tls_cert / mqtt.tls_key: cannot load {tls.cert} with {tls.key}: {why}"
        ) from None
    if tls.ca is not None:
        try:
            context.load_verify_locations(cafile=tls.ca)
        except (ssl.SSLError, OSError, ValueError) as exc:
            raise ConfigError(f"mqtt.tls_ca: cannot load {tls.ca}: {exc}") from None
        context.verify_mode = ssl.CERT_REQUIRED
    return context
