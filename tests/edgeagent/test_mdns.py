"""mDNS discovery: the TXT filter that decides which announced agents we join.

The loopback interface here has no multicast, so a real advertise/browse round trip is left to
the network-namespace testbed; what is tested here is every acceptance rule.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from overlay.mdns import (
    MAX_LABEL_BYTES,
    Peer,
    cluster_hash,
    instance_name,
    parse_peer,
    txt_record,
)
from testbed.loopback import LoopbackCluster
from tests.host_tools import needs_netns

OWN_ID = "a" * 32
PEER_ID = "b" * 32


def announced(cluster: str = "site", node_id: str = PEER_ID, port: int = 7946) -> dict[bytes, bytes]:
    return {k.encode(): v.encode() for k, v in txt_record(cluster, node_id, port).items()}


def test_peer_of_the_same_cluster_is_accepted_with_its_gossip_port() -> None:
    peer = parse_peer(announced(), ["192.0.2.7"], cluster="site", own_node_id=OWN_ID)
    assert peer == Peer(node_id=PEER_ID, addr=("192.0.2.7", 7946))


def test_peer_of_another_cluster_is_ignored() -> None:
    assert parse_peer(announced("other"), ["192.0.2.7"], cluster="site", own_node_id=OWN_ID) is None


def test_our_own_announcement_is_ignored() -> None:
    props = announced(node_id=OWN_ID)
    assert parse_peer(props, ["192.0.2.7"], cluster="site", own_node_id=OWN_ID) is None


def test_bad_port_version_or_missing_fields_are_ignored() -> None:
    for change in ({b"port": b"0"}, {b"port": b"70000"}, {b"port": b"x"}, {b"v": b"2"}, {b"id": b""}):
        props = {**announced(), **change}
        assert parse_peer(props, ["192.0.2.7"], cluster="site", own_node_id=OWN_ID) is None
    props = announced()
    del props[b"c"]
    assert parse_peer(props, ["192.0.2.7"], cluster="site", own_node_id=OWN_ID) is None
    props = {**announced(), b"id": b"\xff\xfe"}  # not UTF-8
    assert parse_peer(props, ["192.0.2.7"], cluster="site", own_node_id=OWN_ID) is None


def test_unusable_addresses_are_skipped_and_ipv4_preferred() -> None:
    addrs = ["not-an-ip", "0.0.0.0", "224.0.0.251", "fe80::1", "2001:db8::5", "192.0.2.9"]
    peer = parse_peer(announced(), addrs, cluster="site", own_node_id=OWN_ID)
    assert peer is not None and peer.addr == ("192.0.2.9", 7946)
    peer = parse_peer(announced(), ["fe80::1", "2001:db8::5"], cluster="site", own_node_id=OWN_ID)
    assert peer is not None and peer.addr == ("2001:db8::5", 7946)
    assert parse_peer(announced(), ["fe80::1"], cluster="site", own_node_id=OWN_ID) is None


def test_txt_carries_only_a_hash_of_the_cluster_name() -> None:
    txt = txt_record("secret-site", PEER_ID, 7946)
    assert "secret-site" not in txt.values()
    assert txt["c"] == cluster_hash("secret-site") != cluster_hash("other-site")


def test_instance_name_fits_one_dns_label() -> None:
    name = instance_name("x" * 200, PEER_ID)
    assert len(name.encode()) <= MAX_LABEL_BYTES and name.endswith(PEER_ID[:8])
    assert len(instance_name("ü" * 40, PEER_ID).encode()) <= MAX_LABEL_BYTES


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
