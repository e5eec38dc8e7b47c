"""MQTT across the mesh, the IO side: interest in replicated state, envelopes on the channel.

How it works (the decisions are sans-IO in :mod:`overlay.mqtt.mesh`; read its docstring first):

- **Interest.** Every :data:`INTEREST_PERIOD_S`, when the broker's ``subscriptions_version``
  moved, the local broker's filters are turned into the
  interest value (:func:`~overlay.mqtt.mesh.interest_value`); when it changed it is set in
  this node's replicated state (:data:`~overlay.mqtt.mesh.INTEREST_KEY`) and in the router at
  once. Peers' values come from ``StateChanged`` events (and a catch-up at start).
- **A local publish.** The broker asks :meth:`MeshLink.share_here` which share groups it
  serves (the router's plan, made once per message and kept for the ``RouteOut`` that
  follows in the same call); :meth:`MeshLink.route_out` puts one envelope per destination
  agent in that agent's outbox (:class:`_Outbox`): one task per destination sends what is
  queued in order, in batches of up to :data:`~overlay.mqtt.mesh.MAX_BATCH` per channel
  request (first byte :data:`PUBLISH_PREFIX`), so messages from this agent arrive in the
  order they were accepted and a burst costs one request, not one each. A retained message
  goes to every reachable agent. A batch holding QoS 1 or 2 is retried (the receiver drops
  duplicates by origin and sequence number) up to :data:`RETRIES` times while the
  destination is a reachable member; when it is gone, what its persistent sessions want
  (interest key ``d``) goes to an on-disk spool for it (:class:`_Outbox`), sent when it is
  back, and the rest is lost (counted: ``mesh_lost``); QoS 0 is sent once. Outboxes are
  bounded. With a held PUBACK (``RouteOut.ack``) :meth:`MeshLink.route_out` returns one
  future per destination, done once that destination acknowledged the batch (or the
  envelope is spooled): the endpoint sends the PUBACK after all of them.
- **A peer's batch** (:meth:`MeshLink.serve`): the origin must be the member the channel
  authenticated (mTLS: no agent can speak for another); retained values are merged by stamp
  (last writer wins), then the message is delivered to the plain subscribers and the share
  groups the envelope names, the whole batch in one broker call. A batch that put QoS 1/2
  messages into persistent sessions is answered only once they are saved
  (:attr:`MeshLink.durable`, :mod:`edgeagent.mqtt_sessions`), so a kill -9 of this agent
  cannot lose what the sender was told was delivered. A malformed envelope is answered,
  counted and dropped.
- **Retained anti-entropy.** Every :data:`DIGEST_PERIOD_S` (recomputed only when the retained
  store's ``version`` moved) this node's retained digest goes
  to its replicated state (:data:`~overlay.mqtt.mesh.RETAINED_KEY`) when it changed; a peer
  whose digest differs from ours is asked for its retained items (first byte
  :data:`RETAINED_PREFIX`, at most once per :data:`SYNC_INTERVAL_S` per peer), which are
  merged by stamp. Both sides pull, so a partition heals to the latest value on each topic.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import random
import time
from collections.abc import Callable
from typing import Any

from gossip import events as ev
from gossip.messages import MemberState
from overlay.mqtt.broker import Broker, Output, RouteOut
from overlay.mqtt.mesh import (
    INTEREST_KEY,
    MAX_BATCH,
    MAX_BATCH_BYTES,
    RETAINED_KEY,
    Envelope,
    MeshDecodeError,
    MeshRouter,
    Plan,
    decode_batch,
    decode_retained_items,
    encode_batch,
    encode_envelope,
    encode_retained_items,
    interest_value,
    retained_digest,
)
from overlay.mqtt.packets import NO_PROPERTIES, Properties, Publish
from overlay.mqtt.topics import SHARE_PREFIX
from overlay.pki import CertIdentity

from .channel import ChannelUnavailable
from .driver import View
from .host import FeatureHost
from .ratelimit import WarnLimiter
from .spool import Spool

log = FeatureHost.logger("mqtt")
PUBLISH_PREFIX = 0x10  # channel service byte: one routed message
RETAINED_PREFIX = 0x11  # channel service byte: "send me your retained items"
INTEREST_PERIOD_S = 0.25
DIGEST_PERIOD_S = 2.0
SYNC_INTERVAL_S = 5.0
SEND_TIMEOUT_S = 5.0
RETRIES = 5
MAX_QUEUED = 10_000  # envelopes waiting for one destination agent
MAX_QUEUED_BYTES = 8 << 20  # ... and their bytes
OK, REFUSED = b"\x00", b"\x01"
SPOOL_DIR = "mqtt-mesh-spool"  # under the state dir: one spool per destination agent
SPOOL_BYTES = 4 << 20  # per destination agent; beyond, the oldest segment goes (counted)
MAX_SPOOLS = 16  # destination agents with a spool at once (disk: at most 64 MiB); others lose
SPOOL_TTL_S = 7 * 24 * 3600.0  # the broker's longest session expiry
WARMUP_S = 5.0  # at most, after start, before clients are served (MeshLink.warm)
PROBE_S = 2.0
MAX_REFUSALS = 5  # the destination refused the spool's head so often: dropped, not retried
PIPELINE = 2  # batches in flight to one destination (a held PUBACK waits one round trip)  # how often an away destination's spool is tried


class MeshLink:
    """The mesh side of one agent's broker; see the module docstring."""

    def __init__(self, host: FeatureHost, channel: Any, rng: random.Random | None = None) -> None:
        self.host = host
        self.chan = channel  # the channel feature (features/channel.py)
        self.me = host.identity.name
        self.router = MeshRouter(self.me, rng or random.Random())
        self.broker: Broker | None = None
        self.run: Any = None  # Endpoint.run, set by the feature
        self.durable: Any = None  # SessionStore.durable when sessions are saved (the feature)
        # (peer, topic) -> the policy lets that peer's clients publish it (features/mqtt.py)
        self.may_publish: Callable[[str, str], bool] | None = None
        self.stats = {
            "mesh_sent": 0, "mesh_received": 0, "mesh_malformed": 0, "mesh_impostor": 0,
            "mesh_retries": 0, "mesh_lost": 0, "mesh_dropped_busy": 0, "retained_synced": 0,
            "retained_pulls": 0, "mesh_denied": 0, "mesh_spooled": 0, "mesh_unspooled": 0, "mesh_spool_dropped": 0,
            "mesh_spool_refused": 0,
        }  # fmt: skip
        self.spool_dir = host.state_dir / SPOOL_DIR
        self._pending: tuple[str, Plan] | None = None
        self._interest: Any = None
        self._digest: str | None = None
        self._seen_versions = (-1, -1)  # (subscriptions, retained) when last published
        self._peer_digests: dict[str, str] = {}
        self._pulled: dict[str, float] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._outboxes: dict[str, _Outbox] = {}
        self._warn = WarnLimiter(log)

    # -- set-up ------------------------------------------------------------------------

    async def start(self, broker: Broker, run: Any) -> None:
        self.broker, self.run = broker, run
        self.router.start_seq(self.host.clock.tick(time.time()).wall_ms << 20)
        self.chan.register(PUBLISH_PREFIX, self.serve)
        self.chan.register(RETAINED_PREFIX, self.serve_retained)
        for member, value in await self.host.member_states(INTEREST_KEY):
            if member.name != self.me:
                self.router.set_interest(member.name, value)
        for member, value in await self.host.member_states(RETAINED_KEY):
            if member.name != self.me and isinstance(value, str):
                self._peer_digests[member.name] = value
        self.host.add_listener(self._on_update)
        await self._reopen_spools()
        self._spawn(self._loop())

    async def _reopen_spools(self) -> None:
        """Spools left by the last run (this agent was stopped or killed while a destination
        was away): their messages are sent once that destination is reachable."""
        try:
            dirs = [d for d in self.spool_dir.iterdir() if d.is_dir()]
        except FileNotFoundError:
            return
        except OSError as exc:
            self.warn_spool("*", exc)
            return
        for where in dirs:
            try:
                node = bytes.fromhex(where.name).decode()
            except ValueError:
                continue  # not ours
            box = self._outbox(node)
            try:
                spool = await box._open_spool()
            except OSError as exc:
                self.warn_spool(node, exc)
                continue
            box.spooled = spool.pending

    def warn_spool(self, node: str, exc: OSError) -> None:
        self._warn.warn(f"spool {node}", time.monotonic(), "mqtt mesh: spool failed",
                        peer=node, why=str(exc))  # fmt: skip

    async def warm(self, joining: bool) -> None:
        """Return once this agent knows the other agents' interest: when it joins a mesh,
        every other ALIVE member has its retained digest here (its whole state arrived with
        it), or after :data:`WARMUP_S` (members without MQTT never publish one)."""
        deadline = time.monotonic() + WARMUP_S
        while joining and time.monotonic() < deadline:
            states = await self.host.member_states(RETAINED_KEY)
            others = [v for m, v in states if m.name != self.me and m.state == MemberState.ALIVE]
            if others and all(v is not None for v in others):
                return
            await asyncio.sleep(0.05)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def stop(self) -> None:
        for box in self._outboxes.values():
            box.close()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task
        for box in self._outboxes.values():
            if box.spool is not None:
                with contextlib.suppress(OSError):
                    await asyncio.to_thread(box.spool.close)

    def _on_update(self, events: tuple[ev.Event, ...], view: View) -> None:
        for event in events:
            if isinstance(event, ev.MemberReaped):
                # gone for good: nothing more is spooled for it
                self.router.remove(event.member.name)
                continue
            if not isinstance(event, ev.StateChanged) or event.owner == self.me:
                continue
            value = None if event.deleted else event.value
            if event.key == INTEREST_KEY:
                self.router.set_interest(event.owner, value)
            elif event.key == RETAINED_KEY:
                if isinstance(value, str):
                    self._peer_digests[event.owner] = value
                else:
                    self._peer_digests.pop(event.owner, None)

    async def _loop(self) -> None:
        last_digest = 0.0
        while True:
            await asyncio.sleep(INTEREST_PERIOD_S)
            try:
                self._publish_interest()
                for box in self._outboxes.values():
                    box.tend()
                if time.monotonic() - last_digest >= DIGEST_PERIOD_S:
                    last_digest = time.monotonic()
                    self._publish_digest()
                    self._pull_retained()
                    for box in self._outboxes.values():
                        if box.spool is not None:  # the group fsync of an idle spool
                            await asyncio.to_thread(box.spool.sync_if_due)
            except Exception:
                log.exception("mqtt mesh: periodic work failed")

    # -- interest and digests ------------------------------------------------------------

    def _publish_interest(self) -> None:
        assert self.broker is not None
        version = self.broker.subscriptions_version
        if version == self._seen_versions[0]:
            return  # no subscription added or removed since: filters() is what we published
        self._seen_versions = (version, self._seen_versions[1])
        plain, shares = [], []
        durable = [
            text for session in self.broker.persistent_sessions()
            for text in session.subscriptions if not text.startswith(SHARE_PREFIX)
        ]  # fmt: skip
        for text in self.broker.filters():
            if text.startswith(SHARE_PREFIX):
                group, _, topic_filter = text[len(SHARE_PREFIX) :].partition("/")
                shares.append((group, topic_filter))
            else:
                plain.append(text)
        value = interest_value(plain, shares, durable)
        if value == self._interest:
            return
        self._interest = value
        self.router.set_interest(self.me, value)
        if value is None:
            self.host.delete_state(INTEREST_KEY)
        else:
            self.host.set_state(INTEREST_KEY, value)

    def _publish_digest(self) -> None:
        assert self.broker is not None
        version = self.broker.retained.version
        if version == self._seen_versions[1]:
            return  # the retained store did not change: neither did its digest
        self._seen_versions = (self._seen_versions[0], version)
        digest = retained_digest((i.topic, i.stamp) for i in self.broker.retained_items())
        if digest != self._digest:
            self._digest = digest
            self.host.set_state(RETAINED_KEY, digest)

    def _pull_retained(self) -> None:
        now = time.monotonic()
        for node in self.chan.peers.names():
            theirs = self._peer_digests.get(node)
            if node == self.me or theirs is None or theirs == self._digest:
                continue
            if now - self._pulled.get(node, -1e9) < SYNC_INTERVAL_S:
                continue
            self._pulled[node] = now
            self._spawn(self._pull(node))

    async def _pull(self, node: str) -> None:
        try:
            reply = await self.chan.request(node, bytes([RETAINED_PREFIX]), SEND_TIMEOUT_S)
            rows = decode_retained_items(reply)
        except (TimeoutError, ChannelUnavailable, MeshDecodeError) as exc:
            self._warn.warn(f"pull {node}", time.monotonic(), "mqtt mesh: retained sync failed",
                            peer=node, why=str(exc))  # fmt: skip
            return
        self.stats["retained_pulls"] += 1
        self._merge_retained(rows)

    def _merge_retained(
        self,
        rows: list[tuple[str, bytes, int, tuple[int, int, str]]],
        props: Properties = NO_PROPERTIES,
    ) -> None:
        """Apply retained values from a peer, last writer (by stamp) wins."""
        assert self.broker is not None
        now = asyncio.get_running_loop().time()
        for topic, payload, qos, stamp in rows:
            if self.broker.set_retained_from_mesh(topic, payload, qos, props, stamp, now):
                self.stats["retained_synced"] += 1

    async def serve_retained(self, identity: CertIdentity, data: bytes) -> bytes:
        assert self.broker is not None
        rows = [
            (i.topic, i.payload, i.qos, i.stamp)
            for i in self.broker.retained_items()
            if isinstance(i.stamp, tuple)
        ]
        return encode_retained_items(rows)

    # -- the data path -------------------------------------------------------------------

    def stamp(self, now: float) -> tuple[int, int, str]:
        """The retained stamp of a message accepted here: hybrid clock reading and our name."""
        ts = self.host.clock.tick(time.time())
        return (ts.wall_ms, ts.counter, self.me)

    def share_here(self, topic: str) -> set[str]:
        plan = self.router.plan(topic, self.chan.peers.names())
        self._pending = (topic, plan)
        return {g for g, node in plan.shares.items() if node == self.me}

    def route_out(self, out: RouteOut) -> list[asyncio.Future[bool]]:
        """Queue the message for every agent that needs it; with ``out.ack`` (a QoS 1 PUBACK
        held by the broker), one future per destination, True once it acknowledged the batch
        (False: lost, counted), for the endpoint to send the PUBACK after."""
        pub = out.publish
        pending, self._pending = self._pending, None
        plan = pending[1] if pending and pending[0] == pub.topic else None
        if plan is None:
            plan = self.router.plan(pub.topic, self.chan.peers.names())
        dests = plan.destinations(self.me)
        stamp = out.retain_stamp if pub.retain and isinstance(out.retain_stamp, tuple) else None
        live = self.chan.peers.names()
        if stamp is not None:  # a retained value goes everywhere (late subscribers)
            for node in live - {self.me}:
                dests.setdefault(node, (False, ()))
        if pub.qos:  # persistent sessions on agents away: spooled until they are back
            for node in self.router.absent_keepers(pub.topic, live):
                dests.setdefault(node, (True, ()))
        waits: list[asyncio.Future[bool]] = []
        if not dests:
            return waits
        seq = self.router.next_seq()
        for node, (plain, groups) in dests.items():
            env = Envelope(
                self.me, seq, pub.topic, pub.payload, pub.qos, pub.retain, plain, groups,
                stamp, 1, out.sender or None, pub.properties,
            )  # fmt: skip
            done = self._outbox(node).put(env, out.ack is not None and pub.qos > 0)
            if done is not None:
                waits.append(done)
        return waits

    def _outbox(self, node: str) -> _Outbox:
        box = self._outboxes.get(node)
        if box is None:
            box = self._outboxes[node] = _Outbox(self, node)
        return box

    async def serve(self, identity: CertIdentity, data: bytes) -> bytes:
        """A peer's batch of envelopes, in order: merge retained values, deliver, reply OK."""
        try:
            envelopes = decode_batch(data[1:])
        except MeshDecodeError as exc:
            self.stats["mesh_malformed"] += 1
            self._warn.warn(f"bad {identity.name}", time.monotonic(),
                            "mqtt mesh: malformed envelope", peer=identity.name, why=str(exc))  # fmt: skip
            return REFUSED
        if any(env.origin != identity.name for env in envelopes):
            self.stats["mesh_impostor"] += 1
            self._warn.warn(f"impostor {identity.name}", time.monotonic(),
                            "mqtt mesh: envelope names another origin", peer=identity.name)  # fmt: skip
            return REFUSED
        if self.may_publish is not None:
            allowed = [env for env in envelopes if self.may_publish(identity.name, env.topic)]
            self.stats["mesh_denied"] += len(envelopes) - len(allowed)
            envelopes = allowed  # dropped, yet acknowledged: a retry would be refused again
        assert self.broker is not None
        version = self.broker.persist_version
        self._deliver(envelopes)
        if self.durable is not None and self.broker.persist_version != version:
            try:  # QoS 1/2 went into persistent sessions: acknowledge once they are on disk
                await self.durable()
            except OSError:
                return REFUSED
        return OK

    def _deliver(self, envelopes: list[Envelope]) -> None:
        """The batch's messages into the broker in one call (one timer re-arm, not one each)."""
        assert self.broker is not None and self.run is not None
        self.stats["mesh_received"] += len(envelopes)
        broker = self.broker
        todo: list[tuple[Publish, Envelope]] = []
        for env in envelopes:
            if env.retain and env.stamp is not None:
                self._merge_retained([(env.topic, env.payload, env.qos, env.stamp)], env.properties)
            if self.router.accept(env) and (env.plain or env.groups):
                publish = Publish(
                    env.topic, env.payload, env.qos, env.retain, properties=env.properties
                )
                todo.append((publish, env))
        if not todo:
            return

        def deliver_all(now: float) -> list[Output]:
            out: list[Output] = []
            for publish, env in todo:
                out += broker.publish_from_mesh(publish, env.client_id, now, env.plain, env.groups)
            return out

        self.run(None, deliver_all)

    def spools(self) -> int:
        return sum(1 for box in self._outboxes.values() if box.spool is not None)

    def status(self) -> dict[str, Any]:
        interested = sum(
            1 for n, i in self.router.interest.items() if n != self.me and (i.plain or i.shares)
        )
        return {
            **self.stats,
            **{f"router_{k}": v for k, v in vars(self.router.stats).items()},
            "router_interest_nodes": interested,
            "mesh_spool_pending": sum(box.spooled for box in self._outboxes.values()),
            "mesh_spool_expired": sum(
                box.spool.stats.dropped_expired for box in self._outboxes.values() if box.spool
            ),
        }


