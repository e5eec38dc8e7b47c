"""Prometheus metrics: a tiny registry and an asyncio HTTP endpoint, stdlib only.

Why not prometheus-client: it pulls in its own HTTP server threads and a
process collector, and costs a few MB of RSS on a Pi; the agent needs only
counters, gauges, one histogram and text exposition format 0.0.4
(https://prometheus.io/docs/instrumenting/exposition_formats/).

Usage::

    registry = Registry()
    drops = registry.counter("edgeagent_packets_dropped_total", "Packets dropped", ["reason"])
    drops.labels(reason="decrypt").inc()
    members = registry.gauge("edgeagent_members", "Members by state", ["state"])
    registry.on_collect(lambda: members.labels(state="alive").set(len(alive)))
    server = await serve_metrics(registry, "127.0.0.1", 9464)

Updates are thread-safe (one lock per metric family), so the gossip thread
may count while the main loop renders. Collect hooks run at render time, on
the thread that serves the scrape.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # exposition format 0.0.4
MAX_REQUEST_BYTES = 8192  # request line + headers; a scrape needs a few hundred
REQUEST_TIMEOUT_S = 10.0  # Prometheus' default scrape_timeout
MAX_CONNECTIONS = 16  # concurrent scrapes served; more are closed at once
METRICS_PATH = "/metrics"
# Probe round trips on a LAN are ~1 ms; the top bucket is memberlist's LAN ProbeTimeout.
RTT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5)

_NAME_RE = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LABEL_RE = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")

LabelValues = tuple[str, ...]


def format_float(value: float) -> str:
    """A sample value as Prometheus writes it: integers without '.0', +Inf, -Inf, NaN."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(float(value))


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _label_text(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{n}="{_escape_label(v)}"' for n, v in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


class _Family:
    """A named metric with fixed label names; one child per distinct label values."""

    kind = "untyped"

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = ()) -> None:
        if not _NAME_RE.match(name):
            raise ValueError(f"invalid metric name {name!r}")
        for label in labelnames:
            if not _LABEL_RE.match(label) or label.startswith("__") or label == "le":
                raise ValueError(f"invalid label name {label!r}")
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._lock = threading.Lock()
        self._values: dict[LabelValues, float] = {}
        if not self.labelnames:
            self._values[()] = 0.0

    def _key(self, labels: dict[str, object]) -> LabelValues:
        if set(labels) != set(self.labelnames):
            raise ValueError(
                f"{self.name} takes labels {list(self.labelnames)}, got {sorted(labels)}"
            )
        return tuple(str(labels[n]) for n in self.labelnames)

    def _check_unlabelled(self) -> None:
        if self.labelnames:
            raise ValueError(f"{self.name} has labels {list(self.labelnames)}; use .labels(...)")

    def value(self, **labels: object) -> float:
        """The current value of one child (0 if never set), mainly for tests and status output."""
        with self._lock:
            return self._values.get(self._key(labels), 0.0)

    def samples(self) -> list[tuple[str, str, float]]:
        """(name suffix, label text, value) for each sample, in a stable order."""
        with self._lock:
            items = sorted(self._values.items())
        return [("", _label_text(self.labelnames, key), value) for key, value in items]


class _Child:
    """A family bound to one set of label values."""

    __slots__ = ("_family", "_key")

    def __init__(self, family: _Family, key: LabelValues) -> None:
        self._family = family
        self._key = key


class CounterChild(_Child):
    __slots__ = ()

    def inc(self, amount: float = 1.0) -> None:
        """Add ``amount`` (>= 0)."""
        if amount < 0:
            raise ValueError("a counter only goes up")
        family = self._family
        with family._lock:
            family._values[self._key] = family._values.get(self._key, 0.0) + amount


class Counter(_Family):
    """A value that only goes up (resets when the process restarts). Name it ``..._total``."""

    kind = "counter"

    def labels(self, **labels: object) -> CounterChild:
        """The child for these label values (created at 0)."""
        key = self._key(labels)
        with self._lock:
            self._values.setdefault(key, 0.0)
        return CounterChild(self, key)

    def inc(self, amount: float = 1.0) -> None:
        """Add ``amount`` to an unlabelled counter."""
        self._check_unlabelled()
        CounterChild(self, ()).inc(amount)

    def follow(self, label: str, totals: Mapping[str, float]) -> None:
        """Raise each child ``{label: name}`` to ``totals[name]``, a running total kept elsewhere
        (a feature's own counts): the counter is the exported state, never lowered."""
        with self._lock:
            for name, total in totals.items():
                key = self._key({label: name})
                if total > self._values.get(key, 0.0):
                    self._values[key] = float(total)


class GaugeChild(_Child):
    __slots__ = ()

    def set(self, value: float) -> None:
        """Set the value."""
        with self._family._lock:
            self._family._values[self._key] = float(value)

    def inc(self, amount: float = 1.0) -> None:
        """Add ``amount`` (may be negative)."""
        family = self._family
        with family._lock:
            family._values[self._key] = family._values.get(self._key, 0.0) + amount

    def dec(self, amount: float = 1.0) -> None:
        """Subtract ``amount``."""
        self.inc(-amount)


