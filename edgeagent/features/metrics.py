"""Metrics: the agent's Prometheus endpoint, fed from gossip-thread snapshots.

How it works. The core and the driver keep plain cumulative counters on the gossip thread; they reach this
(the application's) loop inside each immutable :class:`~edgeagent.driver.View`. :meth:`update`
turns the growth since the previous view into counter increments and sets the gauges, so the
gossip thread never touches the registry. The registry is the host's (``host.metrics``, so
other features can add their own families to it); :class:`Metrics` serves it on
``config.metrics`` and feeds it every view. Imported only when ``--metrics`` is on.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping

from gossip.messages import Address, MemberState
from gossip.stats import KINDS

from ..driver import View
from ..errors import ConfigError
from ..host import FeatureHost
from ..metrics import AgentMetrics, CounterChild, Registry, agent_metrics, serve_metrics
from ..netaddr import format_addr

CLOSE_TIMEOUT = 2.0

# (counter attribute, labels, counter source) where the source is (stats dict, key[, minus key]).
# UDP traffic is the sealed total minus its stream part; TCP is the push-pull streams.
_TRAFFIC = (
    ("packets_received", "udp", ("core", "datagrams_in", None)),
    ("packets_received", "tcp", ("core", "streams_in", None)),
    ("packets_received", "tcp", ("core", "stream_replies_in", None)),
    ("packets_sent", "udp", ("core", "datagrams_out", None)),
    ("packets_sent", "tcp", ("core", "streams_out", None)),
    ("bytes_received", "udp", ("core", "bytes_in", "stream_bytes_in")),
    ("bytes_received", "tcp", ("core", "stream_bytes_in", None)),
    ("bytes_sent", "udp", ("core", "bytes_out", "stream_bytes_out")),
    ("bytes_sent", "tcp", ("core", "stream_bytes_out", None)),
)
# packets_dropped{reason}: core decode/decrypt failures, unusable messages, driver-side drops.
_DROPS = (
    ("decode", "core", "decode_errors"),
    ("decrypt", "core", "decrypt_errors"),
    ("replayed", "core", "replayed"),  # anti-replay window (gossip/replay.py)
    ("unusable", "core", "dropped"),
    ("state_over_budget", "core", "state_rejected"),
    ("state_forged", "core", "state_forged"),
    ("state_unverified", "core", "state_unverified"),
    ("alive_forged", "core", "alive_forged"),
    ("oversize", "driver", "datagrams_oversized"),
    ("sender_limited", "driver", "datagrams_limited"),
    ("oversize", "driver", "frames_oversized"),
    ("stream_error", "driver", "stream_errors"),
    ("stream_limit", "driver", "streams_rejected"),
    ("decrypt", "driver", "stream_headers_rejected"),
    ("stream_per_source", "driver", "streams_per_source"),
    ("stream_evicted", "driver", "streams_evicted"),
    ("stream_header_timeout", "driver", "stream_headers_late"),
    ("stream_budget", "driver", "streams_over_budget"),
    ("stream_out_limit", "driver", "streams_out_rejected"),
    ("send_error", "driver", "send_errors"),
)


class MetricsFeed:
    """The agent's metrics registry, its HTTP endpoint, and the View-to-metrics update."""

    def __init__(self, registry: Registry, metrics: AgentMetrics) -> None:
        self.registry = registry
        self.metrics = metrics
        self._server: asyncio.Server | None = None
        self._last: dict[tuple[str, str], float] = {}
        self._rtts_seen = 0  # last probe RTT sample number observed

    @classmethod
    async def serve(
        cls,
        registry: Registry,
        where: Address,
        *,
        node: str,
        cluster: str,
        profile: str,
        version: str,
    ) -> MetricsFeed:
        """Register the metrics and listen on ``where`` (OSError if it cannot)."""
        feed = cls(registry, agent_metrics(registry))
        feed.metrics.info.labels(node=node, cluster=cluster, profile=profile, version=version).set(
            1
        )
        feed._server = await serve_metrics(registry, where[0], where[1])
        return feed

    @property
    def address(self) -> Address | None:
        """Where the endpoint listens (the real port when 0 was asked)."""
        if self._server is None or not self._server.sockets:
            return None
        host, port = self._server.sockets[0].getsockname()[:2]
        return (str(host), int(port))

    def update(self, view: View) -> None:
        """Bring every metric up to date with ``view``."""
        m = self.metrics
        sources: Mapping[str, Mapping[str, int]] = {
            "core": view.core_stats,
            "driver": view.driver_stats,
        }
        counts = {state: 0 for state in MemberState}
        for member in view.members:
            counts[member.state] += 1
        for state, n in counts.items():
            m.members.labels(state=state.name.lower()).set(n)
        for attr, transport, (src, key, minus) in _TRAFFIC:
            stats = sources[src]
            value = stats.get(key, 0) - (stats.get(minus, 0) if minus else 0)
            self._grow(getattr(m, attr).labels(transport=transport), (attr, transport, key), value)
        for reason, src, key in _DROPS:
            self._grow(
                m.packets_dropped.labels(reason=reason),
                ("drop", reason, key),
                sources[src].get(key, 0),
            )
        core = sources["core"]
        for kind in KINDS:
            for direction, suffix in (("sent", "out"), ("received", "in")):
                for family, prefix in ((m.kind_messages, "kind_msgs"), (m.kind_bytes, "kind_bytes")):
                    key = f"{prefix}_{suffix}_{kind}"
                    self._grow(family.labels(direction=direction, kind=kind), (prefix, direction, key),
                               core.get(key, 0))
        for number, rtt in view.probe_rtts:
            if number > self._rtts_seen:
                m.probe_rtt.observe(rtt)
        if view.probe_rtts:
            self._rtts_seen = max(self._rtts_seen, view.probe_rtts[-1][0])
        m.local_health.set(view.health_score)
        m.incarnation.set(view.incarnation)

    def _grow(self, child: CounterChild, key: tuple[str, str, str], value: float) -> None:
        flat = (key[0] + "/" + key[1], key[2])
        delta = value - self._last.get(flat, 0.0)
        if delta > 0:
            child.inc(delta)
            self._last[flat] = value

    async def close(self) -> None:
        """Stop serving scrapes."""
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), CLOSE_TIMEOUT)
            self._server = None


