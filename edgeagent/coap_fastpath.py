"""The ``--coap`` listener's fast path, the IO: common requests answered beside aiocoap.

:func:`install` puts a :class:`FastPath` in front of the aiocoap server's UDP interface
(``MessageInterfaceUDP6.datagram_msg_received``, on that one object): every datagram on the
listener's socket goes to :meth:`overlay.coap_server.Server.receive` first (read its
docstring: what is handled here, what is delegated), and what it delegates goes on to aiocoap
unchanged. One socket, one port: block-wise transfers, Observe and the rest keep aiocoap's
path, and a response goes out of the socket the request came in on, from the address it was
sent to (the request's IPV6_PKTINFO, as aiocoap does).

A handled request is one task running :meth:`edgeagent.coap_proxy.Router.handle`, at most
:data:`IN_FLIGHT_MAX` at once (more: 5.03 with Max-Age 1 at once, counted ``fast_busy``),
with a timer for the empty ACK after ``EMPTY_ACK_DELAY`` when it is a CON, and timers for a
separate response's retransmissions. Against aiocoap's path this leaves out its message and
token layers, the pipe, the render task's bookkeeping and aiocoap's option objects: with the
faster codec and classifier of :mod:`overlay.coap_route` the ingress agent's CPU per idle
mesh request went from ~1.0 ms to ~0.5 ms, ~900 to ~620 Python calls (medians of four
``python -m testbed.bench coap`` runs each, interleaved, on a loaded shared machine).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections import Counter
from typing import Any

import aiocoap
from aiocoap.transports import udp6

from overlay import coap_route as cr
from overlay import coap_server as cs

from .coap_proxy import Router

log = logging.getLogger("edgeagent.coap")

IN_FLIGHT_MAX = 4096  # handled requests being routed at once, at most
BUSY = cr.Message(cr.SERVICE_UNAVAILABLE, ((cr.MAX_AGE, cr.uint_option(1)),), b"busy")


def _multicast(pktinfo: bytes | None) -> bool:
    """Was the datagram sent to a multicast address (IPv6 ff00::/8, or v4-mapped 224/4)?"""
    if pktinfo is None or len(pktinfo) < 16:
        return False
    if pktinfo[0] == 0xFF:
        return True
    return pktinfo[:12] == b"\0" * 10 + b"\xff\xff" and 224 <= pktinfo[12] <= 239


class FastPath:
    """The fast path of one aiocoap UDP interface."""

    def __init__(self, router: Router, interface: Any) -> None:
        self.router = router
        self.interface = interface
        self.delegate = interface.datagram_msg_received
        self.server = cs.Server()
        self.stats: Counter[str] = self.server.stats
        self.tasks: set[asyncio.Task[None]] = set()
        self.timers: dict[tuple[Any, int], asyncio.TimerHandle] = {}
        self.loop = asyncio.get_running_loop()
        self.closed = False

    def datagram_msg_received(self, data: bytes, ancdata: Any, flags: int, address: Any) -> None:
        pktinfo = None
        for level, kind, value in ancdata:
            if level == socket.IPPROTO_IPV6 and kind == socket.IPV6_PKTINFO:
                pktinfo = value
        decision = self.server.receive(data, address, self.loop.time(), _multicast(pktinfo))
        if isinstance(decision, cs.Handle):
            self._start(decision.exchange, address, pktinfo)
        elif isinstance(decision, cs.Send):
            if decision.datagram is not None:
                self._send(decision.datagram, address, pktinfo)
        else:
            self.stats["delegated"] += 1
            self.delegate(data, ancdata, flags, address)

    def _send(self, datagram: bytes, address: Any, pktinfo: bytes | None) -> None:
        transport = getattr(self.interface, "transport", None)
        if transport is None or self.closed:
            return
        anc = [(socket.IPPROTO_IPV6, socket.IPV6_PKTINFO, pktinfo)] if pktinfo else []
        transport.sendmsg(datagram, anc, 0, address)

    def _start(self, exchange: cs.Exchange, address: Any, pktinfo: bytes | None) -> None:
        self.stats["fast"] += 1
        if len(self.tasks) >= IN_FLIGHT_MAX:
            self.stats["fast_busy"] += 1
            self._answer(exchange, BUSY, address, pktinfo)
            return
        timer = None
        if exchange.request.mtype == cr.CON:
            timer = self.loop.call_later(
                cs.EMPTY_ACK_DELAY, self._empty_ack, exchange, address, pktinfo
            )
        task = self.loop.create_task(self._serve(exchange, address, pktinfo, timer))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _empty_ack(self, exchange: cs.Exchange, address: Any, pktinfo: bytes | None) -> None:
        ack = self.server.empty_ack(exchange)
        if ack is not None:
            self._send(ack, address, pktinfo)

    async def _serve(
        self,
        exchange: cs.Exchange,
        address: Any,
        pktinfo: bytes | None,
        timer: asyncio.TimerHandle | None,
    ) -> None:
        req = exchange.request
        try:
            # the client key is the socket address, as IngressSite's (block-wise affinity)
            response = await self.router.handle(
                cr.Message(req.code, req.options, req.payload, req.mtype), address
            )
        finally:  # also when cancelled at shutdown: no empty ACK after that
            if timer is not None:
                timer.cancel()
        self._answer(exchange, response, address, pktinfo)

    def _answer(
        self, exchange: cs.Exchange, response: cr.Message, address: Any, pktinfo: bytes | None
    ) -> None:
        datagram, delay = self.server.respond(exchange, response)
        self._send(datagram, address, pktinfo)
        if delay is not None:
            self._arm((address, cs.mid_of(datagram)), delay, pktinfo)

    def _arm(self, key: tuple[Any, int], delay: float, pktinfo: bytes | None) -> None:
        self.timers[key] = self.loop.call_later(delay, self._retransmit, key, pktinfo)
        while len(self.timers) > cs.SEPARATE_MAX:  # the server forgot those already
            self.timers.pop(next(iter(self.timers))).cancel()

    def _retransmit(self, key: tuple[Any, int], pktinfo: bytes | None) -> None:
        self.timers.pop(key, None)
        again = self.server.retransmit(*key)
        if again is not None:
            self._send(again[0], key[0], pktinfo)
            self._arm(key, again[1], pktinfo)

    def close(self) -> None:
        self.closed = True
        for task in self.tasks:
            task.cancel()
        for timer in self.timers.values():
            timer.cancel()
        self.timers.clear()
        if self.interface.__dict__.get("datagram_msg_received") is not None:
            del self.interface.datagram_msg_received


def install(ctx: aiocoap.Context, router: Router) -> FastPath | None:
    """Put a fast path in front of ``ctx``'s UDP interface; None when it has none (an aiocoap
    of other shapes: everything keeps going through aiocoap, slower, still right)."""
    for tman in getattr(ctx, "request_interfaces", ()):
        mman = getattr(tman, "token_interface", None)
        interface = getattr(mman, "message_interface", None)
        if isinstance(interface, udp6.MessageInterfaceUDP6) and hasattr(
            interface, "datagram_msg_received"
        ):
            fast = FastPath(router, interface)
            interface.datagram_msg_received = fast.datagram_msg_received
            return fast
    log.info("coap: no aiocoap UDP interface found; no fast path")
    return None
