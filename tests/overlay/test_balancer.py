"""The balancer on virtual time with seeds: P2C, ejection, retries, locality, hashing, faults."""

from __future__ import annotations

import heapq
import random
from collections import Counter

import pytest

from gossip.messages import MemberState
from overlay import balancer as balancer_module
from overlay.balancer import (
    Balancer,
    FaultPolicy,
    Outcome,
    OutlierPolicy,
    PickReason,
    Policy,
    RetryPolicy,
    ServicePolicy,
    Tier,
    tier_loads,
)
from overlay.catalog import Catalog, Instance, encode_instances, make_instance


def mesh(
    layout: dict[str, list[tuple[str, dict[str, str]]]], local: str = "n0"
) -> tuple[Catalog, dict[str, list[Instance]]]:
    """A catalog with ``layout[node] = [(uri, tags), ...]`` instances of service "svc"."""
    cat = Catalog(local=local)
    for node, items in layout.items():
        if node != local:
            cat.on_member(node, MemberState.ALIVE)
        cat.on_state(
            node, encode_instances([make_instance("svc", uri, tags=tags) for uri, tags in items])
        )
    by_node: dict[str, list[Instance]] = {}
    for inst in cat.instances("svc"):
        by_node.setdefault(inst.node, []).append(inst)
    return cat, by_node


def flat(n: int, local: str = "n0") -> tuple[Catalog, list[Instance]]:
    cat, _ = mesh({f"n{i + 1}": [(f"coap://10.0.0.{i + 1}:5683", {})] for i in range(n)}, local)
    return cat, cat.instances("svc")


def run_load(
    bal: Balancer,
    latency: dict[str, float],
    *,
    seed: int,
    rate: float = 200.0,
    duration: float = 60.0,
) -> Counter[str]:
    """Open-loop Poisson arrivals; each try takes latency[key] x a lognormal jitter."""
    rng = random.Random(seed)
    picks: Counter[str] = Counter()
    done: list[tuple[float, int, Instance, float]] = []
    now, seq = 0.0, 0
    while now < duration:
        now += rng.expovariate(rate)
        while done and done[0][0] <= now:
            at, _, inst, took = heapq.heappop(done)
            bal.on_success(inst, took, at)
        chosen = bal.pick("svc", None, now).instance
        assert chosen is not None
        bal.on_start(chosen, now)
        picks[chosen.key] += 1
        took = latency[chosen.key] * rng.lognormvariate(0.0, 0.25)
        seq += 1
        heapq.heappush(done, (now + took, seq, chosen, took))
    return picks


@pytest.mark.parametrize(("n", "seed"), [(2, 1), (5, 2), (10, 3)])
def test_p2c_sends_a_10x_slower_instance_at_most_10_percent(n: int, seed: int) -> None:
    cat, insts = flat(n)
    bal = Balancer(cat, random.Random(seed), default=ServicePolicy(locality=False))
    latency = {i.key: 0.010 for i in insts}
    slow = insts[0].key
    latency[slow] = 0.100
    picks = run_load(bal, latency, seed=seed)
    total = sum(picks.values())
    share = picks[slow] / total
    assert share <= 0.10, (n, share)
    assert picks[slow] > 0  # still probed now and then (the estimate decays)
    fast = [picks[i.key] / total for i in insts[1:]]
    assert max(fast) - min(fast) < 0.5 / n  # the fast ones share the rest about evenly


def test_p2c_equal_instances_share_evenly() -> None:
    cat, insts = flat(4)
    bal = Balancer(cat, random.Random(4), default=ServicePolicy(locality=False))
    picks = run_load(bal, {i.key: 0.01 for i in insts}, seed=4, duration=30.0)
    shares = [picks[i.key] / sum(picks.values()) for i in insts]
    assert all(0.18 < s < 0.32 for s in shares), shares  # peaks make P2C shares wobble


