"""CoAP routing: local clients reach ``SERVICE.mesh`` on any node; the agent channel carries it.

How it works. On start the feature

1. takes the service directory (the catalog and its balancer) of the services feature
   (``host.feature("services")``, always on and started before this one);
2. registers the router with the channel feature (:mod:`edgeagent.features.channel`, on
   whenever this one is, started before it) for channel requests whose first byte is
   :data:`overlay.coap_route.ENVELOPE_VERSION`, and routes with its peers; without a node
   certificate there is no channel and it routes to local instances only;
3. serves CoAP on UDP ``config.coap`` (``--coap``, default ``0.0.0.0:5683``) with aiocoap,
   every path to :class:`edgeagent.coap_proxy.Router`; the common request (no blocks, no
   Observe) is answered by the fast path of :mod:`edgeagent.coap_fastpath` on aiocoap's own
   socket, the rest by aiocoap. A port given with ``--coap`` that
   cannot be had is one ConfigError (exit 2); when the default port is taken (another CoAP
   server on the device) it logs one line and the agent runs without the listener;
4. carries CoAP Observe (RFC 7641) through the mesh: :mod:`edgeagent.coap_observe` takes
   the listener's registrations and the channel's observe envelopes (first byte 2).

With ``EDGEAGENT_DEBUG_COMMANDS=1`` (tests, the coap bench) the control command
``debug-coap-publish`` replaces this node's registrations with ``[{name, uri}]`` in one call
(the services feature's ``service register`` / ``deregister`` one at a time).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import aiocoap

from overlay import coap_route as cr
from overlay.balancer import Balancer
from overlay.catalog import (
    CatalogError,
    Instance,
    make_instance,
)
from overlay.coap_observe import OBSERVE_ENVELOPE
from overlay.policy_enforce import service_policies

from ..channel import Channel
from ..coap_fastpath import FastPath, install
from ..coap_observe import Observations, ObservingSite
from ..coap_proxy import (
    Router,
    ServiceDirectory,
    Upstream,
    bound_deduplication,
    cached_address_checks,
    unnamed_render_tasks,
)
from ..control import ControlError
from ..errors import ConfigError
from ..host import DEBUG_COMMANDS_ENV, FeatureHost
from ..logs import fields

if TYPE_CHECKING:  # not at run time: imported only when the policy feature is on
    from overlay.policy import Bundle

log = FeatureHost.logger("coap")


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
        self.observations: Observations | None = None
        self._server: aiocoap.Context | None = None
        self._fast: FastPath | None = None
        self._channel: Channel | None = None
        self._upstream = Upstream()
        self._tasks: set[asyncio.Future[None]] = set()
        self.coap_address: tuple[str, int] | None = None

    async def start(self, host: FeatureHost) -> None:
        directory = self._directory(host)
        chan = host.feature("channel")  # on whenever this feature is, and started before it
        cached_address_checks()
        await self._upstream.start()
        self.router = Router(directory, host.identity.name, chan.peers, self._upstream)
        policy = host.feature("policy")  # on with [policy] trusted_keys, started before us
        if policy is not None:
            self.router.authorize = policy.allows_peer
            self.router.rate_check = policy.within_rate
            policy.on_change(self._enforcer(directory.balancer))
        self.observations = Observations(self.router)
        await self.observations.start()
        chan.register(cr.ENVELOPE_VERSION, self.router.serve_channel)
        chan.register(OBSERVE_ENVELOPE, self.observations.serve)
        self._channel = chan.channel
        self.router.channel = self._channel
        if host.config.coap is not None:
            await self._serve_coap(host, self.router, self.observations)
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
    def _enforcer(balancer: Balancer) -> Callable[[Bundle | None], None]:
        """A policy listener: the bundle's splits, retries, timeouts and faults become the
        balancer's per-service policies, at once; services it no longer names go back to the
        default. A try in flight keeps the timeout it started with."""
        applied: set[str] = set()

        def enforce(bundle: Bundle | None) -> None:
            policies = service_policies(bundle, balancer.default)
            for name in applied - policies.keys():
                balancer.set_policy(name, None)
            for name, policy in policies.items():
                balancer.set_policy(name, policy)
            applied.clear()
            applied.update(policies)
            if bundle is not None:
                log.info(
                    "policy enforced", extra=fields(version=bundle.version, services=len(policies))
                )

        return enforce

    @staticmethod
    async def _register(services: Any, request: Mapping[str, Any]) -> Any:
        """``debug-coap-publish``: these are this node's registrations (saved, then published)."""
        found = Coap._instances(request, services.catalog.local)
        await services.set_registered(found)
        return {"published": len(found)}

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

    async def _serve_coap(
        self, host: FeatureHost, router: Router, observations: Observations
    ) -> None:
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
            ObservingSite(router, observations), bind=(where, port), transports=["udp6"]
        )
        bound_deduplication(self._server)
        unnamed_render_tasks(self._server)
        self._fast = install(self._server, router)
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
        return {
            "coap": f"{where[0]}:{where[1]}" if where else None,
            "coap_stats": self.router.status() if self.router else {},
            "coap_fast_stats": dict(self._fast.stats) if self._fast else {},
            "observe_stats": self.observations.status() if self.observations else {},
        }

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._fast is not None:
            self._fast.close()
            self._fast = None
        if self._server is not None:
            with contextlib.suppress(Exception):
                await self._server.shutdown()
            self._server = None
        self._channel = None  # the channel feature closes it
        await self._upstream.close()
        if self.observations is not None:
            await self.observations.close()
