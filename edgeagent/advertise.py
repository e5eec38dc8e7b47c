"""Which address an agent bound to a wildcard advertises, and the dual-stack ``[::]`` bind.

How it works. A node bound to ``0.0.0.0`` (or ``[::]``) must tell its peers one address they
can dial. In order:

1. the source address of the default route: a UDP ``connect()`` to a TEST-NET address (RFC
   5737 / RFC 3849) asks the kernel's routing table and sends nothing;
2. with no default route (an isolated site LAN is normal), the addresses of the host's
   interfaces: ``socket.if_nameindex()`` and the ``SIOCGIFFLAGS`` / ``SIOCGIFADDR`` ioctls
   for IPv4, ``/proc/net/if_inet6`` for IPv6. Both work without root and need no new
   dependency (``/proc/net/fib_trie`` has no interface names and is harder to parse; a UDP
   connect to a private-range address finds nothing when the LAN uses another range).
   Interfaces that are up and running come first, then addresses that are not link-local,
   then the lowest interface index; the choice and the other candidates are logged, and
   ``--advertise`` overrides;
3. nothing usable: :class:`NoAdvertiseAddress`, one line naming ``--advertise``, exit 2.

A loopback address (127.0.0.0/8, ::1) is never chosen for a wildcard bind: a node bound to
loopback advertises its bind address, which is the only case where peers can use it.

``[::]``: the UDP and TCP sockets are made dual-stack (``IPV6_V6ONLY=0``), so IPv4 peers
reach the node; IPv4 peers then appear as ``::ffff:a.b.c.d``, which :func:`unmap` turns back
into ``a.b.c.d`` before the core sees it, and :func:`socket_address` maps an IPv4
destination for ``sendto`` on such a socket. A platform that refuses dual-stack
(:func:`make_dual_stack` raises :class:`DualStackRefused`) is one line, exit 2. The address
advertised for ``[::]`` is chosen as for ``0.0.0.0`` first (IPv4 peers are the common case
and reach it), then among IPv6 addresses.
"""

from __future__ import annotations

import fcntl
import ipaddress
import logging
import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass

from gossip.messages import Address

from .errors import ConfigError

log = logging.getLogger("edgeagent.advertise")

ROUTE_PROBE_V4 = ("192.0.2.1", 9)  # RFC 5737 TEST-NET-1: connect() on UDP sends nothing
ROUTE_PROBE_V6 = ("2001:db8::1", 9)  # RFC 3849 documentation prefix
SIOCGIFFLAGS = 0x8913  # linux/sockios.h
SIOCGIFADDR = 0x8915
IFF_UP, IFF_LOOPBACK, IFF_RUNNING = 0x1, 0x8, 0x40
IF_INET6 = "/proc/net/if_inet6"
MAX_INTERFACES = 256  # bound on what is read from the host


class NoAdvertiseAddress(ConfigError):
    """A wildcard bind on a host with no address peers could dial."""


class DualStackRefused(ConfigError):
    """``[::]`` asked for, but the platform will not make the socket dual-stack."""


@dataclass(frozen=True, slots=True)
class Candidate:
    """One address of one interface."""

    interface: str
    index: int
    address: str
    running: bool = True

    def rank(self) -> tuple[int, int, int]:
        link_local = ipaddress.ip_address(self.address.split("%")[0]).is_link_local
        return (0 if self.running else 1, 1 if link_local else 0, self.index)


def usable(address: str | None) -> bool:
    """An address a peer could dial: not loopback, unspecified or multicast."""
    if not address:
        return False
    try:
        ip = ipaddress.ip_address(address.split("%")[0])
    except ValueError:
        return False
    return not (ip.is_loopback or ip.is_unspecified or ip.is_multicast)


def route_source(family: socket.AddressFamily) -> str | None:
    """Our address on the default route for ``family``, or None (no route: nothing sent)."""
    probe = ROUTE_PROBE_V4 if family == socket.AF_INET else ROUTE_PROBE_V6
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.connect(probe)
            host = str(sock.getsockname()[0])
    except OSError:
        return None
    return host if usable(host) else None


