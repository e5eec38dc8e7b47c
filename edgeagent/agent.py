"""The daemon: the lifecycle of one agent and the list of its features.

Lifecycle of :meth:`Agent.run` (the body of ``edgeagent run``):

1. Claim the control socket (a second agent on the same state dir is refused before it can
   touch anything), load the identity and bump its incarnation, saved *before* joining, so a
   restart after ``kill -9`` always announces an incarnation the cluster has not seen. Before
   that, load the cluster material (:mod:`edgeagent.onboarding`): the keyring, the saved
   cluster name and seeds. None is one line and exit 2 (``edgeagent init`` or ``edgeagent
   join TOKEN`` makes it); a key is never generated here. An identity created on another
   machine (a copied state dir, :func:`~edgeagent.persist.is_clone`) becomes a new node first,
   with a warning, and drops the files that named the copy: each feature module's
   ``NODE_BOUND_FILES`` (the address claim, issued tokens) and the node key and certificate
   (re-issued when the CA key is here, else removed: ``edgeagent join TOKEN`` enrolls again).
2. Start the gossip driver (its own thread and loop, :mod:`edgeagent.driver`), then every
   enabled feature of :data:`FEATURES` on one :class:`~edgeagent.host.FeatureHost`, in order
   (a feature whose switch is off is not even imported); then join the seeds (``--join``,
   else the ones saved at enrollment).
3. Tell systemd READY=1 (and ping its watchdog from this loop) when ``NOTIFY_SOCKET`` is set
   (:mod:`edgeagent.systemd`). SIGHUP re-reads the log settings (``reload``), never exits.
   Serve until SIGTERM / SIGINT or ``edgeagent leave`` (systemd hears STOPPING=1); then run the features' before-leave
   hooks (the mDNS goodbye) and leave gracefully: the core broadcasts the leave and we wait
   until it has been sent (no pending broadcasts) or :data:`LEAVE_SPREAD_TIMEOUT` passes, so
   peers record LEFT, not DEAD. Stop the features in reverse order. Exit 0.

Another live node claiming our name (:mod:`edgeagent.name_conflict`) ends the run without a
leave (a leave in our name would mark the other claimant LEFT): exit 2 with one error line
saying what to set when another node holds the name; when a copy of this very node holds
it, become a new node and restart the process (:data:`RESTART` by default re-executes it).

Everything on this (the application's) loop sees the core only through immutable
:class:`~edgeagent.driver.View` snapshots and events, and changes it only through driver
commands: see DESIGN principle 2. The agent's own control commands are ``members``,
``status`` and ``leave`` (and ``debug-*`` for tests); features add theirs.
"""

from __future__ import annotations

import asyncio
import importlib
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

from . import name_conflict, systemd
from .advertise import advertised_host
from .bridge import EventsDropped
from .clock_store import AgentClock
from .config import AgentConfig
from .control import ControlError, ControlServer, socket_path
from .control_json import count_states, members_page, members_page_args
from .driver import GossipDriver, View, stream_drops
from .errors import ConfigError
from .host import DEBUG_COMMANDS_ENV, Feature, FeatureHost
from .logs import FIELDS_ATTR, fields
from .name_conflict import KEEP, REFUSE, Claimant, Verdict, claimant, member_meta, verdict
from .netaddr import format_addr, is_wildcard
from .onboarding import CA_KEY_FILE, apply_material, load_material, renew_node_material
from .persist import (
    IDENTITY_FILE,
    NodeIdentity,
    ensure_state_dir,
    identity_doc,
    is_clone,
    load_or_create_identity,
    machine_fingerprint,
    machine_id_paths,
    renew_identity,
    save_identity,
)
from .ratelimit import LineBudget, WarnLimiter
from .saver import StateSaver, save_at_start
from .state_signing import ForgedStateLog, StateSigning, load_state_signing, log_problem
from .stream_limits import frame_limit
from .streams import StreamAuth

if TYPE_CHECKING:
    from gossip.core import Membership

    from .metrics import Registry

log = logging.getLogger("edgeagent")

LEAVE_SPREAD_TIMEOUT = 2.0  # seconds to let a graceful leave spread before exiting
LEAVE_POLL_INTERVAL = 0.05
MAX_DEBUG_BLOCK_S = 60.0
EXIT_NAME_CONFLICT = 2  # another live node holds our name (the CLI's "fix your config" code)


