"""CoAP Observe through the mesh, the IO: the ingress side, the owner side, the upstream.

The rules, the stream format and the bounds are sans-IO in :mod:`overlay.coap_observe`
(read its docstring first). Here:

- :class:`ObservingSite` is the aiocoap site of the ``--coap`` listener: a registration
  (GET/FETCH with ``Observe: 0``) goes to :meth:`Observations.ingress`, everything else to
  :class:`edgeagent.coap_proxy.IngressSite` as before. aiocoap runs each request's
  ``render_to_pipe`` in a task that it cancels when the client loses interest (a RST to a
  notification, a deregistration), so cancellation arrives here as CancelledError and every
  ``finally`` below frees what the observation held.
- :meth:`Observations.ingress` picks an instance with the balancer (retrying the
  registration like a GET while nothing was answered), then relays the source's frames to
  the client, renumbered (:class:`overlay.coap_observe.Sequence`), the last one without
  Observe. When the path fails once notifications flow (a failure frame, or a source that
  ends without a last frame: the channel or the peer died), the observation moves to another
  instance (:class:`overlay.coap_observe.Moves`); with no move left, a final 5.02. When
  nothing comes within the last frame's Max-Age and a margin
  (:func:`overlay.coap_observe.silence_limit`), it registers again (counted
  ``observe_refreshed``).
- A source is an async iterator of ``(ReplyStatus, Message)``: :func:`observe_upstream`
  for an instance of ours (one aiocoap client context of its own), or
  :meth:`Observations._remote` over :meth:`edgeagent.channel.Channel.stream`.
- :meth:`Observations.serve` is the owner's side: the channel handler for
  :data:`~overlay.coap_observe.OBSERVE_ENVELOPE` requests, an async generator of frames.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import aiocoap
from aiocoap import error as coap_error

from overlay import coap_observe as co
from overlay import coap_route as cr
from overlay.balancer import Outcome
from overlay.catalog import Instance
from overlay.coap_route import ReplyStatus
from overlay.pki import CertIdentity

from .channel import ChannelUnavailable
from .coap_proxy import (
    CHANNEL_MARGIN_S,
    IngressSite,
    Router,
    endpoint_address,
    from_aiocoap,
    to_aiocoap,
)

log = logging.getLogger("edgeagent.coap")

Frames = AsyncGenerator[tuple[ReplyStatus, cr.Message], None]
_FAILED = {
    ReplyStatus.TIMEOUT: Outcome.TIMEOUT,
    ReplyStatus.UNREACHABLE: Outcome.UNREACHABLE,
    ReplyStatus.REFUSED: Outcome.UNREACHABLE,
}


def _failure(failure: cr.Failure, why: str) -> tuple[ReplyStatus, cr.Message]:
    status = {cr.Failure.TIMEOUT: ReplyStatus.TIMEOUT}.get(failure, ReplyStatus.UNREACHABLE)
    return status, co.final_failure(failure, why)


async def observe_upstream(
    ctx: aiocoap.Context, inst: Instance, routed: cr.Message, budget: float
) -> Frames:
    """Register at a local instance; yield its first response, then each notification."""
    request = to_aiocoap(routed)
    request.unresolved_remote = endpoint_address(inst)
    pending = ctx.request(request, handle_blockwise=False)
    try:
        try:
            async with asyncio.timeout(budget):
                first = await pending.response
        except (TimeoutError, coap_error.TimeoutError):
            yield _failure(cr.Failure.TIMEOUT, "instance timed out")
            return
        except (coap_error.Error, OSError, ValueError) as exc:
            yield _failure(cr.Failure.UNREACHABLE, f"instance unreachable: {type(exc).__name__}")
            return
        yield ReplyStatus.ANSWERED, from_aiocoap(first)
        if pending.observation is None or first.opt.observe is None:
            return
        with contextlib.suppress(coap_error.Error):  # the upstream ended it (NotObservable...)
            async for note in pending.observation:
                yield ReplyStatus.ANSWERED, from_aiocoap(note)
    finally:
        if pending.observation is not None and not pending.observation.cancelled:
            pending.observation.cancel()  # aiocoap RSTs the next notification: freed there
        if not pending.response.done():
            pending.response.cancel()


class Observations:
    """Every observation of one agent, both as ingress and as owner."""

    def __init__(self, router: Router) -> None:
        self.router = router
        self.clients = co.Registry(co.MAX_PER_CLIENT, co.MAX_OBSERVATIONS)
        self.peers = co.Registry(co.MAX_PER_PEER, co.MAX_OBSERVATIONS)
        self.stats: Counter[str] = Counter()
        self._ctx: aiocoap.Context | None = None

    async def start(self) -> None:
        self._ctx = await aiocoap.Context.create_client_context(transports=["udp6"])

    async def close(self) -> None:
        if self._ctx is not None:
            with contextlib.suppress(Exception):
                await self._ctx.shutdown()
            self._ctx = None

    def status(self) -> dict[str, int]:
        return {
            **self.stats,
            "observing": self.clients.held(),
            "observed_for_peers": self.peers.held(),
        }

    # -- ingress: a local client's registration ---------------------------------------------

    async def ingress(self, pipe: Any, msg: cr.Message) -> None:
        """Relay one client's observation until it, the upstream or the path ends."""
        client = str(pipe.request.remote)
        route = cr.classify(msg)
        if isinstance(route, cr.Refusal):
            self.stats[f"observe_refused_{route.failure.value}"] += 1
            pipe.add_response(to_aiocoap(cr.refusal_message(route)), is_last=True)
            return
        if not self.clients.admit(client):
            self.stats["observe_refused_limit"] += 1
            why = f"over {co.MAX_PER_CLIENT} observations"
            pipe.add_response(to_aiocoap(co.final_failure(cr.Failure.NO_HEALTHY, why)), True)
            return
        self.stats["observe_registrations"] += 1
        try:
            await self._relay(pipe, msg, route)
        finally:
            self.clients.release(client)

    async def _relay(self, pipe: Any, msg: cr.Message, route: cr.Route) -> None:
        """Relay the sources' frames: when the path to the instance fails, move (co.Moves);
        when it is silent past the last frame's freshness, register again."""
        sequence, moves = co.Sequence(), co.Moves()
        inst, source = await self._register(msg, route)
        while True:
            end = await self._pass_on(pipe, inst, source, sequence, moves)
            if end == "last":
                return
            if end == "silent" and inst is not None:
                self.stats["observe_refreshed"] += 1
                log.info(
                    "observation of %s on %s silent past its Max-Age: registering again",
                    inst.name, inst.node,
                )  # fmt: skip
                inst, source = await self._register(msg, route)
                continue
            if inst is None or not moves.may_move():
                break
            self._failed(inst)
            self.stats["observe_moved"] += 1
            await asyncio.sleep(moves.move())
            inst, source = await self._register(msg, route, avoid=inst.key)
        self.stats["observe_lost"] += 1
        lost = co.final_failure(cr.Failure.UNREACHABLE, "observation lost")
        pipe.add_response(to_aiocoap(lost), is_last=True)

    async def _pass_on(
        self,
        pipe: Any,
        inst: Instance | None,
        source: Frames,
        sequence: co.Sequence,
        moves: co.Moves,
    ) -> str:
        """Relay one source's frames to the client, renumbered. ``"last"``: the client had
        the last one; ``"failed"``: the path failed (a failure frame, a bad frame, the source
        ended without a last one); ``"silent"``: no frame within co.silence_limit."""
        limit: float | None = None  # the first frame is at hand (_register waited for it)
        async with contextlib.aclosing(source):
            try:
                while True:
                    try:
                        async with asyncio.timeout(limit):
                            status, note = await anext(source)
                    except StopAsyncIteration:
                        return "failed"
                    except TimeoutError:
                        return "silent"
                    if moves.should_move(status, inst is not None):
                        return "failed"  # the path failed, not the resource
                    last = co.ends_observation(status, note)
                    out = co.for_client(note, None if last else sequence.next())
                    pipe.add_response(to_aiocoap(out), is_last=last)
                    if last:
                        return "last"
                    moves.delivered()
                    self.stats["observe_notifications"] += 1
                    limit = co.silence_limit(note)
            except cr.CoapFormatError:
                self.stats["observe_bad_frames"] += 1
                return "failed"

    def _failed(self, inst: Instance) -> None:
        """The path to ``inst`` failed under an observation: tell the balancer."""
        self.router.directory.balancer.on_lost(inst, self.router.now())
        log.info("observation of %s on %s lost its path: moving it", inst.name, inst.node)

    async def _register(
        self, msg: cr.Message, route: cr.Route, avoid: str | None = None
    ) -> tuple[Instance | None, Frames]:
        """The first try whose instance answered, and its source (or None and the failure).

        ``avoid``: an instance whose path just failed, picked only if nothing else is usable.
        """
        balancer = self.router.directory.balancer
        tried: list[str] = [] if avoid is None else [avoid]
        for attempt in range(1, 16):  # bounded; should_retry ends it sooner
            now = self.router.now()
            pick = balancer.pick(route.service, "/".join(route.path), now, exclude=tried)
            if pick.instance is None:
                failure = cr.Failure(pick.reason.value) if not tried else cr.Failure.UNREACHABLE
                return None, _single(*_failure(failure, f"{route.service}: {failure}"))
            inst = pick.instance
            balancer.on_start(inst, now, retry=attempt > 1 or avoid is not None)
            source = self._source(inst, msg, route, balancer.per_try_timeout(route.service))
            status, first = await anext(source, _failure(cr.Failure.UNREACHABLE, "no answer"))
            done = self.router.now()
            outcome = _FAILED.get(status)
            if outcome is None:
                balancer.on_success(inst, done - now, done)
                return inst, _chain((status, first), source)
            await source.aclose()
            balancer.on_failure(inst, done - now, done, outcome)
            decision = balancer.should_retry(route.service, "GET", attempt, outcome, done)
            if not decision.retry:
                return None, _single(status, first)
            tried.append(inst.key)
            await asyncio.sleep(decision.delay_s)
        return None, _single(*_failure(cr.Failure.UNREACHABLE, "no try succeeded"))

    def _source(self, inst: Instance, msg: cr.Message, route: cr.Route, budget: float) -> Frames:
        prefix = cr.instance_path(inst.path)
        if isinstance(prefix, cr.Refusal):
            return _single(ReplyStatus.REFUSED, cr.refusal_message(prefix))
        options = co.registration_options(msg, route, prefix)
        routed = cr.Message(msg.code, options, msg.payload, cr.CON)
        if inst.node == self.router.local:
            self.stats["observe_local"] += 1
            return self._local(inst, routed, budget)
        self.stats["observe_remote"] += 1
        return self._remote(inst, routed, route.service, budget)

    def _local(self, inst: Instance, routed: cr.Message, budget: float) -> Frames:
        if self._ctx is None:
            return _single(*_failure(cr.Failure.UNREACHABLE, "no upstream"))
        return observe_upstream(self._ctx, inst, routed, budget)

    async def _remote(
        self, inst: Instance, routed: cr.Message, service: str, budget: float
    ) -> Frames:
        peer, channel = self.router.peers(inst.node), self.router.channel
        if peer is None or channel is None:
            yield _failure(cr.Failure.UNREACHABLE, f"{inst.node}: no channel")
            return
        budget_ms = int(max(budget - CHANNEL_MARGIN_S, 0.01) * 1000)
        data = co.encode_observe_request(cr.MeshRequest(service, inst.endpoint, budget_ms, routed))
        try:
            stream = await channel.stream(peer, data, budget)
        except ChannelUnavailable:
            yield _failure(cr.Failure.UNREACHABLE, f"{inst.node}: unreachable")
            return
        except TimeoutError:
            yield _failure(cr.Failure.TIMEOUT, f"{inst.node}: timeout")
            return
        reader = co.NotificationReader()
        try:
            first = True
            while True:
                async with asyncio.timeout(budget if first else None):
                    chunk = await stream.read()
                if not chunk:
                    return
                for frame in reader.feed(chunk):
                    first = False
                    yield frame
        except ChannelUnavailable:
            yield _failure(cr.Failure.UNREACHABLE, f"{inst.node}: channel lost")
        except TimeoutError:
            yield _failure(cr.Failure.TIMEOUT, f"{inst.node}: timeout")
        finally:
            stream.close()

    # -- owner: a peer's registration for one of our instances ------------------------------

    async def serve(self, identity: CertIdentity, data: bytes) -> AsyncIterator[bytes]:
        """The channel handler's answer to an observe envelope: a stream of frames."""
        return self._serve(identity.name, data)

    async def _serve(self, peer: str, data: bytes) -> AsyncIterator[bytes]:
        self.stats["observe_channel_registrations"] += 1
        try:
            req = co.decode_observe_request(data)
        except cr.CoapFormatError as exc:
            self.stats["observe_channel_malformed"] += 1
            yield co.encode_notification(
                ReplyStatus.REFUSED, co.final_failure(cr.Failure.MALFORMED, str(exc))
            )
            return
        denied = self.router.forbidden(peer, req.service)
        if denied is not None:
            yield co.encode_notification(ReplyStatus.ANSWERED, denied)
            return
        found = self._instance(req)
        if isinstance(found[0], ReplyStatus):
            yield co.encode_notification(found[0], found[1])
            return
        inst, routed = found
        if not self.peers.admit(peer):
            self.stats["observe_channel_refused_limit"] += 1
            why = f"over {co.MAX_PER_PEER} observations for {peer}"
            yield co.encode_notification(
                ReplyStatus.ANSWERED, co.final_failure(cr.Failure.NO_HEALTHY, why)
            )
            return
        try:
            budget = max(req.budget_ms / 1000.0, 0.01)
            if self._ctx is None:
                yield co.encode_notification(*_failure(cr.Failure.UNREACHABLE, "no upstream"))
                return
            async with contextlib.aclosing(observe_upstream(self._ctx, inst, routed, budget)) as up:
                async for frame in up:
                    yield co.encode_notification(*frame)
        finally:
            self.peers.release(peer)

    def _instance(
        self, req: cr.MeshRequest
    ) -> tuple[Instance, cr.Message] | tuple[ReplyStatus, cr.Message]:
        """Our instance and the message to send it, or the refusal frame."""
        inst = next(
            (
                i
                for i in self.router.directory.catalog.instances(req.service)
                if i.node == self.router.local and i.endpoint == req.endpoint
            ),
            None,
        )
        if inst is None:
            self.stats["observe_channel_refused"] += 1
            why = f"{req.service} at {req.endpoint[:80]} is not served here"
            return ReplyStatus.REFUSED, co.final_failure(cr.Failure.UNKNOWN_SERVICE, why)
        hops = cr.next_hop_limit(req.message)
        if isinstance(hops, cr.Refusal):
            status = (
                ReplyStatus.HOP_LIMIT
                if hops.failure == cr.Failure.HOP_LIMIT
                else (ReplyStatus.REFUSED)
            )
            return status, cr.refusal_message(hops)
        options = tuple(o for o in req.message.options if o[0] != cr.HOP_LIMIT)
        options += ((cr.HOP_LIMIT, cr.uint_option(hops)),)
        return inst, cr.Message(req.message.code, options, req.message.payload, cr.CON)


async def _single(status: ReplyStatus, msg: cr.Message) -> Frames:
    yield status, msg


async def _chain(first: tuple[ReplyStatus, cr.Message], rest: Frames) -> Frames:
    try:
        yield first
        async for frame in rest:
            yield frame
    finally:
        await rest.aclose()


class ObservingSite(IngressSite):
    """The ``--coap`` site: Observe registrations to :class:`Observations`, the rest as before."""

    def __init__(self, router: Router, observations: Observations) -> None:
        super().__init__(router)
        self.observations = observations

    async def render_to_pipe(self, pipe: Any) -> None:
        request = pipe.request
        observe = request.opt.observe
        if observe != 0 or request.code not in (aiocoap.GET, aiocoap.FETCH):
            return await super().render_to_pipe(pipe)
        try:
            msg = from_aiocoap(request)
        except Exception:  # an option aiocoap decoded but we cannot re-encode
            return await super().render_to_pipe(pipe)
        await self.observations.ingress(pipe, msg)
