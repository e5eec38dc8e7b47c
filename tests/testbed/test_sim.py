"""Simulator mechanics, checked with a tiny stand-in core whose behaviour is obvious.

The stand-in ("Beacon") sends one sealed datagram ``name|seq`` to every peer it
knows each second, learns peers from datagrams and push-pull streams, and
reports everything it receives as ``UserMessage`` events, so each test can see
exactly what the network delivered, when, and to whom. Tests against the real
core live in ``tests/gossip/test_properties.py``.
"""

from __future__ import annotations

import random

import pytest

from gossip.config import lan
from gossip.events import Event, UserMessage
from gossip.keyring import Keyring
from gossip.messages import Address
from testbed.sim import SimulationError, Simulator

AAD = b"edgeagent"
TICK = 1.0


class Beacon:
    """A minimal core: beacon every TICK seconds to known peers, echo what arrives as events."""

    def __init__(
        self,
        name: str,
        addr: Address,
        config: object,
        rng: random.Random,
        now: float,
        *,
        keyring: Keyring,
        incarnation: int = 0,
        meta: bytes = b"",
        epoch: int = 0,
    ) -> None:
        self.name = name
        self.addr = addr
        self.rng = rng
        self.keyring = keyring
        self.incarnation = incarnation
        self.peers: list[Address] = []
        self.seq = 0
        self.timer: float | None = now + TICK * rng.random()
        self.out: list[tuple[Address, bytes]] = []
        self.out_streams: list[tuple[Address, bytes]] = []
        self.events: list[Event] = []
        self.left = False

    def _learn(self, addr: Address) -> None:
        if addr not in self.peers and addr != self.addr:
            self.peers.append(addr)

    def _note(self, origin: str, payload: bytes) -> None:
        self.events.append(UserMessage(origin=origin, payload=payload))

    def join(self, seeds: list[Address], now: float) -> None:
        for seed in seeds:
            self.out_streams.append((seed, self.keyring.encrypt(f"join|{self.name}".encode(), AAD)))

    def leave(self, now: float) -> None:
        self.left = True

    def receive(self, data: bytes, src: Address, now: float) -> None:
        origin, _, seq = self.keyring.decrypt(data, AAD).decode().partition("|")
        self._learn(src)
        self._note(origin, seq.encode())

    def handle_stream(self, data: bytes, src: Address, now: float) -> bytes | None:
        text = self.keyring.decrypt(data, AAD).decode()
        self._learn(src)
        self._note(text.split("|")[1], b"stream")
        return self.keyring.encrypt(f"reply|{self.name}".encode(), AAD)

    def receive_stream_reply(self, data: bytes, src: Address, now: float) -> None:
        self._learn(src)
        self._note(self.keyring.decrypt(data, AAD).decode().split("|")[1], b"reply")

    def stream_failed(self, dst: Address, now: float) -> None:
        self._note("?", f"failed {dst[0]}".encode())

    def handle_timeout(self, now: float) -> None:
        assert self.timer is not None and now >= self.timer
        self.seq += 1
        self._note(self.name, b"tick")
        for peer in self.peers:
            self.out.append((peer, self.keyring.encrypt(f"{self.name}|{self.seq}".encode(), AAD)))
        self.timer += TICK

    def get_timer(self) -> float | None:
        return self.timer

    def datagrams_to_send(self) -> list[tuple[Address, bytes]]:
        out, self.out = self.out, []
        return out

    def streams_to_send(self) -> list[tuple[Address, bytes]]:
        out, self.out_streams = self.out_streams, []
        return out

    def next_event(self) -> Event | None:
        return self.events.pop(0) if self.events else None


Trace = list[tuple[float, str, str, bytes]]


def make_sim(seed: int = 1, **kwargs: float) -> tuple[Simulator, Trace]:
    sim = Simulator(seed, lan(), core_factory=Beacon, **kwargs)
    trace: Trace = []

    def record(now: float, name: str, event: Event) -> None:
        assert isinstance(event, UserMessage)
        trace.append((now, name, event.origin, event.payload))

    sim.on_event(record)
    return sim, trace


def received(
    trace: Trace, at: str, origin: str, start: float = 0.0, end: float = 1e9
) -> list[float]:
    """Times at which ``at`` received a beacon datagram from ``origin``."""
    return [
        t
        for t, name, org, payload in trace
        if name == at and org == origin and payload.isdigit() and start <= t < end
    ]


