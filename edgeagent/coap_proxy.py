"""The CoAP router's IO: aiocoap at both edges, the agent channel between agents.

How it works
------------
:class:`Router` is the request path; the decisions are sans-IO in :mod:`overlay.coap_route`
(which form, which service, Hop-Limit, the options sent on) and :mod:`overlay.balancer`
(which instance, retry or not).

- **Ingress** (:class:`IngressSite`, the aiocoap server's site): every request a local
  client sends to ``--coap`` comes to :meth:`Router.handle` as an
  :class:`overlay.coap_route.Message` (blocks are not reassembled: Block1/Block2 pass
  through, one block per mesh request, and every block of a transfer after the first goes to
  the instance that answered the previous one: ``Router._affinity``). The router classifies it, asks
  ``balancer.fault`` once, then per try ``pick`` -> ``on_start`` -> the try ->
  ``on_success`` / ``on_failure``, and ``should_retry`` after a failed one (a try that the
  channel reports as never processed may be retried even for POST: it cannot have acted).
- **A try** goes to a local instance directly (:class:`Upstream`) or, for an instance
  another node owns, over the agent channel to that node (:meth:`Router.serve_channel`
  there), which checks Hop-Limit again, forwards to its own instance and replies.
- **Upstream** is our own CoAP client (:mod:`overlay.coap_client`, sans-IO), one connected
  UDP socket per instance address with any number of requests in flight (bounded): aiocoap's
  client cost three times the CPU per request and sends one CON at a time per remote
  (NSTART=1), which made a busy instance a one-at-a-time pipe. A request goes as NON when the
  client sent NON. Observations still use an aiocoap client (:mod:`edgeagent.coap_observe`).
- **Deduplication memory**: aiocoap remembers every request it received (and its response)
  for EXCHANGE_LIFETIME, 247 s, with one timer each. :func:`bound_deduplication` replaces
  that, on the agent's server context only, by a table of at most :data:`DEDUP_MAX`
  entries kept for at most :data:`DEDUP_LIFETIME_S` (a local client's retransmissions end
  within MAX_TRANSMIT_SPAN, 45 s; at high rates the cap, not the time, decides).

Everything a peer or a client sends is decoded by the total decoders of
:mod:`overlay.coap_route`; a bug in the router answers 5.00 and is counted, never crashes.
"""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import logging
import types
from collections import Counter
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, Protocol, cast

import aiocoap
from aiocoap.numbers import OptionNumber
from aiocoap.pipe import error_to_message, run_driving_pipe
from aiocoap.transports import udp6

from overlay import coap_route as cr
from overlay.balancer import Balancer, Outcome, Pick, PickReason
from overlay.catalog import Catalog, Instance
from overlay.coap_client import Answer, Busy, Exchanges, Reset
from overlay.coap_route import ReplyStatus
from overlay.coap_server import DEDUP_LIFETIME_S, DEDUP_MAX, Recent  # one table for both paths
from overlay.pki import CertIdentity

from .channel import Channel, ChannelUnavailable, Peer

log = logging.getLogger("edgeagent.coap")

UPSTREAM_LINKS = 64  # UDP sockets toward local instances (one per address), at most
RESOLVED_TTL_S = 30.0  # an instance given by name is resolved again after this (names move)
AFFINITY_MAX = 1024  # block-wise transfers tracked for instance affinity
CHANNEL_MARGIN_S = 0.05  # the owning agent answers this much before the caller gives up
INTERNAL_ERROR = cr.code(5, 0)
ADDRESS_CHECKS_MAX = 1024  # addresses whose multicast checks are remembered, at most
ADDRESS_CHECKS: tuple[dict[Any, bool], dict[Any, bool]] = ({}, {})  # remote, local


class ServiceDirectory(Protocol):
    """What the router needs of the services feature: the catalog and its balancer."""

    @property
    def catalog(self) -> Catalog: ...

    @property
    def balancer(self) -> Balancer: ...


