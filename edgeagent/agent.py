"""The daemon: the lifecycle of one agent and the list of its features.

Lifecycle of :meth:`Agent.run` (the body of ``edgeagent run``):

1. Claim the control socket (a second agent on the same state dir is refused before it can
   touch anything), load the identity and bump its incarnation, saved *before* joining, so a
   restart after ``kill -9`` always announces an incarnation the cluster has not seen. Load
   the keyring (a new key is generated on first start).
2. Start the gossip driver (its own thread and loop, :mod:`edgeagent.driver`), then every
   enabled feature of :data:`FEATURES` on one :class:`~edgeagent.host.FeatureHost`, in order
   (a feature whose switch is off is not even imported); then join the seeds.
3. Serve until SIGTERM / SIGINT or ``edgeagent leave``; then run the features' before-leave
   hooks (the mDNS goodbye) and leave gracefully: the core broadcasts the leave and we wait
   until it has been sent (no pending broadcasts) or :data:`LEAVE_SPREAD_TIMEOUT` passes, so
   peers record LEFT, not DEAD. Stop the features in reverse order. Exit 0.

Everything on this (the application's) loop sees the core only through immutable
:class:`~edgeagent.driver.View` snapshots and events, and changes it only through driver
commands: see DESIGN principle 2. The agent's own control commands are ``members``,
``status`` and ``leave`` (and ``debug-*`` for tests); features add theirs.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
import os
import random
import signal
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gossip import events as ev
from gossip.keyring import Keyring
from gossip.messages import Address

from .config import AgentConfig
from .control import ControlError, ControlServer, socket_path
from .control_json import count_states, member_json
from .driver import GossipDriver, View
from .errors import ConfigError
from .host import Feature, FeatureHost
from .logs import fields
from .netaddr import format_addr, is_wildcard, routable_host
from .persist import (
    NodeIdentity,
    ensure_state_dir,
    load_or_create_identity,
    load_or_create_keyring,
    save_identity,
)
from .stream_limits import frame_limit
from .streams import StreamAuth

if TYPE_CHECKING:
    from gossip.core import Membership

    from .metrics import Registry

log = logging.getLogger("edgeagent")

LEAVE_SPREAD_TIMEOUT = 2.0  # seconds to let a graceful leave spread before exiting
LEAVE_POLL_INTERVAL = 0.05
DEBUG_COMMANDS_ENV = "EDGEAGENT_DEBUG_COMMANDS"  # "1" enables debug-* commands (tests only)
MAX_DEBUG_BLOCK_S = 60.0


@dataclass(frozen=True, slots=True)
class FeatureSpec:
    """One entry of the feature list: where the feature lives and when it is on."""

    name: str
    module: str  # imported only when ``enabled(config)``
    cls: str  # the feature class in ``module``: built with no arguments
    enabled: Callable[[AgentConfig], bool]


def _always(config: AgentConfig) -> bool:
    return True


# Start order; they stop in reverse. Addresses before DNS only for the log order: DNS consults
# the resolvers at query time.
FEATURES: tuple[FeatureSpec, ...] = (
    FeatureSpec("keys", "edgeagent.features.keys", "Keys", _always),
    FeatureSpec("addresses", "edgeagent.features.addresses", "Addresses", _always),
    FeatureSpec("dns", "edgeagent.features.dns", "Dns", lambda c: c.dns is not None),
    FeatureSpec("metrics", "edgeagent.features.metrics", "Metrics", lambda c: c.metrics is not None),
    FeatureSpec("mdns", "edgeagent.features.mdns", "Mdns", lambda c: c.mdns),
)  # fmt: skip


def build_features(config: AgentConfig) -> dict[str, Feature]:
    """The enabled features of :data:`FEATURES`, by name, in start order (importing only them)."""
    features: dict[str, Feature] = {}
    for spec in FEATURES:
        if spec.enabled(config):
            features[spec.name] = getattr(importlib.import_module(spec.module), spec.cls)()
    return features


class Agent:
    """One running agent. Build with the resolved config, then ``await agent.run()``.

    ``extra_features`` (name -> feature) start after the built-in ones: for embedding and tests.
    """

    def __init__(
        self,
        config: AgentConfig,
        *,
        debug_commands: bool | None = None,
        extra_features: Mapping[str, Feature] | None = None,
    ) -> None:
        self.config = config
        if debug_commands is None:
            debug_commands = os.environ.get(DEBUG_COMMANDS_ENV) == "1"
        self._debug_commands = debug_commands
        self._stop = asyncio.Event()
        self._left = asyncio.Event()
        self._identity: NodeIdentity | None = None
        self._saved_incarnation = 0
        self._driver: GossipDriver[Membership] | None = None
        self._host: FeatureHost | None = None
        self._started_at = time.monotonic()
        self._control = ControlServer(socket_path(config.state_dir))
        self._features = {**build_features(config), **(extra_features or {})}
        self._running: list[Feature] = []  # started and not yet stopped, in start order
        self._started = False

    # -- lifecycle ---------------------------------------------------------------------------

    async def run(self) -> int:
        """Serve until stopped; return the exit code (0 after a graceful leave)."""
        loop = asyncio.get_running_loop()
        config = self.config
        ensure_state_dir(config.state_dir)
        self._register_commands()
        await self._control.start()
        try:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.request_stop)
            identity = load_or_create_identity(config.state_dir, config.name).bumped()
            save_identity(config.state_dir, identity)
            self._identity, self._saved_incarnation = identity, identity.incarnation
            keyring = Keyring(load_or_create_keyring(config.keyring_path))
            self._driver = self._make_driver(loop, identity, keyring)
            self._host = FeatureHost(
                config, identity, self._driver, self._control, keyring, _registry(config)
            )
            self._host.deliver((), await self._start_driver())  # no listener yet: sets the view
            for feature in self._features.values():
                self._running.append(feature)
                await feature.start(self._host)
            if config.join:
                await self._host.call(lambda core, now: core.join(list(config.join), now))
            self._started = True
            self._log_started(identity)
            await self._stop.wait()
            await self._shutdown()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            await self._stop_features()
            if self._driver is not None:
                self._driver.stop()
            await self._control.close()
        return 0

    def request_stop(self) -> None:
        """Begin a graceful leave and exit (signal handlers, ``edgeagent leave``)."""
        self._stop.set()

    @property
    def started(self) -> bool:
        """True once every feature started and the seeds were contacted."""
        return self._started

    def feature(self, name: str) -> Feature:
        """The feature called ``name`` (KeyError if it is off)."""
        return self._features[name]

    @property
    def host(self) -> FeatureHost:
        """The feature host (once the driver runs)."""
        if self._host is None:
            raise RuntimeError("agent not started")
        return self._host

    @property
    def driver(self) -> GossipDriver[Membership]:
        """The gossip driver (once started)."""
        if self._driver is None:
            raise RuntimeError("agent not started")
        return self._driver

    def _make_driver(
        self, loop: asyncio.AbstractEventLoop, identity: NodeIdentity, keyring: Keyring
    ) -> GossipDriver[Membership]:
        config = self.config
        advertise = config.advertise
        if advertise is None and is_wildcard(config.bind[0]):
            advertise = (routable_host(), 0)  # port 0: the bound port
        meta = json.dumps(
            {"id": identity.node_id, "profile": config.profile}, separators=(",", ":")
        ).encode()

        def make_core(addr: Address, now: float) -> Membership:
            from gossip.core import Membership

            return Membership(
                identity.name,
                addr,
                config.gossip,
                random.Random(),
                now,
                keyring=keyring,
                incarnation=identity.incarnation,
                meta=meta,
            )

        return GossipDriver(
            make_core,
            config.bind,
            advertise=advertise,
            main_loop=loop,
            on_update=self._on_update,
            stream_auth=StreamAuth(keyring, config.gossip.cluster_name),
            max_datagram_bytes=config.gossip.max_datagram_bytes,
            max_stream_bytes=frame_limit(config.gossip),
        )

    async def _start_driver(self) -> View:
        host, port = self.config.bind
        try:
            self.driver.start()
        except OSError as exc:
            raise ConfigError(
                f"bind {format_addr((host, port))}: cannot bind UDP and TCP: {exc.strerror or exc}"
            ) from None
        return await self.driver.snapshot()

    def _log_started(self, identity: NodeIdentity) -> None:
        config = self.config
        log.info(
            "agent started",
            extra=fields(
                name=identity.name,
                node_id=identity.node_id,
                addr=self.driver.address,
                incarnation=identity.incarnation,
                cluster=config.cluster,
                profile=config.profile,
                preset=config.gossip_preset,
            ),
        )
        if config.gossip_dropped:
            log.info(
                "gossip preset replaced lower layers' timing",
                extra=fields(preset=config.gossip_preset, dropped=", ".join(config.gossip_dropped)),
            )

    async def _shutdown(self) -> None:
        log.info("leaving the cluster")
        await self.host.leaving()
        await self._leave()
        await self._stop_features()
        self._left.set()
        log.info("left the cluster")

    async def _stop_features(self) -> None:
        while self._running:
            feature = self._running.pop()
            try:
                await feature.stop()
            except Exception:  # one feature failing to stop must not keep the others running
                log.exception("feature failed to stop")

    async def _leave(self) -> None:
        driver = self.driver
        loop = asyncio.get_running_loop()
        deadline = loop.time() + LEAVE_SPREAD_TIMEOUT
        others = await driver.acall(_leave_and_count_others)
        while others and loop.time() < deadline:
            pending = await driver.acall(lambda core, now: core.pending_broadcasts)
            if pending == 0:
                break
            await asyncio.sleep(LEAVE_POLL_INTERVAL)

    # -- updates from the gossip thread ------------------------------------------------------

    def _on_update(self, events: tuple[ev.Event, ...], view: View) -> None:
        for event in events:
            _log_event(event)
        if self._identity is not None and view.incarnation > self._saved_incarnation:
            # A refutation raised our incarnation: keep the next start above it.
            self._saved_incarnation = view.incarnation
            identity = NodeIdentity(self._identity.name, self._identity.node_id, view.incarnation)
            save_identity(self.config.state_dir, identity)
        if self._host is not None:
            self._host.deliver(events, view)

    # -- control commands --------------------------------------------------------------------

    def _register_commands(self) -> None:
        server = self._control
        server.register("members", self._cmd_members)
        server.register("status", self._cmd_status)
        server.register("leave", self._cmd_leave)
        if self._debug_commands:
            server.register("debug-block", _cmd_debug_block)
            server.register("debug-modules", lambda request: sorted(sys.modules))

    @property
    def control(self) -> ControlServer:
        """The control server."""
        return self._control

    async def _cmd_members(self, request: Mapping[str, Any]) -> list[dict[str, Any]]:
        view = await self.driver.snapshot()
        return [member_json(m) for m in sorted(view.members, key=lambda m: m.name)]

    async def _cmd_status(self, request: Mapping[str, Any]) -> dict[str, Any]:
        view = await self.driver.snapshot()
        identity = self._identity
        assert identity is not None
        config = self.config
        return {
            "name": identity.name,
            "node_id": identity.node_id,
            "address": format_addr(view.local.addr),
            "incarnation": view.incarnation,
            "cluster": config.cluster,
            "profile": config.profile,
            "preset": config.gossip_preset,
            "members": count_states(view.members),
            "health_score": view.health_score,
            "uptime_s": round(time.monotonic() - self._started_at, 1),
            "state_dir": str(config.state_dir),
            "mdns": False,  # switched-off features: their own status fields say otherwise
            "metrics": None,
            "pid": os.getpid(),
            **(self._host.status_fields() if self._host is not None else {}),
        }

    async def _cmd_leave(self, request: Mapping[str, Any]) -> dict[str, Any]:
        self.request_stop()
        await self._left.wait()
        return {"left": True}


def _registry(config: AgentConfig) -> Registry | None:
    """A metrics registry when metrics are on (imported only then), else None."""
    if config.metrics is None:
        return None
    from .metrics import Registry

    return Registry()


def _cmd_debug_block(request: Mapping[str, Any]) -> dict[str, Any]:
    seconds = request.get("seconds")
    if not isinstance(seconds, int | float) or not 0 <= seconds <= MAX_DEBUG_BLOCK_S:
        raise ControlError(f"seconds: expected a number in 0..{MAX_DEBUG_BLOCK_S:g}")
    log.warning("debug-block: blocking the main event loop", extra=fields(seconds=seconds))
    time.sleep(seconds)  # deliberately blocks this loop: the gossip thread must not care
    return {"blocked_s": seconds}


def _leave_and_count_others(core: Membership, now: float) -> int:
    others = core.num_alive - 1
    core.leave(now)
    return others


def _log_event(event: ev.Event) -> None:
    if isinstance(event, ev.StateChanged | ev.UserMessage):
        log.debug(type(event).__name__, extra=fields(event=repr(event)))
        return
    member = event.member
    log.info(
        f"member {_EVENT_WORDS.get(type(event), type(event).__name__)}",
        extra=fields(member=member.name, addr=member.addr, incarnation=member.incarnation),
    )


_EVENT_WORDS: dict[type, str] = {
    ev.MemberJoined: "joined",
    ev.MemberUpdated: "updated",
    ev.MemberSuspected: "suspected",
    ev.MemberAlive: "alive",
    ev.MemberFailed: "failed",
    ev.MemberLeft: "left",
    ev.MemberReaped: "reaped",
}
