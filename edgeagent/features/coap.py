"""CoAP routing: local clients reach ``SERVICE.mesh`` on any node; the agent channel carries it.

How it works. On start the feature

1. takes the service directory (the catalog and its balancer) of the services feature
   (``host.feature("services")``, always on and started before this one);
2. loads the node's channel TLS material (:func:`edgeagent.mtls.load_channel_tls`) and
   listens for peers on the ``--bind`` host at the gossip port +
   :data:`~edgeagent.config.schema.CHANNEL_PORT_OFFSET` (2; +1 is the enrollment port);
   without a node certificate it logs one line and routes to local instances only;
3. serves CoAP on UDP ``config.coap`` (``--coap``, default ``0.0.0.0:5683``) with aiocoap,
   every path to :class:`edgeagent.coap_proxy.Router`. A port given with ``--coap`` that
   cannot be had is one ConfigError (exit 2); when the default port is taken (another CoAP
   server on the device) it logs one line and the agent runs without the listener.

A member's channel address is its gossip address's host and gossip port + 2; the node id the
peer's certificate must name comes from its member meta (:mod:`edgeagent.name_conflict`).

With ``EDGEAGENT_DEBUG_COMMANDS=1`` (tests, the coap bench) the control command
``debug-coap-publish`` replaces this node's registrations with ``[{name, uri}]`` in one call
(the services feature's ``service register`` / ``deregister`` one at a time).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import socket
from collections.abc import Mapping
from typing import Any

import aiocoap

from gossip import events as ev
from gossip.messages import MemberState
from overlay.catalog import (
    CatalogError,
    Instance,
    make_instance,
)

from ..channel import Channel, Peer
from ..coap_proxy import (
    IngressSite,
    Router,
    ServiceDirectory,
    Upstream,
    bound_deduplication,
    unnamed_render_tasks,
)
from ..config.schema import default_channel_port
from ..control import ControlError
from ..driver import View
from ..errors import ConfigError
from ..host import DEBUG_COMMANDS_ENV, FeatureHost
from ..logs import fields
from ..mtls import load_channel_tls
from ..name_conflict import claimant

log = FeatureHost.logger("coap")
_MEMBER_EVENTS = ev.MEMBER_STATE_EVENTS


class Peers:
    """Where each member's channel listens, and the node id its certificate must name."""

    def __init__(self) -> None:
        self._peers: dict[str, Peer] = {}

    def update(self, view: View) -> None:
        peers = {}
        for m in view.members:
            if m.state in (MemberState.ALIVE, MemberState.SUSPECT):
                port = default_channel_port(m.addr[1])
                if port:
                    node_id = claimant(m.meta, m.addr).node_id or None
                    peers[m.name] = Peer(m.name, node_id, m.addr[0], port)
        self._peers = peers

    def __call__(self, name: str) -> Peer | None:
        return self._peers.get(name)


def _port_taken(host: str, port: int) -> OSError | None:
    """Is UDP host:port held? (aiocoap binds with SO_REUSEPORT and would share it silently.)"""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind((host, port))
        except OSError as exc:
            return exc
    return None