def reexec() -> None:
    """Restart this process in place (same PID and arguments): the default restart."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, sys.orig_argv)


@dataclass(frozen=True, slots=True)
class FeatureSpec:
    """One entry of the feature list: where the feature lives and when it is on."""

    name: str
    module: str  # imported only when ``enabled(config)``
    cls: str  # the feature class in ``module``: built with no arguments
    enabled: Callable[[AgentConfig], bool]


def _always(config: AgentConfig) -> bool:
    return True


def _holds_ca_key(config: AgentConfig) -> bool:
    return (config.state_dir / CA_KEY_FILE).exists()


def _needs_channel(config: AgentConfig) -> bool:
    """The agent channel: on when a feature that uses it (CoAP, MQTT, policy from peers) is."""
    return config.coap is not None or config.mqtt is not None or bool(config.policy_trusted_keys)


# Start order; they stop in reverse. Addresses before DNS only for the log order: DNS consults
# the resolvers at query time.
FEATURES: tuple[FeatureSpec, ...] = (
    FeatureSpec("keys", "edgeagent.features.keys", "Keys", _always),
    FeatureSpec("addresses", "edgeagent.features.addresses", "Addresses", _always),
    FeatureSpec("services", "edgeagent.features.services", "Services", _always),
    FeatureSpec("policy", "edgeagent.features.policy", "Policy", lambda c: bool(c.policy_trusted_keys)),
    FeatureSpec("dns", "edgeagent.features.dns", "Dns", lambda c: c.dns is not None),
    FeatureSpec("metrics", "edgeagent.features.metrics", "Metrics", lambda c: c.metrics is not None),
    FeatureSpec("mdns", "edgeagent.features.mdns", "Mdns", lambda c: c.mdns),
    FeatureSpec("enroll", "edgeagent.features.enroll", "Enroll", _holds_ca_key),
    FeatureSpec("channel", "edgeagent.features.channel", "ChannelFeature", _needs_channel),
    FeatureSpec("coap", "edgeagent.features.coap", "Coap", lambda c: c.coap is not None),
    FeatureSpec("mqtt", "edgeagent.features.mqtt", "Mqtt", lambda c: c.mqtt is not None),
    FeatureSpec("uplink", "edgeagent.features.uplink", "UplinkFeature", lambda c: c.uplink is not None),
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
        reload: Callable[[], None] | None = None,
        restart: Callable[[], None] = reexec,
        on_started: Callable[[], None] | None = None,
    ) -> None:
        self.config = config
        self._reload = reload  # SIGHUP: re-read and apply the log settings
        self._on_started = on_started  # once start-up is over (the process's own tuning)
        self._restart = restart
        if debug_commands is None:
            debug_commands = os.environ.get(DEBUG_COMMANDS_ENV) == "1"
        self._debug_commands = debug_commands
        self._stop = asyncio.Event()
        self._left = asyncio.Event()
        self._identity: NodeIdentity | None = None
        self._saved_incarnation = 0
        self._conflict_warnings = WarnLimiter(log)
        self._event_lines = LineBudget()  # member joined / reaped lines: a phantom flood
        self._driver: GossipDriver[Membership] | None = None
        self._host: FeatureHost | None = None
        self._clock: AgentClock | None = None  # restored from the state dir in run()
        self._started_at = time.monotonic()
        self._since_ms = int(time.time() * 1000)  # in our meta: who claimed a name first
        self._verdict: Verdict | None = None  # set when a name conflict ends this run
        self._forged_log = ForgedStateLog()
        self._control = ControlServer(socket_path(config.state_dir))
        self._features = {**build_features(config), **(extra_features or {})}
        self._running: list[Feature] = []  # started and not yet stopped, in start order
        self._started = False
        self._saver: StateSaver | None = None  # the state writer, while run() runs

    # -- lifecycle ---------------------------------------------------------------------------

    async def run(self) -> int:
        """Serve until stopped; return the exit code (0 after a graceful leave)."""
        loop = asyncio.get_running_loop()
        config = self.config
        ensure_state_dir(config.state_dir)
        self._register_commands()
        await self._control.start()
        watchdog = systemd.start_watchdog()
        try:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.request_stop)
            loop.add_signal_handler(signal.SIGHUP, self._hangup)
            material = load_material(config)  # none: one line, exit 2 (before any file is made)
            self.config = config = apply_material(config, material)
            # Synchronous, before the driver exists: nothing is sent before the bumped
            # incarnation is on disk. A full disk here is one line (exit 2), not a traceback.
            identity = save_at_start(config.state_dir, self._boot_identity)
            self._identity, self._saved_incarnation = identity, identity.incarnation
            keyring = Keyring(list(material.keys))
            signing = load_state_signing(config.state_dir, identity)
            if signing.problem is not None:
                log_problem(signing.problem)
            self._saver = StateSaver()
            clock = self._start_clock(loop)  # before the meta: ``since`` comes from it
            self._driver = self._make_driver(loop, identity, keyring, signing)
            self._host = FeatureHost(
                config, identity, self._driver, self._control, keyring, _registry(config),
                self._features, saver=self._saver, clock=clock.clock,
            )  # fmt: skip
            self._host.deliver((), await self._start_driver())  # no listener yet: sets the view
            clock.attach(self._host)
            for feature in self._features.values():
                self._running.append(feature)
                await feature.start(self._host)
            if config.join:
                await self._host.call(lambda core, now: core.join(list(config.join), now))
            self._started = True
            if self._on_started is not None:
                self._on_started()
            self._log_started(identity)
            systemd.notify("READY=1", f"STATUS=serving as {identity.name}")
            await self._stop.wait()
            systemd.notify("STOPPING=1")
            if self._verdict is None:
                await self._shutdown()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            if watchdog is not None:
                watchdog.cancel()
            await self._stop_features()
            if self._driver is not None:
                self._driver.stop()
            if self._clock is not None:
                self._clock.stop()
            if self._saver is not None:  # flush what it can (and say what it could not)
                await asyncio.to_thread(self._saver.close)
            await self._control.close()
        if self._verdict is REFUSE:
            return EXIT_NAME_CONFLICT
        if self._verdict is not None:  # RENEW, now that nothing saves the copied claim again
            assert self._identity is not None
            identity, machine = self._identity, machine_fingerprint(machine_id_paths())
            renewed = save_at_start(self.config.state_dir, lambda: self._renew(identity, machine))
            log.warning(
                "restarting as a new node", extra=fields(name=renewed.name, node_id=renewed.node_id)
            )
            self._restart()
        return 0

    def request_stop(self) -> None:
        """Begin a graceful leave and exit (signal handlers, ``edgeagent leave``)."""
        self._stop.set()

    def _hangup(self) -> None:
        """SIGHUP (a closed terminal, ``systemctl reload``): re-read the log settings, go on."""
        try:
            if self._reload is not None:
                self._reload()
        except Exception as exc:  # a broken config file must not take the agent down
            log.warning("SIGHUP: log settings not re-read", extra=fields(error=str(exc)))
            return
        level = logging.getLevelName(logging.getLogger().getEffectiveLevel()).lower()
        log.info(
            "SIGHUP: log settings re-read; other settings apply at the next start",
            extra=fields(level=level),
        )

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

    def _start_clock(self, loop: asyncio.AbstractEventLoop) -> AgentClock:
        """The agent's clock from its saved reading (never back across a restart), saving."""
        self._clock = clock = AgentClock(self.config.state_dir)
        self._since_ms = clock.since_ms()
        clock.start(loop, self._saver)
        return clock

    def _make_driver(
        self,
        loop: asyncio.AbstractEventLoop,
        identity: NodeIdentity,
        keyring: Keyring,
        signing: StateSigning,
    ) -> GossipDriver[Membership]:
        config = self.config
        advertise = config.advertise
        if advertise is None and is_wildcard(config.bind[0]):
            advertise = (advertised_host(config.bind), 0)  # port 0: the bound port
        meta = member_meta(identity.node_id, config.profile, self._since_ms)

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
                signer=signing.signer,
                verifier=signing.verifier,
                epoch=identity.boot_epoch,  # bumped and saved before this start's first send
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
                boot_epoch=identity.boot_epoch,
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
            if isinstance(event, ev.NameConflict):
                self._on_name_conflict(event, view)
            elif isinstance(event, ev.StateChanged | ev.UserMessage) or self._event_lines.allow(
                view.taken_at, log, "member event"
            ):
                _log_event(event)
        self._forged_log.observe(view.core_stats, view.taken_at)
        if (
            self._identity is not None
            and self._verdict is None
            and view.incarnation > self._saved_incarnation
        ):
            # A refutation raised our incarnation (the core announced it at once: it must,
            # to stay alive): save it so the next start bumps above it. Off this loop and
            # retried; until it is on disk, a crash restarts at a lower incarnation, which
            # the first push-pull corrects (the core refutes what peers hold about it).
            self._saved_incarnation = view.incarnation
            identity = self._identity.with_incarnation(view.incarnation)
            if self._saver is not None:
                path = self.config.state_dir / IDENTITY_FILE
                self._saver.save_json(path, identity_doc(identity))
        if self._host is not None:
            self._host.deliver(events, view)

    # -- identity ----------------------------------------------------------------------------

    def _boot_identity(self) -> NodeIdentity:
        """The identity with its incarnation bumped, saved (synchronously, at start)."""
        identity = self._load_identity().bumped()
        save_identity(self.config.state_dir, identity)
        return identity

    def _load_identity(self) -> NodeIdentity:
        """The saved identity (created on first start); a copy made on another machine is
        made a new node here, before it can announce the original's id or address."""
        config = self.config
        machine = machine_fingerprint(machine_id_paths())
        identity = load_or_create_identity(
            config.state_dir, config.name, default_name=config.name_is_default, machine=machine
        )
        if is_clone(identity, machine):
            renewed = self._renew(identity, machine)
            log.warning(
                "this state dir was created on another machine (a cloned disk?): "
                "this node becomes a new node",
                extra=fields(
                    copied_node_id=identity.node_id, name=renewed.name, node_id=renewed.node_id
                ),
            )
            identity = renewed
        return identity

    def _renew(self, identity: NodeIdentity, machine: str | None) -> NodeIdentity:
        """A new node id (and default name) for a copied identity; drop what named the copy."""
        state_dir = self.config.state_dir
        renewed = renew_identity(state_dir, identity, self.config.name, machine)
        for name in self._node_bound_files():
            (state_dir / name).unlink(missing_ok=True)
        reissued = renew_node_material(state_dir, renewed)
        if reissued is False:
            log.warning(
                "this node's certificate named the copied node id: removed it and its key "
                "(gossip runs on the cluster keyring); to give the new node a certificate, "
                f"enroll it again: edgeagent join TOKEN --state-dir {state_dir}",
                extra=fields(node_id=renewed.node_id),
            )
        elif reissued:
            log.info("new node certificate issued for the new node id (the mesh CA key is here)")
        return renewed

    def _node_bound_files(self) -> list[str]:
        """The files that name this node, as each enabled feature's module lists them
        (``NODE_BOUND_FILES``; a switched-off feature is not imported to ask it)."""
        names: list[str] = []
        for feature in self._features.values():
            module = sys.modules.get(type(feature).__module__)
            names.extend(getattr(module, "NODE_BOUND_FILES", ()))
        return names

    def _on_name_conflict(self, event: ev.NameConflict, view: View) -> None:
        """Another address claims our name: keep it, refuse it (exit 2) or renew (restart)."""
        identity = self._identity
        if identity is None or self._verdict is not None:
            return
        other = claimant(event.meta, event.addr)
        decided = verdict(Claimant(identity.node_id, self._since_ms, view.local.addr), other)
        where = fields(name=event.name, other_addr=event.addr, other_node_id=other.node_id)
        if decided is KEEP:  # the core reports each address once; forged ones: once a minute
            self._conflict_warnings.warn(
                event.name,
                view.taken_at,
                f"node name {event.name} is also claimed by {format_addr(event.addr)}, which "
                "started later and gives it up",
                **where[FIELDS_ATTR],
            )
            return
        held_s = time.monotonic() - self._started_at
        if held_s >= name_conflict.ESTABLISHED_S:  # forged, or a partition healing: keep it
            self._conflict_warnings.warn(
                event.name,
                view.taken_at,
                f"node name {event.name} is also claimed by {format_addr(event.addr)} (node "
                f"{other.node_id or '?'}) with an earlier start; this node has held it for "
                f"{held_s:.0f} s and keeps it: if that node is real, give one of them another "
                "name (--name NAME)",
                **where[FIELDS_ATTR],
            )
            return
        self._verdict = decided
        if decided is REFUSE:
            source = f"in {self.config.config_file}" if self.config.config_file else "in the config"
            log.error(
                f"node name {event.name} is already held by node {other.node_id or '?'} at "
                f"{format_addr(event.addr)}: give this node a unique name with --name NAME "
                f"or name = 'NAME' {source}; exiting",
                extra=where,
            )
        else:
            log.warning(
                f"this state dir is a copy of the node at {format_addr(event.addr)} (same node "
                "id): this node becomes a new node and restarts",
                extra=where,
            )
        self._stop.set()  # no leave: it would be in the other claimant's name

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
        """The member table sorted by name; with ``limit``, one page after ``after``."""
        try:
            after, limit = members_page_args(request)
        except ValueError as exc:
            raise ControlError(f"members: {exc}") from None
        members = await self.driver.acall(lambda core, now: tuple(core.members()))
        return members_page(members, after, limit)

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
            **view.undecryptable.status(view.taken_at),
            "stream_drops": stream_drops(view.driver_stats),
            "events_dropped": view.driver_stats.get("events_dropped", 0),
            "gil_fast_periods": view.driver_stats.get("gil_fast_periods", 0),
            **(self._saver.status().status() if self._saver is not None else {}),
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


def _log_event(event: ev.Event | EventsDropped) -> None:
    if isinstance(event, EventsDropped):  # the bridge warned when it dropped them
        log.info("gossip events dropped while the main loop stalled", extra=fields(n=event.count))
        return
    if isinstance(event, ev.StateChanged | ev.UserMessage | ev.NameConflict):
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
