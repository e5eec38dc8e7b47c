"""mDNS for the service catalog: import CoAP devices from the LAN, export mesh services to it.

Part of the services feature (:mod:`edgeagent.features.services`), imported only when mDNS
is on and ``[services] mdns_import`` or ``mdns_export`` is (so zeroconf is not loaded
otherwise). Its own :class:`zeroconf.asyncio.AsyncZeroconf` runs beside the agent-discovery
one of :mod:`edgeagent.features.mdns` (zeroconf's thread, results on the main loop). The
rules are sans-IO in :mod:`overlay.svc_mdns`.

Import. A browser on ``_coap._udp.local.``: each instance added or updated is resolved
(at most :data:`MAX_PENDING_LOOKUPS` at once and :data:`LOOKUPS_PER_S` on average, TXT at
most ``MAX_TXT_BYTES`` before it is decoded), judged by
:func:`overlay.svc_mdns.classify_device` (on-link address, a usable name, not some agent's
export) and kept in an :class:`overlay.svc_mdns.ImportTable`; the services feature
publishes the table's devices as instances this node owns. A removal (goodbye or expiry)
withdraws the device. Refusals are counted by reason (``edgeagent status``:
``services_mdns_refused``) and logged at most once per :data:`REFUSAL_LOG_INTERVAL_S`.

Export. After every catalog change the set of services to announce
(:func:`overlay.svc_mdns.export_names`) is recomputed, and one task registers and
unregisters ``SERVICE._coap._udp.local.`` records until the LAN matches it: SRV at this
agent's address and CoAP port (``config.coap``'s port when the CoAP router's setting is
there, else :data:`edgeagent.config.schema.DEFAULT_COAP_PORT`), TXT ``ea=1`` and
``path=/mesh/SERVICE``. The goodbyes go out at stop, bounded by :data:`GOODBYE_TIMEOUT`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections import Counter
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, cast

from zeroconf import IPVersion, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from overlay.mdns import Links, TokenBucket, instance_name, interface_addresses
from overlay.svc_mdns import (
    COAP_SERVICE_TYPE,
    MAX_TXT_BYTES,
    ImportTable,
    classify_device,
    export_names,
    export_txt,
)

from ..config.schema import DEFAULT_COAP_PORT
from ..host import FeatureHost
from ..logs import fields
from ..netaddr import is_wildcard

if TYPE_CHECKING:
    from .services import Services

log = FeatureHost.logger("services")

MAX_PENDING_LOOKUPS = 8
LOOKUPS_PER_S = 5.0
LOOKUP_BURST = 16
LOOKUP_TIMEOUT_MS = 3000
LINKS_REFRESH_S = 30.0
REFUSAL_LOG_INTERVAL_S = 60.0
GOODBYE_TIMEOUT = 2.0


def export_port(config: Any) -> int | None:
    """The CoAP port exported services point at; None when the agent serves no CoAP."""
    if not hasattr(config, "coap"):  # no CoAP router setting in this build
        return DEFAULT_COAP_PORT
    coap = config.coap
    return None if coap is None else int(coap[1])


class ServicesMdns:
    """The mDNS import and export of one agent's services feature."""

    def __init__(self, services: Services, *, do_import: bool, do_export: bool) -> None:
        self._services = services
        self._do_import = do_import
        self._do_export = do_export
        self._table = ImportTable()
        self._refused: Counter[str] = Counter()
        self._refused_since_log: Counter[str] = Counter()
        self._logged_at: float | None = None
        self._lookups: dict[str, asyncio.Task[None]] = {}
        self._bucket: TokenBucket | None = None
        self._aiozc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._exported: dict[str, AsyncServiceInfo] = {}
        self._export_wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._links: Links | None = None
        self._links_at = 0.0
        self._bind_host = ""
        self._node = ""
        self._addr_host = ""
        self._port: int | None = None

    async def start(self, host: FeatureHost) -> None:
        """Open zeroconf and start browsing / exporting (in the background)."""
        self._bind_host = host.config.bind[0]
        self._node = host.identity.name
        self._label = instance_name(host.identity.name, host.identity.node_id)
        self._addr_host = host.address[0]
        self._port = export_port(host.config)
        interfaces = None if is_wildcard(self._bind_host) else [self._bind_host]
        loop = asyncio.get_running_loop()
        self._bucket = TokenBucket(LOOKUPS_PER_S, LOOKUP_BURST, loop.time())
        try:
            if interfaces is None:
                self._aiozc = AsyncZeroconf(ip_version=IPVersion.V4Only)
            else:
                self._aiozc = AsyncZeroconf(interfaces=interfaces, ip_version=IPVersion.V4Only)
            if self._do_import:
                self._browser = AsyncServiceBrowser(
                    self._aiozc.zeroconf, COAP_SERVICE_TYPE, handlers=[self._on_change]
                )
        except Exception as exc:  # no multicast-capable interface, ...
            log.warning("services mdns unavailable", extra=fields(reason=repr(exc)))
            await self.stop()
            return
        if self._do_export and self._port is not None:
            self._tasks.append(loop.create_task(self._export_loop()))
            self.catalog_changed()

    async def stop(self) -> None:
        """Stop browsing, send the exports' goodbyes, close zeroconf (bounded)."""
        for task in [*self._tasks, *self._lookups.values()]:
            task.cancel()
        self._tasks.clear()
        aiozc, self._aiozc = self._aiozc, None
        if aiozc is None:
            return
        try:
            if self._browser is not None:
                await self._browser.async_cancel()
                self._browser = None
            for info in list(self._exported.values()):
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(
                        _awaited(aiozc.async_unregister_service(info)), GOODBYE_TIMEOUT
                    )
            self._exported.clear()
        finally:
            await aiozc.async_close()

    def status_fields(self) -> dict[str, Any]:
        return {
            "services_mdns_imported": len(self._table),
            "services_mdns_exported": sorted(self._exported),
            "services_mdns_refused": dict(self._refused),
        }

    # -- import ------------------------------------------------------------------------------

    def links(self, now: float) -> Links:
        if self._links is None or now - self._links_at >= LINKS_REFRESH_S:
            try:
                interfaces = interface_addresses()
            except OSError:
                interfaces = []
            self._links = Links.of(interfaces, self._bind_host)
            self._links_at = now
        return self._links

    def refuse(self, reason: str) -> None:
        """Count one refused announcement; log at most once per interval."""
        now = asyncio.get_running_loop().time()
        self._refused[reason] += 1
        self._refused_since_log[reason] += 1
        if self._logged_at is not None and now - self._logged_at < REFUSAL_LOG_INTERVAL_S:
            return
        counts = ", ".join(f"{k}={v}" for k, v in sorted(self._refused_since_log.items()))
        log.info("mdns coap announcements refused", extra=fields(counts=counts))
        self._refused_since_log.clear()
        self._logged_at = now

    def _on_change(
        self, zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        if state_change is ServiceStateChange.Removed:
            task = self._lookups.pop(name, None)
            if task is not None:
                task.cancel()
            if self._table.remove(name):
                log.info("mdns coap device withdrawn", extra=fields(mdns_name=name))
                self._services.set_imported(self._table.instances())
            return
        if name in self._lookups:
            return
        loop = asyncio.get_running_loop()
        assert self._bucket is not None
        if len(self._lookups) >= MAX_PENDING_LOOKUPS or not self._bucket.take(loop.time()):
            self.refuse("rate_limited")
            return
        task = loop.create_task(self._resolve(name))
        self._lookups[name] = task
        task.add_done_callback(functools.partial(self._lookup_done, name))

    def _lookup_done(self, name: str, task: asyncio.Task[None]) -> None:
        if self._lookups.get(name) is task:
            del self._lookups[name]

    async def _resolve(self, name: str) -> None:
        aiozc = self._aiozc
        if aiozc is None:
            return
        info = AsyncServiceInfo(COAP_SERVICE_TYPE, name)
        if not await info.async_request(aiozc.zeroconf, LOOKUP_TIMEOUT_MS):
            return
        if len(info.text or b"") > MAX_TXT_BYTES:
            self.refuse("txt_too_big")
            return
        now = asyncio.get_running_loop().time()
        found = classify_device(
            name, cast(Mapping[object, object], info.properties or {}), info.parsed_addresses(),
            info.port,
            links=self.links(now), node=self._node,
        )  # fmt: skip
        if isinstance(found, str):
            self.refuse(found)
            return
        verdict = self._table.offer(name, found)
        if verdict == "full":
            self.refuse("full")
        elif verdict in ("added", "updated"):
            log.info(
                "mdns coap device imported",
                extra=fields(mdns_name=name, service=found.name, endpoint=found.endpoint),
            )
            self._services.set_imported(self._table.instances())

    # -- export ------------------------------------------------------------------------------

    def catalog_changed(self) -> None:
        """Something in the catalog changed: the export task re-checks what to announce."""
        self._export_wake.set()

    def wanted_exports(self) -> list[str]:
        services = self._services
        ejected = services.balancer.ejected(services.now())
        return export_names(services.catalog, self._table.instances(), ejected)

    async def _export_loop(self) -> None:
        while True:
            await self._export_wake.wait()
            self._export_wake.clear()
            try:
                await self._sync_exports(set(self.wanted_exports()))
            except Exception as exc:  # a LAN that refuses now may accept later
                log.warning("mdns coap export failed", extra=fields(reason=repr(exc)))
            await asyncio.sleep(0.5)  # coalesce bursts of catalog changes

    async def _sync_exports(self, wanted: set[str]) -> None:
        aiozc = self._aiozc
        if aiozc is None or self._port is None:
            return
        for service in sorted(set(self._exported) - wanted):
            info = self._exported.pop(service)
            await _awaited(aiozc.async_unregister_service(info))
            log.info("mdns coap export withdrawn", extra=fields(service=service))
        for service in sorted(wanted - set(self._exported)):
            info = AsyncServiceInfo(
                COAP_SERVICE_TYPE,
                f"{service}.{COAP_SERVICE_TYPE}",
                port=self._port,
                properties=export_txt(service),
                server=f"{self._label}-coap.local.",
                parsed_addresses=[self._addr_host],
            )
            self._exported[service] = info  # before the await: announced from its first packet
            try:
                await _awaited(aiozc.async_register_service(info, allow_name_change=True))
            except BaseException:
                self._exported.pop(service, None)
                raise
            log.info("mdns coap export", extra=fields(service=service, port=self._port))


async def _awaited(step: Any) -> None:
    """zeroconf's register/unregister return an awaitable that must itself be awaited."""
    await (await step)
