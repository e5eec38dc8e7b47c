"""The agent's CoAP listener's fast path, sans-IO: a server's message layer (RFC 7252 4).

The ``--coap`` listener is an aiocoap server; aiocoap's message and token layers, its pipes
and its render task cost more than half the ingress agent's CPU per mesh request. The
common request needs none of them, so the IO side (:mod:`edgeagent.coap_fastpath`) offers
every datagram that arrives on aiocoap's socket to :meth:`Server.receive` first, and only
what this returns :class:`Delegate` for goes on to aiocoap, on the same socket:

- **handled here**: a CON or NON request (GET ... IPATCH) without Block1, Block2, Observe or
  No-Response, not sent to a multicast address; it becomes an :class:`Exchange` the caller
  answers (:meth:`Server.respond`): a piggybacked ACK, or, once the caller sent the empty
  ACK (:meth:`Server.empty_ack`, after :data:`EMPTY_ACK_DELAY` like aiocoap), a separate CON
  response retransmitted on the RFC's back-off (:meth:`Server.retransmit`) until the client's
  ACK or RST; a NON request gets a NON response. A repeated CON (same client, same Message
  ID) gets the stored ACK again, or nothing while it is still being answered; a repeated NON
  is dropped. The table is EXCHANGE_LIFETIME's (RFC 7252 4.8.2) but capped:
  :data:`DEDUP_MAX` entries for at most :data:`DEDUP_LIFETIME_S` (a client's retransmissions
  end within MAX_TRANSMIT_SPAN, 45 s), oldest first, as aiocoap's is bounded in
  :func:`edgeagent.coap_proxy.bound_deduplication`;
- **delegated to aiocoap**: everything else: block-wise transfers, Observe registrations and
  deregistrations, No-Response, pings, ACKs and RSTs that are not for a separate response of
  ours, responses, undecodable datagrams (aiocoap logs and drops them, as before). A
  retransmission is byte for byte its original, so it goes the same way and is deduplicated
  by the same side.

Total: any datagram is classified without an exception (fuzzed); memory is bounded by
:data:`DEDUP_MAX` and :data:`SEPARATE_MAX`.
"""

from __future__ import annotations

import collections
import random
from collections import Counter
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

from . import coap_route as cr
from .coap_client import ACK_RANDOM_FACTOR, ACK_TIMEOUT, MAX_RETRANSMIT  # RFC 7252 4.8

EMPTY_ACK_DELAY = 0.1  # s before an unanswered CON gets an empty ACK (aiocoap's default)
DEDUP_MAX = 2048  # requests remembered for deduplication, at most
DEDUP_LIFETIME_S = 47.0  # MAX_TRANSMIT_SPAN (45 s) + a LAN's latency, both ways
SEPARATE_MAX = 1024  # separate CON responses awaiting the client's ACK, at most
DELEGATED_OPTIONS = frozenset({cr.BLOCK1, cr.BLOCK2, cr.OBSERVE, cr.NO_RESPONSE})
EMPTY = 0


class Recent(collections.OrderedDict[Any, Any]):
    """What was received lately, by key, oldest first: at most ``cap`` entries, none older
    than ``lifetime`` (each admission evicts from the old end; no timer per entry). The
    table of :class:`Server` and, in aiocoap's place, of the agent's aiocoap server context
    (:func:`edgeagent.coap_proxy.bound_deduplication`, which relies on it being a dict)."""

    def __init__(self, cap: int, lifetime: float) -> None:
        super().__init__()
        self.cap, self.lifetime = cap, lifetime
        self.stamps: dict[Any, float] = {}

    def admit(self, key: Any, value: Any, now: float) -> None:
        self[key] = value
        self.stamps[key] = now
        while self and (
            len(self) > self.cap or self.stamps[next(iter(self))] < now - self.lifetime
        ):
            old, _ = self.popitem(last=False)
            del self.stamps[old]

    def pop(self, key: Any, default: Any = None) -> Any:
        self.stamps.pop(key, None)
        return super().pop(key, default)


@dataclass(slots=True)
class Exchange:
    """One request handled here, from arrival to its response."""

    remote: Hashable
    request: cr.Message  # as received: its type, Message ID and token are the reply's keys
    acked: bool = False  # the empty ACK went out: the response is a separate one
    reply: bytes | None = None  # what a repeated CON gets (the ACK we sent), once sent
    done: bool = False


@dataclass(slots=True)
class Delegate:
    """Not for the fast path: hand the datagram to aiocoap."""


@dataclass(slots=True)
class Handle:
    """A new request: route it, then :meth:`Server.respond`."""

    exchange: Exchange


