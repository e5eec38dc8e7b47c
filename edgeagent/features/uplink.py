"""The MQTT uplink feature (issue 11): one agent of the site carries mapped topics to the cloud.

On only with an ``[uplink]`` table (``edgeagent/config/uplink.py``); this module, aiomqtt
(through :mod:`edgeagent.mqtt_attach` and :mod:`edgeagent.uplink`) and the spool are imported
only then. It needs the MQTT feature (the config refuses ``[uplink]`` with MQTT off).

How it works:

- **Capability and holder.** The agent publishes ``uplink = {"v": 1, "site": S, "up": L}``
  in its replicated state and feeds an :class:`overlay.uplink_select.UplinkSelector` from
  gossip events (as the services feature feeds the catalog). Every capable agent computes
  the same holder from its view (best reachability level, then rendezvous hash, over ALIVE /
  SUSPECT candidates); only the holder runs the cloud client. The holder moves when it is
  declared DEAD or LEFT or when the levels say another candidate reaches the cloud and it
  does not.
- **Reachability.** ``L`` comes from :class:`overlay.uplink_select.Reach`, fed by the
  client's connect rounds (holder, drain) or by a probe every ``probe_s`` (an MQTT connect,
  then leave) while the agent has no client; a candidate at level 2 probes once more before
  it takes the uplink over, so a stale level does not move the uplink to an agent that
  cannot reach the cloud either (a total outage).
- **Data path, up.** Every capable agent is a socketless client of its own broker
  (:class:`edgeagent.mqtt_attach.BridgeClient`, conn id -2, client id
  ``edgeagent-uplink-NODE``) subscribed to the local filters of the ``out`` mappings, so the
  mesh's interest routing brings every matching publish of the site to every candidate. The
  holder maps the topic (local prefix -> remote prefix) and spools QoS 1 messages
  (:meth:`edgeagent.uplink.Uplink.append_many`, in order, one thread hop per burst); the
  client drains the spool to the cloud at QoS 1, acking it after the PUBACKs. QoS 0 goes out
  at once on a live connection, or is dropped (counted) when there is none.
- **Hot standby.** A candidate that does not hold keeps the last ``standby_s`` seconds (at
  most ``standby_max`` messages) of QoS 1 up-bound messages in memory; when it becomes the
  holder it spools them first. So messages the dead holder had taken but not yet delivered
  (or that the mesh routed to it just before it died) reach the cloud from the new holder:
  at-least-once, with up to ``standby_s`` of duplicates at a takeover.
- **Data path, down.** The holder subscribes in the cloud to the remote filters of the
  ``in`` mappings and publishes what arrives into its broker (remote prefix -> local
  prefix, QoS at most 1), and so across the mesh; those messages carry the user property
  ``edgeagent-uplink = NODE`` and are never sent up again (``loops_dropped``).
- **Handover.** A former holder whose spool still holds undelivered records keeps a
  connection (without down subscriptions) until it is drained (``mode = drain``), so a
  takeover, a restart as non-holder or a healed partition strands nothing.
- **Startup.** An agent that knows no other member yet waits :data:`HOLD_GRACE_S` before it
  holds, so a restarting agent does not grab the uplink for the moment before its first
  push-pull.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import itertools
import random
import ssl
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from gossip import events as ev
from overlay.mqtt.codec import check_topic_name
from overlay.mqtt.packets import (
    MQTT5,
    Connect,
    Properties,
    Publish,
    Subscribe,
    Subscription,
    Unsubscribe,
)
from overlay.mqtt.topics import filter_matches
from overlay.uplink_select import (
    STATE_KEY,
    UP,
    Reach,
    UplinkSelectError,
    UplinkSelector,
    encode_capability,
)

from ..bridge import EventsDropped
from ..config.schema import UplinkSettings, UplinkTopic
from ..driver import View
from ..errors import ConfigError
from ..host import FeatureHost
from ..logs import fields
from ..mqtt_attach import BridgeClient
from ..spool import Spool
from ..uplink import Uplink, UplinkConfig

if TYPE_CHECKING:
    from overlay.policy import Uplink as PolicyUplink

log = FeatureHost.logger("uplink")
MARKER = "edgeagent-uplink"  # user property on what came down from the cloud
SPOOL_DIR = "uplink-spool"
BRIDGE_CONN = -2  # attach mode's bridge is -1; real connections are >= 1
HOLD_GRACE_S = 2.0
CHECK_S = 1.0  # the mode is re-judged at least this often (spool drained, grace over)
WRITE_BATCH = 256
SPOOL_RETRY_S = 1.0


def to_remote(topics: tuple[UplinkTopic, ...], topic: str) -> tuple[UplinkTopic, str] | None:
    """The first ``out`` mapping of a local topic and its cloud topic."""
    for t in topics:
        if t.outbound and filter_matches(t.local_filter, topic):
            return t, t.remote_prefix + topic[len(t.local_prefix) :]
    return None


def to_local(topics: tuple[UplinkTopic, ...], topic: str) -> tuple[UplinkTopic, str] | None:
    """The first ``in`` mapping of a cloud topic and its local topic."""
    for t in topics:
        if t.inbound and filter_matches(t.remote_filter, topic):
            return t, t.local_prefix + topic[len(t.remote_prefix) :]
    return None


def policy_topics(mappings: Iterable[PolicyUplink]) -> tuple[UplinkTopic, ...]:
    """A policy bundle's ``mqtt.uplink`` mappings as this feature's: ``up`` sends a local
    topic matching ``local`` to ``remote + topic``, ``down`` brings ``remote + T`` back as
    T (for T matching ``local``); QoS 1, the message's own QoS if lower."""
    return tuple(
        UplinkTopic(m.local, "out" if m.direction == "up" else "in", 1, "", m.remote)
        for m in mappings
    )


