"""Mesh DNS: sans-IO answers, hostile input, and a real UDP round trip with dnspython."""

from __future__ import annotations

import asyncio
import random

import dns.asyncquery
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import pytest

from overlay.dns import MeshDNS

NODES = {"pi1": ["10.99.0.17"], "gw": ["fd00:99:1::1"], "dual": ["10.99.0.33", "fd00:99:2::1"]}
SERVICES = {"temp": ["10.99.0.18", "10.99.0.34"]}


def responder(services: bool = True) -> MeshDNS:
    return MeshDNS(
        lambda n: NODES.get(n, []),
        (lambda s: SERVICES.get(s, [])) if services else None,
    )


def ask(server: MeshDNS, name: str, rdtype: str = "A") -> dns.message.Message:
    query = dns.message.make_query(name, rdtype)
    wire = server.handle(query.to_wire())
    assert wire is not None
    reply = dns.message.from_wire(wire)
    assert reply.id == query.id
    return reply


def addresses(reply: dns.message.Message) -> list[str]:
    return sorted(rd.to_text() for rrset in reply.answer for rd in rrset)


def test_a_record_for_node_is_its_overlay_address() -> None:
    reply = ask(responder(), "pi1.node.mesh.")
    assert reply.rcode() == dns.rcode.NOERROR
    assert addresses(reply) == ["10.99.0.17"]
    assert reply.flags & dns.flags.AA
    assert 0 < reply.answer[0].ttl <= 30


def test_aaaa_record_for_ipv6_node() -> None:
    reply = ask(responder(), "gw.node.mesh.", "AAAA")
    assert addresses(reply) == ["fd00:99:1::1"]


def test_node_name_matches_case_insensitively() -> None:
    assert addresses(ask(responder(), "PI1.Node.MESH.")) == ["10.99.0.17"]


def test_a_query_for_dual_stack_node_returns_only_ipv4() -> None:
    assert addresses(ask(responder(), "dual.node.mesh.")) == ["10.99.0.33"]


def test_existing_name_with_other_type_is_noerror_and_empty() -> None:
    for name, rdtype in (("gw.node.mesh.", "A"), ("pi1.node.mesh.", "MX")):
        reply = ask(responder(), name, rdtype)
        assert reply.rcode() == dns.rcode.NOERROR and reply.answer == []
        assert reply.authority and reply.authority[0].rdtype == dns.rdatatype.SOA


def test_unknown_node_is_nxdomain_with_soa() -> None:
    server = responder()
    reply = ask(server, "nosuch.node.mesh.")
    assert reply.rcode() == dns.rcode.NXDOMAIN
    assert reply.authority[0].rdtype == dns.rdatatype.SOA
    assert server.stats["nxdomain"] == 1


def test_service_name_answers_all_instances() -> None:
    assert addresses(ask(responder(), "temp.mesh.")) == ["10.99.0.18", "10.99.0.34"]


def test_service_name_without_service_resolver_is_nxdomain() -> None:
    assert ask(responder(services=False), "temp.mesh.").rcode() == dns.rcode.NXDOMAIN


@pytest.mark.parametrize("name", ["a.b.node.mesh.", "x.y.mesh.", "nosuch.mesh."])
def test_names_that_do_not_exist_in_zone_are_nxdomain(name: str) -> None:
    assert ask(responder(), name).rcode() == dns.rcode.NXDOMAIN


def test_name_outside_mesh_is_refused() -> None:
    server = responder()
    assert ask(server, "example.com.").rcode() == dns.rcode.REFUSED
    assert server.stats["refused"] == 1


def test_resolver_returning_garbage_is_nxdomain_not_a_crash() -> None:
    server = MeshDNS(lambda n: ["not an address"])
    assert ask(server, "pi1.node.mesh.").rcode() == dns.rcode.NXDOMAIN


def test_raising_resolver_answers_servfail_and_counts() -> None:
    def broken(name: str) -> list[str]:
        raise RuntimeError("bug")

    server = MeshDNS(broken)
    assert ask(server, "pi1.node.mesh.").rcode() == dns.rcode.SERVFAIL
    assert server.stats["resolver_errors"] == 1


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00",
        b"\x12\x34" + b"\x00" * 9,  # short header
        b"\xff" * 64,
        b"\x00" * 5000,  # oversized
    ],
)
def test_malformed_query_is_dropped_and_counted(data: bytes) -> None:
    server = responder()
    assert server.handle(data) is None
    assert server.stats["malformed"] == 1 and server.stats["queries"] == 0


def test_response_packet_is_dropped_not_answered() -> None:
    server = responder()
    reply = dns.message.make_response(dns.message.make_query("pi1.node.mesh.", "A"))
    assert server.handle(reply.to_wire()) is None
    assert server.stats["malformed"] == 1


def test_random_and_mutated_input_never_raises() -> None:
    rng = random.Random(4)
    server = responder()
    good = dns.message.make_query("pi1.node.mesh.", "A", use_edns=0).to_wire()
    for _ in range(3000):
        if rng.random() < 0.5:
            data = bytes(rng.randrange(256) for _ in range(rng.randrange(64)))
        else:
            mutated = bytearray(good)
            for _ in range(rng.randrange(1, 6)):
                mutated[rng.randrange(len(mutated))] = rng.randrange(256)
            data = bytes(mutated[: rng.randrange(len(mutated) + 1)])
        reply = server.handle(data)
        assert reply is None or isinstance(reply, bytes)
    assert server.stats["malformed"] > 0


async def test_real_udp_round_trip_with_dnspython_client() -> None:
    from overlay.dns import serve_dns

    transport = await serve_dns(responder(), "127.0.0.1", 0)
    try:
        port = transport.get_extra_info("sockname")[1]
        query = dns.message.make_query("pi1.node.mesh.", "A")
        reply = await dns.asyncquery.udp(query, "127.0.0.1", port=port, timeout=10)
        assert addresses(reply) == ["10.99.0.17"]
        missing = dns.message.make_query("nobody.node.mesh.", "AAAA")
        reply = await dns.asyncquery.udp(missing, "127.0.0.1", port=port, timeout=10)
        assert reply.rcode() == dns.rcode.NXDOMAIN
    finally:
        transport.close()
        await asyncio.sleep(0)