class Gauge(_Family):
    """A value that goes up and down."""

    kind = "gauge"

    def labels(self, **labels: object) -> GaugeChild:
        """The child for these label values (created at 0)."""
        key = self._key(labels)
        with self._lock:
            self._values.setdefault(key, 0.0)
        return GaugeChild(self, key)

    def set(self, value: float) -> None:
        """Set an unlabelled gauge."""
        self._check_unlabelled()
        GaugeChild(self, ()).set(value)

    def inc(self, amount: float = 1.0) -> None:
        """Add to an unlabelled gauge."""
        self._check_unlabelled()
        GaugeChild(self, ()).inc(amount)

    def dec(self, amount: float = 1.0) -> None:
        """Subtract from an unlabelled gauge."""
        self.inc(-amount)

    def clear(self) -> None:
        """Forget every labelled child (before re-setting them from a fresh snapshot)."""
        with self._lock:
            self._values = {} if self.labelnames else {(): 0.0}


class Histogram(_Family):
    """Observations counted into cumulative buckets, with ``_sum`` and ``_count`` (no labels)."""

    kind = "histogram"

    def __init__(
        self, name: str, documentation: str, buckets: Iterable[float] = RTT_BUCKETS
    ) -> None:
        super().__init__(name, documentation)
        bounds = sorted(float(b) for b in buckets if not math.isinf(b))
        if not bounds:
            raise ValueError("a histogram needs at least one finite bucket")
        self.bounds = (*bounds, math.inf)
        self._counts = [0] * len(self.bounds)
        self._sum = 0.0

    def observe(self, value: float) -> None:
        """Record one observation (NaN is ignored)."""
        if math.isnan(value):
            return
        with self._lock:
            self._sum += value
            for i, bound in enumerate(self.bounds):
                if value <= bound:
                    self._counts[i] += 1
                    break

    def samples(self) -> list[tuple[str, str, float]]:
        with self._lock:
            counts = list(self._counts)
            total = self._sum
        out: list[tuple[str, str, float]] = []
        running = 0
        for bound, count in zip(self.bounds, counts, strict=True):
            running += count
            out.append(("_bucket", '{le="' + format_float(bound) + '"}', float(running)))
        out.append(("_sum", "", total))
        out.append(("_count", "", float(running)))
        return out


class Registry:
    """A set of metric families rendered together."""

    def __init__(self) -> None:
        self._families: dict[str, _Family] = {}
        self._hooks: list[Callable[[], None]] = []
        self._lock = threading.Lock()

    def _add(self, family: _Family) -> _Family:
        with self._lock:
            if family.name in self._families:
                raise ValueError(f"metric {family.name} is already registered")
            self._families[family.name] = family
        return family

    def counter(self, name: str, documentation: str, labelnames: Sequence[str] = ()) -> Counter:
        """Register and return a counter."""
        family = Counter(name, documentation, labelnames)
        self._add(family)
        return family

    def counter_of(
        self, name: str, documentation: str, label: str, totals: Callable[[], Mapping[str, float]]
    ) -> Counter:
        """A counter with one label that follows ``totals()`` (name -> running total) at each
        render, for counts a feature keeps itself (see :meth:`Counter.follow`)."""
        family = self.counter(name, documentation, [label])
        self.on_collect(lambda: family.follow(label, totals()))
        return family

    def gauge(self, name: str, documentation: str, labelnames: Sequence[str] = ()) -> Gauge:
        """Register and return a gauge."""
        family = Gauge(name, documentation, labelnames)
        self._add(family)
        return family

    def histogram(
        self, name: str, documentation: str, buckets: Iterable[float] = RTT_BUCKETS
    ) -> Histogram:
        """Register and return a histogram."""
        family = Histogram(name, documentation, buckets)
        self._add(family)
        return family

    def on_collect(self, hook: Callable[[], None]) -> None:
        """Call ``hook`` before each render (to refresh gauges from a snapshot)."""
        self._hooks.append(hook)

    def get(self, name: str) -> _Family:
        """A registered family by name (KeyError if none)."""
        return self._families[name]

    def render(self) -> str:
        """The exposition text: ``# HELP``, ``# TYPE`` and samples for each family, sorted by name."""
        for hook in list(self._hooks):
            hook()
        with self._lock:
            families = sorted(self._families.values(), key=lambda f: f.name)
        lines: list[str] = []
        for family in families:
            lines.append(f"# HELP {family.name} {_escape_help(family.documentation)}")
            lines.append(f"# TYPE {family.name} {family.kind}")
            for suffix, labels, value in family.samples():
                lines.append(f"{family.name}{suffix}{labels} {format_float(value)}")
        return "\n".join(lines) + "\n"


