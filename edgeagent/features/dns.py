"""Mesh DNS: the :class:`overlay.dns.MeshDNS` responder on UDP, answering from the host.

How it works. The responder is sans-IO (:mod:`overlay.dns`); this feature binds it to
``config.dns`` with :func:`overlay.dns.serve_dns` and gives it the host's resolvers, which are
consulted at query time: ``NODE.node.mesh`` from every node resolver (the addresses feature
registers one), ``SERVICE.mesh`` from every service resolver (the services feature registers
one: the overlay addresses of the agents owning healthy instances; none is NXDOMAIN). Imported only when ``--dns`` is on,
so dnspython is not loaded otherwise.
"""

from __future__ import annotations

import asyncio

from overlay.dns import MeshDNS, serve_dns

from ..errors import ConfigError
from ..host import FeatureHost
from ..logs import fields

# The logger the mesh DNS line was written to when DNS was part of the address service.
log = FeatureHost.logger("ipam")


class Dns:
    """The mesh DNS responder of one agent."""

    def __init__(self) -> None:
        self._transport: asyncio.DatagramTransport | None = None

    async def start(self, host: FeatureHost) -> None:
        """Listen on ``config.dns``; a port that cannot be had is one ConfigError."""
        if host.config.dns is None:
            raise ValueError("the dns feature needs config.dns")
        host_text, port = host.config.dns
        responder = MeshDNS(host.resolve_node, host.resolve_service)
        try:
            self._transport = await serve_dns(responder, host_text, port)
        except OSError as exc:
            raise ConfigError(
                f"dns {host_text}:{port}: cannot listen: {exc.strerror or exc}"
            ) from None
        log.info("mesh dns listening", extra=fields(addr=f"{host_text}:{port}"))

    @property
    def address(self) -> tuple[str, int] | None:
        """Where mesh DNS listens (the bound port when configured as 0), or None."""
        if self._transport is None:
            return None
        host, port = self._transport.get_extra_info("sockname")[:2]
        return str(host), int(port)

    async def stop(self) -> None:
        """Close the socket."""
        if self._transport is not None:
            self._transport.close()
            self._transport = None
