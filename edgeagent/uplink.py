"""The MQTT uplink client: carries QoS 1 messages from the site to a cloud broker and back.

Config (``[uplink]``)::

    brokers = ["cloud-a.example:8883", "cloud-b.example:8883"]  # tried in order
    tls = true                      # default true when any TLS file is given
    ca_file = "cloud-ca.pem"        # else the system trust store
    cert_file = "node.pem"          # client certificate (optional)
    key_file = "node.key"
    username = "site1"              # optional, with password
    password = "..."
    up = ["sensors/#"]              # local topic filters sent to the cloud
    down = ["cmd/site1/#"]          # cloud topic filters delivered to the local broker
    prefix = "site1/"               # prepended on the way up (not on the way down)
    primary_retry_s = 30            # while on a secondary, try the primary this often
    spool_max_bytes = 16777216      # the store-and-forward spool's bound
    ttl_s = 86400                   # a spooled message is dropped after this (0 = never)

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

from .errors import ConfigError
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


def _broker(text: object) -> tuple[str, int]:
    if not isinstance(text, str) or ":" not in text:
        raise ConfigError(f"[uplink] brokers: {text!r} is not HOST:PORT")
    host, _, port = text.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"[uplink] brokers: {text!r} is not HOST:PORT")
    return host, int(port)


def _str_list(table: dict[str, Any], key: str, default: tuple[str, ...]) -> tuple[str, ...]:
    value = table.get(key, list(default))
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"[uplink] {key} must be a list of topic filters")
    return tuple(value)


def _number(table: dict[str, Any], key: str, default: float, low: float) -> float:
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or value < low:
        raise ConfigError(f"[uplink] {key} must be a number >= {low}")
    return float(value)


def parse_config(table: dict[str, Any], client_id: str = "") -> UplinkConfig:
    """The ``[uplink]`` table; ConfigError naming the key on bad input."""
    known = set(UplinkConfig.__dataclass_fields__) - {"client_id"}
    if unknown := sorted(set(table) - known):
        raise ConfigError(f"[uplink] unknown key {unknown[0]!r}")
    brokers = table.get("brokers")
    if not isinstance(brokers, list) or not brokers:
        raise ConfigError('[uplink] brokers must be a non-empty list of "HOST:PORT"')
    files = {k: table.get(k) for k in ("ca_file", "cert_file", "key_file")}
    for key, value in [
        *files.items(),
        ("username", table.get("username")),
        ("password", table.get("password")),
        ("prefix", table.get("prefix")),
    ]:
        if value is not None and not isinstance(value, str):
            raise ConfigError(f"[uplink] {key} must be a string")
    if (files["cert_file"] is None) != (files["key_file"] is None):
        raise ConfigError("[uplink] cert_file and key_file go together")
    tls = table.get("tls", any(v is not None for v in files.values()))
    if not isinstance(tls, bool):
        raise ConfigError("[uplink] tls must be true or false")
    return UplinkConfig(
        brokers=tuple(_broker(b) for b in brokers),
        tls=tls,
        username=table.get("username"),
        password=table.get("password"),
        up=_str_list(table, "up", ("#",)),
        down=_str_list(table, "down", ()),
        prefix=table.get("prefix") or "",
        primary_retry_s=_number(table, "primary_retry_s", 30.0, 0.1),
        spool_max_bytes=int(_number(table, "spool_max_bytes", DEFAULT_MAX_BYTES, 65536)),
        ttl_s=_number(table, "ttl_s", 86400.0, 0),
        client_id=client_id,
        **files,
    )


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
    stats: UplinkStats = field(default_factory=UplinkStats)
    _wake: asyncio.Event = field(default_factory=asyncio.Event)

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

    def _tls_context(self) -> ssl.SSLContext | None:
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
            username=self.cfg.username,
            password=self.cfg.password,
            tls_context=self._tls_context(),
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

    async def run(self) -> None:
        """Connect, drain, fail over and back, forever (cancel to stop)."""
        import aiomqtt

        backoff = BACKOFF_MIN_S
        while True:
            got = await self._connect_first()
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
        try:
            for filt in self.cfg.down:
                await client.subscribe(filt, qos=1)
            return await self._drain(client, index, reader)
        finally:
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
