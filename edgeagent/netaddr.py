"""Socket addresses as the agent prints and picks them.

``format_addr`` writes ``host:port`` (``[v6]:port`` for IPv6), the form used in every log line,
message and control answer; ``is_wildcard`` tells a bind-to-all host; ``routable_host`` finds
the address of the default route, which an agent bound to a wildcard advertises.
"""

from __future__ import annotations

import socket

from gossip.messages import Address

ROUTE_PROBE_ADDR = ("192.0.2.1", 9)  # RFC 5737 TEST-NET-1: a UDP connect() sends nothing
WILDCARD_HOSTS = ("", "0.0.0.0", "::")


def format_addr(addr: Address) -> str:
    """``host:port``, or ``[host]:port`` for an IPv6 host."""
    host, port = addr
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def is_wildcard(host: str) -> bool:
    """True for a host that binds every interface."""
    return host in WILDCARD_HOSTS


def routable_host() -> str:
    """This host's address on the default route (no packet is sent), else loopback."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(ROUTE_PROBE_ADDR)
            return str(sock.getsockname()[0])
        except OSError:
            return "127.0.0.1"
