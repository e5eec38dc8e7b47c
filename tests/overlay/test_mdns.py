"""mDNS discovery (overlay.mdns): the TXT filter that decides which announced agents we join.

The loopback interface has no multicast, so the real advertise/browse round trip is in
tests/edgeagent/test_mdns.py (network namespace); here every acceptance rule is tested.
"""

from __future__ import annotations

from overlay.mdns import (
    MAX_LABEL_BYTES,
    Peer,
    cluster_hash,
    instance_name,
    parse_peer,
    txt_record,
)

OWN_ID = "a" * 32
PEER_ID = "b" * 32


def announced(
    cluster: str = "site", node_id: str = PEER_ID, port: int = 7946
) -> dict[bytes, bytes]:
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
    for change in (
        {b"port": b"0"},
        {b"port": b"70000"},
        {b"port": b"x"},
        {b"v": b"2"},
        {b"id": b""},
    ):
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
