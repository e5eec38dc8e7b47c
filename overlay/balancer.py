"""The mesh's client-side load balancer: which instance a request goes to, and what then.

Sans-IO: every call takes ``now``; randomness is the injected ``random.Random``. The router
calls, per request: :meth:`Balancer.fault` once (fault injection), then per try
:meth:`Balancer.pick` -> :meth:`Balancer.on_start` -> the try -> :meth:`Balancer.on_success`
or :meth:`Balancer.on_failure`, and after a failed try :meth:`Balancer.should_retry`.

Choosing among instances (``ServicePolicy.lb``)
-----------------------------------------------
- ``p2c`` (default): Peak-EWMA power of two choices, as Finagle's and linkerd's balancers.
  Each instance keeps an RTT estimate that jumps to a new peak at once and otherwise decays
  as an EWMA with time constant ``decay_s``; when no responses come, the estimate decays
  towards zero as time passes (so a slow instance is re-probed now and then). Its cost is
  ``estimate x (outstanding + 1) / weight``. Two distinct instances are drawn at random and
  the cheaper one is taken. A failed try counts as at least ``per_try_timeout_s`` of latency
  (a fast-failing instance must not look fast). A new instance, and one back from an
  ejection, starts with no estimate (``default_rtt_s``, 0): it costs nothing while idle, so
  it is probed at once, and :data:`PENALTY` while its first try is out (Finagle's rule), so
  it gets one request, not a burst, until it has answered.
- ``round_robin``: in turn, over the usable instances in a stable order.
- ``weighted``: a random draw in proportion to each instance's weight (a canary split).
- ``hash``: consistent hashing on the request key over a ring of virtual nodes
  (``hash_vnodes x weight`` points per instance, blake2b). When an instance leaves or is
  ejected only the keys it held move; every other key keeps its instance.

Locality (``ServicePolicy.locality``), Envoy's priority levels with spill-over
---------------------------------------------------------------------------------
Instances fall in three tiers: on this node, on another node of this node's ``site`` tag,
anywhere else. A tier's health is ``usable / published`` of its instances; it takes
``min(1, overprovisioning x health)`` of the traffic still unassigned (Envoy's
overprovisioning factor 1.4), in order; if the healthy shares add up to less than 1 they are
scaled up so that all traffic goes somewhere. So a node with 10 local instances of which 8
are usable still keeps everything local, with 5 of 10 it sends 70% locally and spills the
rest to its site, then anywhere. The tier is drawn at random (from the request key under
``hash``, so a key sticks to its tier too).

Outlier detection (``OutlierPolicy``), Envoy's consecutive-failure ejection
-------------------------------------------------------------------------
``consecutive_failures`` failed tries in a row eject an instance for
``base_ejection_s x ejections`` (capped at ``max_ejection_s``), where ``ejections`` counts
its ejections and drops by one for every ``base_ejection_s`` it spends back in service
without being ejected. Never ejected: the last usable instance of its service, and more
than ``max_ejection_percent`` of a service's instances (but one may always be ejected when
at least two are usable). A success resets the run of failures. After the ejection time the
instance is back in rotation. Failures that count: timeout, unreachable, reset, overloaded
(5.03) and server errors (5.xx); a 4.xx answer is a success for health purposes.

Retries (``RetryPolicy``), Finagle's retry budget with Envoy's backoff
--------------------------------------------------------------------
Only idempotent methods (GET, FETCH, PUT, DELETE, iPATCH) are retried, only after a
timeout, an unreachable instance, a reset or an overload, at most ``max_retries`` times,
and only while the service's budget allows: retries in the last ``budget_ttl_s`` may not
exceed ``min_retries_per_s x budget_ttl_s + budget_ratio x requests`` in that window (so a
failing service gets at most ~20% more load, not 3x). A retry waits a fully jittered
exponential backoff and goes to another instance if there is one (``exclude``). Each try
has its own timeout, ``per_try_timeout_s``.

Version splits (``ServicePolicy.split``, a policy bundle's ``splits``): ``(version, weight)``
pairs. Before locality, a try draws a version in proportion to the weights, among the
versions that have a usable instance (a version with none gets no traffic and its share goes
to the others, as a weighted cluster that has gone away); the tiers and the instance are then
chosen among that version's instances (by ``version`` tag). When no instance carries any
split version, the split is ignored and counted (``split_unmatched``).

Fault injection (``FaultPolicy``): per request, delay by ``delay_s`` with
``delay_percent`` probability and abort with ``abort_code`` with ``abort_percent``.

Memory: per-instance and per-service records are bounded (``MAX_TRACKED``); records of
instances no longer in the catalog are dropped when the bound is reached.
"""

