"""mDNS discovery: announce this agent on the LAN and try to join the agents of our cluster it finds.

How it works. :class:`overlay.mdns.MdnsDiscovery` announces us and browses for the others;
each announcement it accepts (same cluster hash, an address on a link of ours: see
:func:`overlay.mdns.classify_peer` and :class:`overlay.mdns.Links`) whose address is not
already an alive member goes to a :class:`overlay.mdns.JoinSchedule`: one join attempt at once
(``core.join_once``: **not** a seed the core keeps retrying), a few retries with exponential
backoff and jitter while the peer has not shown up alive, then it is forgotten. The schedule
holds at most ``MAX_CANDIDATES`` addresses. Our links are read from the interfaces at most
every :data:`LINKS_REFRESH_S`.

Refusals (other clusters, off-link or loopback addresses, oversized TXT, rate-limited lookups,
a full schedule) are counted (``edgeagent status``: ``mdns_refused``) and logged at most once
per :data:`REFUSAL_LOG_INTERVAL_S`, with the counts since the last line, so a hostile LAN
cannot flood the log.

Announcing takes a second or two, so :meth:`Mdns.start` runs it in a task and returns at once
(``status`` says ``mdns: true`` from then on); a LAN with no multicast is a warning and the
agent joins by seeds only. The goodbye is sent when the leave begins (a ``before_leave``
hook), before the leave is broadcast, bounded by :data:`GOODBYE_TIMEOUT`. Imported only when
mDNS is on, so zeroconf is not loaded otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections import Counter
from typing import Any

from gossip.messages import Address, MemberState
from overlay.mdns import JoinSchedule, Links, MdnsDiscovery, Peer, interface_addresses

from ..host import FeatureHost
from ..logs import fields
from ..netaddr import format_addr, is_wildcard

GOODBYE_TIMEOUT = 2.0  # seconds; the agent's leave spread timeout, which it used to share
LINKS_REFRESH_S = 30.0  # re-read the interface addresses at most this often
REFUSAL_LOG_INTERVAL_S = 60.0  # at most one log line about refused announcements per minute
IDLE_WAKE_S = 5.0  # the retry task's longest sleep when nothing is scheduled

log = FeatureHost.logger()  # the agent's logger, as before mDNS was a feature


class RefusalLog:
    """Counts refused announcements; one log line per interval at most (``now`` passed in)."""

    def __init__(self, interval: float = REFUSAL_LOG_INTERVAL_S) -> None:
        self.total: Counter[str] = Counter()
        self._interval = interval
        self._since_log: Counter[str] = Counter()
        self._logged_at: float | None = None

    def refuse(self, reason: str, now: float) -> bool:
        """Count one refusal; True when a line was logged for it."""
        self.total[reason] += 1
        self._since_log[reason] += 1
        if self._logged_at is not None and now - self._logged_at < self._interval:
            return False
        counts = ", ".join(f"{k}={v}" for k, v in sorted(self._since_log.items()))
        log.info("mdns announcements refused", extra=fields(counts=counts))
        self._since_log.clear()
        self._logged_at = now
        return True


class Mdns:
    """The mDNS announcer and browser of one agent, and its join schedule."""

    def __init__(self) -> None:
        self._mdns: MdnsDiscovery | None = None
        self._starting: asyncio.Task[None] | None = None
        self._retrying: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._schedule = JoinSchedule(random.Random())
        self._refusals = RefusalLog()
        self._links: Links | None = None
        self._links_at = 0.0
        self._bind_host = ""
        self._joins = 0

    async def start(self, host: FeatureHost) -> None:
        """Start announcing and browsing (in the background: it takes a second or two)."""
        self._bind_host = host.config.bind[0]
        loop = asyncio.get_running_loop()
        self._mdns = MdnsDiscovery(
            node_name=host.identity.name,
            node_id=host.identity.node_id,
            cluster=host.config.cluster,
            addr=host.address,
            on_peer=lambda peer: self._on_peer(host, peer, loop.time()),
            links=lambda: self.links(loop.time()),
            on_refused=lambda reason: self._refusals.refuse(reason, loop.time()),
            interfaces=None if is_wildcard(self._bind_host) else [self._bind_host],
        )
        host.add_status(self._status)
        host.before_leave(self.stop)
        self._starting = loop.create_task(self._announce(self._mdns))
        self._retrying = loop.create_task(self._retry(host))

    def links(self, now: float) -> Links:
        """Our links, re-read from the interfaces at most every :data:`LINKS_REFRESH_S`."""
        if self._links is None or now - self._links_at >= LINKS_REFRESH_S:
            try:
                interfaces = interface_addresses()
            except OSError as exc:
                log.warning("mdns: cannot read interfaces", extra=fields(reason=repr(exc)))
                interfaces = []
            self._links = Links.of(interfaces, self._bind_host)
            self._links_at = now
        return self._links

    def _status(self) -> dict[str, Any]:
        return {
            "mdns": self._mdns is not None,
            "mdns_joins": self._joins,
            "mdns_pending": len(self._schedule),
            "mdns_refused": dict(self._refusals.total),
        }

    def _on_peer(self, host: FeatureHost, peer: Peer, now: float) -> None:
        if _alive(host, peer.addr):
            self._schedule.done(peer.addr)
            return
        verdict = self._schedule.offer(peer.addr, now)
        if verdict == "full":
            self._refusals.refuse("full", now)
        elif verdict == "join":
            log.info("mdns found peer", extra=fields(node_id=peer.node_id, addr=format_addr(peer.addr)))
            self._join(host, peer.addr)
            self._wake.set()

    def _join(self, host: FeatureHost, addr: Address) -> None:
        self._joins += 1
        host.join_once(addr)

    async def _retry(self, host: FeatureHost) -> None:
        """Retry the scheduled addresses when due; forget those that joined."""
        loop = asyncio.get_running_loop()
        while True:
            deadline = self._schedule.next_deadline()
            sleep = IDLE_WAKE_S if deadline is None else max(0.0, deadline - loop.time())
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), min(sleep, IDLE_WAKE_S))
            for addr in self._schedule.due(loop.time()):
                if _alive(host, addr):
                    self._schedule.done(addr)
                else:
                    self._join(host, addr)

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
        if self._retrying is not None:
            self._retrying.cancel()
            self._retrying = None
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


def _alive(host: FeatureHost, addr: Address) -> bool:
    return any(m.addr == addr and m.state is MemberState.ALIVE for m in host.view.members)
