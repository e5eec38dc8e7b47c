"""The daemon: wires config, persistence, the gossip driver, control API, mDNS and metrics.

Lifecycle of :meth:`Agent.run` (the body of ``edgeagent run``):

1. Claim the control socket (a second agent on the same state dir is refused before it can
   touch anything), load the identity and bump its incarnation, saved *before* joining, so a
   restart after ``kill -9`` always announces an incarnation the cluster has not seen. Load
   the keyring (a new key is generated on first start).
2. Start the gossip driver (its own thread and loop, :mod:`edgeagent.driver`) and join the
   seeds; start mDNS and metrics only if enabled (their modules are imported only then).
3. Serve until SIGTERM / SIGINT or ``edgeagent leave``; then leave gracefully: the core
   broadcasts the leave and we wait until it has been sent (no pending broadcasts) or
   :data:`LEAVE_SPREAD_TIMEOUT` passes, so peers record LEFT, not DEAD. Exit 0.

Everything on this (the application's) loop sees the core only through immutable
:class:`~edgeagent.driver.View` snapshots and events, and changes it only through driver
commands: see DESIGN principle 2. The keyring object is owned by the gossip thread too; the
code here touches it only inside commands. Keys are rotated cluster-wide (see
:mod:`edgeagent.commands.keys`): a key operation is applied locally, persisted, and sent to
every member as a user broadcast that each agent applies and persists in turn.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import json
import logging
import os
import random
import signal
import socket
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from gossip import events as ev
from gossip.events import Member
from gossip.keyring import KEY_SIZE, Keyring
from gossip.messages import Address, MemberState

from .config import AgentConfig
from .control import ControlError, ControlServer, socket_path
from .driver import GossipDriver, View
from .errors import ConfigError
from .logs import fields
from .persist import (
    NodeIdentity,
    ensure_state_dir,
    load_or_create_identity,
    load_or_create_keyring,
    save_identity,
    save_keyring,
)

if TYPE_CHECKING:
    from gossip.core import Membership

log = logging.getLogger("edgeagent")

LEAVE_SPREAD_TIMEOUT = 2.0  # seconds to let a graceful leave spread before exiting
LEAVE_POLL_INTERVAL = 0.05
DEBUG_COMMANDS_ENV = "EDGEAGENT_DEBUG_COMMANDS"  # "1" enables debug-* commands (tests only)
MAX_DEBUG_BLOCK_S = 60.0
KEYS_STATE_KEY = "keys"  # replicated state: this node's key fingerprints, primary first
KEY_OP_PREFIX = b"edgeagent/keys\0"  # user-broadcast payloads carrying a keyring operation
KEY_OPS = ("install", "use", "remove")
FINGERPRINT_BYTES = 8  # of SHA-256: identifies a key without revealing it
ROUTE_PROBE_ADDR = ("192.0.2.1", 9)  # RFC 5737 TEST-NET-1: a UDP connect() sends nothing


def fingerprint(key: bytes) -> str:
    """A short public identifier of a key: the first bytes of its SHA-256, in hex."""
    return hashlib.sha256(key).hexdigest()[: 2 * FINGERPRINT_BYTES]


def decode_key(text: str) -> bytes:
    """Parse a base64 AES-256 key; raise ControlError with one clear line."""
    try:
        key = base64.b64decode(text.strip(), validate=True)
    except (ValueError, binascii.Error):
        raise ControlError("expected a base64 key") from None
    if len(key) != KEY_SIZE:
        raise ControlError(f"expected a {KEY_SIZE}-byte key (base64 of 32 bytes), got {len(key)}")
    return key


def format_addr(addr: Address) -> str:
    host, port = addr
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def decode_meta(meta: bytes) -> Any:
    """Node metadata for people: our JSON object, else text, else base64."""
    try:
        return json.loads(meta) if meta else {}
    except (UnicodeDecodeError, json.JSONDecodeError):
        pass
    try:
        return meta.decode()
    except UnicodeDecodeError:
        return "base64:" + base64.b64encode(meta).decode()


def member_json(member: Member) -> dict[str, Any]:
    """The control API's view of one member (``members --json``)."""
    return {
        "name": member.name,
        "address": format_addr(member.addr),
        "state": member.state.name.lower(),
        "incarnation": member.incarnation,
        "meta": decode_meta(member.meta),
    }