from __future__ import annotations

import bisect
import hashlib
import math
import random
from collections.abc import Collection
from dataclasses import dataclass, field
from enum import StrEnum

from .catalog import Catalog, Instance

PENALTY = 1e6  # cost of an instance with no estimate yet and a try out (Finagle's Penalty)
MAX_TRACKED = 4096  # instance and service records kept before pruning the departed
MAX_RING_POINTS = 16384  # virtual nodes per ring at most (weights are scaled down to fit)
MAX_RINGS = 64  # consistent-hash rings cached (one per distinct instance set)
IDEMPOTENT_METHODS = frozenset({"GET", "FETCH", "PUT", "DELETE", "IPATCH"})


class Policy(StrEnum):
    P2C = "p2c"
    ROUND_ROBIN = "round_robin"
    WEIGHTED = "weighted"
    HASH = "hash"


class Outcome(StrEnum):
    """How a failed try failed (the router maps its errors onto these)."""

    TIMEOUT = "timeout"  # no answer within the per-try timeout
    UNREACHABLE = "unreachable"  # could not send: channel down, refused
    RESET = "reset"  # the channel reset the stream or went away
    OVERLOADED = "overloaded"  # the upstream answered 5.03
    SERVER_ERROR = "server_error"  # another 5.xx


RETRYABLE = frozenset({Outcome.TIMEOUT, Outcome.UNREACHABLE, Outcome.RESET, Outcome.OVERLOADED})


class Tier(StrEnum):
    NODE = "node"
    SITE = "site"
    ANY = "any"


class PickReason(StrEnum):
    PICKED = "picked"
    UNKNOWN_SERVICE = "unknown_service"  # no node publishes it: 4.04
    NO_HEALTHY = "no_healthy"  # all down or ejected: 5.03


@dataclass(frozen=True, slots=True)
class OutlierPolicy:
    consecutive_failures: int = 5  # Envoy consecutive_5xx
    base_ejection_s: float = 30.0  # Envoy base_ejection_time
    max_ejection_s: float = 300.0  # Envoy max_ejection_time
    max_ejection_percent: float = 50.0  # Envoy: 10; meshes here have few instances


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_retries: int = 2
    budget_ratio: float = 0.2  # Finagle RetryBudget percentCanRetry
    min_retries_per_s: float = 10.0  # Finagle minRetriesPerSec
    budget_ttl_s: float = 10.0  # Finagle ttl
    per_try_timeout_s: float = 2.0
    backoff_base_s: float = 0.025  # Envoy retry back-off base interval
    backoff_max_s: float = 0.25


@dataclass(frozen=True, slots=True)
class FaultPolicy:
    delay_s: float = 0.0
    delay_percent: float = 0.0
    abort_code: str = "5.03"
    abort_percent: float = 0.0


@dataclass(frozen=True, slots=True)
class ServicePolicy:
    lb: Policy = Policy.P2C
    locality: bool = True
    overprovisioning: float = 1.4  # Envoy's overprovisioning factor
    decay_s: float = 10.0  # Finagle PeakEwma decayTime
    default_rtt_s: float = 0.0  # estimate of a fresh endpoint (linkerd: 30 ms; Finagle: 0)
    hash_vnodes: int = 160  # ring points per unit of weight
    outlier: OutlierPolicy = field(default_factory=OutlierPolicy)
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    fault: FaultPolicy | None = None
    split: tuple[tuple[str, int], ...] = ()  # (version tag, weight): see "Version splits"


@dataclass(frozen=True, slots=True)
class Pick:
    instance: Instance | None
    reason: PickReason
    tier: Tier | None = None


@dataclass(frozen=True, slots=True)
class Fault:
    delay_s: float = 0.0
    abort_code: str | None = None


