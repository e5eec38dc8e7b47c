"""Hostile datagrams and streams sent to a running agent (DESIGN principle 3).

Malformed, truncated, oversized, wrong-key and other-cluster datagrams and TCP streams
(garbage, an unauthenticated header, a header naming a huge body, a slowloris partial header,
a connection flood) go to one real agent. It must keep running and serving, count every kind in its metrics, and keep its
member list exactly as it was.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Iterator

import pytest

from edgeagent.streams import CHALLENGE_SIZE, Header, Kind, StreamAuth, body_digest
from gossip.codec import DatagramHeader, destination_tag, encode_datagram
from gossip.keyring import Keyring
from gossip.messages import Ping
from testbed.loopback import LoopbackAgent, LoopbackCluster

pytestmark = pytest.mark.slow

CLUSTER = "loopback"
STREAM_CUTOFF_WAIT = 40.0  # the agent's header timeout is 2 s; the machine is shared
FLOOD_CONNECTIONS = 40  # from one address: above MAX_INBOUND_PER_SOURCE and MAX_INBOUND_STREAMS


@pytest.fixture(scope="module")
def cluster() -> Iterator[LoopbackCluster]:
    with LoopbackCluster(2, cluster=CLUSTER, metrics=True) as c:
        c.wait_converged(60.0)
        yield c


def dropped(agent: LoopbackAgent, reason: str) -> float:
    return agent.scrape_metrics().get(f'edgeagent_packets_dropped_total{{reason="{reason}"}}', 0.0)


def membership(agent: LoopbackAgent) -> list[tuple[str, str, str, int]]:
    return sorted((m["name"], m["address"], m["state"], m["incarnation"]) for m in agent.members())


def sealed(key: bytes, plaintext: bytes, cluster: str = CLUSTER) -> bytes:
    return Keyring([key]).encrypt(plaintext, cluster.encode())


def frame(data: bytes) -> bytes:
    """The pre-header frame format: a length prefix and the body, no key needed."""
    return struct.pack(">I", len(data)) + data


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n and (chunk := sock.recv(n - len(data))):
        data += chunk
    return data


def send_stream(target: tuple[str, int], data: bytes | None = None, *, key: bytes | None = None,
                body: bytes = b"", length: int | None = None, cluster: str = CLUSTER) -> bytes:
    """On a fresh connection, read the challenge and send ``data``, or a header sealed with
    ``key`` naming ``length`` (default: the body's) and ``body``; return what comes back after
    the challenge before the agent closes."""
    with socket.create_connection(target, timeout=30) as sock:
        challenge = recv_exactly(sock, CHALLENGE_SIZE)
        assert len(challenge) == CHALLENGE_SIZE
        if data is None:
            assert key is not None
            auth = StreamAuth(Keyring([key]), cluster)
            size = len(body) if length is None else length
            header = Header(Kind.REQUEST, size, challenge, os.urandom(16), body_digest(body))
            data = auth.seal(header) + body
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_hostile_datagrams_are_dropped_and_counted(cluster: LoopbackCluster) -> None:
    target_agent, peer = cluster.agents
    target = (target_agent.host, target_agent.port)
    before = membership(target_agent)
    decrypt0, decode0, oversize0, unusable0 = (
        dropped(target_agent, r) for r in ("decrypt", "decode", "oversize", "unusable")
    )
    key = cluster.key
    valid = encode_datagram(
        [Ping(seq=1, target="node1", source="x", source_addr=("127.0.0.9", 1))], DatagramHeader("x", 1, 0, destination_tag("node1"))
    )
    misdirected = encode_datagram(
        [Ping(seq=2, target="nobody", source="x", source_addr=("127.0.0.9", 1))], DatagramHeader("x", 1, 1, destination_tag("node1"))
    )
    decrypt_failures = [
        b"",  # empty
        os.urandom(9),  # shorter than the AEAD overhead
        os.urandom(600),  # garbage
        sealed(key, valid)[:-7],  # truncated: the tag no longer matches
        sealed(Keyring.generate_key(), valid),  # wrong key
        sealed(key, valid, cluster="another-site"),  # other cluster (associated data differs)
        b"\x02" + sealed(key, valid)[1:],  # unknown encryption version
    ]
    decode_failures = [
        sealed(key, b"\x01\x00\x00\x00garbage"),  # right key, not our codec
        sealed(key, os.urandom(300)),
        sealed(key, valid[: len(valid) // 2]),  # truncated plaintext
    ]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for data in decrypt_failures + decode_failures:
            sock.sendto(data, target)
        sock.sendto(os.urandom(5000), target)  # oversized: above max_datagram_bytes
        sock.sendto(sealed(key, misdirected), target)  # decodes, but names another member

    cluster.wait_for(
        lambda: dropped(target_agent, "decrypt") >= decrypt0 + len(decrypt_failures)
        and dropped(target_agent, "decode") >= decode0 + len(decode_failures)
        and dropped(target_agent, "oversize") >= oversize0 + 1
        and dropped(target_agent, "unusable") >= unusable0 + 1,
        30.0,
        "every hostile datagram counted",
    )
    assert target_agent.running
    assert membership(target_agent) == before
    assert peer.state_of(target_agent.name) == "alive"


def test_hostile_streams_are_dropped_and_counted(cluster: LoopbackCluster) -> None:
    target_agent, peer = cluster.agents
    target = (target_agent.host, target_agent.port)
    before = membership(target_agent)
    decrypt0, decode0, oversize0 = (dropped(target_agent, r) for r in ("decrypt", "decode", "oversize"))
    key = cluster.key

    assert send_stream(target, frame(os.urandom(2000))) == b""  # garbage frame
    assert send_stream(target, frame(sealed(key, b"x" * 100))) == b""  # old format: no header
    assert send_stream(target, key=Keyring.generate_key(), body=b"x" * 100) == b""  # wrong key
    assert send_stream(target, key=key, body=b"x" * 100, cluster="another-site") == b""
    assert send_stream(target, key=key, body=sealed(key, os.urandom(100))) == b""  # garbage body
    assert send_stream(target, key=key, length=0xFFFFFFF0) == b""  # header naming a huge body
    assert send_stream(target, os.urandom(3)) == b""  # truncated header

    cluster.wait_for(
        lambda: dropped(target_agent, "decrypt") >= decrypt0 + 4
        and dropped(target_agent, "decode") >= decode0 + 1
        and dropped(target_agent, "oversize") >= oversize0 + 1,
        30.0,
        "every hostile stream counted",
    )
    assert membership(target_agent) == before
    assert peer.state_of(target_agent.name) == "alive"


def test_slowloris_and_connection_flood_do_not_stall_the_agent(cluster: LoopbackCluster) -> None:
    target_agent, peer = cluster.agents
    target = (target_agent.host, target_agent.port)
    before = membership(target_agent)
    limit0 = dropped(target_agent, "stream_per_source")
    late0 = dropped(target_agent, "stream_header_timeout")

    slow = socket.create_connection(target, timeout=STREAM_CUTOFF_WAIT)
    slow.sendall(b"partial header")  # and then nothing
    assert len(recv_exactly(slow, CHALLENGE_SIZE)) == CHALLENGE_SIZE
    flood = [socket.create_connection(target, timeout=10) for _ in range(FLOOD_CONNECTIONS)]
    try:
        # While the hostile connections hang, the agent answers and gossips normally.
        assert target_agent.status()["members"]["alive"] == 2
        time.sleep(2.0)
        assert peer.state_of(target_agent.name) == "alive"
        started = time.monotonic()
        assert slow.recv(100) == b""  # cut off by the agent's header timeout
        assert time.monotonic() - started < STREAM_CUTOFF_WAIT
    finally:
        slow.close()
        for sock in flood:
            sock.close()
    cluster.wait_for(
        lambda: dropped(target_agent, "stream_per_source") > limit0, 30.0, "flood connections refused"
    )
    cluster.wait_for(
        lambda: dropped(target_agent, "stream_header_timeout") > late0, 30.0, "slowloris counted"
    )
    assert target_agent.running
    assert membership(target_agent) == before
    assert peer.state_of(target_agent.name) == "alive"


def test_metrics_report_members_traffic_and_health(cluster: LoopbackCluster) -> None:
    agent = cluster.agents[1]
    first = agent.scrape_metrics()
    assert first['edgeagent_members{state="alive"}'] == 2
    assert first['edgeagent_members{state="dead"}'] == 0
    assert first["edgeagent_local_health_score"] == 0
    assert first["edgeagent_incarnation"] == agent.status()["incarnation"]
    time.sleep(3.0)  # a few probe rounds
    later = agent.scrape_metrics()
    for name in (
        'edgeagent_packets_received_total{transport="udp"}',
        'edgeagent_packets_sent_total{transport="udp"}',
        'edgeagent_received_bytes_total{transport="udp"}',
        'edgeagent_sent_bytes_total{transport="udp"}',
    ):
        assert later[name] > first[name], name
    # Probes succeeded in those rounds, so their round-trip times were recorded.
    assert later["edgeagent_probe_rtt_seconds_count"] > first.get("edgeagent_probe_rtt_seconds_count", 0)
    assert 0 < later["edgeagent_probe_rtt_seconds_sum"] < later["edgeagent_probe_rtt_seconds_count"]
