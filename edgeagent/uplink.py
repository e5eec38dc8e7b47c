"""The MQTT uplink client: carries QoS 1 messages from the site to a cloud broker and back.

:class:`UplinkConfig` is the transport's settings; the agent builds it from ``[uplink]``
(``edgeagent/config/uplink.py``) in ``features/uplink.py``, which maps topics itself and
hands this client cloud-side topics (``up = ("#",)``, no prefix, ``down`` = the cloud-side
filters of the ``in`` mappings).

Failover and back, as mosquitto's bridge ``address a b`` with ``round_robin false``: connect
to the first broker that answers, in order; when the connection drops start again from the
first; while on a secondary, every ``primary_retry_s`` a connection to the primary is tried
*beside* the current one, and only once it is up is the secondary closed (no gap).

Store-and-forward: every message bound for the cloud goes through the spool
(:mod:`edgeagent.spool`), connected or not: :meth:`Uplink.send` only appends (so local
publishers never wait on the cloud), and the drainer publishes the oldest records in
batches, QoS 1, and acks them in the spool once the cloud broker's PUBACKs are in. Order is
the spool's order; a message whose PUBACK was lost with the connection is sent again on the
next (at-least-once, never lost). aiomqtt is imported only when an uplink is configured.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .spool import DEFAULT_MAX_BYTES, Spool

if TYPE_CHECKING:
    import aiomqtt

log = logging.getLogger(__name__)

BATCH = 10  # aiomqtt warns above 10 publishes awaiting their PUBACK
BACKOFF_MIN_S = 0.5
BACKOFF_MAX_S = 30.0


@dataclass(frozen=True)
class UplinkConfig:
    brokers: tuple[tuple[str, int], ...]
    tls: bool = False
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    username: str | None = None
    password: str | None = None
    up: tuple[str, ...] = ("#",)
    down: tuple[str, ...] = ()
    prefix: str = ""
    primary_retry_s: float = 30.0
    spool_max_bytes: int = DEFAULT_MAX_BYTES
    ttl_s: float = 86400.0
    client_id: str = ""


def topic_matches(filt: str, topic: str) -> bool:
    """MQTT topic filter match (``+`` one level, ``#`` the rest); $-topics only explicitly."""
    f_parts, t_parts = filt.split("/"), topic.split("/")
    if topic.startswith("$") and not filt.startswith("$"):
        return False
    for i, part in enumerate(f_parts):
        if part == "#":
            return True
        if i >= len(t_parts) or (part != "+" and part != t_parts[i]):
            return False
    return len(f_parts) == len(t_parts)


@dataclass
class UplinkStats:
    connected_to: str = ""
    connects: int = 0
    connect_failures: int = 0
    failovers_back: int = 0
    sent: int = 0
    received: int = 0


@dataclass
class Uplink:
    """One agent's uplink: :meth:`send` spools, :meth:`run` connects and drains."""

    cfg: UplinkConfig
    spool: Spool
    deliver_down: Callable[[str, bytes, bool], Awaitable[None]] | None = None
    on_round: Callable[[bool], None] | None = None  # each connect round: reached the cloud?
    stats: UplinkStats = field(default_factory=UplinkStats)
    _wake: asyncio.Event = field(default_factory=asyncio.Event)
    _live: aiomqtt.Client | None = None  # the connection being drained into, if any

    def wants(self, topic: str) -> bool:
        """True if a local message on ``topic`` goes up."""
        return any(topic_matches(f, topic) for f in self.cfg.up)

    async def send(self, topic: str, payload: bytes, retain: bool = False) -> bool:
        """Spool a local message for the cloud (False if it is not mapped up or too large)."""
        if not self.wants(topic):
            return False
        ttl = self.cfg.ttl_s or None
        seq = await asyncio.to_thread(
            self.spool.append, self.cfg.prefix + topic, payload, retain=retain, ttl=ttl
        )
        self._wake.set()
        return seq is not None

    async def append_many(self, items: list[tuple[str, bytes, bool]]) -> int:
        """Spool ``(cloud topic, payload, retain)`` records in order, in one thread hop;
        how many were taken (the rest were too large, counted by the spool)."""
        ttl = self.cfg.ttl_s or None

        def write() -> int:
            return sum(self.spool.append(t, p, retain=r, ttl=ttl) is not None for t, p, r in items)

        taken = await asyncio.to_thread(write)
        self._wake.set()
        return taken

    def send_now(self, topic: str, payload: bytes, retain: bool = False) -> bool:
        """QoS 0: publish at once on the live connection, not spooled (False: none, dropped)."""
        client = self._live
        if client is None:
            return False
        task = asyncio.ensure_future(client.publish(topic, payload, qos=0, retain=retain))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        return True

    def tls_context(self) -> ssl.SSLContext | None:
        if not self.cfg.tls:
            return None
        ctx = ssl.create_default_context(cafile=self.cfg.ca_file)
        if self.cfg.cert_file and self.cfg.key_file:
            ctx.load_cert_chain(self.cfg.cert_file, self.cfg.key_file)
        return ctx

    def _client(self, index: int) -> aiomqtt.Client:
        import aiomqtt  # only when an uplink is configured and running

        host, port = self.cfg.brokers[index]
        return aiomqtt.Client(
            hostname=host,
            port=port,
            identifier=self.cfg.client_id or None,
            protocol=aiomqtt.ProtocolVersion.V5,
            username=self.cfg.username,
            password=self.cfg.password,
            tls_context=self.tls_context(),
            timeout=10,
            keepalive=30,
        )

    async def _connect_first(self) -> tuple[aiomqtt.Client, int] | None:
        """The first broker, in order, that accepts a connection."""
        import aiomqtt

        for index in range(len(self.cfg.brokers)):
            client = self._client(index)
            try:
                await client.__aenter__()
            except (aiomqtt.MqttError, OSError) as exc:
                self.stats.connect_failures += 1
                log.info("uplink: %s:%d: %s", *self.cfg.brokers[index], exc)
                continue
            return client, index
        return None

    async def probe(self) -> bool:
        """Whether a broker accepts an MQTT connection now (connects in order, then leaves).

        Uses the client id of :meth:`run`: call it only while :meth:`run` is not running."""
        got = await self._connect_first()
        if got is None:
            return False
        with contextlib.suppress(Exception):
            await got[0].__aexit__(None, None, None)
        return True

    def _round(self, ok: bool) -> None:
        if self.on_round is not None:
            self.on_round(ok)

    async def run(self) -> None:
        """Connect, drain, fail over and back, forever (cancel to stop)."""
        import aiomqtt

        backoff = BACKOFF_MIN_S
        while True:
            got = await self._connect_first()
            self._round(got is not None)
            if got is None:
                self.stats.connected_to = ""
                await asyncio.sleep(backoff * random.uniform(0.5, 1.0))
                backoff = min(backoff * 2, BACKOFF_MAX_S)
                continue
            backoff = BACKOFF_MIN_S
            client: aiomqtt.Client | None = got[0]
            index = got[1]
            while client is not None:
                self.stats.connects += 1
                host, port = self.cfg.brokers[index]
                self.stats.connected_to = f"{host}:{port}"
                log.info("uplink: connected to %s", self.stats.connected_to)
                try:
                    client, index = await self._session(client, index)
                except aiomqtt.MqttError as exc:
                    log.warning("uplink: %s lost: %s", self.stats.connected_to, exc)
                    client = None
            self.stats.connected_to = ""

    async def _session(
        self, client: aiomqtt.Client, index: int
    ) -> tuple[aiomqtt.Client | None, int]:
        """Serve one connection; returns the primary's client when it failed back to it."""
        reader = asyncio.create_task(self._read_down(client))
        self._live = client
        try:
            from paho.mqtt.subscribeoptions import SubscribeOptions

            for filt in self.cfg.down:  # no_local: what we sent up does not come back down
                await client.subscribe(filt, options=SubscribeOptions(qos=1, noLocal=True))
            return await self._drain(client, index, reader)
        finally:
            self._live = None
            reader.cancel()
            with contextlib.suppress(BaseException):
                await reader
            with contextlib.suppress(Exception):
                await client.__aexit__(None, None, None)

    async def _drain(
        self, client: aiomqtt.Client, index: int, reader: asyncio.Task[None]
    ) -> tuple[aiomqtt.Client | None, int]:
        loop = asyncio.get_running_loop()
        next_probe = loop.time() + self.cfg.primary_retry_s
        while True:
            if index > 0 and loop.time() >= next_probe:
                primary = await self._probe_primary()
                if primary is not None:
                    self.stats.failovers_back += 1
                    return primary, 0
                next_probe = loop.time() + self.cfg.primary_retry_s
            batch = await asyncio.to_thread(self.spool.peek, BATCH)
            if not batch:
                self._wake.clear()
                wait = max(0.05, next_probe - loop.time()) if index > 0 else 1.0
                with contextlib.suppress(TimeoutError):
                    await _unless_lost(asyncio.wait_for(self._wake.wait(), wait), reader)
                await asyncio.to_thread(self.spool.sync_if_due)
                continue
            await _unless_lost(
                asyncio.gather(
                    *(client.publish(r.topic, r.payload, qos=1, retain=r.retain) for r in batch)
                ),
                reader,
            )
            await asyncio.to_thread(self.spool.ack, batch[-1].seq)
            self.stats.sent += len(batch)

    async def _probe_primary(self) -> aiomqtt.Client | None:
        import aiomqtt

        client = self._client(0)
        try:
            await client.__aenter__()
        except (aiomqtt.MqttError, OSError):
            return None
        return client

    async def _read_down(self, client: aiomqtt.Client) -> None:
        async for msg in client.messages:
            self.stats.received += 1
            if self.deliver_down is None or not isinstance(msg.payload, bytes):
                continue
            try:
                await self.deliver_down(str(msg.topic), msg.payload, bool(msg.retain))
            except Exception:  # a local delivery failure must not look like a lost uplink
                log.exception("uplink: delivering %s from the cloud failed", msg.topic)


async def _unless_lost(aw: Awaitable[Any], reader: asyncio.Task[None]) -> Any:
    """Await ``aw`` unless the connection drops first (the reader of ``messages`` ends).

    aiomqtt leaves a publish awaiting its PUBACK until its timeout when the connection
    drops; this turns the drop into an MqttError at once, so the failover does not wait.
    """
    import aiomqtt

    task = asyncio.ensure_future(aw)
    done, _ = await asyncio.wait({task, reader}, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        return task.result()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    exc = reader.exception() if not reader.cancelled() else None
    if isinstance(exc, aiomqtt.MqttError):
        raise exc
    raise aiomqtt.MqttError("uplink connection lost")