@dataclass(frozen=True, slots=True)
class RetryDecision:
    retry: bool
    reason: str
    delay_s: float = 0.0


@dataclass(slots=True)
class _Endpoint:
    """What the balancer knows about one instance."""

    ewma: float
    stamp: float
    outstanding: int = 0
    failures: int = 0  # consecutive
    ejections: int = 0
    ejected_until: float = -math.inf
    back_since: float = -math.inf  # when the last ejection ended (for the decay of ejections)
    reinstate: bool = False  # ejected; start afresh when the ejection is over

    def estimate(self, now: float, decay_s: float) -> float:
        """The RTT estimate now: decayed towards zero since the last observation."""
        return self.ewma * math.exp(-max(now - self.stamp, 0.0) / decay_s)

    def observe(self, rtt: float, now: float, decay_s: float) -> None:
        """A new peak is taken at once; otherwise a time-weighted EWMA (Finagle's PeakEwma)."""
        w = math.exp(-max(now - self.stamp, 0.0) / decay_s)
        decayed = self.ewma * w
        self.ewma = rtt if rtt > decayed else decayed + rtt * (1.0 - w)
        self.stamp = max(now, self.stamp)


class _Budget:
    """Finagle's retry budget: deposits per request, withdrawals per retry, over a window."""

    def __init__(self) -> None:
        self.buckets: dict[int, list[int]] = {}  # second -> [requests, retries]

    def _window(self, now: float, ttl: float) -> tuple[int, int]:
        oldest = math.floor(now - ttl)
        for second in [s for s in self.buckets if s <= oldest]:
            del self.buckets[second]
        return (sum(b[0] for b in self.buckets.values()), sum(b[1] for b in self.buckets.values()))

    def deposit(self, now: float, ttl: float) -> None:
        second = math.floor(now)
        if second not in self.buckets:
            self._window(now, ttl)  # prune: at most ttl + 1 buckets are ever kept
            self.buckets[second] = [0, 0]
        self.buckets[second][0] += 1

    def withdraw(self, now: float, policy: RetryPolicy) -> bool:
        requests, retries = self._window(now, policy.budget_ttl_s)
        allowed = policy.min_retries_per_s * policy.budget_ttl_s + policy.budget_ratio * requests
        if retries + 1 > allowed:
            return False
        self.buckets.setdefault(math.floor(now), [0, 0])[1] += 1
        return True


def _hash64(text: str, salt: bytes = b"") -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8, salt=salt).digest(), "big")


def tier_loads(healthy: list[int], total: list[int], overprovisioning: float) -> list[float]:
    """Envoy's priority load: the share of traffic each tier takes, in order (sums to 1)."""
    health = [
        min(1.0, overprovisioning * h / t) if t else 0.0
        for h, t in zip(healthy, total, strict=True)
    ]
    scale = min(1.0, sum(health))
    if scale <= 0.0:
        return [0.0 for _ in health]
    loads, remaining = [], 1.0
    for h in health:
        load = min(remaining, h / scale)
        loads.append(load)
        remaining -= load
    return loads


