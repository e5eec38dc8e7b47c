"""Socket addresses as the agent prints and picks them.

``format_addr`` writes ``host:port`` (``[v6]:port`` for IPv6), the form used in every log line,
message and control answer; ``is_wildcard`` tells a bind-to-all host. What a wildcard bind
advertises is chosen in :mod:`edgeagent.advertise`.
"""

from __future__ import annotations

from gossip.messages import Address

WILDCARD_HOSTS = ("", "0.0.0.0", "::")


def format_addr(addr: Address) -> str:
    """``host:port``, or ``[host]:port`` for an IPv6 host."""
    host, port = addr
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def is_wildcard(host: str) -> bool:
    """True for a host that binds every interface."""
    return host in WILDCARD_HOSTS

