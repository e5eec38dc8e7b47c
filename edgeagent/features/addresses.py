"""Overlay addresses: glue between the feature host and :class:`overlay.ipam.Allocator`.

How it works. The allocator is sans-IO and lives on the agent's (main) loop. Gossip events
reach it through ``host.add_listener``; its claim goes back into the core's replicated
state (key ``"ipam"``) with ``host.set_state``; its timer is one ``loop.call_at``. Its
persisted state (the claim, the clock, named local addresses) is written atomically to
``<state_dir>/ipam.json`` by the host's state writer (off the main loop, retried on disk
errors) and the claim is published only once the save that holds it is on disk, so a
``kill -9`` at any moment restarts with the block the mesh last heard about (on a full disk
the claim waits, unpublished, until the write succeeds). Renumbering and exhaustion are logged.

Control commands: ``addresses`` (every claim this node knows, for ``edgeagent addresses``)
and ``address`` (``op`` = ``allocate`` | ``release`` | ``list`` with ``name``) for
``edgeagent address ...``. It registers :meth:`Addresses.resolve_node` with the host, so
mesh DNS (:mod:`edgeagent.features.dns`, when on) answers ``NODE.node.mesh`` from it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Any

from gossip import events as ev
from overlay.ipam import (
    STATE_KEY,
    Allocator,
    BlockClaimed,
    IpamError,
    PrefixExhausted,
    Renumbered,
)

from ..bridge import EventsDropped
from ..control import ControlError
from ..driver import View
from ..host import FeatureHost
from ..logs import fields
from ..persist import load_json

log = FeatureHost.logger("ipam")

STATE_FILE = "ipam.json"
# Removed when a copied state dir becomes a new node (agent): the copy claims a block afresh.
NODE_BOUND_FILES = (STATE_FILE,)
_MEMBER_EVENTS = ev.MEMBER_STATE_EVENTS


class Addresses:
    """The allocator of one agent, fed by its gossip events, served on its control socket."""

    def __init__(self) -> None:
        self._host: FeatureHost | None = None
        self._alloc: Allocator | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._saves_asked = 0  # saves of ipam.json requested ...
        self._saves_done = 0  # ... and known to be on disk (a later one covers earlier ones)
        self._unpublished: Any = None  # the claim update waiting for its save
        self._unpublished_gen = 0  # the save it waits for
        self._resyncing: asyncio.Task[None] | None = None  # re-reading claims after a drop

    @property
    def alloc(self) -> Allocator:
        """The allocator (once started)."""
        if self._alloc is None:
            raise RuntimeError("addresses feature not started")
        return self._alloc

    @property
    def host(self) -> FeatureHost:
        if self._host is None:
            raise RuntimeError("addresses feature not started")
        return self._host

    async def start(self, host: FeatureHost) -> None:
        """Build the allocator from its saved state, hook it in, catch up with the core."""
        config = host.config
        self._host = host
        self._loop = asyncio.get_running_loop()
        self.path = host.state_dir / STATE_FILE
        now = self._loop.time()
        persisted = load_json(self.path, None)
        self._alloc = Allocator(
            host.identity.name,
            host.identity.node_id,
            config.overlay_prefix,
            config.block_prefixlen,
            config.dead_quarantine_s,
            now,
            persisted if isinstance(persisted, dict) else None,
            wall_offset=time.time() - now,
            clock=host.clock,  # the agent's: restored from its saved reading
        )
        host.add_listener(self._on_update)
        host.register_command("addresses", self.cmd_addresses)
        host.register_command("address", self.cmd_address)
        host.add_status(self.status_fields)
        host.add_node_resolver(self.resolve_node)
        await self._catch_up()
        self._pump()

    async def stop(self) -> None:
        """Stop the timer (the claim stays published and saved)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._resyncing is not None:
            self._resyncing.cancel()

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
        """Feed the members and claims the core already knows (started after a join)."""
        now = self._loop.time()
        rows = await self.host.member_states(STATE_KEY)
        for member, claim in rows:
            self.alloc.on_member(member.name, member.state, now)
            if claim is not None:
                self.alloc.on_claim(member.name, claim, now)
        if any(member.name != self.alloc.node for member, _ in rows):
            self.alloc.synced(now)

    def _on_update(self, events: tuple[ev.Event, ...], view: View) -> None:
        now = self._loop.time()
        alloc = self.alloc
        for event in events:
            if isinstance(event, EventsDropped):  # the main loop stalled: re-read every claim
                self._resync()
            elif isinstance(event, ev.StateChanged):
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

    def _resync(self) -> None:
        if self._resyncing is None or self._resyncing.done():
            self._resyncing = self._loop.create_task(self._catch_up_and_pump())

    async def _catch_up_and_pump(self) -> None:
        """After dropped events: what the core holds now replaces what we missed."""
        rows = await self.host.member_states(STATE_KEY)
        now, alloc = self._loop.time(), self.alloc
        known = {member.name: claim for member, claim in rows}
        for row in alloc.claims():
            if row.node == alloc.node:
                continue
            if row.node not in known:
                alloc.on_reaped(row.node, now)  # reaped while we were not looking
            elif known[row.node] is None:
                alloc.on_claim(row.node, None, now)  # its claim was deleted
        await self._catch_up()
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
            self._saves_asked += 1
            gen, loop = self._saves_asked, self._loop
            future = self.host.saver.save_json(self.path, saved)
            future.add_done_callback(lambda f: _call_soon(loop, self._saved, gen, f))
        update = alloc.claim_to_publish()
        if update is not None and update.again:  # the same value again: nothing to save
            self.host.rebroadcast_state(STATE_KEY)
        elif update is not None:  # published once the state holding it is on disk
            self._unpublished, self._unpublished_gen = update, self._saves_asked
        self._publish_saved()
        while (event := alloc.next_event()) is not None:
            self._log_event(event)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        timer = alloc.get_timer()
        if timer is not None:
            self._timer = self._loop.call_at(timer, self._pump)

    def _saved(self, gen: int, future: Any) -> None:
        if future.exception() is None:  # else abandoned at shutdown: never published
            self._saves_done = max(self._saves_done, gen)
            self._publish_saved()

    def _publish_saved(self) -> None:
        update = self._unpublished
        if update is not None and self._unpublished_gen <= self._saves_done:
            self._unpublished = None
            self.host.set_state(STATE_KEY, update.value)

    @staticmethod
    def _log_event(event: object) -> None:
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


def _call_soon(loop: asyncio.AbstractEventLoop, fn: Any, *args: Any) -> None:
    """``fn(*args)`` on ``loop`` from any thread (a closed loop: we are stopping)."""
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:
        pass