def delays(trace: Trace, src: str, dst: str, start: float = 0.0) -> list[float]:
    """Arrival minus send time of each of src's beacons received by dst at or after start."""
    sent = [
        t for t, name, org, p in trace if name == src and p == b"tick"
    ]  # seq k sent at sent[k-1]
    return [
        t - sent[int(p) - 1]
        for t, name, org, p in trace
        if name == dst and org == src and p.isdigit() and t >= start
    ]


def pair(seed: int = 1, **kwargs: float) -> tuple[Simulator, Trace]:
    sim, trace = make_sim(seed, **kwargs)
    sim.add_node("a")
    sim.add_node("b", join=["a"])
    sim.run_for(0.5)  # the join stream and its reply have arrived; both know each other
    return sim, trace


def test_same_seed_gives_identical_trace_and_other_seed_differs() -> None:
    def run(seed: int) -> Trace:
        sim, trace = make_sim(seed, loss=0.2, jitter=0.01)
        sim.add_cluster(8, seeds=2, spacing=0.05)
        sim.starve("n003")
        sim.run_for(20)
        return trace

    first, second, other = run(7), run(7), run(8)
    assert first == second
    assert first != other


def test_sealed_bytes_are_deterministic_from_the_seed() -> None:
    sealed = []
    for _ in range(2):
        sim, _ = make_sim(3)
        sim.add_node("a")
        sealed.append(sim.call("a", lambda core, now: core.keyring.encrypt(b"x", AAD)))
    assert sealed[0] == sealed[1]


def test_join_stream_makes_both_ends_know_each_other() -> None:
    sim, trace = pair()
    sim.run_for(5)
    assert len(received(trace, "a", "b")) >= 4
    assert len(received(trace, "b", "a")) >= 4
    assert sim.nodes["b"].streams_sent == 1 and sim.nodes["a"].streams_sent == 1


def test_latency_and_jitter_bound_delivery_time() -> None:
    sim, trace = pair(latency=0.05, jitter=0.01)
    sim.run_for(10)
    lags = delays(trace, "a", "b")
    assert len(lags) >= 9
    assert all(0.04 <= d <= 0.06 for d in lags)
    assert max(lags) - min(lags) > 0.005


def test_global_loss_drops_about_that_fraction_and_counts_sent_bytes() -> None:
    sim, trace = make_sim(5, loss=0.3)
    sim.add_cluster(5, seeds=4, spacing=0.0)
    sim.run_for(100)
    totals = sim.totals()
    attempted = totals["datagrams_sent"]
    assert attempted > 1000
    assert 0.25 < totals["datagrams_lost"] / attempted < 0.35
    assert totals["datagrams_received"] == attempted - totals["datagrams_lost"]
    assert totals["datagram_bytes_sent"] == sum(n.datagram_bytes_sent for n in sim.nodes.values())
    assert sim.max_datagram_bytes > 0


def test_per_link_loss_applies_to_that_link_only() -> None:
    sim, trace = make_sim(2)
    for name in "abc":
        sim.add_node(name, join=["a"] if name != "a" else [])
    sim.run_for(0.5)
    sim.call("b", lambda core, now: core._learn(sim.nodes["c"].addr))
    sim.set_link("a", "b", loss=1.0)
    start = sim.now
    sim.run_for(10)
    assert received(trace, "b", "a", start) == []
    assert received(trace, "a", "b", start) == []
    assert len(received(trace, "c", "a", start)) >= 9
    assert len(received(trace, "c", "b", start)) >= 9


def test_symmetric_partition_blocks_then_heal_restores() -> None:
    sim, trace = pair()
    sim.partition([["a"], ["b"]])
    cut = sim.now
    sim.run_for(10)
    assert received(trace, "a", "b", cut) == [] and received(trace, "b", "a", cut) == []
    assert sim.datagrams_blocked >= 18
    sim.heal()
    healed = sim.now
    sim.run_for(5)
    assert len(received(trace, "a", "b", healed)) >= 4
    assert len(received(trace, "b", "a", healed)) >= 4


def test_unlisted_nodes_form_one_group_in_a_partition() -> None:
    sim, trace = make_sim(4)
    for name in "abc":
        sim.add_node(name, join=["a"] if name != "a" else [])
    sim.run_for(0.5)
    sim.partition([["a"]])
    sim.call("b", lambda core, now: core._learn(sim.nodes["c"].addr))
    cut = sim.now
    sim.run_for(5)
    assert received(trace, "b", "a", cut) == []
    assert len(received(trace, "c", "b", cut)) >= 4


