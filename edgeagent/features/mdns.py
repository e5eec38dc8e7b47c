"""mDNS discovery: announce this agent on the LAN and join the agents of our cluster it finds.

How it works. :class:`overlay.mdns.MdnsDiscovery` announces us and browses for the others;
each peer it accepts (same cluster hash, see :func:`overlay.mdns.parse_peer`) that is not
already an alive member is joined with ``host.join``. Announcing takes a second or two, so
:meth:`Mdns.start` runs it in a task and returns at once (``status`` says ``mdns: true`` from
then on); a LAN with no multicast is a warning and the agent joins by seeds only. The goodbye
is sent when the leave begins (a ``before_leave`` hook), before the leave is broadcast, bounded
by :data:`GOODBYE_TIMEOUT`. Imported only when mDNS is on, so zeroconf is not loaded otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib

from gossip.messages import MemberState
from overlay.mdns import MdnsDiscovery, Peer

from ..host import FeatureHost
from ..logs import fields
from ..netaddr import is_wildcard

GOODBYE_TIMEOUT = 2.0  # seconds; the agent's leave spread timeout, which it used to share

log = FeatureHost.logger()  # the agent's logger, as before mDNS was a feature


class Mdns:
    """The mDNS announcer and browser of one agent."""

    def __init__(self) -> None:
        self._mdns: MdnsDiscovery | None = None
        self._starting: asyncio.Task[None] | None = None

    async def start(self, host: FeatureHost) -> None:
        """Start announcing and browsing (in the background: it takes a second or two)."""

        def on_peer(peer: Peer) -> None:
            if any(
                m.addr == peer.addr and m.state is MemberState.ALIVE for m in host.view.members
            ):
                return
            log.info("mdns found peer", extra=fields(node_id=peer.node_id, addr=peer.addr))
            host.join([peer.addr])

        bind_host = host.config.bind[0]
        self._mdns = MdnsDiscovery(
            node_name=host.identity.name,
            node_id=host.identity.node_id,
            cluster=host.config.cluster,
            addr=host.address,
            on_peer=on_peer,
            interfaces=None if is_wildcard(bind_host) else [bind_host],
        )
        host.add_status(lambda: {"mdns": self._mdns is not None})
        host.before_leave(self.stop)
        self._starting = asyncio.get_running_loop().create_task(self._announce(self._mdns))

    async def _announce(self, mdns: MdnsDiscovery) -> None:
        try:
            await mdns.start()
        except Exception as exc:  # no multicast-capable interface, port 5353 refused, ...
            log.warning("mdns unavailable; join by seeds only", extra=fields(reason=repr(exc)))
            self._mdns = None
            with contextlib.suppress(Exception):
                await mdns.stop()

    async def stop(self) -> None:
        """Send the goodbye (bounded: it must not block the leave)."""
        if self._starting is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self._starting), GOODBYE_TIMEOUT)
            self._starting.cancel()
        mdns, self._mdns = self._mdns, None
        if mdns is None:
            return
        try:
            await asyncio.wait_for(mdns.stop(), GOODBYE_TIMEOUT)
        except Exception:  # a goodbye that cannot be sent must not block the leave
            log.warning("mdns goodbye failed", exc_info=True)