def test_round_robin_and_weighted_split() -> None:
    cat, insts = flat(3)
    rr = Balancer(
        cat, random.Random(5), default=ServicePolicy(lb=Policy.ROUND_ROBIN, locality=False)
    )
    seen = [rr.pick("svc", None, 0.0).instance for _ in range(9)]
    assert seen == insts * 3
    cat2, _ = mesh({"n1": [("coap://10.0.0.1:1", {})], "n2": [("coap://10.0.0.2:1", {})]})
    canary = cat2.instances("svc")[1]
    # weights come from the instances: re-publish n2's with weight 1, n1's with weight 9
    cat2.on_state("n1", encode_instances([make_instance("svc", "coap://10.0.0.1:1", weight=9)]))
    weighted = Balancer(
        cat2, random.Random(6), default=ServicePolicy(lb=Policy.WEIGHTED, locality=False)
    )
    counts = Counter(weighted.pick("svc", None, 0.0).instance.key for _ in range(10_000))  # type: ignore[union-attr]
    assert 0.08 < counts[canary.key] / 10_000 < 0.12


def test_unknown_service_and_no_healthy_instance() -> None:
    cat, insts = flat(2)
    bal = Balancer(cat, random.Random(7))
    assert bal.pick("nope", None, 0.0).reason == PickReason.UNKNOWN_SERVICE
    for inst in insts:
        cat.on_member(inst.node, MemberState.DEAD)
    pick = bal.pick("svc", None, 0.0)
    assert (pick.instance, pick.reason) == (None, PickReason.NO_HEALTHY)
    assert bal.stats["unknown_service"] == 1 and bal.stats["no_healthy"] == 1


def fail(bal: Balancer, inst: Instance, times: int, now: float) -> bool:
    ejected = False
    for _ in range(times):
        bal.on_start(inst, now)
        ejected = bal.on_failure(inst, 0.001, now, Outcome.UNREACHABLE) or ejected
    return ejected


def test_consecutive_failures_eject_for_a_growing_time_and_return() -> None:
    cat, insts = flat(3)
    bal = Balancer(cat, random.Random(8), default=ServicePolicy(locality=False))
    bad = insts[0]
    assert not fail(bal, bad, 4, 0.0)
    bal.on_start(bad, 0.0)
    bal.on_success(bad, 0.01, 0.0)  # a success resets the run
    assert not fail(bal, bad, 4, 0.0)
    assert fail(bal, bad, 1, 1.0)  # the 5th in a row
    assert bad.key in bal.ejected(1.0)
    picked = {bal.pick("svc", None, t).instance.key for t in range(2, 31)}  # type: ignore[union-attr]
    assert bad.key not in picked
    assert bad.key not in bal.ejected(31.0)  # 30 s (base x 1) later it is back
    back = Counter()
    for k in range(1000):  # 100 req/s of 10 ms successes for 10 s: it gets its share again
        now = 31.0 + k * 0.01
        inst = bal.pick("svc", None, now).instance
        assert inst is not None
        bal.on_start(inst, now)
        bal.on_success(inst, 0.01, now + 0.01)
        back[inst.key] += 1
    assert back[bad.key] > 250, back
    assert fail(bal, bad, 5, 32.0)  # ejected again soon: 60 s this time
    assert bad.key in bal.ejected(91.0) and bad.key not in bal.ejected(92.1)
    # a long healthy spell lowers the count again: 300 s later it is 30 s once more
    assert fail(bal, bad, 5, 92.0 + 300.0)
    assert bad.key not in bal.ejected(392.0 + 30.1)


def test_never_eject_the_last_instance_nor_over_the_percentage() -> None:
    cat, insts = flat(1)
    bal = Balancer(cat, random.Random(9))
    assert not fail(bal, insts[0], 50, 0.0)
    assert bal.pick("svc", None, 1.0).instance == insts[0]
    assert bal.stats["ejections_refused"] > 0

    cat, insts = flat(2)
    bal = Balancer(cat, random.Random(9))
    assert fail(bal, insts[0], 5, 0.0)
    assert not fail(bal, insts[1], 50, 0.0)  # the last usable one stays
    assert bal.pick("svc", None, 1.0).instance == insts[1]

    cat, insts = flat(4)
    bal = Balancer(
        cat, random.Random(9), default=ServicePolicy(outlier=OutlierPolicy(max_ejection_percent=50))
    )
    results = [fail(bal, inst, 5, 0.0) for inst in insts]
    assert results == [True, True, False, False]
    assert len(bal.ejected(1.0)) == 2