@dataclass(frozen=True, slots=True)
class AgentMetrics:
    """The agent's standard metrics, so every part counts under the same names."""

    members: Gauge  # labels: state = alive | suspect | dead | left
    packets_received: Counter  # labels: transport = udp | tcp
    packets_sent: Counter  # labels: transport
    bytes_received: Counter  # labels: transport
    bytes_sent: Counter  # labels: transport
    packets_dropped: Counter  # labels: reason = decode | decrypt | cluster | oversize | ...
    kind_messages: Counter  # labels: direction = sent | received, kind = gossip.stats.KINDS
    kind_bytes: Counter  # labels: direction, kind; encoded message bytes (no seal, no headers)
    probe_rtt: Histogram  # seconds, successful direct probes
    local_health: Gauge  # Lifeguard local health multiplier, 0 (healthy) .. awareness max
    incarnation: Gauge  # this node's incarnation number
    info: Gauge  # labels: node, cluster, profile, version; always 1


def agent_metrics(registry: Registry) -> AgentMetrics:
    """Register the agent's standard metrics on ``registry``."""
    return AgentMetrics(
        members=registry.gauge("edgeagent_members", "Cluster members known, by state.", ["state"]),
        packets_received=registry.counter(
            "edgeagent_packets_received_total", "Gossip packets received.", ["transport"]
        ),
        packets_sent=registry.counter(
            "edgeagent_packets_sent_total", "Gossip packets sent.", ["transport"]
        ),
        bytes_received=registry.counter(
            "edgeagent_received_bytes_total", "Gossip bytes received.", ["transport"]
        ),
        bytes_sent=registry.counter(
            "edgeagent_sent_bytes_total", "Gossip bytes sent.", ["transport"]
        ),
        packets_dropped=registry.counter(
            "edgeagent_packets_dropped_total",
            "Packets or streams dropped, by reason (decode, decrypt, cluster, oversize...).",
            ["reason"],
        ),
        kind_messages=registry.counter(
            "edgeagent_gossip_messages_total",
            "Gossip messages by kind (push-pull: frames, counted under push_pull_digest).",
            ["direction", "kind"],
        ),
        kind_bytes=registry.counter(
            "edgeagent_gossip_message_bytes_total",
            "Encoded bytes of gossip messages by kind (push-pull frames split into members, state, digest).",
            ["direction", "kind"],
        ),
        probe_rtt=registry.histogram(
            "edgeagent_probe_rtt_seconds", "Round-trip time of successful probes."
        ),
        local_health=registry.gauge(
            "edgeagent_local_health_score", "Lifeguard local health multiplier (0 is healthy)."
        ),
        incarnation=registry.gauge("edgeagent_incarnation", "This node's incarnation number."),
        info=registry.gauge(
            "edgeagent_info",
            "Agent identity; the value is always 1.",
            ["node", "cluster", "profile", "version"],
        ),
    )


# --------------------------------------------------------------------------- HTTP endpoint


def _response(
    status: str, body: bytes, content_type: str = "text/plain; charset=utf-8", head: bool = False
) -> bytes:
    header = (
        f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return header.encode("ascii") + (b"" if head else body)


def _answer(registry: Registry, head_bytes: bytes) -> bytes:
    request_line = head_bytes.split(b"\r\n", 1)[0].decode("latin-1")
    parts = request_line.split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        return _response("400 Bad Request", b"bad request\n")
    method, target, _version = parts
    path = target.split("?", 1)[0]
    if path != METRICS_PATH:
        return _response("404 Not Found", b"not found; metrics are at /metrics\n")
    if method not in ("GET", "HEAD"):
        return _response("405 Method Not Allowed", b"method not allowed\n")
    body = registry.render().encode("utf-8")
    return _response("200 OK", body, CONTENT_TYPE, head=method == "HEAD")


async def serve_metrics(registry: Registry, host: str, port: int) -> asyncio.Server:
    """Serve ``GET /metrics`` from ``registry`` on host:port (port 0 picks one; see ``server.sockets``).

    Requests are bounded (MAX_REQUEST_BYTES of headers, REQUEST_TIMEOUT_S,
    MAX_CONNECTIONS at once); anything else gets 404, 405 or 400. Close with
    ``server.close(); await server.wait_closed()``.
    """
    active = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal active
        if active >= MAX_CONNECTIONS:
            writer.close()
            return
        active += 1
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT_S)
                reply = _answer(registry, head)
            except asyncio.LimitOverrunError:
                reply = _response("431 Request Header Fields Too Large", b"request too large\n")
            except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
                return
            writer.write(reply)
            with contextlib.suppress(ConnectionError):
                await asyncio.wait_for(writer.drain(), REQUEST_TIMEOUT_S)
        except TimeoutError:
            return
        finally:
            active -= 1
            writer.close()
            with contextlib.suppress(ConnectionError, TimeoutError):
                await asyncio.wait_for(writer.wait_closed(), REQUEST_TIMEOUT_S)

    return await asyncio.start_server(handle, host, port, limit=MAX_REQUEST_BYTES)
