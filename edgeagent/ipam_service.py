"""Overlay addresses in the daemon: glue between the agent and :class:`overlay.ipam.Allocator`.

How it works. The allocator is sans-IO and lives on the agent's (main) loop. Gossip events
reach it through ``agent.add_listener``; its claim goes back into the core's replicated
state (key ``"ipam"``) with a driver command; its timer is one ``loop.call_at``. Its
persisted state (the claim, the clock, named local addresses) is written atomically to
``<state_dir>/ipam.json`` *before* the claim is published, so a ``kill -9`` at any moment
restarts with the block the mesh last heard about. Renumbering and exhaustion are logged.

Control commands: ``addresses`` (every claim this node knows, for ``edgeagent addresses``)
and ``address`` (``op`` = ``allocate`` | ``release`` | ``list`` with ``name``) for
``edgeagent address ...``. With ``config.dns`` set, the mesh DNS responder answers
``NODE.node.mesh`` from the same allocator.

Wiring (in ``Agent.run``, after the driver started and before joining the seeds)::

    self._ipam = await IpamService.attach(self, identity)
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gossip import events as ev
from gossip.messages import MemberState
from overlay.ipam import (
    STATE_KEY,
    Allocator,
    BlockClaimed,
    IpamError,
    PrefixExhausted,
    Renumbered,
)

from .control import ControlError
from .errors import ConfigError
from .logs import fields
from .persist import load_json, save_json

if TYPE_CHECKING:
    from .agent import Agent
    from .driver import View
    from .persist import NodeIdentity

log = logging.getLogger("edgeagent.ipam")

STATE_FILE = "ipam.json"
_MEMBER_EVENTS = (
    ev.MemberJoined,
    ev.MemberUpdated,
    ev.MemberSuspected,
    ev.MemberAlive,
    ev.MemberFailed,
    ev.MemberLeft,
)


class IpamService:
    """The allocator of one agent, fed by its gossip events, served on its control socket."""

    def __init__(self, agent: Agent, identity: NodeIdentity) -> None:
        config = agent.config
        self.agent = agent
        self.path = Path(config.state_dir) / STATE_FILE
        self._loop = asyncio.get_running_loop()
        now = self._loop.time()
        persisted = load_json(self.path, None)
        self.alloc = Allocator(
            identity.name,
            identity.node_id,
            config.overlay_prefix,
            config.block_prefixlen,
            config.dead_quarantine_s,
            now,
            persisted if isinstance(persisted, dict) else None,
            wall_offset=time.time() - now,
        )
        self._timer: asyncio.TimerHandle | None = None
        self._dns_transport: asyncio.DatagramTransport | None = None

    @classmethod
    async def attach(cls, agent: Agent, identity: NodeIdentity) -> IpamService:
        """Build the service, hook it into ``agent`` and catch up with the core's state."""
        service = cls(agent, identity)
        agent.add_listener(service._on_update)
        agent.control.register("addresses", service.cmd_addresses)
        agent.control.register("address", service.cmd_address)
        await service._catch_up()
        if agent.config.dns is not None:
            await service.start_dns(*agent.config.dns)
        service._pump()
        return service

    async def start_dns(self, host: str, port: int) -> None:
        """Serve mesh DNS on UDP ``host:port`` (``NODE.node.mesh`` -> overlay address)."""
        from overlay.dns import MeshDNS, serve_dns

        try:
            self._dns_transport = await serve_dns(MeshDNS(self.resolve_node), host, port)
        except OSError as exc:
            raise ConfigError(f"dns {host}:{port}: cannot listen: {exc.strerror or exc}") from None
        log.info("mesh dns listening", extra=fields(addr=f"{host}:{port}"))

    @property
    def dns_address(self) -> tuple[str, int] | None:
        """Where mesh DNS listens (the bound port when configured as 0), or None."""
        if self._dns_transport is None:
            return None
        host, port = self._dns_transport.get_extra_info("sockname")[:2]
        return str(host), int(port)

    def close(self) -> None:
        """Stop the timer and the DNS responder."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._dns_transport is not None:
            self._dns_transport.close()
            self._dns_transport = None

    # -- queries -----------------------------------------------------------------------------

    def resolve_node(self, label: str) -> list[str]:
        """Overlay address of the node named ``label`` (case-insensitive), for mesh DNS."""
        wanted = label.lower()
        for row in self.alloc.claims():
            if row.node.lower() == wanted:
                address = self.alloc.owner_address(row.node)
                return [str(address)] if address is not None else []
        return []

    def status_fields(self) -> dict[str, Any]:
        """This node's overlay block and address, for ``edgeagent status``."""
        return {
            "overlay_block": str(self.alloc.block) if self.alloc.block else None,
            "overlay_address": str(self.alloc.address) if self.alloc.address else None,
        }

    # -- control commands --------------------------------------------------------------------

    def cmd_addresses(self, request: Mapping[str, Any]) -> list[dict[str, str]]:
        """Every claim this node knows: node, block, address, state."""
        return [row.to_dict() for row in self.alloc.claims(self._loop.time())]

    def cmd_address(self, request: Mapping[str, Any]) -> Any:
        """``op``: allocate NAME | release NAME | list."""
        op, name = request.get("op"), request.get("name")
        if op == "list":
            return self.alloc.local_addresses()
        if op not in ("allocate", "release"):
            raise ControlError("op: expected allocate, release or list")
        if not isinstance(name, str) or not name:
            raise ControlError("name: expected a non-empty string")
        try:
            if op == "allocate":
                address = str(self.alloc.allocate(name))
                log.info("address allocated", extra=fields(name=name, address=address))
                result: dict[str, Any] = {"name": name, "address": address}
            else:
                result = {"name": name, "released": self.alloc.release(name)}
        except IpamError as exc:
            raise ControlError(str(exc)) from None
        self._pump()
        return result

    # -- gossip events -----------------------------------------------------------------------

    async def _catch_up(self) -> None:
        """Feed the members and claims the core already knows (attached after a join)."""

        def collect(core: Any, now: float) -> tuple[tuple[str, MemberState, Any], ...]:
            return tuple(
                (m.name, m.state, (core.state_of(m.name) or {}).get(STATE_KEY))
                for m in core.members()
            )

        now = self._loop.time()
        rows = await self.agent.driver.acall(collect)
        for name, state, claim in rows:
            self.alloc.on_member(name, state, now)
            if claim is not None:
                self.alloc.on_claim(name, claim, now)
        if any(name != self.alloc.node for name, _, _ in rows):
            self.alloc.synced(now)

    def _on_update(self, events: tuple[ev.Event, ...], view: View) -> None:
        now = self._loop.time()
        alloc = self.alloc
        for event in events:
            if isinstance(event, ev.StateChanged):
                if event.key == STATE_KEY:
                    alloc.on_claim(event.owner, None if event.deleted else event.value, now)
            elif isinstance(event, _MEMBER_EVENTS):
                member = event.member
                alloc.on_member(member.name, member.state, now)
                if isinstance(event, ev.MemberJoined) and member.name != alloc.node:
                    alloc.synced(now)
            elif isinstance(event, ev.MemberReaped):
                alloc.on_reaped(event.member.name, now)
        self._pump()

    def _pump(self) -> None:
        """Run due decisions; persist, then publish; log events; re-arm the timer."""
        alloc = self.alloc
        now = self._loop.time()
        timer = alloc.get_timer()
        if timer is not None and timer <= now:
            alloc.handle_timeout(now)
        saved = alloc.state_to_persist()
        if saved is not None:
            save_json(self.path, saved)
        update = alloc.claim_to_publish()
        if update is not None:
            value = update.value
            self.agent.driver.call(lambda core, t: core.set_state(STATE_KEY, value, t))
        while (event := alloc.next_event()) is not None:
            self._log_event(event)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        timer = alloc.get_timer()
        if timer is not None:
            self._timer = self._loop.call_at(timer, self._pump)

    @staticmethod
    def _log_event(event: Any) -> None:
        if isinstance(event, BlockClaimed):
            log.info(
                "overlay block claimed", extra=fields(block=event.block, address=event.address)
            )
        elif isinstance(event, Renumbered):
            log.warning(
                "overlay block renumbered",
                extra=fields(old=event.old_block, new=event.new_block, because=event.because),
            )
        elif isinstance(event, PrefixExhausted):
            log.error("overlay prefix exhausted: no free block", extra=fields(prefix=event.prefix))