def test_retries_only_idempotent_within_max_and_budget() -> None:
    cat, insts = flat(3)
    bal = Balancer(cat, random.Random(10), default=ServicePolicy(retry=RetryPolicy(max_retries=2)))
    assert not bal.should_retry("svc", "POST", 1, Outcome.TIMEOUT, 0.0).retry
    assert bal.should_retry("svc", "POST", 1, Outcome.TIMEOUT, 0.0).reason == "not_idempotent"
    assert not bal.should_retry("svc", "GET", 1, Outcome.SERVER_ERROR, 0.0).retry
    assert not bal.should_retry("svc", "GET", 3, Outcome.TIMEOUT, 0.0).retry
    decision = bal.should_retry("svc", "get", 2, Outcome.RESET, 0.0)
    assert decision.retry and 0.0 <= decision.delay_s <= 0.05
    for method in ("GET", "FETCH", "PUT", "DELETE"):
        assert bal.should_retry("svc", method, 1, Outcome.OVERLOADED, 0.0).retry


def test_retry_budget_caps_retries_when_everything_fails() -> None:
    cat, insts = flat(3)
    policy = RetryPolicy(max_retries=3, budget_ratio=0.2, min_retries_per_s=10.0, budget_ttl_s=10.0)
    bal = Balancer(cat, random.Random(11), default=ServicePolicy(retry=policy, locality=False))
    rng = random.Random(11)
    now, requests, retries = 0.0, 0, 0
    retry_times: list[float] = []
    while now < 60.0:  # 100 req/s, every try fails
        now += rng.expovariate(100.0)
        requests += 1
        attempt, tried = 1, set()
        inst = bal.pick("svc", None, now).instance
        assert inst is not None
        bal.on_start(inst, now)
        while True:
            tried.add(inst.key)
            bal.on_failure(inst, 0.01, now, Outcome.TIMEOUT)
            if not bal.should_retry("svc", "GET", attempt, Outcome.TIMEOUT, now).retry:
                break
            retries += 1
            retry_times.append(now)
            attempt += 1
            inst = bal.pick("svc", None, now, exclude=tried).instance
            assert inst is not None
            bal.on_start(inst, now, retry=True)
    # In every 10 s window: retries <= 10/s x 10 s + 20% of requests (~1000) = 300.
    for start in range(0, 51):
        in_window = sum(1 for t in retry_times if start <= t < start + 10)
        assert in_window <= 100 + 0.2 * 1100, (start, in_window)
    assert 0.2 * requests < retries < 0.45 * requests  # far below 3 tries per request
    assert bal.stats["retries_refused_budget"] > 0


def test_retry_budget_memory_is_bounded_without_retries() -> None:
    cat, insts = flat(1)
    bal = Balancer(cat, random.Random(16))
    for k in range(10_000):  # 1,000 s of requests that all succeed
        bal.on_start(insts[0], k * 0.1)
        bal.on_success(insts[0], 0.01, k * 0.1)
    assert len(bal._budgets["svc"].buckets) <= 11


def test_locality_prefers_node_then_site_and_spills_over_as_health_drops() -> None:
    layout = {
        "n0": [(f"coap://10.0.0.{i}:1", {"site": "s1"}) for i in range(1, 5)],
        "n1": [("coap://10.0.1.1:1", {"site": "s1"}), ("coap://10.0.1.2:1", {"site": "s1"})],
        "n2": [("coap://10.0.2.1:1", {"site": "s2"}), ("coap://10.0.2.2:1", {"site": "s2"})],
    }
    cat, by_node = mesh(layout)
    bal = Balancer(cat, random.Random(12), site="s1", default=ServicePolicy(lb=Policy.ROUND_ROBIN))

    def tiers(draws: int = 10_000) -> dict[Tier, float]:
        counts = Counter(bal.pick("svc", None, 1.0).tier for _ in range(draws))
        return {t: counts[t] / draws for t in Tier}

    assert tiers()[Tier.NODE] == 1.0
    local = by_node["n0"]
    fail(bal, local[0], 5, 0.0)  # 3 of 4 usable: 0.75 x 1.4 >= 1, still all local
    assert tiers()[Tier.NODE] == 1.0
    fail(bal, local[1], 5, 0.0)  # 2 of 4: 70% local, 30% spills to the site
    shares = tiers()
    assert abs(shares[Tier.NODE] - 0.7) < 0.02 and abs(shares[Tier.SITE] - 0.3) < 0.02
    cat.on_member("n1", MemberState.DEAD)  # site gone too: the spill goes anywhere
    shares = tiers()
    assert abs(shares[Tier.NODE] - 0.7) < 0.02 and abs(shares[Tier.ANY] - 0.3) < 0.02
    off = Balancer(cat, random.Random(12), default=ServicePolicy(locality=False))
    assert {off.pick("svc", None, 1.0).tier for _ in range(100)} == {Tier.ANY}