class Metrics:
    """The metrics feature: serve ``host.metrics`` and keep it up to date with every view."""

    def __init__(self) -> None:
        self._feed: MetricsFeed | None = None

    async def start(self, host: FeatureHost) -> None:
        """Listen on ``config.metrics``; a port that cannot be had is one ConfigError."""
        where, registry = host.config.metrics, host.metrics
        if where is None or registry is None:
            raise ValueError("the metrics feature needs config.metrics and host.metrics")
        try:
            self._feed = await MetricsFeed.serve(
                registry,
                where,
                node=host.identity.name,
                cluster=host.config.cluster,
                profile=host.config.profile,
                version=_agent_version(),
            )
        except OSError as exc:
            raise ConfigError(
                f"metrics {format_addr(where)}: cannot listen: {exc.strerror or exc}"
            ) from None
        self._feed.update(host.view)
        host.want_fresh_views()
        host.add_listener(lambda events, view: self._update(view))
        host.add_status(self.status_fields)

    def _update(self, view: View) -> None:
        if self._feed is not None:
            self._feed.update(view)

    def status_fields(self) -> dict[str, str | None]:
        """Where scrapes go, for ``edgeagent status``."""
        address = self._feed.address if self._feed is not None else None
        return {"metrics": format_addr(address) if address is not None else None}

    async def stop(self) -> None:
        """Stop serving scrapes."""
        if self._feed is not None:
            await self._feed.close()
            self._feed = None


def _agent_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("edgeagent")
    except PackageNotFoundError:
        return "unknown"