def count_states(members: Iterable[Member]) -> dict[str, int]:
    counts = Counter(m.state.name.lower() for m in members)
    return {state.name.lower(): counts.get(state.name.lower(), 0) for state in MemberState}


def routable_host() -> str:
    """This host's address on the default route (no packet is sent), else loopback."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(ROUTE_PROBE_ADDR)
            return str(sock.getsockname()[0])
        except OSError:
            return "127.0.0.1"


def is_wildcard(host: str) -> bool:
    return host in ("", "0.0.0.0", "::")


class Agent:
    """One running agent. Build with the resolved config, then ``await agent.run()``."""

    def __init__(self, config: AgentConfig, *, debug_commands: bool | None = None) -> None:
        self.config = config
        if debug_commands is None:
            debug_commands = os.environ.get(DEBUG_COMMANDS_ENV) == "1"
        self._debug_commands = debug_commands
        self._stop = asyncio.Event()
        self._left = asyncio.Event()
        self._identity: NodeIdentity | None = None
        self._saved_incarnation = 0
        self._driver: GossipDriver[Membership] | None = None
        self._view: View | None = None
        self._keyring: Keyring | None = None  # owned by the gossip thread: use in commands only
        self._started_at = time.monotonic()
        self._control = ControlServer(socket_path(config.state_dir))
        self._mdns: Any = None
        self._metrics: Any = None
        self._ipam: Any = None  # edgeagent.ipam_service.IpamService once started
        self._tasks: set[asyncio.Task[Any]] = set()
        self._listeners: list[Callable[[tuple[ev.Event, ...], View], None]] = []

    # -- lifecycle ---------------------------------------------------------------------------

    async def run(self) -> int:
        """Serve until stopped; return the exit code (0 after a graceful leave)."""
        loop = asyncio.get_running_loop()
        config = self.config
        ensure_state_dir(config.state_dir)
        self._register_commands()
        await self._control.start()
        try:
            identity = load_or_create_identity(config.state_dir, config.name).bumped()
            save_identity(config.state_dir, identity)
            self._identity, self._saved_incarnation = identity, identity.incarnation
            keys = load_or_create_keyring(config.keyring_path)
            self._driver = self._make_driver(loop, identity, keys)
            await self._start_driver()
            from .ipam_service import IpamService  # overlay addresses (and mesh DNS when on)

            self._ipam = await IpamService.attach(self, identity)
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.request_stop)
            if config.metrics is not None:
                await self._start_metrics(config.metrics)
            seeds = list(config.join)
            if seeds:
                await self._driver.acall(lambda core, now: core.join(seeds, now))
            if config.mdns:
                await self._start_mdns()
            log.info(
                "agent started",
                extra=fields(
                    name=identity.name,
                    node_id=identity.node_id,
                    addr=self._driver.address,
                    incarnation=identity.incarnation,
                    cluster=config.cluster,
                    profile=config.profile,
                    preset=config.gossip_preset,
                ),
            )
            await self._stop.wait()
            await self._shutdown()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            if self._ipam is not None:
                self._ipam.close()
            if self._driver is not None:
                self._driver.stop()
            await self._control.close()
        return 0

    @property
    def ipam(self) -> Any:
        """The overlay address service (``edgeagent.ipam_service.IpamService``), once started."""
        return self._ipam

    def request_stop(self) -> None:
        """Begin a graceful leave and exit (signal handlers, ``edgeagent leave``)."""
        self._stop.set()

    def _make_driver(
        self, loop: asyncio.AbstractEventLoop, identity: NodeIdentity, keys: Sequence[bytes]
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

            keyring = Keyring(keys)
            self._keyring = keyring
            core = Membership(
                identity.name,
                addr,
                config.gossip,
                random.Random(),
                now,
                keyring=keyring,
                incarnation=identity.incarnation,
                meta=meta,
            )
            core.set_state(KEYS_STATE_KEY, [fingerprint(k) for k in keyring.keys], now)
            return core

        return GossipDriver(
            make_core,
            config.bind,
            advertise=advertise,
            main_loop=loop,
            on_update=self._on_update,
            max_datagram_bytes=config.gossip.max_datagram_bytes,
            max_stream_bytes=config.gossip.max_stream_bytes,
        )

    async def _start_driver(self) -> None:
        assert self._driver is not None
        host, port = self.config.bind
        try:
            self._driver.start()
        except OSError as exc:
            raise ConfigError(
                f"bind {format_addr((host, port))}: cannot bind UDP and TCP: {exc.strerror or exc}"
            ) from None
        self._view = await self._driver.snapshot()

    async def _shutdown(self) -> None:
        log.info("leaving the cluster")
        if self._mdns is not None:
            try:
                await asyncio.wait_for(self._mdns.stop(), LEAVE_SPREAD_TIMEOUT)
            except Exception:  # a goodbye that cannot be sent must not block the leave
                log.warning("mdns goodbye failed", exc_info=True)
        await self._leave()
        if self._metrics is not None:
            await self._metrics.close()
        self._left.set()
        log.info("left the cluster")

    async def _leave(self) -> None:
        driver = self._driver
        assert driver is not None
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
        self._view = view
        for event in events:
            self._log_event(event)
            if isinstance(event, ev.UserMessage) and event.payload.startswith(KEY_OP_PREFIX):
                self._spawn(self._apply_remote_key_op(event.origin, event.payload))
        if self._identity is not None and view.incarnation > self._saved_incarnation:
            # A refutation raised our incarnation: keep the next start above it.
            self._saved_incarnation = view.incarnation
            identity = NodeIdentity(self._identity.name, self._identity.node_id, view.incarnation)
            save_identity(self.config.state_dir, identity)
        if self._metrics is not None:
            self._metrics.update(view)
        for listener in self._listeners:
            try:
                listener(events, view)
            except Exception:  # one feature's bug must not stop the others hearing events
                log.exception("update listener failed")

    def add_listener(self, listener: Callable[[tuple[ev.Event, ...], View], None]) -> None:
        """Call ``listener(events, view)`` on this loop after every update from the gossip thread.

        For features built on membership (addresses, services, mesh DNS): they read the
        immutable snapshot and send changes back with :attr:`driver` commands.
        """
        self._listeners.append(listener)

    @staticmethod
    def _log_event(event: ev.Event) -> None:
        if isinstance(event, ev.StateChanged | ev.UserMessage):
            log.debug(type(event).__name__, extra=fields(event=repr(event)))
            return
        member = event.member
        log.info(
            f"member {_EVENT_WORDS.get(type(event), type(event).__name__)}",
            extra=fields(member=member.name, addr=member.addr, incarnation=member.incarnation),
        )

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- control commands --------------------------------------------------------------------

    def _register_commands(self) -> None:
        server = self._control
        server.register("members", self._cmd_members)
        server.register("status", self._cmd_status)
        server.register("leave", self._cmd_leave)
        server.register("keys", self._cmd_keys)
        if self._debug_commands:
            server.register("debug-block", self._cmd_debug_block)
            server.register("debug-modules", lambda request: sorted(sys.modules))

    @property
    def control(self) -> ControlServer:
        """The control server, for features that add their own commands."""
        return self._control

    @property
    def driver(self) -> GossipDriver[Membership]:
        """The gossip driver, for features that send commands to the core."""
        if self._driver is None:
            raise RuntimeError("agent not started")
        return self._driver

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
            "mdns": self._mdns is not None,
            "metrics": format_addr(self._metrics.address) if self._metrics else None,
            "pid": os.getpid(),
            **(self._ipam.status_fields() if self._ipam is not None else {}),
        }

    async def _cmd_leave(self, request: Mapping[str, Any]) -> dict[str, Any]:
        self.request_stop()
        await self._left.wait()
        return {"left": True}

    def _cmd_debug_block(self, request: Mapping[str, Any]) -> dict[str, Any]:
        seconds = request.get("seconds")
        if not isinstance(seconds, int | float) or not 0 <= seconds <= MAX_DEBUG_BLOCK_S:
            raise ControlError(f"seconds: expected a number in 0..{MAX_DEBUG_BLOCK_S:g}")
        log.warning("debug-block: blocking the main event loop", extra=fields(seconds=seconds))
        time.sleep(seconds)  # deliberately blocks this loop: the gossip thread must not care
        return {"blocked_s": seconds}

    async def _cmd_keys(self, request: Mapping[str, Any]) -> Any:
        op = request.get("op")
        if op == "list":
            return await self._keys_list()
        if op not in KEY_OPS:
            raise ControlError(f"op: expected one of list, {', '.join(KEY_OPS)}")
        key_text = request.get("key")
        if not isinstance(key_text, str):
            raise ControlError("key: expected a base64 key")
        key = decode_key(key_text)
        if not request.get("force"):
            await self._check_key_op(op, key)
        keys = await self._apply_key_op(op, key)
        payload = KEY_OP_PREFIX + json.dumps({"op": op, "key": key_text.strip()}).encode()
        await self.driver.acall(lambda core, now: core.broadcast(payload, now))
        members = await self.driver.acall(lambda core, now: core.num_alive)
        return {"op": op, "fingerprint": fingerprint(key), "keys": len(keys), "members": members}

    async def _keys_list(self) -> dict[str, Any]:
        def collect(core: Any, now: float) -> tuple[tuple[bytes, ...], dict[str, Any]]:
            assert self._keyring is not None
            views = {}
            for m in core.members():
                if m.state is MemberState.ALIVE:
                    state = core.state_of(m.name) or {}
                    views[m.name] = state.get(KEYS_STATE_KEY)
            return tuple(self._keyring.keys), views

        local_keys, views = await self.driver.acall(collect)
        alive = len(views)
        rows: dict[str, dict[str, Any]] = {}
        for i, key in enumerate(local_keys):
            rows[fingerprint(key)] = {
                "fingerprint": fingerprint(key),
                "key": base64.b64encode(key).decode(),
                "local_primary": i == 0,
                "installed": 0,
                "primary": 0,
            }
        for fps in views.values():
            if not isinstance(fps, list):
                continue
            for i, fp in enumerate(fps):
                row = rows.setdefault(
                    fp,
                    {
                        "fingerprint": fp,
                        "key": None,
                        "local_primary": False,
                        "installed": 0,
                        "primary": 0,
                    },
                )
                row["installed"] += 1
                row["primary"] += i == 0
        return {"alive": alive, "keys": list(rows.values())}

    async def _check_key_op(self, op: str, key: bytes) -> None:
        """Refuse a rotation step that would cut members off (override with force)."""
        if op == "install":
            return
        listing = await self._keys_list()
        fp = fingerprint(key)
        row = next((r for r in listing["keys"] if r["fingerprint"] == fp), None)
        alive = listing["alive"]
        if op == "use":
            installed = row["installed"] if row else 0
            if installed < alive:
                raise ControlError(
                    f"key {fp} is installed on {installed} of {alive} alive members; "
                    "install it everywhere first (or use --force)"
                )
        elif op == "remove" and row is not None and row["primary"] > 0:
            raise ControlError(
                f"key {fp} is still the primary on {row['primary']} members; "
                "make another key primary first (or use --force)"
            )

    async def _apply_key_op(self, op: str, key: bytes) -> tuple[bytes, ...]:
        def apply(core: Any, now: float) -> tuple[bytes, ...]:
            keyring = self._keyring
            assert keyring is not None
            getattr(keyring, op)(key)
            core.set_state(KEYS_STATE_KEY, [fingerprint(k) for k in keyring.keys], now)
            return tuple(keyring.keys)

        from gossip.errors import KeyringError

        try:
            keys = await self.driver.acall(apply)
        except KeyringError as exc:
            raise ControlError(str(exc)) from None
        save_keyring(self.config.keyring_path, list(keys))
        log.info(f"keyring {op}", extra=fields(key=fingerprint(key), keys=len(keys)))
        return keys

    async def _apply_remote_key_op(self, origin: str, payload: bytes) -> None:
        try:
            doc = json.loads(payload[len(KEY_OP_PREFIX) :])
            op, key = doc["op"], decode_key(doc["key"])
            if op not in KEY_OPS:
                raise ValueError(op)
            await self._apply_key_op(op, key)
        except ControlError as exc:
            log.warning(
                "keyring operation not applied", extra=fields(origin=origin, reason=str(exc))
            )
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            log.warning("malformed keyring operation dropped", extra=fields(origin=origin))

    # -- optional features -------------------------------------------------------------------

    async def _start_mdns(self) -> None:
        from overlay.mdns import MdnsDiscovery, Peer

        identity, driver = self._identity, self.driver
        assert identity is not None

        def on_peer(peer: Peer) -> None:
            view = self._view
            if view is not None and any(
                m.addr == peer.addr and m.state is MemberState.ALIVE for m in view.members
            ):
                return
            log.info("mdns found peer", extra=fields(node_id=peer.node_id, addr=peer.addr))
            driver.call(lambda core, now: core.join([peer.addr], now))

        bind_host = self.config.bind[0]
        mdns = MdnsDiscovery(
            node_name=identity.name,
            node_id=identity.node_id,
            cluster=self.config.cluster,
            addr=driver.address,
            on_peer=on_peer,
            interfaces=None if is_wildcard(bind_host) else [bind_host],
        )
        self._mdns = mdns  # announcing takes a second or two; status already says "on"
        try:
            await mdns.start()
        except Exception as exc:  # no multicast-capable interface, port 5353 refused, ...
            log.warning("mdns unavailable; join by seeds only", extra=fields(reason=repr(exc)))
            self._mdns = None
            with contextlib.suppress(Exception):
                await mdns.stop()

    async def _start_metrics(self, where: Address) -> None:
        from importlib.metadata import PackageNotFoundError, version

        from .agent_metrics import MetricsFeed

        identity = self._identity
        assert identity is not None
        try:
            agent_version = version("edgeagent")
        except PackageNotFoundError:
            agent_version = "unknown"
        try:
            self._metrics = await MetricsFeed.serve(
                where,
                node=identity.name,
                cluster=self.config.cluster,
                profile=self.config.profile,
                version=agent_version,
            )
        except OSError as exc:
            raise ConfigError(
                f"metrics {format_addr(where)}: cannot listen: {exc.strerror or exc}"
            ) from None
        if self._view is not None:
            self._metrics.update(self._view)


def _leave_and_count_others(core: Any, now: float) -> int:
    others = int(core.num_alive) - 1
    core.leave(now)
    return others


_EVENT_WORDS: dict[type, str] = {
    ev.MemberJoined: "joined",
    ev.MemberUpdated: "updated",
    ev.MemberSuspected: "suspected",
    ev.MemberAlive: "alive",
    ev.MemberFailed: "failed",
    ev.MemberLeft: "left",
    ev.MemberReaped: "reaped",
}