_Queued = tuple[Envelope, bytes, "asyncio.Future[bool] | None"]  # envelope, bytes, who waits


class _Outbox:
    """Envelopes for one destination agent, sent in order, batched, retried (see the docstring).

    Bounded by :data:`MAX_QUEUED` envelopes and :data:`MAX_QUEUED_BYTES`: beyond, the new
    envelope is dropped (QoS 0: ``mesh_dropped_busy``; QoS 1 and 2: ``mesh_lost``).

    The spool (:class:`edgeagent.spool.Spool` in ``STATE_DIR/mqtt-mesh-spool/<node hex>/``,
    opened when first needed): a QoS 1/2 envelope that a persistent session on the
    destination wants (:meth:`MeshRouter.keeps`) goes there instead of being lost when the
    destination is away (not a reachable member, or a batch failed after its retries); while
    the spool holds anything, such envelopes are appended behind it (order kept), and the
    drain sends the spool first, then the memory queue. A spooled envelope's future is done
    once it is written (a plain write: kill -9 of this agent keeps it).
    """

    def __init__(self, link: MeshLink, node: str) -> None:
        self.link, self.node = link, node
        self.queue: collections.deque[_Queued] = collections.deque()
        self.bytes = 0
        self.task: asyncio.Task[None] | None = None
        self.spool: Spool | None = None
        self.spooled = 0  # records in the spool (or on their way there) not yet delivered
        self.to_spool: list[_Queued] = []
        self.writer: asyncio.Task[None] | None = None
        self.retry_at = 0.0  # monotonic: when to try the spool's head again after a failure
        self.refusals = 0  # answers other than OK to the spool's head in a row

    def live(self) -> bool:
        return self.node in self.link.chan.peers.names()

    def worth_spooling(self, env: Envelope) -> bool:
        if not (env.qos > 0 and env.plain and self.link.router.keeps(self.node, env.topic)):
            return False
        return self.spooled > 0 or self.spool is not None or self.link.spools() < MAX_SPOOLS

    def put(self, env: Envelope, tracked: bool = False) -> asyncio.Future[bool] | None:
        """Queue one envelope; ``tracked``: return a future, True once the destination
        acknowledged the batch holding it (or it is spooled), False when dropped or lost."""
        data = encode_envelope(env)
        stats = self.link.stats
        done = asyncio.get_running_loop().create_future() if tracked else None
        if (self.spooled or not self.live()) and self.worth_spooling(env):
            self._spool([(env, data, done)])
            return done
        if (
            not self.live()
            or len(self.queue) >= MAX_QUEUED
            or self.bytes + len(data) > MAX_QUEUED_BYTES
        ):
            stats["mesh_dropped_busy" if env.qos == 0 else "mesh_lost"] += 1
            if done is not None:
                done.set_result(False)
            return done
        self.queue.append((env, data, done))
        self.bytes += len(data)
        self.kick()
        return done

    def kick(self) -> None:
        if self.task is None:
            self.task = asyncio.ensure_future(self._drain())

    def _batch(self) -> list[_Queued]:
        batch: list[_Queued] = []
        size = 0
        while self.queue and len(batch) < MAX_BATCH:
            data = self.queue[0][1]
            if batch and size + len(data) + 4 > MAX_BATCH_BYTES - 16:
                break
            batch.append(self.queue.popleft())
            self.bytes -= len(data)
            size += len(data) + 4
        return batch

    async def _drain(self) -> None:
        """Send the spool, then the memory queue: up to :data:`PIPELINE` batches in flight
        (each with its own retries), settled in order; a batch that fails sends it and
        every later one still unsettled to :meth:`_away`."""
        inflight: collections.deque[tuple[list[_Queued], asyncio.Task[bool]]] = collections.deque()
        try:
            while self.spooled or self.queue or inflight:
                if self.spooled and not inflight:
                    if not await self._drain_spool():
                        if not self.live():
                            self._away([])
                        return  # away still: the link's loop kicks us again (retry_at)
                    continue
                while self.queue and not self.spooled and len(inflight) < PIPELINE:
                    batch = self._batch()
                    data = bytes([PUBLISH_PREFIX]) + encode_batch([d for _, d, _ in batch])
                    send = asyncio.ensure_future(self._send(data, any(e.qos for e, _, _ in batch)))
                    inflight.append((batch, send))
                if not inflight:
                    continue
                batch, send = inflight[0]
                ok = await send
                inflight.popleft()
                if ok:
                    self._settle(batch, True)
                    continue
                failed = batch
                while inflight:  # what was sent beside it: settled as it went
                    later, send = inflight.popleft()
                    if await send:
                        self._settle(later, True)
                    else:
                        failed = failed + later
                self._away(failed)
        finally:
            for batch, send in inflight:  # stopped mid-batch: no PUBACK for these (cancelled)
                send.cancel()
                for _, _, done in batch:
                    if done is not None:
                        done.cancel()
            self.task = None

    def _away(self, batch: list[_Queued]) -> None:
        """The destination is away: what its persistent sessions want goes to the spool
        (behind what is there), the rest is lost (counted)."""
        rest = batch + list(self.queue)
        self.queue.clear()
        self.bytes = 0
        self._settle([q for q in rest if not self.worth_spooling(q[0])], False)
        self._spool([q for q in rest if self.worth_spooling(q[0])])
        self.retry_at = time.monotonic() + PROBE_S

    def _settle(self, batch: list[_Queued], ok: bool) -> None:
        stats = self.link.stats
        for env, _, done in batch:
            if ok:
                stats["mesh_sent"] += 1
            else:
                stats["mesh_lost" if env.qos else "mesh_dropped_busy"] += 1
            if done is not None and not done.done():
                done.set_result(ok)

    # -- the spool -----------------------------------------------------------------------

    def _spool(self, items: list[_Queued]) -> None:
        if not items:
            return
        self.to_spool += items
        self.spooled += len(items)
        if self.writer is None:
            self.writer = asyncio.ensure_future(self._write_spool())

    async def _open_spool(self) -> Spool:
        if self.spool is None:
            where = self.link.spool_dir / self.node.encode().hex()
            self.spool = await asyncio.to_thread(Spool, where, max_bytes=SPOOL_BYTES)
        return self.spool

    async def _write_spool(self) -> None:
        """Append what waits for the spool, in order, one thread hop per run (not per message)."""
        stats = self.link.stats
        try:
            while self.to_spool:
                items, self.to_spool = self.to_spool, []
                try:
                    spool = await self._open_spool()
                    before = spool.stats.dropped_full
                    seqs = await asyncio.to_thread(_append_all, spool, [d for _, d, _ in items])
                    stats["mesh_spool_dropped"] += spool.stats.dropped_full - before
                except OSError as exc:
                    self.link.warn_spool(self.node, exc)
                    seqs = [None] * len(items)
                for (_, _, done), seq in zip(items, seqs, strict=True):
                    if seq is None:  # too large for the spool, or it cannot be written
                        self.spooled -= 1
                        stats["mesh_lost"] += 1
                    else:
                        stats["mesh_spooled"] += 1
                    if done is not None and not done.done():
                        done.set_result(seq is not None)
        finally:
            self.writer = None

    async def _drain_spool(self) -> bool:
        """One batch from the spool's head to the destination; False if it is away."""
        if self.writer is not None or not self.live() or time.monotonic() < self.retry_at:
            if self.writer is not None:
                await asyncio.sleep(0.01)  # let the appends land first, then send them
                return True
            return False
        spool = await self._open_spool()
        records = await asyncio.to_thread(spool.peek, MAX_BATCH)
        if not records:  # expired or dropped while away
            self.spooled = len(self.to_spool) + (self.writer is not None)
            return True
        data = bytes([PUBLISH_PREFIX]) + encode_batch([r.payload for r in records])
        try:
            reply = await self.link.chan.request(self.node, data, SEND_TIMEOUT_S)
        except (ChannelUnavailable, TimeoutError):
            reply = REFUSED
        if reply != OK:
            self.retry_at = time.monotonic() + PROBE_S
            self.refusals += reply == REFUSED  # an answer, not an outage
            if self.refusals < MAX_REFUSALS:
                return False
            self.link.stats["mesh_lost"] += len(records)  # refused again and again: drop it
            self.link.stats["mesh_spool_refused"] += len(records)
        self.refusals = 0
        await asyncio.to_thread(spool.ack, records[-1].seq)
        self.spooled = max(0, self.spooled - len(records))
        if reply == OK:
            self.link.stats["mesh_sent"] += len(records)
            self.link.stats["mesh_unspooled"] += len(records)
        return True

    def tend(self) -> None:
        """The link's periodic loop: try the spool again when due; fail over what waits in
        memory for a destination that went away meanwhile."""
        if self.task is not None or not (self.spooled or self.queue):
            return
        if not self.live():
            self._away([])
        elif time.monotonic() >= self.retry_at:
            self.kick()

    async def _send(self, data: bytes, reliable: bool) -> bool:
        """One batch; retried (QoS 1/2 in it) while the destination is a member we can reach."""
        link = self.link
        for attempt in range(RETRIES + 1 if reliable else 1):
            if attempt:
                link.stats["mesh_retries"] += 1
                await asyncio.sleep(min(0.2 * 2**attempt, 5.0))
                if self.node not in link.chan.peers.names():
                    return False
            try:
                reply = await link.chan.request(self.node, data, SEND_TIMEOUT_S)
            except (ChannelUnavailable, TimeoutError):
                continue
            return bool(reply == OK)
        return False

    def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
        if self.writer is not None:
            self.writer.cancel()


def _append_all(spool: Spool, records: list[bytes]) -> list[int | None]:
    """In a worker thread: append encoded envelopes (plain writes; fsync grouped by the spool)."""
    return [spool.append("m", data, ttl=SPOOL_TTL_S) for data in records]
