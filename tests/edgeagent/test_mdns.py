"""mDNS discovery in the agent: zeroconf stays unimported when mDNS is off, and agents in a
network namespace find each other by mDNS alone (the TXT filter rules: tests/overlay/test_mdns.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator

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


@pytest.fixture
def multicast_netns() -> Iterator[str]:
    """A private network namespace whose loopback carries multicast: mDNS stays inside it."""
    name = f"ea-mdns-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up", "multicast", "on"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


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
