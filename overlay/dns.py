"""Mesh DNS: a tiny authoritative responder for the ``mesh.`` zone.

How it works: :class:`MeshDNS` is sans-IO. ``handle(query_bytes)`` parses one
query with dnspython, answers from two callbacks and returns the wire response (or
None for input that is not a well-formed query: dropped and counted in ``stats``).

- ``NODE.node.mesh``  A / AAAA: the node's overlay address (``resolve_node(NODE)``).
- ``SERVICE.mesh``    A / AAAA: healthy instances (``resolve_service(SERVICE)``).
- A name that resolves to nothing: NXDOMAIN. An existing name asked for another type
  (MX, TXT, ...): NOERROR with no answer (RFC 2308 "NODATA"). Negative answers carry
  the zone's SOA so resolvers cache them only briefly.
- A name outside ``mesh.``: REFUSED (we are not a recursive resolver).

Labels are passed to the callbacks lower-cased (resolvers randomise case, the
"0x20" trick), so callbacks must match case-insensitively.

``serve_dns`` is the thin asyncio adapter: one UDP socket, one call per datagram.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Callable
from typing import cast

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset

log = logging.getLogger(__name__)

ZONE = dns.name.from_text("mesh.")
NODE_ZONE = dns.name.from_text("node.mesh.")
# Answers change when nodes renumber or instances fail: keep caches short.
ANSWER_TTL = 5
NEGATIVE_TTL = 5  # SOA minimum: how long resolvers cache NXDOMAIN (RFC 2308 section 5)
MAX_ANSWERS = 16  # bounded answer set; more instances than this are not all listed
MAX_QUERY_BYTES = 4096  # a query is a few dozen bytes; anything bigger is not one
UDP_PAYLOAD = 512  # RFC 1035 4.2.1, unless the query's EDNS advertises more

Resolver = Callable[[str], list[str]]

_SOA = dns.rdata.from_text(
    dns.rdataclass.IN,
    dns.rdatatype.SOA,
    f"ns.mesh. hostmaster.mesh. 1 {ANSWER_TTL} {ANSWER_TTL} {ANSWER_TTL} {NEGATIVE_TTL}",
)


# Address family each query type asks for (0: both).
_WANTED_VERSION: dict[int, int] = {dns.rdatatype.A: 4, dns.rdatatype.AAAA: 6, dns.rdatatype.ANY: 0}


class MeshDNS:
    """Sans-IO responder: bytes in, bytes (or None) out."""

    def __init__(self, resolve_node: Resolver, resolve_service: Resolver | None = None) -> None:
        self.resolve_node = resolve_node
        self.resolve_service = resolve_service
        self.stats: dict[str, int] = {
            "queries": 0,
            "malformed": 0,  # dropped: not a parsable single-question query
            "answered": 0,
            "nxdomain": 0,
            "refused": 0,
            "resolver_errors": 0,  # a callback raised; answered SERVFAIL
        }

    def handle(self, query: bytes) -> bytes | None:
        """Answer one DNS query; None if it is malformed (dropped, counted)."""
        msg = self._parse(query)
        if msg is None:
            self.stats["malformed"] += 1
            return None
        self.stats["queries"] += 1
        response = dns.message.make_response(msg)
        response.flags |= dns.flags.AA
        response.flags &= ~dns.flags.RA
        question = msg.question[0]
        qname, qtype = question.name, question.rdtype
        if msg.opcode() != dns.opcode.QUERY:
            response.set_rcode(dns.rcode.NOTIMP)
        elif question.rdclass not in (dns.rdataclass.IN, dns.rdataclass.ANY):
            response.set_rcode(dns.rcode.REFUSED)
            self.stats["refused"] += 1
        elif not qname.is_subdomain(ZONE):
            response.flags &= ~dns.flags.AA
            response.set_rcode(dns.rcode.REFUSED)
            self.stats["refused"] += 1
        else:
            self._answer(response, qname, qtype)
        max_size = max(UDP_PAYLOAD, msg.payload if msg.edns >= 0 else 0)
        try:
            return response.to_wire(max_size=max_size)
        except dns.exception.TooBig:
            response.answer.clear()
            response.authority.clear()
            response.flags |= dns.flags.TC
            return response.to_wire(max_size=max_size)

    def _parse(self, query: bytes) -> dns.message.Message | None:
        if len(query) > MAX_QUERY_BYTES:
            return None
        try:
            msg = dns.message.from_wire(query)
        except (dns.exception.DNSException, ValueError, UnicodeError):
            return None
        if msg.flags & dns.flags.QR or len(msg.question) != 1:
            return None
        return msg

    def _answer(self, response: dns.message.Message, qname: dns.name.Name, qtype: int) -> None:
        try:
            addresses = self._lookup(qname)
        except Exception:  # a callback bug must not kill the responder
            log.exception("mesh dns lookup failed for %s", qname)
            self.stats["resolver_errors"] += 1
            response.set_rcode(dns.rcode.SERVFAIL)
            return
        if addresses is None:
            response.set_rcode(dns.rcode.NXDOMAIN)
            response.authority.append(self._soa())
            self.stats["nxdomain"] += 1
            return
        wanted = _WANTED_VERSION.get(qtype)
        self.stats["answered"] += 1
        if wanted is None:
            response.authority.append(self._soa())
            return
        for version, rdtype in ((4, dns.rdatatype.A), (6, dns.rdatatype.AAAA)):
            if wanted not in (0, version):
                continue
            texts = [str(a) for a in addresses if a.version == version][:MAX_ANSWERS]
            if texts:
                response.answer.append(
                    dns.rrset.from_text(qname, ANSWER_TTL, dns.rdataclass.IN, rdtype, *texts)
                )
        if not response.answer:
            response.authority.append(self._soa())

    def _lookup(
        self, qname: dns.name.Name
    ) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address] | None:
        """Addresses for ``qname``, [] for a name that exists with none, None: no such name."""
        if qname in (ZONE, NODE_ZONE):
            return []
        relative = qname.relativize(ZONE).labels
        if len(relative) == 2 and qname.is_subdomain(NODE_ZONE):
            found = self.resolve_node(_label(relative[0]))
        elif len(relative) == 1 and self.resolve_service is not None:
            found = self.resolve_service(_label(relative[0]))
        else:
            return None
        addresses = []
        for text in found:
            try:
                addresses.append(ipaddress.ip_address(text))
            except ValueError:
                continue
        return addresses or None

    def _soa(self) -> dns.rrset.RRset:
        return dns.rrset.from_rdata(ZONE, NEGATIVE_TTL, _SOA)


def _label(raw: bytes) -> str:
    return raw.decode("utf-8", "replace").lower()


class _DNSProtocol(asyncio.DatagramProtocol):
    def __init__(self, mesh_dns: MeshDNS) -> None:
        self.mesh_dns = mesh_dns
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        reply = self.mesh_dns.handle(data)
        if reply is not None and self.transport is not None:
            self.transport.sendto(reply, addr)

    def error_received(self, exc: Exception) -> None:
        log.debug("mesh dns socket error: %s", exc)


async def serve_dns(mesh_dns: MeshDNS, host: str, port: int) -> asyncio.DatagramTransport:
    """Answer DNS on UDP ``host:port`` until the returned transport is closed."""
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(
        lambda: _DNSProtocol(mesh_dns), local_addr=(host, port)
    )
    return transport
