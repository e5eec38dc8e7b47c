"""``python -m testbed.bench traffic``: the wiretap's attribution, and short real runs.

The real runs start 3 agents with windows of a few seconds: they check the result's shape
and that its numbers are plausible (bytes counted, cluster converged, the tap saw what
nftables counted, nothing left behind), not the cluster's traffic levels.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys

import pytest

from gossip.codec import DatagramHeader, encode_datagram, encoded_size
from gossip.keyring import Keyring
from gossip.messages import Alive, Ping, StateUpdate
from testbed import netns
from testbed.bench import traffic
from tests.host_tools import needs_netns

PORT = 7946
KEY = bytes(range(32))
HDR = DatagramHeader("a", 1, 0, 0)
SHORT = ["--nodes", "3", "--startup-window", "3", "--settle", "5", "--window", "3", "--timeline", "8"]


def _udp_packet(payload: bytes) -> bytes:
    """An lo frame: zeroed Ethernet header, IPv4 (no options), UDP to PORT."""
    total = 20 + 8 + len(payload)
    ip = struct.pack(">BBHHHBBH4s4s", 0x45, 0, total, 0, 0, 64, 17, 0,
                     bytes([127, 1, 1, 1]), bytes([127, 1, 1, 2]))
    udp = struct.pack(">HHHH", PORT, PORT, 8 + len(payload), 0)
    return bytes(14) + ip + udp + payload


def test_tap_splits_a_probe_datagram_into_probe_piggyback_and_overhead() -> None:
    ping = Ping(7, "b", "a", ("127.1.1.1", PORT))
    alive = Alive("c", 3, ("127.1.1.3", PORT), b"")
    claim = StateUpdate("c", 2, "ipam", "10.0.0.3")
    sealed = Keyring([KEY]).encrypt(encode_datagram([ping, alive, claim], HDR), b"test")
    tap = traffic._Tap(PORT, KEY, "test")
    packet = _udp_packet(sealed)
    tap.packet(packet, 0)
    kinds = tap.buckets[0]
    assert kinds["udp:probe:ping"] == [1, encoded_size(ping)]
    assert kinds["udp:piggyback:alive"] == [1, encoded_size(alive)]
    assert kinds["udp:piggyback:state:ipam"] == [1, encoded_size(claim)]
    assert sum(b for _, b in kinds.values()) == len(packet) - 14  # every IP byte, once
    tap.packet(packet, 1)
    redundancy = tap.dump(0)["redundancy"]
    assert redundancy["alive"] == {"distinct": 1, "sent": 2, "sends_per_update": 2.0}
    assert redundancy["state:ipam"]["distinct_values"] == 1


def test_tap_counts_a_datagram_under_another_key_as_undecodable() -> None:
    sealed = Keyring([bytes(32)]).encrypt(encode_datagram([Ping(1, "b", "a", ("127.1.1.1", PORT))], HDR), b"test")
    tap = traffic._Tap(PORT, KEY, "test")
    tap.packet(_udp_packet(sealed), 0)
    assert list(tap.buckets[0]) == ["udp:undecodable"]


def _tcp(sport: int, dport: int, flags: int, payload: bytes = b"") -> bytes:
    """A TCP header (no options) with ``flags``, then ``payload``."""
    return struct.pack(">HHIIBBHHH", sport, dport, 0, 0, 5 << 4, flags, 65535, 0, 0) + payload


def test_tap_reads_a_push_pull_through_its_challenge_and_sealed_headers() -> None:
    from edgeagent.streams import CHALLENGE_SIZE, HEADER_SIZE, Header, Kind, StreamAuth
    from gossip.codec import encode_frame
    from gossip.messages import PushPull

    keyring = Keyring([KEY])
    auth = StreamAuth(keyring, "test")
    request = keyring.encrypt(encode_frame(PushPull("a", True, False, (), ())), b"test")
    reply = keyring.encrypt(encode_frame(PushPull("b", False, True, (), ())), b"test")
    challenge, nonce = b"c" * CHALLENGE_SIZE, b"n" * 16
    client, server = bytes([127, 1, 1, 1]), bytes([127, 1, 1, 2])
    tap = traffic._Tap(PORT, KEY, "test")
    tap.segment(client, server, _tcp(40000, PORT, traffic.TCP_SYN), 60, 0)
    tap.segment(server, client, _tcp(PORT, 40000, traffic.TCP_SYN), 60, 0)
    tap.segment(server, client, _tcp(PORT, 40000, 0, challenge), 40 + CHALLENGE_SIZE, 0)
    head = auth.seal(Header(Kind.REQUEST, len(request), challenge, nonce))
    tap.segment(client, server, _tcp(40000, PORT, 0, head + request), 40 + HEADER_SIZE + len(request), 0)
    head = auth.seal(Header(Kind.REPLY, len(reply), nonce, challenge))
    tap.segment(server, client, _tcp(PORT, 40000, 0, head + reply), 40 + HEADER_SIZE + len(reply), 0)
    cells = tap.buckets[0]
    assert cells["tcp:push_pull:join"] == [1, HEADER_SIZE + len(request)]
    assert cells["tcp:push_pull:reply"] == [1, HEADER_SIZE + len(reply)]
    assert cells["tcp:stream_header"] == [0, CHALLENGE_SIZE]
    assert "tcp:undecodable" not in cells


def _bench(*extra: str) -> dict[str, object]:
    proc = subprocess.run(
        [sys.executable, "-m", "testbed.bench", "traffic", *SHORT, *extra, "--json"],
        capture_output=True, text=True, timeout=240, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return dict(json.loads(proc.stdout))


def _check_common(result: dict[str, object]) -> None:
    assert result["nodes"] == 3
    assert result["alive_views_at_end"] == 3
    assert 0 < result["converged_s"] < 60  # type: ignore[operator]
    for key in ("startup_bytes_per_node_s", "settled_bytes_per_node_s"):
        assert 30 < result[key] < 100_000, key  # type: ignore[operator]  # a probe a second is ~80 B
    assert 0 <= result["settled_cpu_percent"] < 50  # type: ignore[operator]
    rss = result["rss_mb"]
    assert isinstance(rss, dict) and 10 < rss["median"] <= rss["max"] < 500
    assert isinstance(result["bytes_by_kind"], dict) and result["bytes_by_kind"]["settled"]
    assert result["config"]["window_s"] == 3  # type: ignore[index]


@pytest.mark.slow
@pytest.mark.root
@needs_netns("ip", "nft")
def test_traffic_in_a_namespace_counts_every_byte_and_cleans_up() -> None:
    before = netns.list_netns()
    result = _bench()
    _check_common(result)
    assert result["method"] == "nftables"
    assert 0.95 < result["tap_coverage"] <= 1.0  # type: ignore[operator]
    settled = result["bytes_by_kind"]["settled"]  # type: ignore[index]
    assert settled["udp:probe:ping"] > 0 and settled["udp:overhead"] > 0
    assert len(result["timeline"]["udp_bytes"]) == 8  # type: ignore[index]
    assert not {ns for ns in netns.list_netns() - before if ns.startswith("ea-traffic-")}


@pytest.mark.slow
def test_traffic_from_metrics_states_its_header_estimate() -> None:
    result = _bench("--no-netns")
    _check_common(result)
    assert result["method"] == "metrics"
    assert result["header_estimate"]["udp_bytes_per_datagram"] == 28  # type: ignore[index]
    assert result["bytes_by_kind"]["settled"]["udp"] > 0  # type: ignore[index]