def test_one_way_block_drops_only_that_direction() -> None:
    sim, trace = pair()
    sim.block("a", "b")
    cut = sim.now
    sim.run_for(10)
    assert received(trace, "b", "a", cut) == []
    assert len(received(trace, "a", "b", cut)) >= 9


def test_stream_across_partition_fails_after_connect_timeout() -> None:
    sim, trace = make_sim(1, connect_timeout=1.5)
    sim.add_node("a")
    sim.add_node("b")
    sim.partition([["a"], ["b"]])
    sim.call("b", lambda core, now: core.join([sim.nodes["a"].addr], now))
    start = sim.now
    sim.run_for(5)
    failures = [t for t, name, org, p in trace if name == "b" and p.startswith(b"failed")]
    assert failures == [pytest.approx(start + 1.5)]
    assert not [1 for t, name, org, p in trace if name == "a" and p == b"stream"]


def test_stream_blocked_one_way_fails_too() -> None:
    sim, trace = make_sim(1)
    sim.add_node("a")
    sim.add_node("b")
    sim.block("a", "b")  # replies could not come back: TCP cannot connect
    sim.call("b", lambda core, now: core.join([sim.nodes["a"].addr], now))
    sim.run_for(3)
    assert [p for t, name, org, p in trace if name == "b" and p.startswith(b"failed")]


def test_stream_request_and_reply_each_take_latency() -> None:
    sim, trace = make_sim(1, latency=0.2, jitter=0.0)
    sim.add_node("a")
    sim.add_node("b", join=["a"])
    sim.run_for(1)
    got = {(name, p): t for t, name, org, p in trace if p in (b"stream", b"reply")}
    assert got[("a", b"stream")] == pytest.approx(0.2)
    assert got[("b", b"reply")] == pytest.approx(0.4)


def test_starved_node_reads_late_but_its_timers_fire_on_time() -> None:
    sim, trace = pair(jitter=0.0)
    sim.starve("b", 0.5, 2.5)
    start = sim.now
    sim.run_for(40)
    lags = delays(trace, "a", "b", start)
    assert len(lags) >= 30
    assert all(0.5 + 0.001 <= d <= 2.5 + 0.001 for d in lags)
    assert max(lags) - min(lags) > 1.0  # drawn per packet
    b_ticks = [t for t, name, org, p in trace if name == "b" and p == b"tick" and t >= start]
    assert all(y - x == pytest.approx(TICK) for x, y in zip(b_ticks, b_ticks[1:], strict=False))
    sim.unstarve("b")
    sim.run_for(3)  # let the late ones drain
    on_time = sim.now
    sim.run_for(10)
    assert all(d == pytest.approx(0.001) for d in delays(trace, "a", "b", on_time))


def test_crash_stops_timers_and_delivery_and_restart_bumps_incarnation() -> None:
    sim, trace = pair()
    sim.run_for(3)
    sim.crash("b")
    crashed = sim.now
    sim.run_for(10)
    assert [1 for t, name, org, p in trace if name == "b" and t > crashed] == []
    assert sim.datagrams_undeliverable >= 9
    with pytest.raises(SimulationError):
        sim.call("b", lambda core, now: None)
    node = sim.restart("b")
    assert node.core.incarnation == 1 and node.alive
    back = sim.now
    sim.run_for(5)
    assert [1 for t, name, org, p in trace if name == "a" and p == b"stream" and t > back]
    assert len(received(trace, "a", "b", back)) >= 4
    assert len(received(trace, "b", "a", back)) >= 4


def test_stream_reply_is_not_delivered_to_a_restarted_requester() -> None:
    sim, trace = make_sim(1, latency=0.5, jitter=0.0)
    sim.add_node("a")
    sim.add_node("b", join=["a"])
    sim.run_for(0.6)  # request delivered, reply in flight
    sim.crash("b")
    sim.restart("b", join=[])
    sim.run_for(2)
    assert [1 for t, name, org, p in trace if name == "b" and p == b"reply"] == []


def test_graceful_leave_keeps_node_running_for_linger_then_stops() -> None:
    sim, trace = pair()
    sim.leave("b", linger=3.0)
    assert sim.nodes["b"].core.left and sim.nodes["b"].status == "leaving"
    start = sim.now
    sim.run_for(2.9)
    assert len(received(trace, "a", "b", start)) >= 2
    sim.run_for(0.2)
    assert sim.nodes["b"].status == "left" and not sim.nodes["b"].alive
    stop = sim.now
    sim.run_for(5)
    assert received(trace, "a", "b", stop) == []