@dataclass(slots=True)
class Send:
    """Send ``datagram`` back (a repeated CON's ACK), or nothing when None."""

    datagram: bytes | None = None


Decision = Delegate | Handle | Send


@dataclass(slots=True)
class _Separate:
    datagram: bytes
    interval: float
    transmissions: int = 1


@dataclass
class Server:
    """The fast path's state for one listener."""

    rng: random.Random = field(default_factory=random.Random)
    stats: Counter[str] = field(default_factory=Counter)
    cap: int = DEDUP_MAX
    lifetime: float = DEDUP_LIFETIME_S

    def __post_init__(self) -> None:
        self._mid = self.rng.randrange(1 << 16)
        self._recent = Recent(self.cap, self.lifetime)  # (remote, Message ID) -> Exchange
        self._separate: collections.OrderedDict[tuple[Hashable, int], _Separate] = (
            collections.OrderedDict()
        )

    def __len__(self) -> int:
        return len(self._recent)

    def receive(
        self, data: bytes, remote: Hashable, now: float, multicast: bool = False
    ) -> Decision:
        """One datagram from ``remote`` (its sender). Total: never raises."""
        try:
            msg = cr.decode_message(data)
        except cr.CoapFormatError:
            return Delegate()
        if msg.mtype == cr.ACK or msg.mtype == cr.RST:
            if self._separate.pop((remote, msg.mid), None) is None:
                return Delegate()  # an ACK of aiocoap's (a notification), or a stray one
            self.stats["separate_acked" if msg.mtype == cr.ACK else "separate_reset"] += 1
            return Send()
        if multicast or msg.code not in cr.METHODS:
            return Delegate()
        for number, _ in msg.options:
            if number in DELEGATED_OPTIONS:
                return Delegate()
        key = (remote, msg.mid)
        seen = self._recent.get(key)
        if seen is not None:
            self.stats["duplicates"] += 1
            return Send(seen.reply if msg.mtype == cr.CON else None)
        exchange = Exchange(remote, msg)
        self._recent.admit(key, exchange, now)
        return Handle(exchange)

    def empty_ack(self, exchange: Exchange) -> bytes | None:
        """The empty ACK for a CON still unanswered after :data:`EMPTY_ACK_DELAY`."""
        if exchange.done or exchange.acked or exchange.request.mtype != cr.CON:
            return None
        exchange.acked = True
        exchange.reply = cr.encode_message(cr.Message(EMPTY, (), b"", cr.ACK, exchange.request.mid))
        self.stats["empty_acks"] += 1
        return exchange.reply

    def respond(self, exchange: Exchange, response: cr.Message) -> tuple[bytes, float | None]:
        """The datagram answering ``exchange`` with ``response`` (code, options, payload), and
        the delay to its first retransmission (a separate CON response) or None."""
        req = exchange.request
        exchange.done = True
        if req.mtype == cr.CON and not exchange.acked:
            mtype, mid = cr.ACK, req.mid
        else:
            self._mid = (self._mid + 1) & 0xFFFF
            mtype, mid = (cr.CON if req.mtype == cr.CON else cr.NON), self._mid
        try:
            datagram = cr.encode_message(
                cr.Message(response.code, response.options, response.payload, mtype, mid, req.token)
            )
        except ValueError:
            self.stats["unencodable"] += 1
            datagram = cr.encode_message(cr.Message(cr.code(5, 0), (), b"", mtype, mid, req.token))
        if mtype == cr.ACK:
            exchange.reply = datagram
            return datagram, None
        if mtype == cr.NON:
            return datagram, None
        interval = ACK_TIMEOUT * self.rng.uniform(1.0, ACK_RANDOM_FACTOR)
        self._separate[(exchange.remote, mid)] = _Separate(datagram, interval)
        while len(self._separate) > SEPARATE_MAX:
            self._separate.popitem(last=False)
        self.stats["separate"] += 1
        return datagram, interval

    def retransmit(self, remote: Hashable, mid: int) -> tuple[bytes, float] | None:
        """A separate CON response to send again and the delay to the next, or None when it
        was acknowledged, reset, evicted or is out of retransmissions."""
        pending = self._separate.get((remote, mid))
        if pending is None:
            return None
        if pending.transmissions > MAX_RETRANSMIT:
            del self._separate[(remote, mid)]
            self.stats["separate_unacknowledged"] += 1
            return None
        pending.transmissions += 1
        pending.interval *= 2
        self.stats["retransmissions"] += 1
        return pending.datagram, pending.interval


def mid_of(datagram: bytes) -> int:
    """The Message ID of a datagram this module encoded."""
    return int.from_bytes(datagram[2:4], "big")