PeerLookup = Callable[[str], Peer | None]  # node name -> where its channel listens
# (peer node by its mTLS identity, destination service) -> allowed; the policy feature's
# intentions (edgeagent.features.policy). None: every peer is allowed.
Authorize = Callable[[str, str], bool]
# source node -> within the policy's rate limits (a token taken); None: no limits
RateCheck = Callable[[str], bool]
FORBIDDEN = cr.code(4, 3)
TOO_MANY_REQUESTS = cr.code(4, 29)  # RFC 8516, with Max-Age: when to try again
MAX_AGE = 14


# -- aiocoap <-> overlay.coap_route.Message ------------------------------------------------


def from_aiocoap(msg: aiocoap.Message) -> cr.Message:
    options = tuple((int(o.number), bytes(o.encode())) for o in msg.opt.option_list())
    mtype = int(msg.mtype) if msg.mtype is not None else cr.CON
    return cr.Message(int(msg.code), options, bytes(msg.payload), mtype)


def to_aiocoap(msg: cr.Message, **kwargs: Any) -> aiocoap.Message:
    out = aiocoap.Message(code=aiocoap.Code(msg.code), payload=msg.payload, **kwargs)
    for number, value in msg.options:
        out.opt.add_option(OptionNumber(number).create_option(decode=value))
    return out


def endpoint_address(inst: Instance) -> str:
    return f"[{inst.host}]:{inst.port}" if ":" in inst.host else f"{inst.host}:{inst.port}"


# -- deduplication bound -------------------------------------------------------------------


def bound_deduplication(ctx: aiocoap.Context) -> int:
    """Bound the request-deduplication memory of ``ctx``'s message managers; how many."""
    bounded = 0
    for tman in getattr(ctx, "request_interfaces", ()):
        mman = getattr(tman, "token_interface", None)
        if mman is None or not hasattr(mman, "_recent_messages"):
            continue
        recent = Recent(DEDUP_MAX, DEDUP_LIFETIME_S)
        mman._recent_messages = recent

        def deduplicate(self: Any, message: aiocoap.Message, recent: Recent = recent) -> bool:
            key = (message.remote, message.mid)
            if key in recent:
                stored = recent[key]
                if message.mtype is aiocoap.CON and stored is not None:
                    self._send_initially(stored)
                return True
            recent.admit(key, None, self.loop.time())
            return False

        mman._deduplicate_message = types.MethodType(deduplicate, mman)
        bounded += 1
    return bounded


def cached_address_checks() -> None:
    """Memoise aiocoap's ``is_multicast`` / ``is_multicast_locally`` of UDP addresses (idempotent).

    aiocoap answers both by formatting the address and parsing it again with
    :mod:`ipaddress`, three times per upstream request and once per response to a local
    client: a fifth of the owning agent's CPU per request at low load. Both depend only on
    the address bytes (``sockaddr[0]``, the pktinfo), so they are kept in a bounded table
    (:data:`ADDRESS_CHECKS_MAX`, cleared when full: a client sending from many addresses
    costs the parse again, never memory).
    """
    cls = udp6.UDP6EndpointAddress
    if getattr(cls, "_edgeagent_cached", False):
        return
    try:  # an aiocoap whose class has other shapes keeps its own checks: slower, still right
        remote_check, local_check = cls.is_multicast.fget, cls.is_multicast_locally.fget
    except AttributeError:
        log.info("coap: aiocoap's address checks are not properties here; not memoised")
        return
    remote, local = ADDRESS_CHECKS

    def cached(table: dict[Any, bool], key: Any, check: Any, address: Any) -> bool:
        hit = table.get(key)
        if hit is None:
            hit = bool(check(address))
            if len(table) >= ADDRESS_CHECKS_MAX:
                table.clear()
            table[key] = hit
        return hit

    cls.is_multicast = property(lambda self: cached(remote, self.sockaddr[0], remote_check, self))
    cls.is_multicast_locally = property(lambda self: cached(local, self.pktinfo, local_check, self))
    cls._edgeagent_cached = True