def test_schedule_and_call_run_at_virtual_times() -> None:
    sim, trace = pair()
    seen: list[float] = []
    sim.schedule(7.25, lambda: seen.append(sim.now))
    sim.schedule(3.0, lambda: sim.call("a", lambda core, now: seen.append(now)))
    sim.run_until(10)
    assert seen == [3.0, 7.25]
    assert sim.now == 10


def test_event_hook_sees_every_event_with_its_node_and_time() -> None:
    sim, trace = pair()
    sim.run_for(3)
    assert {name for _, name, _, _ in trace} == {"a", "b"}
    assert all(t <= sim.now for t, *_ in trace)
    assert trace == sorted(trace, key=lambda e: e[0])


def test_timer_that_never_advances_is_reported() -> None:
    class Stuck(Beacon):
        def handle_timeout(self, now: float) -> None:
            pass

    sim = Simulator(1, lan(), core_factory=Stuck)
    sim.add_node("a")
    with pytest.raises(SimulationError, match="does not advance"):
        sim.run_for(2)


def test_virtual_addresses_are_unique_and_never_loopback() -> None:
    sim, _ = make_sim(1)
    nodes = sim.add_cluster(300, seeds=1, spacing=0.0)
    addrs = {n.addr for n in nodes}
    assert len(addrs) == 300
    assert all(a[0].startswith("10.") for a in addrs)


def test_gossip_bench_reports_every_documented_number_for_a_small_cluster() -> None:
    import argparse

    from testbed.bench import gossip as bench

    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(
        ["--nodes", "8", "--duration", "45", "--settle", "2", "--loss", "0.01"]
    )
    out = bench.run(args)
    for key in (
        "nodes",
        "runs",
        "detection_p50_s",
        "detection_p99_s",
        "undetected",
        "false_deaths",
        "false_suspicions",
        "dissemination_p99_s",
        "dissemination_max_s",
        "bytes_per_node_s",
        "max_datagram_bytes",
        "sim_wall_s",
    ):
        assert key in out, key
    assert out["nodes"] == 8 and out["undetected"] == 0
    assert 0 < out["detection_p50_s"] <= out["detection_p99_s"] < 30
    assert 0 < out["dissemination_p99_s"] <= out["dissemination_max_s"] < 5
    assert 0 < out["bytes_per_node_s"] and 0 < out["max_datagram_bytes"] <= 1400


def test_nearest_rank_percentile() -> None:
    from testbed.bench.stats import nearest_rank

    values = [float(v) for v in range(1, 101)]
    assert nearest_rank(values, 50) == 50.0
    assert nearest_rank(values, 99) == 99.0
    assert nearest_rank([3.0, 1.0, 2.0], 50) == 2.0
    assert nearest_rank([], 50) is None


def test_wiretap_sees_every_datagram_with_its_fate() -> None:
    sim, trace = make_sim(1, loss=0.5)
    fates: dict[str, int] = {}
    sim.on_datagram(
        lambda now, src, dst, data, fate: fates.__setitem__(fate, fates.get(fate, 0) + 1)
    )
    sim.add_node("a")
    sim.add_node("b", join=["a"])
    sim.run_for(0.5)
    sim.block("b", "a")
    sim.run_for(20)
    sim.crash("b")
    sim.run_for(5)
    assert fates["blocked"] == sim.datagrams_blocked >= 19
    assert fates["lost"] == sim.datagrams_lost > 0
    assert fates["undeliverable"] == sim.datagrams_undeliverable >= 4
    assert fates["delivered"] == sim.totals()["datagrams_received"] > 0
    assert sum(fates.values()) == sim.totals()["datagrams_sent"]


def test_real_core_cluster_replays_identically_from_its_seed() -> None:
    def run(seed: int) -> tuple[list[tuple[float, str, str]], dict[str, int]]:
        sim = Simulator(seed, lan(), loss=0.05)
        events: list[tuple[float, str, str]] = []
        sim.on_event(lambda now, name, e: events.append((now, name, repr(e))))
        sim.add_cluster(6, seeds=2, spacing=0.1)
        sim.run_for(10)
        sim.crash("n002")
        sim.run_for(20)
        return events, sim.totals()

    first, second, other = run(11), run(11), run(12)
    assert first == second
    assert first[0] != other[0]
    assert any("MemberFailed" in e[2] for e in first[0])
