"""The agent channel as a feature: one mutual-TLS listener and pool shared by CoAP and MQTT.

How it works. The feature is on when a feature that needs it is (``--coap`` or ``--mqtt``
not off: ``agent._needs_channel``), and starts before them. On start it loads the node's channel TLS
material (:func:`edgeagent.mtls.load_channel_tls`) and listens on the ``--bind`` host at the
gossip port + :data:`~edgeagent.config.schema.CHANNEL_PORT_OFFSET` (2; +1 is the enrollment
port). Without a node certificate it logs one line and there is no channel (the features
then work on this node only).

Services. A channel request's first byte says which service it is for; a feature registers
its handler with :meth:`ChannelFeature.register` (CoAP: 1 for a try, 2 for an observation;
MQTT: :data:`overlay.mqtt.mesh.PUBLISH_PREFIX` and ``RETAINED_PREFIX``). A request with an
unknown first byte is answered with an empty reply and counted (``unknown_service``).

Peers. :class:`Peers` is where each member's channel listens (its gossip host, gossip port
+ 2) and the node id its certificate must name (from its member meta,
:mod:`edgeagent.name_conflict`), kept from the gossip view; :meth:`ChannelFeature.request`
resolves a member name through it.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from gossip import events as ev
from gossip.messages import Address, MemberState
from overlay.pki import CertIdentity

from ..channel import Channel, ChannelUnavailable, Peer
from ..config.schema import default_channel_port
from ..driver import View
from ..errors import ConfigError
from ..host import FeatureHost
from ..logs import fields
from ..mtls import load_channel_tls
from ..name_conflict import claimant

log = FeatureHost.logger("channel")
_MEMBER_EVENTS = ev.MEMBER_STATE_EVENTS
ServiceHandler = Callable[[CertIdentity, bytes], Awaitable[bytes | AsyncIterator[bytes]]]


class Peers:
    """Where each member's channel listens, and the node id its certificate must name."""

    def __init__(self) -> None:
        self._peers: dict[str, Peer] = {}
        self._parsed: dict[str, tuple[bytes, Address, Peer]] = {}  # name -> (meta, addr, peer)

    def update(self, view: View) -> None:
        # A member whose meta and address did not change keeps its Peer: parsing every
        # member's meta on every view was most of the main loop's work under a phantom
        # flood (thousands of members, a view per event batch), and it starved the gossip
        # thread of the GIL (issue 14).
        peers, parsed, old = {}, {}, self._parsed
        for m in view.members:
            if m.state in (MemberState.ALIVE, MemberState.SUSPECT):
                known = old.get(m.name)
                if known is not None and known[0] == m.meta and known[1] == m.addr:
                    peer = known[2]
                else:
                    port = default_channel_port(m.addr[1])
                    if not port:
                        continue
                    node_id = claimant(m.meta, m.addr).node_id or None
                    peer = Peer(m.name, node_id, m.addr[0], port)
                peers[m.name] = peer
                parsed[m.name] = (m.meta, m.addr, peer)
        self._peers, self._parsed = peers, parsed

    def __call__(self, name: str) -> Peer | None:
        return self._peers.get(name)

    def names(self) -> set[str]:
        return set(self._peers)


class ChannelFeature:
    """The channel of one agent: the listener, the pool, and the services on it."""

    def __init__(self) -> None:
        self.channel: Channel | None = None
        self.peers = Peers()
        self.address: tuple[str, int] | None = None
        self._services: dict[int, ServiceHandler] = {}
        self.unknown_service = 0

    def register(self, first_byte: int, handler: ServiceHandler) -> None:
        if first_byte in self._services:
            raise ValueError(f"channel service {first_byte} registered twice")
        self._services[first_byte] = handler

    async def start(self, host: FeatureHost) -> None:
        self.peers.update(host.view)
        host.add_listener(self._on_update)
        host.add_status(self.status_fields)
        port = default_channel_port(host.address[1])
        try:
            tls = load_channel_tls(host.state_dir, dt.datetime.now(dt.UTC))
        except ConfigError as exc:
            log.warning("no agent channel: CoAP and MQTT stay local to this node", extra=fields(why=str(exc)))
            return
        channel = Channel(tls, self._serve)
        self.channel = channel
        if not port:
            log.warning("no channel port beside gossip port 0; outbound channel only")
            return
        try:
            self.address = await channel.serve(host.config.bind[0], port)
        except OSError as exc:
            await channel.close()
            self.channel = None
            raise ConfigError(
                f"channel {host.config.bind[0]}:{port} (gossip port + 2): cannot listen: "
                f"{exc.strerror or exc}"
            ) from None
        log.info("agent channel listening", extra=fields(addr=f"{host.config.bind[0]}:{port}"))

    def _on_update(self, events: tuple[ev.Event, ...], view: View) -> None:
        if any(isinstance(e, (*_MEMBER_EVENTS, ev.MemberReaped)) for e in events):
            self.peers.update(view)

    async def _serve(self, identity: CertIdentity, data: bytes) -> bytes | AsyncIterator[bytes]:
        handler = self._services.get(data[0]) if data else None
        if handler is None:
            self.unknown_service += 1
            return b""
        return await handler(identity, data)

    async def request(self, name: str, data: bytes, timeout: float) -> bytes:
        """One request to member ``name``; raises ChannelUnavailable (retryable when unsent)."""
        peer = self.peers(name)
        if self.channel is None or peer is None:
            raise ChannelUnavailable(f"no channel to {name}", retryable=True)
        return await self.channel.request(peer, data, timeout)

    def status_fields(self) -> dict[str, Any]:
        where = self.address
        stats = self.channel.status() if self.channel else {}
        return {
            "channel": f"{where[0]}:{where[1]}" if where else None,
            "channel_stats": {**stats, "unknown_service": self.unknown_service},
        }

    async def stop(self) -> None:
        if self.channel is not None:
            await self.channel.close()
            self.channel = None