def unnamed_render_tasks(ctx: aiocoap.Context) -> None:
    """Render ``ctx``'s requests as aiocoap does, without naming each task by ``repr``.

    aiocoap names every render task ``"Rendering for %r" % request``: formatting the
    message and its addresses (with :mod:`ipaddress`) was 5% of the ingress agent's CPU.
    """

    def render_to_pipe(self: aiocoap.Context, pipe: Any) -> None:
        run_driving_pipe(error_to_message(pipe, self.log), self._render_to_pipe(pipe))

    ctx.render_to_pipe = types.MethodType(render_to_pipe, ctx)


# -- upstream: local instances -------------------------------------------------------------


class _Link(asyncio.DatagramProtocol):
    """One connected UDP socket toward one instance, with its outstanding requests.

    Connected, so that the kernel delivers only the instance's datagrams and reports an ICMP
    port-unreachable (:meth:`error_received`): a stopped instance fails its requests at once
    (5.02, and the balancer moves on) instead of after the try's timeout.
    """

    def __init__(self, stats: Counter[str]) -> None:
        self.exchanges = Exchanges(stats=stats)
        self.stats = stats
        self.transport: asyncio.DatagramTransport | None = None
        self.waiting: dict[bytes, asyncio.Future[tuple[ReplyStatus, cr.Message]]] = {}
        self.timers: dict[bytes, asyncio.TimerHandle] = {}
        self.until = float("inf")  # re-resolved after this (a name, not an address literal)
        self.retired = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        got = self.exchanges.receive(data)
        if got.reply is not None and self.transport is not None:
            self.transport.sendto(got.reply)
        if isinstance(got.outcome, Answer):
            self._finish(got.outcome.token, (ReplyStatus.ANSWERED, got.outcome.response))
        elif isinstance(got.outcome, Reset):
            self.stats["unreachable"] += 1
            self._finish(got.outcome.token, _unreachable("instance reset the request"))

    def error_received(self, exc: Exception) -> None:
        self._fail_all(f"instance unreachable: {type(exc).__name__}")

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._fail_all("instance unreachable: socket closed")

    def _fail_all(self, why: str) -> None:
        for token in list(self.waiting):
            self.exchanges.cancel(token)
            self.stats["unreachable"] += 1
            self._finish(token, _unreachable(why))

    def _finish(self, token: bytes, result: tuple[ReplyStatus, cr.Message]) -> None:
        future = self.waiting.pop(token, None)
        if future is not None and not future.done():
            future.set_result(result)

    def _retransmit(self, token: bytes) -> None:
        self.timers.pop(token, None)
        again = self.exchanges.retransmit(token)
        if again is not None and self.transport is not None:
            self.transport.sendto(again[0])
            self.timers[token] = asyncio.get_running_loop().call_later(
                again[1], self._retransmit, token
            )

    async def request(self, msg: cr.Message, timeout: float) -> tuple[ReplyStatus, cr.Message]:
        if self.transport is None:
            return _unreachable("instance unreachable: socket closed")
        try:
            token, datagram, delay = self.exchanges.start(msg)
        except Busy:
            self.stats["busy"] += 1
            return _unreachable("too many requests outstanding to the instance")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[tuple[ReplyStatus, cr.Message]] = loop.create_future()
        self.waiting[token] = future
        self.transport.sendto(datagram)
        if delay is not None:
            self.timers[token] = loop.call_later(delay, self._retransmit, token)
        try:
            async with asyncio.timeout(timeout):
                return await future
        except TimeoutError:
            self.stats["timeouts"] += 1
            return ReplyStatus.TIMEOUT, _failure(cr.Failure.TIMEOUT, "instance timed out")
        finally:
            self.exchanges.cancel(token)
            self.waiting.pop(token, None)
            timer = self.timers.pop(token, None)
            if timer is not None:
                timer.cancel()
            if self.retired and not self.waiting:
                self.close()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


