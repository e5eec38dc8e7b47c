"""What an active policy bundle changes in the data plane, sans-IO (issue 11, enforcement).

- :func:`service_policies`: a bundle's per-service traffic sections as the balancer's
  :class:`~overlay.balancer.ServicePolicy`: ``splits`` (weights by the instances' ``version``
  tag), ``retries.attempts`` (the retries after the first try), ``timeouts`` (the per-try
  timeout, seconds) and ``faults`` (delay / abort injection), each over the agent's default for
  whatever the bundle leaves out. A service the bundle does not name keeps the default.
- MQTT topic permissions: :mod:`overlay.mqtt.permissions` (imported only with MQTT on).
- :class:`RateLimiter`: ``rate_limits``, a token bucket per source node for each selector
  (``node:NAME``, ``service:NAME``: any node running it, ``*``: every node); the most specific
  selector that matches the source decides (node, then service, then ``*``, like the
  intentions). Buckets are per (selector, node), at most :data:`MAX_BUCKETS`, the least
  recently used forgotten first (a forgotten bucket starts full again: the bound errs on
  letting a request through, never on refusing one it should not).

Applying a new bundle replaces the policies and the limiter at once; a request already in
flight keeps the timeout and budget it started with.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Final

from .balancer import ServicePolicy

if TYPE_CHECKING:  # not at run time: the coap feature imports this with policy off
    from .policy import Bundle, RateLimit

MAX_BUCKETS: Final = 4096


def service_policies(bundle: Bundle | None, default: ServicePolicy) -> dict[str, ServicePolicy]:
    """The balancer policy of every service ``bundle`` says something about."""
    if bundle is None:
        return {}
    names = set(bundle.splits) | set(bundle.retries) | set(bundle.timeouts) | set(bundle.faults)
    out = {}
    for name in sorted(names):
        retry = default.retry
        if name in bundle.retries:
            retry = dataclasses.replace(retry, max_retries=bundle.retries[name].attempts)
        if name in bundle.timeouts:
            retry = dataclasses.replace(retry, per_try_timeout_s=bundle.timeouts[name])
        split = tuple(sorted(bundle.splits.get(name, {}).items()))
        out[name] = dataclasses.replace(
            default,
            retry=retry,
            fault=bundle.faults.get(name, default.fault),
            split=split or default.split,
        )
    return out


@dataclasses.dataclass(slots=True)
class _Bucket:
    tokens: float
    stamp: float


class RateLimiter:
    """The token buckets of one bundle's ``rate_limits``."""

    def __init__(self, limits: Mapping[str, RateLimit]) -> None:
        self.limits = dict(limits)
        self._services = sorted(s for s in self.limits if s.startswith("service:"))
        self._buckets: collections.OrderedDict[tuple[str, str], _Bucket] = collections.OrderedDict()
        self.limited = 0

    def selector(self, node: str, services: Iterable[str]) -> str | None:
        """The ``rate_limits`` key that governs requests from ``node``, if any."""
        if f"node:{node}" in self.limits:
            return f"node:{node}"
        if self._services:
            running = frozenset(services)
            for key in self._services:  # sorted: the same key every time for the same node
                if key[len("service:") :] in running:
                    return key
        return "*" if "*" in self.limits else None

    def allow(self, node: str, services: Iterable[str], now: float) -> bool:
        """Take one token for a request from ``node`` at ``now`` (seconds, monotonic)."""
        key = self.selector(node, services) if self.limits else None
        if key is None:
            return True
        limit = self.limits[key]
        bucket = self._buckets.get((key, node))
        if bucket is None:
            bucket = self._buckets[(key, node)] = _Bucket(float(limit.burst), now)
            while len(self._buckets) > MAX_BUCKETS:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end((key, node))
            elapsed = max(0.0, now - bucket.stamp)
            bucket.tokens = min(float(limit.burst), bucket.tokens + elapsed * limit.rate)
            bucket.stamp = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return True
        self.limited += 1
        return False

    def __len__(self) -> int:
        return len(self._buckets)