def transport_config(
    settings: UplinkSettings, node: str, topics: tuple[UplinkTopic, ...] | None = None
) -> UplinkConfig:
    """The client's settings: cloud-side topics only (this feature maps them)."""
    topics = settings.topics if topics is None else topics
    return UplinkConfig(
        brokers=settings.brokers,
        tls=settings.tls,
        ca_file=str(settings.ca_file) if settings.ca_file else None,
        cert_file=str(settings.cert_file) if settings.cert_file else None,
        key_file=str(settings.key_file) if settings.key_file else None,
        username=settings.username,
        password=settings.password,
        up=("#",),
        down=tuple(dict.fromkeys(t.remote_filter for t in topics if t.inbound)),
        prefix="",
        primary_retry_s=settings.primary_retry_s,
        spool_max_bytes=settings.spool_max_bytes,
        ttl_s=settings.ttl_s,
        client_id=settings.client_id or f"edgeagent-uplink-{node}",
    )


def _check_tls(up: Uplink) -> None:
    """The TLS files load (else one ConfigError naming the keys, at start, not per connect)."""
    try:
        up.tls_context()
    except (ssl.SSLError, OSError, ValueError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(f"uplink.ca_file / cert_file / key_file: cannot load: {why}") from None


class UplinkFeature:
    """The uplink of one agent: capability, holder choice, bridge, spool, cloud client."""

    def __init__(self) -> None:
        self.settings: UplinkSettings | None = None
        self.selector: UplinkSelector | None = None
        self.spool: Spool | None = None
        self.up: Uplink | None = None
        self.mode = "off"  # "hold" | "drain" | "off"
        self.stats = {
            "up_spooled": 0, "up_qos0": 0, "up_qos0_dropped": 0, "down": 0, "down_dropped": 0,
            "loops_dropped": 0, "standby_dropped": 0, "takeovers": 0, "bad_values": 0,
            "spool_errors": 0, "client_failures": 0, "probes": 0, "probe_failures": 0,
            "level_changes": 0,
        }  # fmt: skip
        self.reach = Reach()
        self._site = ""
        self._probe_lock = asyncio.Lock()
        self._host: FeatureHost | None = None
        self._endpoint: Any = None
        self._bridge: BridgeClient | None = None
        self._ids = itertools.cycle(range(1, 65536))
        self._standby: collections.deque[tuple[float, str, bytes, bool]] = collections.deque()
        self._writes: collections.deque[tuple[str, bytes, bool]] = collections.deque()
        self._write_wake = asyncio.Event()
        self._changed = asyncio.Event()
        self._client: asyncio.Task[None] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._started = 0.0
        self._others_seen = False
        self._policy_topics: tuple[UplinkTopic, ...] = ()  # the policy bundle's mappings

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self, host: FeatureHost) -> None:
        settings = self.settings = host.config.uplink
        assert settings is not None
        mqtt = host.feature("mqtt")
        assert mqtt is not None and mqtt.endpoint is not None  # the config requires it
        self._host, self._endpoint = host, mqtt.endpoint
        node = host.identity.name
        site = settings.site or host.config.services_site or "default"
        try:
            self.selector = UplinkSelector(local=node, site=site)
        except UplinkSelectError as exc:  # a [services] site the uplink cannot use
            raise ConfigError(f"uplink.site: {exc} (got {site!r}); set uplink.site") from None
        path = host.state_dir / SPOOL_DIR
        try:
            self.spool = await asyncio.to_thread(Spool, path, max_bytes=settings.spool_max_bytes)
        except OSError as exc:
            raise ConfigError(
                f"uplink: cannot open the spool {path}: {exc.strerror or exc}"
            ) from None
        self.up = Uplink(transport_config(settings, node), self.spool, self._deliver_down)
        self.up.on_round = self._on_round
        _check_tls(self.up)
        self._site = site
        self.selector.set_local_level(self.reach.level)
        self._join_broker(node)
        policy = host.feature("policy")  # started before us when on
        if policy is not None:
            policy.on_change(lambda bundle: self.set_policy_topics(bundle.uplink if bundle else ()))
        host.add_listener(self._on_update)
        await self._catch_up()
        await asyncio.wrap_future(
            host.set_state(STATE_KEY, encode_capability(site, self.reach.level))
        )
        self._started = time.monotonic()
        self._tasks = [
            asyncio.create_task(self._write_loop(), name="uplink-spool"),
            asyncio.create_task(self._mode_loop(), name="uplink-mode"),
            asyncio.create_task(self._probe_loop(), name="uplink-probe"),
        ]
        host.add_status(lambda: {"uplink": self.status()})
        host.register_command("uplink", lambda request: self.status())
        log.info("uplink capable", extra=fields(site=site, brokers=len(settings.brokers)))

    async def stop(self) -> None:
        for task in [*self._tasks, *([self._client] if self._client else [])]:
            task.cancel()
        for task in [*self._tasks, *([self._client] if self._client else [])]:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks, self._client = [], None
        if self.up is not None and self._writes:
            await self.up.append_many(list(self._writes))  # taken, so kept for the next run
            self._writes.clear()
        if self.spool is not None:
            await asyncio.to_thread(self.spool.close)

    def status(self) -> dict[str, Any]:
        sel, up = self.selector, self.up
        return {
            "site": sel.site if sel else None,
            "holder": sel.holder() if sel else None,
            "mode": self.mode,
            "candidates": list(sel.candidates()) if sel else [],
            "connected_to": up.stats.connected_to if up else "",
            "sent": up.stats.sent if up else 0,
            "received": up.stats.received if up else 0,
            "connects": up.stats.connects if up else 0,
            "connect_failures": up.stats.connect_failures if up else 0,
            "standby": len(self._standby),
            "level": self.reach.level,
            **self.stats,
            "spool": self.spool.status() if self.spool else {},
        }

    # -- the holder --------------------------------------------------------------------------

    async def _catch_up(self) -> None:
        assert self._host is not None and self.selector is not None
        for member, value in await self._host.member_states(STATE_KEY):
            self._note_member(member.name, member.state)
            if value is not None and not self.selector.on_state(member.name, value):
                self.stats["bad_values"] += 1

    def _note_member(self, name: str, state: Any) -> None:
        assert self.selector is not None
        self.selector.on_member(name, state)
        if name != self.selector.local:
            self._others_seen = True

    def _on_update(self, events: tuple[ev.Event, ...], view: View) -> None:
        sel = self.selector
        assert sel is not None
        before = sel.holder()
        for event in events:
            if isinstance(event, ev.StateChanged):
                if event.key == STATE_KEY and not sel.on_state(
                    event.owner, None if event.deleted else event.value
                ):
                    self.stats["bad_values"] += 1
            elif isinstance(event, ev.MEMBER_STATE_EVENTS):
                self._note_member(event.member.name, event.member.state)
            elif isinstance(event, ev.MemberReaped):
                sel.on_reaped(event.member.name)
            elif isinstance(event, EventsDropped):
                for member in view.members:  # resync the states; values come by events
                    self._note_member(member.name, member.state)
        if sel.holder() != before:
            self._changed.set()

    def _wanted_mode(self) -> str:
        assert self.selector is not None and self.spool is not None
        grace = not self._others_seen and time.monotonic() - self._started < HOLD_GRACE_S
        if self.selector.i_hold() and not grace:
            return "hold"
        if self.mode != "off" and self.spool.pending > 0:
            return "drain"  # a former holder finishes what it spooled
        return "off"

    async def _mode_loop(self) -> None:
        while True:
            self._changed.clear()
            async with self._probe_lock:
                wanted = self._wanted_mode()
                if wanted == "hold" and self.mode != "hold" and not await self._pre_probe():
                    continue  # our level dropped: judge again at once
                self._set_mode(wanted)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), CHECK_S)

    # -- reachability (overlay.uplink_select.Reach) ------------------------------------------

    async def _pre_probe(self) -> bool:
        """Before taking the uplink as a reachable candidate, check the cloud answers now: a
        stale level 2 must not take the uplink from a holder that is failing (in a total
        cloud outage the uplink would only move to another agent that cannot reach it)."""
        assert self.up is not None
        if self.reach.level != UP:
            return True  # no reachable candidate is left: hold in any case (and spool)
        ok = bool(self.up.stats.connected_to) if self._client else await self._probe()
        if not ok:
            self._set_level(self.reach.failure(conclusive=True))
        return ok

    async def _probe(self) -> bool:
        assert self.up is not None
        self.stats["probes"] += 1
        ok = await self.up.probe()
        if not ok:
            self.stats["probe_failures"] += 1
        return ok

    async def _probe_loop(self) -> None:
        """A candidate without a cloud client probes it every ``probe_s`` (the first at once)."""
        assert self.settings is not None
        while True:
            async with self._probe_lock:
                if self.mode == "off" and self._client is None:
                    ok = await self._probe()
                    self._set_level(self.reach.success() if ok else self.reach.failure())
            # never sooner than probe_s: after an outage the holder reconnects first
            await asyncio.sleep(self.settings.probe_s * random.uniform(1.0, 1.2))

    def _on_round(self, ok: bool) -> None:
        """The cloud client's connect round (every broker tried once) succeeded or failed."""
        level = self.reach.success(self.mode == "hold") if ok else self.reach.failure()
        self._set_level(level)

    def _set_level(self, level: int) -> None:
        sel, host = self.selector, self._host
        assert sel is not None and host is not None
        if level == sel.level(sel.local):
            return
        log.info("uplink reachability", extra=fields(level=level, was=sel.level(sel.local)))
        sel.set_local_level(level)
        self.stats["level_changes"] += 1
        done = host.set_state(STATE_KEY, encode_capability(self._site, level))
        done.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._changed.set()

    def _set_mode(self, mode: str) -> None:
        client = self._client
        if client is not None and client.done() and not client.cancelled():
            log.error("uplink: client failed, restarting it", exc_info=client.exception())
            self._client = None
            self.stats["client_failures"] += 1
            if mode != "off":
                self._start_client(mode)
        if mode == self.mode:
            return
        assert self.up is not None and self.selector is not None
        log.info(
            "uplink mode",
            extra=fields(mode=mode, was=self.mode, holder=self.selector.holder() or "-"),
        )
        if self._client is not None:
            self._client.cancel()
            self._client = None
        if mode == "hold":
            self.stats["takeovers"] += 1
            self._take_standby()
        self.mode = mode
        if mode != "off":
            self._start_client(mode)

    def _start_client(self, mode: str) -> None:
        """The cloud client; a draining former holder subscribes to nothing down."""
        assert self.up is not None and self.selector is not None and self.settings is not None
        full = transport_config(self.settings, self.selector.local, self.topics)
        self.up.cfg = full if mode == "hold" else dataclasses.replace(full, down=())
        self._client = asyncio.create_task(self.up.run(), name="uplink-client")

    def _take_standby(self) -> None:
        """Becoming the holder: what the candidate remembers goes to the spool first."""
        recent = [(t, p, r) for _, t, p, r in self._standby]
        self._standby.clear()
        self._writes.extend(recent)  # after what a former hold left unwritten (older)
        if recent:
            self._write_wake.set()

    # -- topic mappings: the config's, then the policy's ----------------------------------------

    @property
    def topics(self) -> tuple[UplinkTopic, ...]:
        assert self.settings is not None
        return self.settings.topics + self._policy_topics

    def set_policy_topics(self, mappings: Iterable[PolicyUplink]) -> None:
        """A new bundle's mappings, at once: the bridge subscribes to new ``up`` filters and
        drops the ones no mapping needs any more; a holder's cloud client reconnects when
        the ``down`` filters changed (in-flight spool records stay in the spool)."""
        new = policy_topics(mappings)
        if new == self._policy_topics:
            return
        before_out = {t.local_filter for t in self.topics if t.outbound}
        before_down = {t.remote_filter for t in self.topics if t.inbound}
        self._policy_topics = new
        after_out = {t.local_filter for t in self.topics if t.outbound}
        added = tuple(
            Subscription(t.local_filter, min(t.qos, 1), no_local=True, retain_as_published=True)
            for t in new
            if t.outbound and t.local_filter not in before_out
        )
        if added:
            self._feed(Subscribe(next(self._ids), added))
        if before_out - after_out:
            self._feed(Unsubscribe(next(self._ids), tuple(sorted(before_out - after_out))))
        if {t.remote_filter for t in self.topics if t.inbound} != before_down and self._client:
            self._client.cancel()
            self._client = None
            self._start_client(self.mode)
        log.info("uplink policy mappings", extra=fields(mappings=len(new)))

    # -- the local broker side ---------------------------------------------------------------

    def _join_broker(self, node: str) -> None:
        assert self.settings is not None
        endpoint = self._endpoint
        bridge = self._bridge = BridgeClient(self, BRIDGE_CONN)
        endpoint.clients[bridge.conn] = bridge
        endpoint.run(None, lambda now: endpoint.broker.connect(bridge.conn, now))
        self._feed(Connect(f"edgeagent-uplink-{node}", protocol_level=MQTT5, keep_alive=0))
        subs = tuple(
            Subscription(t.local_filter, min(t.qos, 1), no_local=True, retain_as_published=True)
            for t in self.topics
            if t.outbound
        )
        if subs:
            self._feed(Subscribe(next(self._ids), subs))

    def _feed(self, packet: Any) -> None:
        bridge = self._bridge
        if bridge is not None:
            broker = self._endpoint.broker
            self._endpoint.run(None, lambda now: broker.receive(bridge.conn, packet, now))

    def later(self, packet: Any) -> None:
        """Answer the broker after its current call returns (no re-entry into it)."""
        asyncio.get_running_loop().call_soon(self._feed, packet)

    def from_broker(self, publish: Publish) -> None:
        """A message for an ``out`` mapping, from a local client or the mesh."""
        assert self.settings is not None and self.up is not None
        if any(k == MARKER for k, _ in publish.properties.user_properties or ()):
            self.stats["loops_dropped"] += 1
            return
        found = to_remote(self.topics, publish.topic)
        if found is None:
            return
        mapping, remote = found
        qos = min(publish.qos, mapping.qos)
        if self.mode == "hold" and qos == 0:
            ok = self.up.send_now(remote, publish.payload, publish.retain)
            self.stats["up_qos0" if ok else "up_qos0_dropped"] += 1
        elif self.mode == "hold":
            self._writes.append((remote, publish.payload, publish.retain))
            self._write_wake.set()
        elif qos:
            self._remember(remote, publish.payload, publish.retain)

    def _remember(self, remote: str, payload: bytes, retain: bool) -> None:
        assert self.settings is not None
        now = time.monotonic()
        ring, keep = self._standby, self.settings.standby_s
        while ring and (len(ring) >= self.settings.standby_max or ring[0][0] < now - keep):
            ring.popleft()
        if self.settings.standby_max and keep:
            ring.append((now, remote, payload, retain))
        else:
            self.stats["standby_dropped"] += 1

    async def _write_loop(self) -> None:
        assert self.up is not None
        while True:
            await self._write_wake.wait()
            self._write_wake.clear()
            while self._writes:
                n = min(len(self._writes), WRITE_BATCH)
                batch = [self._writes.popleft() for _ in range(n)]
                try:
                    self.stats["up_spooled"] += await self.up.append_many(batch)
                except OSError as exc:  # full or failing disk: keep them, retry
                    self._writes.extendleft(reversed(batch))
                    self.stats["spool_errors"] += 1
                    log.warning(
                        "uplink spool: cannot write, retrying", extra=fields(error=str(exc))
                    )
                    await asyncio.sleep(SPOOL_RETRY_S)

    async def _deliver_down(self, topic: str, payload: bytes, retain: bool) -> None:
        """A message from the cloud: into the local broker (and so the mesh), marked."""
        assert self.settings is not None and self.selector is not None
        found = to_local(self.topics, topic) if self.mode == "hold" else None
        limits = self._endpoint.limits
        if (
            found is None
            or len(payload) + len(found[1]) > limits.max_packet_bytes
            or (check_topic_name(found[1], limits))
        ):
            self.stats["down_dropped"] += 1
            return
        mapping, local = found
        qos = min(mapping.qos, 1)
        self.stats["down"] += 1
        self._feed(
            Publish(
                topic=local, payload=payload, qos=qos, retain=retain,
                packet_id=next(self._ids) if qos else None,
                properties=Properties(user_properties=((MARKER, self.selector.local),)),
            )
        )  # fmt: skip