def _unreachable(why: str) -> tuple[ReplyStatus, cr.Message]:
    return ReplyStatus.UNREACHABLE, _failure(cr.Failure.UNREACHABLE, why)


class Upstream:
    """Requests to this node's instances: our own CoAP client (:mod:`overlay.coap_client`),
    one connected UDP socket per instance address, many requests in flight on each.

    aiocoap's client cost ~315 µs of CPU per request against ~105 µs for this, and sends one
    CON at a time per remote (NSTART=1), which made a busy instance a one-at-a-time pipe
    unless requests were spread over many contexts. An instance given by name is resolved
    when its socket opens and again after :data:`RESOLVED_TTL_S`; at most ``limit`` sockets
    are open, the least recently used closed first.
    """

    def __init__(self, limit: int = UPSTREAM_LINKS) -> None:
        self.limit = limit
        self._links: collections.OrderedDict[tuple[str, int], _Link] = collections.OrderedDict()
        self._opening: asyncio.Lock | None = None
        self._closed = False
        self.stats: Counter[str] = Counter()

    async def start(self) -> None:
        self._opening = asyncio.Lock()

    async def close(self) -> None:
        self._closed = True
        for link in self._links.values():
            link.close()
        self._links.clear()

    async def forward(
        self, inst: Instance, msg: cr.Message, timeout: float
    ) -> tuple[ReplyStatus, cr.Message]:
        """Send ``msg`` (already routed for ``inst``) and wait at most ``timeout``."""
        if self._opening is None or self._closed:
            return _unreachable("no upstream")
        key = (inst.host, inst.port)
        link = self._links.get(key)
        if link is None or link.transport is None or asyncio.get_running_loop().time() > link.until:
            try:
                async with asyncio.timeout(timeout):
                    link = await self._open(key)
            except (OSError, TimeoutError) as exc:
                self.stats["unreachable"] += 1
                return _unreachable(f"instance unreachable: {type(exc).__name__}")
        else:
            self._links.move_to_end(key)
        return await link.request(msg, timeout)

    async def _open(self, key: tuple[str, int]) -> _Link:
        assert self._opening is not None
        async with self._opening:
            link = self._links.get(key)
            loop = asyncio.get_running_loop()
            if link is not None and link.transport is not None and loop.time() <= link.until:
                return link
            _, link = await loop.create_datagram_endpoint(
                lambda: _Link(self.stats), remote_addr=key
            )
            if not _is_address(key[0]):
                link.until = loop.time() + RESOLVED_TTL_S
            self._retire(self._links.pop(key, None))
            self._links[key] = link
            while len(self._links) > self.limit:
                self._retire(self._links.popitem(last=False)[1])
            self.stats["links"] = len(self._links)
            self.stats["opened"] += 1
            return link

    @staticmethod
    def _retire(link: _Link | None) -> None:
        """Close ``link`` once its outstanding requests are done."""
        if link is None:
            return
        link.retired = True
        if not link.waiting:
            link.close()


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _failure(failure: cr.Failure, why: str) -> cr.Message:
    return cr.refusal_message(cr.Refusal(failure, why))


# -- the router ------------------------------------------------------------------------------


@dataclass(slots=True)
class _Try:
    outcome: Outcome | None  # None: answered (a success for the balancer)
    response: cr.Message
    never_processed: bool = False


def _in_transfer(msg: cr.Message) -> bool:
    """Part of a block-wise transfer: any Block1, or Block2 past block 0 (RFC 7959)."""
    if msg.values(cr.BLOCK1):
        return True
    return any(int.from_bytes(v, "big") >> 4 for v in msg.values(cr.BLOCK2))


_STATUS_OUTCOME = {
    ReplyStatus.TIMEOUT: Outcome.TIMEOUT,
    ReplyStatus.UNREACHABLE: Outcome.UNREACHABLE,
    ReplyStatus.REFUSED: Outcome.UNREACHABLE,  # a stale catalog entry: try another
}