class Coap:
    """The CoAP listener, the router and the agent channel of one agent."""

    def __init__(self) -> None:
        self.router: Router | None = None
        self._server: aiocoap.Context | None = None
        self._channel: Channel | None = None
        self._upstream = Upstream()
        self._tasks: set[asyncio.Future[None]] = set()
        self.coap_address: tuple[str, int] | None = None
        self.channel_address: tuple[str, int] | None = None

    async def start(self, host: FeatureHost) -> None:
        directory = self._directory(host)
        peers = Peers()
        peers.update(host.view)
        host.add_listener(lambda events, view: self._on_update(peers, events, view))
        await self._upstream.start()
        self.router = Router(directory, host.identity.name, peers, self._upstream)
        self._channel = await self._start_channel(host, self.router)
        self.router.channel = self._channel
        if host.config.coap is not None:
            await self._serve_coap(host, self.router)
        host.add_status(self.status_fields)
        host.register_command("coap", lambda request: self.cmd_coap(directory))

    def _directory(self, host: FeatureHost) -> ServiceDirectory:
        """The services feature (always on, started before us): its catalog and balancer."""
        services = host.feature("services")
        if services is None:
            raise RuntimeError("the coap feature needs the services feature")
        if os.environ.get(DEBUG_COMMANDS_ENV) == "1":
            host.register_command("debug-coap-publish", lambda r: self._register(services, r))
        return services  # type: ignore[no-any-return]

    @staticmethod
    async def _register(services: Any, request: Mapping[str, Any]) -> Any:
        """``debug-coap-publish``: these are this node's registrations (saved, then published)."""
        found = Coap._instances(request, services.catalog.local)
        await services.set_registered(found)
        return {"published": len(found)}

    @staticmethod
    def _on_update(peers: Peers, events: tuple[ev.Event, ...], view: View) -> None:
        if any(isinstance(e, (*_MEMBER_EVENTS, ev.MemberReaped)) for e in events):
            peers.update(view)

    @staticmethod
    def _instances(request: Mapping[str, Any], node: str) -> list[Instance]:
        items = request.get("instances")
        if not isinstance(items, list):
            raise ControlError("instances: expected a list of {name, uri}")
        try:
            return [
                make_instance(str(i.get("name", "")), str(i.get("uri", "")), node=node)
                for i in items
                if isinstance(i, dict)
            ]
        except CatalogError as exc:
            raise ControlError(str(exc)) from None

    async def _start_channel(self, host: FeatureHost, router: Router) -> Channel | None:
        port = default_channel_port(host.address[1])
        try:
            tls = load_channel_tls(host.state_dir, dt.datetime.now(dt.UTC))
        except ConfigError as exc:
            log.warning("coap: local instances only (no agent channel)", extra=fields(why=str(exc)))
            return None
        channel = Channel(tls, router.serve_channel)
        if not port:
            log.warning("coap: no channel port beside gossip port 0; outbound channel only")
            return channel
        try:
            self.channel_address = await channel.serve(host.config.bind[0], port)
        except OSError as exc:
            await channel.close()
            raise ConfigError(
                f"channel {host.config.bind[0]}:{port} (gossip port + 2): cannot listen: "
                f"{exc.strerror or exc}"
            ) from None
        log.info("agent channel listening", extra=fields(addr=f"{host.config.bind[0]}:{port}"))
        return channel

    async def _serve_coap(self, host: FeatureHost, router: Router) -> None:
        assert host.config.coap is not None
        where, port = host.config.coap
        taken = _port_taken(where, port) if port else None
        if taken is not None and host.config.coap_explicit:
            raise ConfigError(f"coap {where}:{port}: cannot listen: {taken.strerror or taken}")
        if taken is not None:
            log.warning(
                "coap: default port taken, no CoAP listener (set --coap HOST:PORT or off)",
                extra=fields(addr=f"{where}:{port}", error=taken.strerror or str(taken)),
            )
            return
        self._server = await aiocoap.Context.create_server_context(
            IngressSite(router), bind=(where, port), transports=["udp6"]
        )
        bound_deduplication(self._server)
        unnamed_render_tasks(self._server)
        self.coap_address = (where, port)
        log.info("coap listening", extra=fields(addr=f"{where}:{port}"))

    def cmd_coap(self, directory: ServiceDirectory) -> dict[str, Any]:
        """The ``coap`` control command: status, counters and the instances the router sees."""
        now = asyncio.get_running_loop().time()
        return {
            **self.status_fields(),
            "instances": directory.catalog.rows(directory.balancer.ejected(now)),
        }

    def status_fields(self) -> dict[str, Any]:
        where = self.coap_address
        chan = self.channel_address
        return {
            "coap": f"{where[0]}:{where[1]}" if where else None,
            "channel": f"{chan[0]}:{chan[1]}" if chan else None,
            "coap_stats": self.router.status() if self.router else {},
            "channel_stats": self._channel.status() if self._channel else {},
        }

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await self._server.shutdown()
            self._server = None
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
        await self._upstream.close()
