"""mDNS discovery in the agent: zeroconf stays unimported when mDNS is off, agents in a
network namespace find each other by mDNS alone, an announcement is one join attempt (then
backoff, a capped schedule), refusals are counted and logged at most once a minute, and many
announced names start a bounded number of lookups (the TXT, on-link and backoff rules on
virtual time: tests/overlay/test_mdns.py).
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from testbed.loopback import LoopbackCluster
from tests.host_tools import needs_netns


def test_zeroconf_is_not_imported_when_mdns_is_off() -> None:
    code = (
        "import sys, edgeagent.agent, edgeagent.cli;"
        "edgeagent.cli.build_parser();"
        "print('zeroconf' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.slow
@needs_netns("ip")
def test_agents_find_each_other_by_mdns_alone_and_ignore_other_clusters(
    multicast_netns: str,
) -> None:
    wrapper = ["ip", "netns", "exec", multicast_netns]
    with (
        LoopbackCluster(3, seeds=False, mdns=True, wrapper=wrapper, cluster="site-a") as site_a,
        LoopbackCluster(1, seeds=False, mdns=True, wrapper=wrapper, cluster="site-b") as site_b,
    ):
        site_a.wait_converged(60.0)
        assert all(a.status()["mdns"] for a in site_a.agents)
        time.sleep(3.0)  # site-b's announcements have been seen (and filtered) by now
        names = {a.name for a in site_a.agents}
        for agent in site_a.agents:
            assert set(agent.states()) == names
        assert set(site_b.agents[0].states()) == {site_b.agents[0].name}


# --------------------------------------------------------------------------- the feature's rules


class FakeHost:
    """What Mdns._on_peer uses of a FeatureHost: the view and join_once."""

    def __init__(self, alive: list[tuple[str, int]] = ()) -> None:
        from gossip.messages import MemberState

        member = type("M", (), {})
        self.members = []
        for addr in alive:
            m = member()
            m.addr, m.state = addr, MemberState.ALIVE
            self.members.append(m)
        self.view = type("V", (), {"members": self.members})()
        self.joined: list[tuple[str, int]] = []

    def join_once(self, addr: tuple[str, int]) -> None:
        self.joined.append(addr)


def test_an_announced_peer_is_joined_once_not_again_while_backing_off_and_never_if_alive() -> None:
    from edgeagent.features.mdns import Mdns
    from overlay.mdns import MAX_CANDIDATES, Peer

    feature = Mdns()
    host = FakeHost(alive=[("192.0.2.1", 7946)])
    feature._on_peer(host, Peer("a" * 32, ("192.0.2.1", 7946)), 0.0)  # already alive
    assert host.joined == []
    for t in range(10):  # re-announced 10 times in a second
        feature._on_peer(host, Peer("b" * 32, ("192.0.2.2", 7946)), t / 10)
    assert host.joined == [("192.0.2.2", 7946)]
    for i in range(3, 3 + 2 * MAX_CANDIDATES):  # a flood of names and addresses
        feature._on_peer(host, Peer(f"{i:032x}", (f"192.0.2.{i}", 7946)), 1.0)
    assert len(host.joined) == MAX_CANDIDATES  # 1 + the 31 places left
    status = feature._status()
    assert status["mdns_pending"] == MAX_CANDIDATES
    assert status["mdns_refused"] == {"full": MAX_CANDIDATES + 1}


def test_refusals_are_counted_and_logged_at_most_once_per_interval(caplog) -> None:
    import logging

    from edgeagent.features.mdns import RefusalLog
    from edgeagent.logs import FIELDS_ATTR

    caplog.set_level(logging.INFO, logger="edgeagent")
    refusals = RefusalLog(interval=60.0)
    logged = [refusals.refuse("off_link" if i % 2 else "foreign", i * 0.5) for i in range(1000)]
    assert refusals.total == {"off_link": 500, "foreign": 500}
    assert [i * 0.5 for i, yes in enumerate(logged) if yes] == [60.0 * k for k in range(9)]
    lines = [r for r in caplog.records if r.getMessage() == "mdns announcements refused"]
    assert len(lines) == 9
    # Each line counts what was refused since the previous one (120 refusals in 60 s).
    assert getattr(lines[2], FIELDS_ATTR) == {"counts": "foreign=60, off_link=60"}


async def test_many_announced_names_start_a_bounded_number_of_lookups() -> None:
    from zeroconf import ServiceStateChange

    from overlay.mdns import LOOKUP_BURST, MAX_PENDING_LOOKUPS, SERVICE_TYPE, _Resolver

    refused: list[str] = []
    resolver = _Resolver(lambda info: None, refused.append)  # aiozc None: lookups end at once
    for i in range(5000):
        resolver.on_change(None, SERVICE_TYPE, f"n{i}.{SERVICE_TYPE}", ServiceStateChange.Added)
    assert len(resolver._lookups) <= MAX_PENDING_LOOKUPS
    assert refused.count("rate_limited") >= 5000 - LOOKUP_BURST
    resolver.cancel()