def _outcome_of(status: ReplyStatus, response: cr.Message) -> Outcome | None:
    if status in _STATUS_OUTCOME:
        return _STATUS_OUTCOME[status]
    if status == ReplyStatus.ANSWERED and response.code == cr.SERVICE_UNAVAILABLE:
        return Outcome.OVERLOADED
    if status == ReplyStatus.ANSWERED and response.code >> 5 == 5:
        return Outcome.SERVER_ERROR
    return None


class Router:
    """Routes local clients' mesh requests; serves peers' requests for our instances."""

    def __init__(
        self,
        directory: ServiceDirectory,
        local: str,
        peers: PeerLookup,
        upstream: Upstream,
        channel: Channel | None = None,
    ) -> None:
        self.directory, self.local, self.peers = directory, local, peers
        self.upstream, self.channel = upstream, channel
        self.authorize: Authorize | None = None  # set by the coap feature when policy is on
        self.rate_check: RateCheck | None = None  # likewise
        self.stats: Counter[str] = Counter()
        # Block-wise transfers in progress: (client, service, path) -> instance key, so that
        # every block of one transfer reaches the same instance (most recent last, bounded).
        self._affinity: collections.OrderedDict[Any, str] = collections.OrderedDict()

    @staticmethod
    def now() -> float:
        return asyncio.get_running_loop().time()

    async def handle(self, msg: cr.Message, client: Hashable = "") -> cr.Message:
        """One local client's request -> the response to send it (never raises).

        ``client`` identifies the client for block-wise affinity (its aiocoap address).
        """
        self.stats["requests"] += 1
        try:
            return await self._handle(msg, client)
        except Exception:
            self.stats["internal_errors"] += 1
            log.exception("coap router failed on a request")
            return cr.Message(INTERNAL_ERROR, (), b"internal error")

    async def _handle(self, msg: cr.Message, client: Hashable) -> cr.Message:
        route = cr.classify(msg)
        if isinstance(route, cr.Refusal):
            self.stats[f"refused_{route.failure.value}"] += 1
            return cr.refusal_message(route)
        self.stats[f"form_{route.form.value}"] += 1
        balancer = self.directory.balancer
        fault = balancer.fault(route.service)
        if fault.delay_s:
            await asyncio.sleep(fault.delay_s)
        if fault.abort_code is not None:
            return cr.Message(cr.parse_code(fault.abort_code), (), b"fault injected")
        return await self._tries(msg, route, balancer, (client, route.service, route.path))

    def _pick(
        self, msg: cr.Message, route: cr.Route, balancer: Balancer, tried: list[str], sticky: Any
    ) -> Pick:
        """The balancer's pick, except that a block-wise transfer stays on its instance."""
        now = self.now()
        held = self._affinity.get(sticky) if _in_transfer(msg) else None
        if held is not None and not tried:
            for inst in balancer.usable(route.service, now):
                if inst.key == held:
                    return Pick(inst, PickReason.PICKED)
        return balancer.pick(route.service, "/".join(route.path), now, exclude=tried)

    def _remember(self, sticky: Any, inst: Instance, msg: cr.Message, response: cr.Message) -> None:
        blocks = response.values(cr.BLOCK1) or response.values(cr.BLOCK2)
        if not (blocks or _in_transfer(msg)):
            return
        self._affinity[sticky] = inst.key
        self._affinity.move_to_end(sticky)
        while len(self._affinity) > AFFINITY_MAX:
            self._affinity.popitem(last=False)

    async def _tries(
        self, msg: cr.Message, route: cr.Route, balancer: Balancer, sticky: Any
    ) -> cr.Message:
        tried: list[str] = []
        last: cr.Message | None = None
        for attempt in range(1, 64):  # bounded; should_retry ends it far sooner
            pick = self._pick(msg, route, balancer, tried, sticky)
            if pick.instance is None:
                if last is not None:
                    return last
                failure = cr.Failure(pick.reason.value)  # unknown_service / no_healthy
                self.stats[f"refused_{failure.value}"] += 1
                return cr.refusal_message(cr.Refusal(failure, f"{route.service}: {failure}"))
            inst = pick.instance
            start = self.now()
            balancer.on_start(inst, start, retry=attempt > 1)
            result = await self._try(inst, msg, route, balancer.per_try_timeout(route.service))
            now = self.now()
            if result.outcome is None:
                balancer.on_success(inst, now - start, now)
                self._remember(sticky, inst, msg, result.response)
                return result.response
            balancer.on_failure(inst, now - start, now, result.outcome)
            self.stats[f"try_{result.outcome.value}"] += 1
            method = "GET" if result.never_processed else msg.method
            decision = balancer.should_retry(route.service, method, attempt, result.outcome, now)
            last = result.response
            if not decision.retry:
                return last
            self.stats["retries"] += 1
            tried.append(inst.key)
            await asyncio.sleep(decision.delay_s)
        return last or _failure(cr.Failure.UNREACHABLE, "no try succeeded")

    async def _try(self, inst: Instance, msg: cr.Message, route: cr.Route, budget: float) -> _Try:
        prefix = cr.instance_path(inst.path)
        if isinstance(prefix, cr.Refusal):
            return _Try(Outcome.UNREACHABLE, cr.refusal_message(prefix))
        options = cr.upstream_options(msg, route, prefix, route.hop_limit)
        routed = cr.Message(msg.code, options, msg.payload, msg.mtype)
        if inst.node == self.local:
            self.stats["local_tries"] += 1
            limited = self.limited(self.local)
            if limited is not None:
                return _Try(None, limited)
            status, response = await self.upstream.forward(inst, routed, budget)
            return _Try(_outcome_of(status, response), response)
        self.stats["remote_tries"] += 1
        return await self._remote(inst, routed, route.service, budget)

    async def _remote(
        self, inst: Instance, routed: cr.Message, service: str, budget: float
    ) -> _Try:
        peer = self.peers(inst.node)
        if peer is None or self.channel is None:
            why = "no channel" if self.channel is None else f"{inst.node} has no channel address"
            return _Try(Outcome.UNREACHABLE, _failure(cr.Failure.UNREACHABLE, why), True)
        budget_ms = int(max(budget - CHANNEL_MARGIN_S, 0.01) * 1000)
        data = cr.encode_request(cr.MeshRequest(service, inst.endpoint, budget_ms, routed))
        try:
            reply = await self.channel.request(peer, data, budget)
            status, response = cr.decode_reply(reply)
        except ChannelUnavailable as exc:
            failed = _failure(cr.Failure.UNREACHABLE, f"{inst.node}: unreachable")
            return _Try(Outcome.UNREACHABLE, failed, exc.retryable)
        except TimeoutError:
            return _Try(Outcome.TIMEOUT, _failure(cr.Failure.TIMEOUT, f"{inst.node}: timeout"))
        except cr.CoapFormatError:
            self.stats["bad_replies"] += 1
            return _Try(Outcome.SERVER_ERROR, _failure(cr.Failure.UNREACHABLE, "bad reply"))
        return _Try(_outcome_of(status, response), response)

    # -- the owning side: a peer's request for one of our instances ------------------------

    async def serve_channel(self, identity: CertIdentity, data: bytes) -> bytes:
        """A peer agent's try for one of our instances -> the reply (never raises)."""
        self.stats["channel_requests"] += 1
        try:
            status, response = await self._serve(data, identity)
        except Exception:
            self.stats["internal_errors"] += 1
            log.exception("coap router failed on a channel request")
            status, response = ReplyStatus.REFUSED, cr.Message(INTERNAL_ERROR, (), b"")
        return cr.encode_reply(status, response)

    def forbidden(self, peer: str, service: str) -> cr.Message | None:
        """The 4.03 for a peer's request (or observe registration) the intentions deny; None
        when allowed. Answered, not refused: the ingress must not try another instance nor
        count the instance as failing. Checked before the instance lookup, so a denied peer
        learns nothing about what is served here."""
        if self.authorize is None or self.authorize(peer, service):
            return None
        self.stats["channel_forbidden"] += 1
        return cr.Message(FORBIDDEN, (), b"denied by policy")

    def limited(self, source: str) -> cr.Message | None:
        """The 4.29 for a request from ``source`` over the policy's rate limit; None when
        within it. Answered, like a 4.03: neither retried elsewhere nor an instance failure."""
        if self.rate_check is None or self.rate_check(source):
            return None
        self.stats["rate_limited"] += 1
        return cr.Message(TOO_MANY_REQUESTS, ((MAX_AGE, cr.uint_option(1)),), b"rate limited")

    async def _serve(self, data: bytes, identity: CertIdentity) -> tuple[ReplyStatus, cr.Message]:
        try:
            req = cr.decode_request(data)
        except cr.CoapFormatError as exc:
            self.stats["channel_malformed"] += 1
            return ReplyStatus.REFUSED, _failure(cr.Failure.MALFORMED, str(exc))
        denied = self.forbidden(identity.name, req.service) or self.limited(identity.name)
        if denied is not None:
            return ReplyStatus.ANSWERED, denied
        inst = next(
            (
                i
                for i in self.directory.catalog.instances(req.service)
                if i.node == self.local and i.endpoint == req.endpoint
            ),
            None,
        )
        if inst is None or req.message.code not in cr.METHODS:
            self.stats["channel_refused"] += 1
            why = f"{req.service} at {req.endpoint[:80]} is not served here"
            return ReplyStatus.REFUSED, _failure(cr.Failure.UNKNOWN_SERVICE, why)
        hops = cr.next_hop_limit(req.message)
        if isinstance(hops, cr.Refusal):
            status = (
                ReplyStatus.HOP_LIMIT
                if hops.failure == cr.Failure.HOP_LIMIT
                else ReplyStatus.REFUSED
            )
            self.stats[f"channel_{hops.failure.value}"] += 1
            return status, cr.refusal_message(hops)
        options = tuple(o for o in req.message.options if o[0] != cr.HOP_LIMIT)
        options += ((cr.HOP_LIMIT, cr.uint_option(hops)),)
        routed = cr.Message(req.message.code, options, req.message.payload, req.message.mtype)
        return await self.upstream.forward(inst, routed, max(req.budget_ms / 1000.0, 0.01))

    def status(self) -> dict[str, int]:
        return {**self.stats, **{f"upstream_{k}": v for k, v in self.upstream.stats.items()}}


class IngressSite:
    """The aiocoap server's site: every path, every method, to :meth:`Router.handle`."""

    def __init__(self, router: Router) -> None:
        self.router = router

    async def render_to_pipe(self, pipe: Any) -> None:
        try:
            msg = from_aiocoap(pipe.request)
        except Exception:  # an option aiocoap decoded but we cannot re-encode
            self.router.stats["refused_malformed"] += 1
            msg = None
        if msg is None:
            response = cr.refusal_message(cr.Refusal(cr.Failure.MALFORMED, "bad options"))
        else:
            # the socket address (str() of the remote costs more than the router's whole
            # decision); the fast path (coap_fastpath) keys the same client the same way,
            # so a block-wise transfer it started keeps its instance here
            remote = pipe.request.remote
            response = await self.router.handle(msg, getattr(remote, "sockaddr", remote))
        try:
            out = to_aiocoap(response)
        except Exception:
            self.router.stats["internal_errors"] += 1
            out = aiocoap.Message(code=aiocoap.Code(INTERNAL_ERROR))
        pipe.add_response(out, is_last=True)