class Balancer:
    """Picks instances of a service from the catalog's healthy view; see the module docstring."""

    def __init__(
        self,
        catalog: Catalog,
        rng: random.Random,
        *,
        site: str = "",
        default: ServicePolicy | None = None,
    ) -> None:
        self.catalog = catalog
        self.rng = rng
        self.site = site
        self.default = default or ServicePolicy()
        self._policies: dict[str, ServicePolicy] = {}
        self._endpoints: dict[str, _Endpoint] = {}
        self._ejected: dict[str, float] = {}  # key -> until (a subset of _endpoints)
        self._tiers: dict[str, Tier] = {}  # locality of each instance seen (a cache)
        self._budgets: dict[str, _Budget] = {}
        self._turns: dict[str, int] = {}
        self._rings: dict[tuple[tuple[str, int], ...], tuple[list[int], list[str]]] = {}
        self.stats: dict[str, int] = {
            "picks": 0,
            "unknown_service": 0,
            "no_healthy": 0,
            "ejections": 0,
            "ejections_refused": 0,
            "retries": 0,
            "retries_refused_budget": 0,
            "faults_delayed": 0,
            "faults_aborted": 0,
            "split_unmatched": 0,
            "pruned": 0,
        }

    # -- policy --------------------------------------------------------------------------

    def set_policy(self, service: str, policy: ServicePolicy | None) -> None:
        """Use ``policy`` for ``service`` (None: back to the default)."""
        if policy is None:
            self._policies.pop(service, None)
        else:
            self._policies[service] = policy

    def policy(self, service: str) -> ServicePolicy:
        return self._policies.get(service, self.default)

    def per_try_timeout(self, service: str) -> float:
        return self.policy(service).retry.per_try_timeout_s

    # -- picking -------------------------------------------------------------------------

    def ejected(self, now: float) -> frozenset[str]:
        """Keys of the instances ejected at ``now``."""
        for key in [k for k, until in self._ejected.items() if until <= now]:
            del self._ejected[key]
        return frozenset(self._ejected)

    def usable(self, service: str, now: float) -> list[Instance]:
        """The healthy view: instances on live nodes that are not ejected."""
        return self.catalog.healthy(service, self.ejected(now))

    def pick(
        self, service: str, request_key: str | None, now: float, exclude: Collection[str] = ()
    ) -> Pick:
        """The instance for one try of a request to ``service``, or None and why.

        ``request_key`` is what ``hash`` hashes (e.g. the URI path); ``exclude`` holds keys
        of instances already tried (used only if nothing else is usable).
        """
        published = self.catalog.instances(service)
        if not published:
            self.stats["unknown_service"] += 1
            return Pick(None, PickReason.UNKNOWN_SERVICE)
        usable = self.usable(service, now)
        others = [i for i in usable if i.key not in exclude]
        usable = others or usable
        if not usable:
            self.stats["no_healthy"] += 1
            return Pick(None, PickReason.NO_HEALTHY)
        policy = self.policy(service)
        if policy.split:
            published, usable = self._split(policy, published, usable, request_key)
        tier, members = self._choose_tier(policy, published, usable, request_key)
        self.stats["picks"] += 1
        return Pick(
            self._choose(policy, service, members, request_key, now), PickReason.PICKED, tier
        )

    def _split(
        self,
        policy: ServicePolicy,
        published: list[Instance],
        usable: list[Instance],
        key: str | None,
    ) -> tuple[list[Instance], list[Instance]]:
        """The published and usable instances of the version the split draws."""
        present = {inst.version for inst in usable}
        weights = [(tag, w) for tag, w in policy.split if w > 0 and tag in present]
        if not weights:
            self.stats["split_unmatched"] += 1
            return published, usable
        total = sum(w for _, w in weights)
        if policy.lb == Policy.HASH and key is not None:
            draw = _hash64(key, b"split") / 2**64 * total
        else:
            draw = self.rng.random() * total
        chosen = weights[-1][0]
        for tag, w in weights:
            if draw < w:
                chosen = tag
                break
            draw -= w
        return (
            [i for i in published if i.version == chosen],
            [i for i in usable if i.version == chosen],
        )

    def _tier_of(self, inst: Instance) -> Tier:
        tier = self._tiers.get(inst.key)
        if tier is None:
            if inst.node == self.catalog.local:
                tier = Tier.NODE
            elif self.site and inst.site == self.site:
                tier = Tier.SITE
            else:
                tier = Tier.ANY
            if len(self._tiers) >= MAX_TRACKED:
                self._tiers.clear()
            self._tiers[inst.key] = tier
        return tier

    def _choose_tier(
        self,
        policy: ServicePolicy,
        published: list[Instance],
        usable: list[Instance],
        key: str | None,
    ) -> tuple[Tier, list[Instance]]:
        if not policy.locality:
            return Tier.ANY, usable
        tiers = list(Tier)
        by_tier: dict[Tier, list[Instance]] = {t: [] for t in tiers}
        for inst in usable:
            by_tier[self._tier_of(inst)].append(inst)
        totals = {t: 0 for t in tiers}
        for inst in published:
            totals[self._tier_of(inst)] += 1
        loads = tier_loads(
            [len(by_tier[t]) for t in tiers], [totals[t] for t in tiers], policy.overprovisioning
        )
        if policy.lb == Policy.HASH and key is not None:
            draw = _hash64(key, b"tier") / 2**64
        else:
            draw = self.rng.random()
        for t, load in zip(tiers, loads, strict=True):
            if draw < load and by_tier[t]:
                return t, by_tier[t]
            draw -= load
        last = next(t for t in reversed(tiers) if by_tier[t])  # float rounding at the edge
        return last, by_tier[last]

    def _choose(
        self,
        policy: ServicePolicy,
        service: str,
        members: list[Instance],
        key: str | None,
        now: float,
    ) -> Instance:
        if len(members) == 1:
            return members[0]
        if policy.lb == Policy.ROUND_ROBIN:
            turn = self._turns.get(service, 0)
            self._turns[service] = turn + 1
            if len(self._turns) > MAX_TRACKED:
                self._prune()
            return members[turn % len(members)]
        if policy.lb == Policy.WEIGHTED:
            return self.rng.choices(members, weights=[i.weight for i in members])[0]
        if policy.lb == Policy.HASH:
            if key is None:
                key = str(self.rng.random())
            return self._ring_pick(policy, members, key)
        a, b = self.rng.sample(members, 2)
        return a if self.cost(a, now) <= self.cost(b, now) else b

    def cost(self, inst: Instance, now: float) -> float:
        """Peak-EWMA load: RTT estimate x (outstanding + 1) / weight."""
        policy = self.policy(inst.name)
        ep = self._endpoint(inst, now)
        if ep.reinstate and now >= ep.ejected_until:
            ep.reinstate = False
            ep.ewma, ep.stamp = policy.default_rtt_s, now
        if ep.ewma == 0.0 and ep.outstanding:
            return PENALTY
        return ep.estimate(now, policy.decay_s) * (ep.outstanding + 1) / inst.weight

    def _ring_pick(self, policy: ServicePolicy, members: list[Instance], key: str) -> Instance:
        ident = tuple(sorted((i.key, i.weight) for i in members))
        ring = self._rings.get(ident)
        if ring is None:
            wanted = policy.hash_vnodes * sum(w for _, w in ident)
            scale = min(1.0, MAX_RING_POINTS / max(wanted, 1))
            points = sorted(
                (_hash64(f"{k}#{v}"), k)
                for k, w in ident
                for v in range(max(1, int(policy.hash_vnodes * w * scale)))
            )
            if len(self._rings) >= MAX_RINGS:
                self._rings.clear()
            ring = ([p for p, _ in points], [k for _, k in points])
            self._rings[ident] = ring
        hashes, owners = ring
        owner = owners[bisect.bisect_left(hashes, _hash64(key)) % len(hashes)]
        return next(i for i in members if i.key == owner)

    # -- outcomes ------------------------------------------------------------------------

    def _endpoint(self, inst: Instance, now: float) -> _Endpoint:
        ep = self._endpoints.get(inst.key)
        if ep is None:
            if len(self._endpoints) >= MAX_TRACKED:
                self._prune()
            ep = _Endpoint(self.policy(inst.name).default_rtt_s, now)
            self._endpoints[inst.key] = ep
        return ep

    def _prune(self) -> None:
        present = {i.key for s in self.catalog.services() for i in self.catalog.instances(s)}
        for key in [
            k for k, e in self._endpoints.items() if k not in present and not e.outstanding
        ]:
            del self._endpoints[key]
            self._ejected.pop(key, None)
            self.stats["pruned"] += 1
        services = set(self.catalog.services())
        for table in (self._budgets, self._turns):
            for service in [s for s in table if s not in services]:
                del table[service]

    def on_start(self, inst: Instance, now: float, *, retry: bool = False) -> None:
        """A try to ``inst`` begins (``retry``: it is not the request's first try)."""
        self._endpoint(inst, now).outstanding += 1
        if not retry:
            budget = self._budgets.get(inst.name)
            if budget is None:
                if len(self._budgets) >= MAX_TRACKED:
                    self._prune()
                budget = self._budgets[inst.name] = _Budget()
            budget.deposit(now, self.policy(inst.name).retry.budget_ttl_s)

    def on_success(self, inst: Instance, latency: float, now: float) -> None:
        """The try to ``inst`` was answered (any answer but a 5.xx) after ``latency`` s."""
        ep = self._endpoint(inst, now)
        ep.outstanding = max(0, ep.outstanding - 1)
        ep.failures = 0
        ep.observe(max(latency, 0.0), now, self.policy(inst.name).decay_s)

    def on_failure(
        self, inst: Instance, latency: float, now: float, outcome: Outcome = Outcome.TIMEOUT
    ) -> bool:
        """The try to ``inst`` failed; True if this ejected it."""
        ep = self._endpoint(inst, now)
        ep.outstanding = max(0, ep.outstanding - 1)
        return self._failed(inst, ep, latency, now)

    def on_lost(self, inst: Instance, now: float) -> bool:
        """A path to ``inst`` failed outside any try (an observation's stream or upstream
        ended without its last message): counted towards ejection as a failed try is, with
        no try to end; True if this ejected it."""
        return self._failed(inst, self._endpoint(inst, now), 0.0, now)

    def _failed(self, inst: Instance, ep: _Endpoint, latency: float, now: float) -> bool:
        policy = self.policy(inst.name)
        ep.observe(max(latency, policy.retry.per_try_timeout_s), now, policy.decay_s)
        if ep.ejected_until > now:
            return False
        ep.failures += 1
        if ep.failures < policy.outlier.consecutive_failures:
            return False
        return self._eject(inst, ep, policy.outlier, now)

    def _eject(self, inst: Instance, ep: _Endpoint, outlier: OutlierPolicy, now: float) -> bool:
        ejected = self.ejected(now)
        published = self.catalog.instances(inst.name)
        already = sum(1 for i in published if i.key in ejected)
        allowed = max(1, math.floor(len(published) * outlier.max_ejection_percent / 100.0))
        if already >= allowed or not self.catalog.healthy(inst.name, ejected | {inst.key}):
            self.stats["ejections_refused"] += 1
            return False
        if ep.back_since > -math.inf and outlier.base_ejection_s > 0:
            healed = math.floor((now - ep.back_since) / outlier.base_ejection_s)
            ep.ejections = max(0, ep.ejections - healed)
        ep.ejections += 1
        duration = min(outlier.base_ejection_s * ep.ejections, outlier.max_ejection_s)
        ep.ejected_until = ep.back_since = now + duration
        self._ejected[inst.key] = ep.ejected_until
        ep.failures = 0
        ep.reinstate = True
        self.stats["ejections"] += 1
        return True

    def should_retry(
        self, service: str, method: str, attempt: int, outcome: Outcome, now: float
    ) -> RetryDecision:
        """After try number ``attempt`` (1 = the first) failed with ``outcome``: try again?

        A yes has been counted against the budget; the router waits ``delay_s``, then picks
        with the tried instances in ``exclude`` and calls ``on_start(..., retry=True)``.
        """
        retry = self.policy(service).retry
        if method.upper() not in IDEMPOTENT_METHODS:
            return RetryDecision(False, "not_idempotent")
        if outcome not in RETRYABLE:
            return RetryDecision(False, "not_retryable")
        if attempt > retry.max_retries:
            return RetryDecision(False, "max_retries")
        budget = self._budgets.setdefault(service, _Budget())
        if not budget.withdraw(now, retry):
            self.stats["retries_refused_budget"] += 1
            return RetryDecision(False, "budget")
        self.stats["retries"] += 1
        ceiling = min(retry.backoff_max_s, retry.backoff_base_s * 2 ** (attempt - 1))
        return RetryDecision(True, "retry", self.rng.uniform(0.0, ceiling))

    def fault(self, service: str) -> Fault:
        """The fault to inject into one request to ``service`` (none, delay, abort or both)."""
        policy = self.policy(service).fault
        if policy is None:
            return Fault()
        delay = policy.delay_s if self.rng.random() * 100.0 < policy.delay_percent else 0.0
        abort = policy.abort_code if self.rng.random() * 100.0 < policy.abort_percent else None
        self.stats["faults_delayed"] += delay > 0
        self.stats["faults_aborted"] += abort is not None
        return Fault(delay, abort)