def test_tier_loads_are_envoys_priority_loads() -> None:
    assert tier_loads([4, 2, 2], [4, 2, 2], 1.4) == [1.0, 0.0, 0.0]
    assert tier_loads([2, 2, 2], [4, 2, 2], 1.4) == pytest.approx([0.7, 0.3, 0.0])
    assert tier_loads([1, 1, 0], [4, 4, 4], 1.4) == pytest.approx([0.5, 0.5, 0.0])  # scaled up
    assert tier_loads([0, 0, 3], [0, 0, 3], 1.4) == [0.0, 0.0, 1.0]


def test_consistent_hash_moves_only_the_leavers_keys() -> None:
    n = 10
    cat, insts = flat(n)
    bal = Balancer(cat, random.Random(13), default=ServicePolicy(lb=Policy.HASH, locality=False))
    keys = [f"/sensor/{k}" for k in range(10_000)]
    before = {k: bal.pick("svc", k, 0.0).instance.key for k in keys}  # type: ignore[union-attr]
    shares = Counter(before.values())
    assert max(shares.values()) / min(shares.values()) < 1.6  # 160 vnodes: fairly even
    leaver = insts[3]
    cat.on_member(leaver.node, MemberState.DEAD)
    after = {k: bal.pick("svc", k, 0.0).instance.key for k in keys}  # type: ignore[union-attr]
    moved = [k for k in keys if before[k] != after[k]]
    assert all(before[k] == leaver.key for k in moved)
    assert all(after[k] != leaver.key for k in keys)
    assert abs(len(moved) / len(keys) - 1 / n) < 0.03
    cat.on_member(leaver.node, MemberState.ALIVE)  # back: the same keys return
    assert {k: bal.pick("svc", k, 0.0).instance.key for k in keys} == before  # type: ignore[union-attr]


def test_fault_injection_rates() -> None:
    cat, _ = flat(1)
    bal = Balancer(cat, random.Random(14))
    assert bal.fault("svc").abort_code is None and bal.fault("svc").delay_s == 0.0
    bal.set_policy(
        "svc",
        ServicePolicy(
            fault=FaultPolicy(
                delay_s=0.5, delay_percent=25.0, abort_code="5.00", abort_percent=10.0
            )
        ),
    )
    faults = [bal.fault("svc") for _ in range(20_000)]
    delayed = sum(1 for f in faults if f.delay_s == 0.5) / len(faults)
    aborted = sum(1 for f in faults if f.abort_code == "5.00") / len(faults)
    assert abs(delayed - 0.25) < 0.015 and abs(aborted - 0.10) < 0.01
    bal.set_policy("svc", None)
    assert bal.fault("svc").abort_code is None


def test_per_instance_records_stay_bounded_under_churn(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(balancer_module, "MAX_TRACKED", 50)
    cat = Catalog(local="n0")
    bal = Balancer(cat, random.Random(15))
    for round_ in range(40):  # 40 rounds of 5 fresh instances, the old ones withdrawn
        cat.on_state(
            "n0",
            encode_instances(
                [make_instance("svc", f"coap://10.1.{round_}.{i}:1") for i in range(5)]
            ),
        )
        for _ in range(20):
            inst = bal.pick("svc", None, float(round_)).instance
            assert inst is not None
            bal.on_start(inst, float(round_))
            bal.on_success(inst, 0.01, float(round_))
        assert len(bal._endpoints) <= 50
    assert bal.stats["pruned"] > 0


def test_a_path_lost_outside_a_try_counts_towards_ejection_and_ends_no_try() -> None:
    cat, insts = flat(3)
    bal = Balancer(cat, random.Random(8), default=ServicePolicy(locality=False))
    bad = insts[0]
    bal.on_start(bad, 0.0)  # one try of an ordinary request in flight meanwhile
    assert not any(bal.on_lost(bad, 0.1 * k) for k in range(4))
    assert bal.on_lost(bad, 0.5)  # the 5th failure in a row, as on_failure counts them
    assert bad.key in bal.ejected(0.5)
    assert bal._endpoints[bad.key].outstanding == 1  # the try in flight is still counted
