"""A policy bundle's traffic sections in the balancer, and its rate limits (virtual time)."""

from __future__ import annotations

import random
from collections import Counter

from overlay.balancer import Balancer, PickReason, ServicePolicy
from overlay.policy import RateLimit, parse_bundle
from overlay.policy_enforce import MAX_BUCKETS, RateLimiter, service_policies
from tests.overlay.test_balancer import mesh

BUNDLE = b"""
version = 3
issued = 1
[splits.api]
v1 = 90
v2 = 10
[retries.api]
attempts = 0
[timeouts]
db = 0.5
[faults.cam]
abort_percent = 100
abort_code = "4.29"
"""


def test_bundle_sections_become_service_policies_over_the_default() -> None:
    default = ServicePolicy()
    policies = service_policies(parse_bundle(BUNDLE), default)
    assert sorted(policies) == ["api", "cam", "db"]
    api = policies["api"]
    assert api.split == (("v1", 90), ("v2", 10)) and api.retry.max_retries == 0
    assert api.retry.per_try_timeout_s == default.retry.per_try_timeout_s
    assert policies["db"].retry.per_try_timeout_s == 0.5 and policies["db"].split == ()
    assert policies["db"].retry.max_retries == default.retry.max_retries
    fault = policies["cam"].fault
    assert fault is not None and (fault.abort_code, fault.abort_percent) == ("4.29", 100.0)
    assert service_policies(None, default) == {}


def _versions(
    split: tuple[tuple[str, int], ...], layout: dict[str, str], n: int = 5000
) -> Counter[str]:
    """Versions picked for ``n`` requests: one instance per node, ``layout[node] = version``."""
    cat, _ = mesh(
        {
            node: [(f"coap://10.0.0.{i + 1}:5683", {"version": v})]
            for i, (node, v) in enumerate(layout.items())
        }
    )
    bal = Balancer(cat, random.Random(7))
    bal.set_policy("svc", ServicePolicy(split=split, locality=False))
    out: Counter[str] = Counter()
    for _ in range(n):
        pick = bal.pick("svc", None, 0.0)
        assert pick.reason == PickReason.PICKED and pick.instance is not None
        out[pick.instance.version] += 1
    return out


def test_a_split_sends_each_version_its_weight() -> None:
    got = _versions((("v1", 90), ("v2", 10)), {"n1": "v1", "n2": "v1", "n3": "v2"})
    assert 0.08 < got["v2"] / 5000 < 0.12 and got["v1"] + got["v2"] == 5000


def test_a_version_without_instances_gives_its_share_to_the_others() -> None:
    assert _versions((("v1", 50), ("v2", 50)), {"n1": "v1", "n2": "v1"}) == Counter(v1=5000)


def test_no_instance_of_any_split_version_ignores_the_split_and_counts_it() -> None:
    cat, _ = mesh({"n1": [("coap://10.0.0.1:5683", {"version": "v9"})]})
    bal = Balancer(cat, random.Random(1))
    bal.set_policy("svc", ServicePolicy(split=(("v1", 1),)))
    assert bal.pick("svc", None, 0.0).instance is not None
    assert bal.stats["split_unmatched"] == 1


def test_rate_limits_take_the_most_specific_selector_and_refill_with_time() -> None:
    limiter = RateLimiter(
        {
            "*": RateLimit(rate=1.0, burst=1),
            "service:web": RateLimit(rate=1.0, burst=3),
            "node:cam": RateLimit(rate=2.0, burst=2),
        }
    )
    assert limiter.selector("cam", ["web"]) == "node:cam"
    assert limiter.selector("w1", ["web", "x"]) == "service:web"
    assert limiter.selector("other", []) == "*"
    assert [limiter.allow("w1", ["web"], 0.0) for _ in range(4)] == [True, True, True, False]
    assert [limiter.allow("cam", [], 0.0) for _ in range(3)] == [True, True, False]
    assert limiter.allow("cam", [], 0.5)  # 2 tokens/s: one back after 0.5 s
    assert not limiter.allow("cam", [], 0.5)
    assert limiter.allow("w2", ["web"], 0.0)  # per source node: w2 has its own bucket
    assert limiter.limited == 3


def test_without_a_matching_selector_nothing_is_limited() -> None:
    limiter = RateLimiter({"node:cam": RateLimit(rate=0.001, burst=1)})
    assert all(limiter.allow("other", [], 0.0) for _ in range(100)) and len(limiter) == 0


def test_buckets_stay_bounded_under_many_sources() -> None:
    limiter = RateLimiter({"*": RateLimit(rate=0.001, burst=1)})
    for i in range(MAX_BUCKETS + 500):
        assert limiter.allow(f"n{i}", [], 0.0)
    assert len(limiter) == MAX_BUCKETS