def ipv4_interfaces() -> list[Candidate]:
    """Up, non-loopback interfaces with an IPv4 address (ioctls: no root needed)."""
    found: list[Candidate] = []
    try:
        names = socket.if_nameindex()[:MAX_INTERFACES]
    except OSError:
        return found
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for index, name in names:
            request = struct.pack("256s", name.encode()[:15])
            try:
                flags = struct.unpack_from("H", fcntl.ioctl(sock, SIOCGIFFLAGS, request), 16)[0]
                if not flags & IFF_UP or flags & IFF_LOOPBACK:
                    continue
                raw = fcntl.ioctl(sock, SIOCGIFADDR, request)
            except OSError:  # no IPv4 address on it, or it went away meanwhile
                continue
            address = socket.inet_ntoa(raw[20:24])
            if usable(address):
                found.append(Candidate(name, index, address, bool(flags & IFF_RUNNING)))
    return found


def ipv6_interfaces(path: str = IF_INET6) -> list[Candidate]:
    """Global-scope IPv6 addresses from ``/proc/net/if_inet6`` (none if it is unreadable)."""
    found: list[Candidate] = []
    try:
        with open(path, encoding="ascii") as f:
            lines = f.readlines()[:MAX_INTERFACES]
    except (OSError, UnicodeDecodeError):
        return found
    for line in lines:
        parts = line.split()
        if len(parts) != 6 or len(parts[0]) != 32 or parts[3] != "00":  # scope 00: global
            continue
        try:
            address = str(ipaddress.IPv6Address(bytes.fromhex(parts[0])))
            index = int(parts[1], 16)
        except ValueError:
            continue
        if usable(address):
            found.append(Candidate(parts[5], index, address))
    return found


def choose(candidates: Iterable[Candidate]) -> Candidate | None:
    """The best candidate: running first, then not link-local, then lowest interface index."""
    ranked = sorted((c for c in candidates if usable(c.address)), key=Candidate.rank)
    return ranked[0] if ranked else None


def advertised_host(bind: Address) -> str:
    """The host to advertise for a wildcard ``bind``; raises :class:`NoAdvertiseAddress`."""
    host = bind[0]
    families = [socket.AF_INET] + ([socket.AF_INET6] if ":" in host else [])
    for family in families:
        routed = route_source(family)
        if routed is not None:
            return routed
        found = ipv4_interfaces() if family == socket.AF_INET else ipv6_interfaces()
        best = choose(found)
        if best is not None:
            others = ", ".join(f"{c.interface}={c.address}" for c in found if c is not best)
            log.info(
                "no default route: advertising the address of interface %s (%s)%s; "
                "set --advertise to choose another",
                best.interface,
                best.address,
                f"; others: {others}" if others else "",
            )
            return best.address
    what = "IPv4 or IPv6" if ":" in host else "IPv4"
    shown = f"[{host}]" if ":" in host else host
    raise NoAdvertiseAddress(
        f"bind {shown}:{bind[1]}: no address to advertise (no default route and no network "
        f"interface with a non-loopback {what} address); set --advertise HOST:PORT "
        "(or advertise = in the config)"
    )


def wants_dual_stack(host: str) -> bool:
    """True for the IPv6 wildcard, which is bound dual-stack."""
    return host == "::"


def make_dual_stack(sock: socket.socket, bind: Address) -> None:
    """Clear ``IPV6_V6ONLY`` on ``sock``; raise :class:`DualStackRefused` if it will not."""
    try:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        refused = sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) != 0
    except (OSError, AttributeError):
        refused = True
    if refused:
        raise DualStackRefused(
            f"bind [{bind[0]}]:{bind[1]}: this platform refuses dual-stack sockets "
            "(IPV6_V6ONLY=0), so IPv4 peers could not reach it; bind 0.0.0.0 instead, "
            "or a specific IPv6 address for an IPv6-only mesh"
        )


def unmap(host: str) -> str:
    """``::ffff:a.b.c.d`` (an IPv4 peer on a dual-stack socket) as ``a.b.c.d``."""
    if host[:7].lower() == "::ffff:" and "." in host:
        return host[7:]
    return host


def socket_address(dst: Address, family: socket.AddressFamily) -> Address:
    """``dst`` as a ``sendto`` on a socket of ``family`` takes it (IPv4 mapped on IPv6)."""
    host, port = dst
    if family == socket.AF_INET6 and ":" not in host:
        return (f"::ffff:{host}", port)
    return dst
