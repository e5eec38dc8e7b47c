"""A member that missed every copy of a Dead is told directly (core._tell_gone).

In a 5-node cluster a Dead is sent RetransmitMult * ceil(log10 N) = 2 times per holder, some
of them to the dead member itself, so in ~4 % of crashes one member hears none and, nobody left to
confirm its suspicion, waits the longest one: suspicion_max_timeout_mult (6) x 3 s = 18 s
(the containers' churn scenario failed on that: n2 kept n3 suspect for 18 s). Its Suspect, or
the PingReq it sends when it probes the dead member again, now reaches members that hold the
member dead, and they tell it.
"""

from __future__ import annotations

import random

from gossip.config import local
from gossip.core import Membership
from gossip.messages import Alive, Dead, MemberState, Suspect
from testbed.sim import Simulator, make_keyring, seal, sent

SRC = ("10.0.9.9", 7946)
DETECTED_WITHIN = 12.0  # s after the crash; the longest unconfirmed suspicion alone is 18 s


def test_every_member_sees_a_crash_well_before_the_longest_suspicion() -> None:
    late = []
    for seed in range(60):  # ~0.01 s each on virtual time; several of them took 19-25 s before
        sim = Simulator(seed, local())
        names = sim.converge_cluster(5, timeout=60)
        victim = names[2]
        sim.crash(victim)
        sim.run_for(DETECTED_WITHIN)
        stale = [n for n in names if n != victim and sim.view(n).get(victim) != MemberState.DEAD]
        if stale:
            late.append((seed, stale))
    assert late == []


def test_a_stale_suspect_is_answered_with_our_dead_at_most_once_per_probe_interval() -> None:
    core = Membership("a", ("10.0.0.1", 7946), local(), random.Random(3), 0.0,
                      keyring=make_keyring(random.Random(4)))  # fmt: skip
    peers = [Alive(f"p{i}", 1, (f"10.0.1.{i}", 7946), b"") for i in range(4)]
    core.receive(seal(peers, to="a"), SRC, 0.0)
    core.receive(seal([Dead("p0", 1, "p1")], to="a"), SRC, 0.1)
    sent(core)
    core.receive(seal([Suspect("p0", 1, "p2")], to="a"), SRC, 0.2)
    told = [(dst, msgs[0]) for dst, msgs in sent(core)]  # queued broadcasts ride behind it
    assert told == [(("10.0.1.2", 7946), Suspect("p0", 1, "a"))]  # a confirmation, not a verdict
    core.receive(seal([Suspect("p0", 1, "p3")], to="a"), SRC, 0.3)  # within the probe interval
    assert sent(core) == []
    assert core.stats.gone_told == 1
