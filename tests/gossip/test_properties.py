"""Membership invariants checked across many seeds in the simulator (virtual time).

Small clusters and short runs so the whole file stays quick enough for every CI
run. Each test loops over its seeds and reports every failing seed at once, so
a failure names the exact ``Simulator(seed, ...)`` to replay.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable

from gossip.config import GossipConfig, lan
from gossip.events import Event, MemberAlive, MemberFailed, MemberJoined, MemberLeft, MemberUpdated
from gossip.messages import MemberState
from testbed.sim import Simulator

CONVERGE_TIMEOUT = 30.0  # simulated seconds a small cluster gets to reach a full view
HEAL_TARGET = 60.0  # issue 2: a healed partition converges within 60 s of the links returning


class Recorder:
    """Every membership event, as (time, observer, member name, event type, incarnation)."""

    def __init__(self, sim: Simulator) -> None:
        self.events: list[tuple[float, str, str, type, int]] = []
        sim.on_event(self._record)

    def _record(self, now: float, name: str, event: Event) -> None:
        member = getattr(event, "member", None)
        if member is not None:
            self.events.append((now, name, member.name, type(event), member.incarnation))

    def about(self, member: str, kind: type, since: float = 0.0) -> dict[str, float]:
        """Observer -> first time it emitted ``kind`` about ``member`` at or after ``since``."""
        first: dict[str, float] = {}
        for t, observer, name, k, _ in self.events:
            if name == member and k is kind and t >= since:
                first.setdefault(observer, t)
        return first


def cluster(
    seed: int | str, n: int, *, config: GossipConfig | None = None, loss: float = 0.0
) -> tuple[Simulator, Recorder]:
    """A converged cluster of ``n`` nodes (the loss applies from the start)."""
    sim = Simulator(seed, config or lan(), loss=loss)
    rec = Recorder(sim)
    sim.add_cluster(n, seeds=2, spacing=0.05)
    assert sim.run_until_converged(CONVERGE_TIMEOUT), f"seed {seed}: no convergence"
    return sim, rec


def check_seeds(seeds: Iterable[int], check: Callable[[int], str | None]) -> None:
    """Run ``check`` per seed; fail listing every seed that returned a complaint."""
    failures = [f"seed {s}: {msg}" for s in seeds if (msg := check(s)) is not None]
    assert not failures, "\n".join(failures)


def test_crashed_node_is_declared_dead_by_every_live_node() -> None:
    def check(seed: int) -> str | None:
        sim, rec = cluster(seed, 6, loss=0.01)
        victim = sim.rng.choice(list(sim.nodes))
        crashed = sim.now
        sim.crash(victim)
        sim.run_for(45)  # LAN at N=6: max suspicion timeout 6 * 4 * log10(6) s ~ 19 s
        live = {n.name for n in sim.live_nodes()}
        detected = set(rec.about(victim, MemberFailed, crashed))
        if live - detected:
            return f"{sorted(live - detected)} never declared {victim} dead"
        views = {n: sim.view(n).get(victim) for n in live}
        if any(state != MemberState.DEAD for state in views.values()):
            return f"views of {victim}: {views}"
        return None

    check_seeds(range(30), check)


def test_loss_alone_never_kills_a_live_member() -> None:
    def check(seed: int) -> str | None:
        loss = (0.01, 0.03, 0.05)[seed % 3]
        sim, rec = cluster(seed, 10, loss=loss)
        sim.run_for(90)
        deaths = [e for e in rec.events if e[3] is MemberFailed]
        if deaths:
            return f"loss {loss}: false deaths {deaths[:5]}"
        return None

    check_seeds(range(15), check)


def test_graceful_leave_is_recorded_left_everywhere_never_dead() -> None:
    def check(seed: int) -> str | None:
        n = 4 + seed % 3
        sim, rec = cluster(seed, n, loss=(0.0, 0.01, 0.03, 0.05)[seed % 4])
        leaver = sim.rng.choice(list(sim.nodes))
        left_at = sim.now
        sim.leave(leaver)
        sim.run_for(15)
        peers = {x.name for x in sim.live_nodes()}
        dead = rec.about(leaver, MemberFailed, left_at)
        if dead:
            return f"{sorted(dead)} recorded {leaver} DEAD"
        left = rec.about(leaver, MemberLeft, left_at)
        if peers - set(left):
            return f"{sorted(peers - set(left))} never recorded {leaver} LEFT"
        views = {p: sim.view(p).get(leaver) for p in peers}
        if any(state != MemberState.LEFT for state in views.values()):
            return f"views of {leaver}: {views}"
        return None

    check_seeds(range(200), check)


def test_partition_longer_than_suspicion_timeout_heals_within_a_minute() -> None:
    def check(seed: int) -> str | None:
        sim, rec = cluster(seed, 8)
        names = list(sim.nodes)
        sim.rng.shuffle(names)
        left, right = names[:4], names[4:]
        cut = sim.now
        sim.partition([left, right])
        sim.run_for(60)  # LAN at N=8: suspicion timeout <= 6 * 4 * log10(8) s ~ 22 s
        a, b = left[0], right[0]
        if sim.view(a).get(b) != MemberState.DEAD:
            return f"after 60 s apart {a} sees {b} as {sim.view(a).get(b)}, not DEAD"
        if not rec.about(b, MemberFailed, cut):
            return "nobody declared the other side dead"
        sim.heal()
        healed = sim.now
        if not sim.run_until_converged(HEAL_TARGET):
            views = {
                n: sorted(k for k, v in sim.view(n).items() if v != MemberState.ALIVE)
                for n in sim.nodes
            }
            return f"not one view {HEAL_TARGET} s after heal; non-alive per node: {views}"
        return None if sim.now - healed <= HEAL_TARGET else "converged too late"

    check_seeds(range(8), check)


def test_restarted_node_rejoins_alive_everywhere_with_higher_incarnation() -> None:
    def check(seed: int) -> str | None:
        sim, rec = cluster(seed, 6)
        victim = sim.rng.choice(list(sim.nodes))
        before = sim.nodes[victim].core.incarnation
        sim.crash(victim)
        sim.run_for(5 if seed % 2 else 40)  # before and after the others declare it dead
        node = sim.restart(victim)
        back = sim.now
        if node.core.incarnation <= before:
            return f"restarted incarnation {node.core.incarnation} <= {before}"
        sim.run_for(20)
        for peer in sim.live_nodes():
            if peer.name == victim:
                continue
            member = peer.core.member(victim)
            if member is None or member.state != MemberState.ALIVE:
                return f"{peer.name} sees {victim} as {member}"
            if member.incarnation <= before:
                return f"{peer.name} still has incarnation {member.incarnation} <= {before}"
        back_events = (MemberJoined, MemberUpdated, MemberAlive)
        noticed = defaultdict(list)
        for t, observer, name, kind, inc in rec.events:
            if name == victim and t >= back and kind in back_events:
                noticed[observer].append(inc)
        if any(inc <= before for incs in noticed.values() for inc in incs):
            return f"an event carried the old incarnation: {dict(noticed)}"
        return None

    check_seeds(range(16), check)


def test_simultaneous_leaves_are_recorded_left_by_the_member_that_stays() -> None:
    # Agents stop soon after leave() (once their queue drains); several stopping at
    # once must still reach the member that stays, never leaving them alive or DEAD.
    def check(seed: int) -> str | None:
        sim, rec = cluster(seed, 5, loss=(0.0, 0.01)[seed % 2])
        names = sorted(sim.nodes)
        stayer = sim.rng.choice(names)
        leavers = [n for n in names if n != stayer]
        left_at = sim.now
        for name in leavers:
            sim.leave(name, linger=0.3)
        sim.run_for(30)
        view = sim.view(stayer)
        wrong = {n: view.get(n) for n in leavers if view.get(n) != MemberState.LEFT}
        if wrong:
            return f"{stayer} holds {wrong} after all others left at {left_at:.1f}"
        if rec.about(stayer, MemberFailed, left_at):
            return "someone recorded the stayer dead"
        return None

    check_seeds(range(100), check)
