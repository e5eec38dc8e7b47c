"""The service catalog of one agent: what it publishes, what it knows, what it answers.

How it works. This node's instances come from three sources: the config file's
``[[service]]`` tables (``config.services``), registrations made through the control API
(``edgeagent service register|deregister``), and CoAP devices on the LAN imported by mDNS
(:mod:`edgeagent.features.services_mdns`, only when mDNS and ``[services] mdns_import`` are
on). All of them are published as one value under the replicated-state key ``svc``
(:func:`overlay.catalog.encode_instances`, via ``host.set_state``). Registrations are saved
to ``<state_dir>/services.json`` (atomic write) *before* they are published and before the
command answers, so they survive a restart and ``kill -9``; the config's instances are
re-read from the file at each start and are not saved there.

The :class:`overlay.catalog.Catalog` is fed from gossip events (``host.add_listener``:
member state changes, ``svc`` state changes, reaped members) after a catch-up from
``host.member_states``; this node's own value is fed directly when published (the core
raises no event for local changes).

What other features use (the CoAP router): ``host.feature("services")`` is this object;
:attr:`Services.catalog` (the healthy view), :attr:`Services.balancer` (one shared
:class:`overlay.balancer.Balancer` for the whole agent, so ejections and estimates are the
same for every request path), :meth:`Services.healthy` (the instances of a service a request
may go to now) and :meth:`Services.now` (the loop clock the balancer runs on). Mesh DNS
answers ``SERVICE.mesh`` with :meth:`Services.resolve_service`: the overlay addresses (from
the node resolvers, i.e. the addresses feature) of the nodes that own a healthy instance.

Control commands: ``services`` (the rows of ``edgeagent services``) and ``service`` with
``op`` = ``register`` (``name``, ``uri``, optional ``weight``, ``tags``) or ``deregister``
(``name``, ``uri``). Refusals are one line (the CLI exits 2).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterable, Mapping
from typing import Any

from gossip import events as ev
from gossip.messages import StateValue
from overlay.balancer import Balancer
from overlay.catalog import (
    STATE_KEY,
    Catalog,
    CatalogError,
    Instance,
    encode_instances,
    make_instance,
)

from ..control import ControlError
from ..driver import View
from ..errors import ConfigError
from ..host import FeatureHost
from ..logs import fields
from ..persist import load_json

log = FeatureHost.logger("services")

STATE_FILE = "services.json"
SAVE_TIMEOUT_S = 5.0  # a registration answers once on disk; a failing disk refuses it
FILE_VERSION = 1
_MEMBER_EVENTS = ev.MEMBER_STATE_EVENTS


def _entry(inst: Instance) -> dict[str, Any]:
    """A registration as saved in services.json."""
    return {"name": inst.name, "uri": inst.endpoint, "weight": inst.weight, "tags": dict(inst.tags)}


def load_registrations(path: Any) -> list[Instance]:
    """The saved registrations; a file that is not ours is one ConfigError naming it."""
    doc = load_json(path, {"v": FILE_VERSION, "registered": []})
    items = doc.get("registered") if isinstance(doc, dict) else None
    if not isinstance(doc, dict) or doc.get("v") != FILE_VERSION or not isinstance(items, list):
        raise ConfigError(f"{path}: corrupt: not a version-{FILE_VERSION} service list")
    found: list[Instance] = []
    for item in items:
        try:
            if not isinstance(item, dict):
                raise CatalogError("not an object")
            found.append(
                make_instance(
                    item.get("name", ""),
                    item.get("uri", ""),
                    weight=item.get("weight", 1),
                    tags=item.get("tags", {}),
                )
            )
        except (CatalogError, TypeError, AttributeError) as exc:
            raise ConfigError(f"{path}: corrupt entry: {exc}; restore or remove it") from None
    return found


class Services:
    """This agent's service catalog feature (see the module docstring)."""

    def __init__(self) -> None:
        self._host: FeatureHost | None = None
        self._catalog: Catalog | None = None
        self._balancer: Balancer | None = None
        self._registered: list[Instance] = []
        self._imported: list[Instance] = []
        # What our replicated state says; no key at all means no instances (the gossip core
        # tombstones a key left over from an earlier life), so an agent without services
        # publishes nothing at start: one signed update fewer for every member to spread
        # after a site-wide power cut (issue 13).
        self._published: StateValue | None = encode_instances([])
        self._lock = asyncio.Lock()
        self._mdns: Any = None  # services_mdns.ServicesMdns when mDNS import/export is on
        self.stats: dict[str, int] = {"publish_failed": 0, "imports_over_budget": 0}
        self._tasks: set[asyncio.Task[None]] = set()  # republish tasks (kept referenced)

    # -- what other features use -------------------------------------------------------------

    @property
    def catalog(self) -> Catalog:
        """The mesh's instances and their health (once started)."""
        if self._catalog is None:
            raise RuntimeError("services feature not started")
        return self._catalog

    @property
    def balancer(self) -> Balancer:
        """The agent's one balancer over :attr:`catalog` (once started)."""
        if self._balancer is None:
            raise RuntimeError("services feature not started")
        return self._balancer

    @property
    def host(self) -> FeatureHost:
        if self._host is None:
            raise RuntimeError("services feature not started")
        return self._host

    @staticmethod
    def now() -> float:
        """The clock the balancer runs on: the main loop's."""
        return asyncio.get_running_loop().time()

    def healthy(self, service: str) -> list[Instance]:
        """The instances of ``service`` a request may go to now (live nodes, not ejected)."""
        return self.balancer.usable(service.lower(), self.now())

    def local_instances(self) -> list[Instance]:
        """What this node publishes: config, then registrations, then mDNS imports."""
        return [*self._configured(), *self._registered, *self._imported]

    def resolve_service(self, label: str) -> list[str]:
        """Mesh DNS: overlay addresses of the agents owning healthy instances of ``label``."""
        ejected = self.balancer.ejected(self.now())
        answers: list[str] = []
        for node in self.catalog.dns_nodes(label, ejected):
            answers.extend(a for a in self.host.resolve_node(node) if a not in answers)
        return answers

    def rows(self) -> list[dict[str, object]]:
        """``edgeagent services --json``."""
        return self.catalog.rows(self.balancer.ejected(self.now()))

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self, host: FeatureHost) -> None:
        """Load the registrations, publish, hook into events and the control API."""
        self._host = host
        self.path = host.state_dir / STATE_FILE
        self._catalog = Catalog(host.identity.name)
        self._balancer = Balancer(self._catalog, random.Random(), site=host.config.services_site)
        self._registered = self._without_configured(load_registrations(self.path))
        host.add_listener(self._on_update)
        host.register_command("services", lambda request: self.rows())
        host.register_command("service", self.cmd_service)
        host.add_status(self.status_fields)
        host.add_service_resolver(self.resolve_service)
        await self._catch_up()
        config = host.config
        try:
            await self._publish()
        except Exception as exc:  # the config's own [[service]] list does not fit the core
            source = config.config_file or "the config"
            raise ConfigError(f"{source}: service: cannot be published: {exc}") from None
        do_import = config.mdns and config.services_mdns_import
        do_export = config.mdns and config.services_mdns_export
        if do_import or do_export:
            from .services_mdns import ServicesMdns  # imports zeroconf: only when on

            self._mdns = ServicesMdns(self, do_import=do_import, do_export=do_export)
            await self._mdns.start(host)

    async def stop(self) -> None:
        """Stop mDNS import and export (the published value stays with the leave)."""
        for task in list(self._tasks):
            task.cancel()
        mdns, self._mdns = self._mdns, None
        if mdns is not None:
            await mdns.stop()

    def status_fields(self) -> dict[str, Any]:
        fields_: dict[str, Any] = {
            "services_published": len(self.local_instances()),
            "services_known": len(self.catalog.services()),
            "services_bad_values": self.catalog.stats["bad_values"],
        }
        if self._mdns is not None:
            fields_.update(self._mdns.status_fields())
        return fields_

    # -- publishing --------------------------------------------------------------------------

    def _configured(self) -> tuple[Instance, ...]:
        return self.host.config.services

    def _owned(self, instances: Iterable[Instance]) -> list[Instance]:
        """As published: owned by this node; the node's site as the site tag of those without."""
        node, site = self.host.identity.name, self.host.config.services_site
        published = []
        for i in instances:
            tags = i.tags if not site or i.site else tuple(sorted((*i.tags, ("site", site))))
            published.append(
                Instance(i.name, i.protocol, i.host, i.port, i.path, i.weight, tags, node)
            )
        return published

    def _without_configured(self, registered: list[Instance]) -> list[Instance]:
        """Saved registrations minus those the config file now defines (the file wins)."""
        kept = [r for r in registered if not any(_same_place(r, c) for c in self._configured())]
        for dropped in [r for r in registered if r not in kept]:
            log.warning(
                "registration replaced by the config file's [[service]]",
                extra=fields(name=dropped.name, endpoint=dropped.endpoint),
            )
        return kept

    async def _publish(self) -> None:
        """Publish this node's instances (only when they changed); feed our own catalog."""
        value = self._encode_with_imports()
        if value == self._published:
            return
        await asyncio.wrap_future(self.host.set_state(STATE_KEY, value))
        self._published = value
        self.catalog.on_state(self.host.identity.name, value)

    def _encode_with_imports(self) -> StateValue:
        """The value, dropping the last mDNS imports if they would not fit the budget."""
        own = [*self._configured(), *self._registered]
        imported = list(self._imported)
        while True:
            try:
                return encode_instances(self._owned(own + imported))
            except CatalogError:
                if not imported:
                    raise
                imported.pop()
                self.stats["imports_over_budget"] += 1

    def set_imported(self, instances: Iterable[Instance]) -> None:
        """The mDNS import's current devices (called by services_mdns); republish."""
        own = [*self._configured(), *self._registered]
        self._imported = [i for i in instances if not any(_same_place(i, o) for o in own)]
        task = asyncio.get_running_loop().create_task(self._republish())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _republish(self) -> None:
        async with self._lock:
            try:
                await self._publish()
            except Exception as exc:  # over the gossip budget: keep what was published
                self.stats["publish_failed"] += 1
                log.warning("service list not published", extra=fields(error=str(exc)))

    # -- control commands --------------------------------------------------------------------

    async def cmd_service(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """``op``: register NAME URI [weight, tags] | deregister NAME URI."""
        op = request.get("op")
        if op not in ("register", "deregister"):
            raise ControlError("op: expected register or deregister")
        name, uri = request.get("name"), request.get("uri")
        if not isinstance(name, str) or not isinstance(uri, str):
            raise ControlError("name and uri: expected strings")
        async with self._lock:
            if op == "register":
                return await self._register(name, uri, request)
            return await self._deregister(name, uri)

    async def _register(self, name: str, uri: str, request: Mapping[str, Any]) -> dict[str, Any]:
        tags = request.get("tags", {})
        try:
            if not isinstance(tags, dict):
                raise CatalogError("tags: expected an object of KEY: VALUE")
            inst = make_instance(name, uri, weight=request.get("weight", 1), tags=tags)
        except CatalogError as exc:
            raise ControlError(str(exc)) from None
        same = [i for i in self._configured() if _same_place(i, inst)]
        if same:
            raise ControlError(
                f"{inst.name} at {inst.endpoint} is defined in the config file; change it there"
            )
        kept = [i for i in self._registered if not _same_place(i, inst)]
        replaced = len(kept) != len(self._registered)
        await self._change([*kept, inst])
        log.info("service registered", extra=fields(name=inst.name, endpoint=inst.endpoint))
        return {**_entry(inst), "replaced": replaced}

    async def _deregister(self, name: str, uri: str) -> dict[str, Any]:
        try:
            probe = make_instance(name, uri)
        except CatalogError as exc:
            raise ControlError(str(exc)) from None
        kept = [i for i in self._registered if not _same_place(i, probe)]
        if len(kept) == len(self._registered):
            where = (
                "defined in the config file"
                if any(_same_place(i, probe) for i in self._configured())
                else "not registered"
            )
            raise ControlError(f"{probe.name} at {probe.endpoint} is {where}")
        await self._change(kept)
        log.info("service deregistered", extra=fields(name=probe.name, endpoint=probe.endpoint))
        return {"name": probe.name, "uri": probe.endpoint, "deregistered": True}

    async def set_registered(self, registered: list[Instance]) -> None:
        """Replace what was registered at run time (saved, then published; tools and tests)."""
        await self._change(list(registered))

    async def _change(self, registered: list[Instance]) -> None:
        """Save ``registered``, then publish; refused (nothing changed) if over the budget."""
        old = self._registered
        try:
            encode_instances(self._owned([*self._configured(), *registered]))
        except CatalogError as exc:
            raise ControlError(str(exc)) from None
        await self._save(registered, old)
        self._registered = registered
        try:
            await self._publish()
        except Exception as exc:  # the core refused it (over max_state_bytes / a datagram)
            await self._save(old, old)
            self._registered = old
            raise ControlError(f"the service list cannot be published: {exc}") from None

    async def _save(self, registered: list[Instance], old: list[Instance]) -> None:
        """Write the registrations through the state writer (off the main loop) and wait.

        If the disk does not take them within SAVE_TIMEOUT_S, ``old`` is queued instead (the
        writer keeps only the latest value per file), so memory and disk keep agreeing.
        """
        done = asyncio.wrap_future(self.host.saver.save_json(self.path, _doc(registered)))
        try:
            await asyncio.wait_for(asyncio.shield(done), SAVE_TIMEOUT_S)
        except TimeoutError:
            self.host.saver.save_json(self.path, _doc(old))
            raise ControlError(
                f"{self.path}: not saved yet (the disk is failing; it is retried): "
                "the change is not published"
            ) from None

    # -- gossip events -----------------------------------------------------------------------

    async def _catch_up(self) -> None:
        """Feed the members and service lists the core already knows."""
        catalog = self.catalog
        for member, value in await self.host.member_states(STATE_KEY):
            catalog.on_member(member.name, member.state)
            if member.name != catalog.local and value is not None:
                catalog.on_state(member.name, value)

    def _on_update(self, events: tuple[ev.Event, ...], view: View) -> None:
        catalog = self.catalog
        for event in events:
            if isinstance(event, ev.StateChanged):
                if event.key == STATE_KEY and event.owner != catalog.local:
                    catalog.on_state(event.owner, None if event.deleted else event.value)
            elif isinstance(event, _MEMBER_EVENTS):
                catalog.on_member(event.member.name, event.member.state)
            elif isinstance(event, ev.MemberReaped):
                catalog.on_reaped(event.member.name)
        if self._mdns is not None:
            self._mdns.catalog_changed()


def _same_place(a: Instance, b: Instance) -> bool:
    """One instance per (name, endpoint): the catalog's identity of an instance on a node."""
    return a.name == b.name and a.endpoint == b.endpoint


def _doc(registered: list[Instance]) -> dict[str, object]:
    return {"v": FILE_VERSION, "registered": [_entry(i) for i in registered]}
