"""How signed policy reaches an agent (issue 11, "sync and spread"): from peers, from the cloud,
and what the agent reports back. Every envelope fetched goes through the policy feature's
:meth:`~edgeagent.features.policy.Policy.offer`, so through :func:`overlay.policy.decide`
against this node's own trusted keys and high-water mark: no peer and no endpoint can forge
or roll back policy, whatever it serves.

Peers (:class:`PeerFetch`). Each node publishes the version it enforces in its replicated
state (``pv``). A node that sees a peer's ``pv`` above its own high-water mark asks that peer
for its envelope over the agent channel (service byte :data:`PEER_SERVICE`; the request is
that one byte, the reply the peer's active envelope as received, or empty). At most one fetch
is in flight; a round tries up to :data:`MAX_TRIES` of the peers advertising the wanted
version (in random order, so one bad peer cannot hold the node back), each bounded by
:data:`PEER_TIMEOUT_S` and by the envelope size limit. A round that does not reach the wanted
version backs that version off (exponential with jitter, :data:`BACKOFF_MIN_S` ..
:data:`BACKOFF_MAX_S`). The accepted bundle's source is ``peer:<name>`` (the mTLS identity
of the peer it came from).

The cloud (:class:`CloudPoll`). With ``[policy] url`` the agent GETs the envelope over HTTPS
every ``interval`` seconds (stdlib :mod:`http.client` in a worker thread; the certificate is
checked against ``[policy] ca``, else the system's CAs, and must name the host). The ETag of
the last answer goes in ``If-None-Match``: 304 means nothing new. While the endpoint is
unreachable (connection, TLS, or an HTTP status other than 200/304) the poll backs off with
jitter, up to the interval, and logs one warning per outage (and one line when it is back).
A body over :data:`overlay.policy.MAX_ENVELOPE_BYTES` is not read.

Reporting (:class:`Reporter`). With ``[policy] report_url`` the agent POSTs its reported state
as JSON (as a device shadow's ``reported``): node, applied version, high-water mark, source,
last sync, refusal counts and the last refusal, and a health summary. Sent when it changed,
at most once per ``interval`` (at least :data:`REPORT_MIN_S` apart), one request at a time,
with the same backoff while the endpoint fails; the answer's body is read at most 4 KiB and
dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import random
import ssl
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from overlay import policy as pol
from overlay.pki import CertIdentity

from .channel import ChannelUnavailable
from .control import ControlError
from .errors import ConfigError
from .host import FeatureHost
from .logs import fields

log = FeatureHost.logger("policy")

PEER_SERVICE = 0x50  # b"P": "your active envelope, please"
PEER_TIMEOUT_S = 10.0
MAX_TRIES = 3  # peers asked per round
BACKOFF_MIN_S = 1.0
BACKOFF_MAX_S = 60.0
MAX_BACKOFF_ENTRIES = 64
HTTP_TIMEOUT_S = 10.0
MAX_REPLY_BYTES = 4096  # of a report's answer (read and dropped)
REPORT_MIN_S = 1.0
MAX_DETAIL_CHARS = 200

Offer = Callable[[bytes, str], Awaitable[Mapping[str, Any]]]


class PolicyLike(Protocol):
    high_water: int
    envelope: bytes | None

    async def offer(self, envelope: bytes, source: str) -> dict[str, Any]: ...


def backoff_delay(failures: int, rng: random.Random, high: float = BACKOFF_MAX_S) -> float:
    """Exponential from :data:`BACKOFF_MIN_S`, capped at ``high``, with jitter (x0.5 .. x1)."""
    return float(min(high, BACKOFF_MIN_S * 2 ** min(failures - 1, 30)) * rng.uniform(0.5, 1.0))


async def _offer(policy: PolicyLike, envelope: bytes, source: str) -> bool:
    """Offer ``envelope``; True when accepted (refusals are counted by the policy)."""
    try:
        return bool((await policy.offer(envelope, source))["accepted"])
    except ControlError as exc:  # accepted but not saved in time: not applied
        log.warning("fetched policy not applied", extra=fields(source=source, why=str(exc)))
        return False


# -- peers ---------------------------------------------------------------------------------


class PeerFetch:
    """Which version each peer enforces; fetches a newer bundle from them, one at a time."""

    def __init__(
        self,
        policy: PolicyLike,
        request: Callable[[str, bytes, float], Awaitable[bytes]],
        reachable: Callable[[], set[str]],
        rng: random.Random | None = None,
    ) -> None:
        self.policy = policy
        self._request = request
        self._reachable = reachable
        self.rng = rng or random.Random()
        self.versions: dict[str, int] = {}  # peer -> the version it enforces
        self._backoff: dict[int, tuple[int, float]] = {}  # version -> (failures, not before)
        self._task: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self.stats: Counter[str] = Counter()

    def seen(self, peer: str, value: object) -> None:
        """``peer`` published ``value`` under ``pv`` (None: removed)."""
        if type(value) is int and 1 <= value <= 2**53:
            self.versions[peer] = value
        else:
            self.versions.pop(peer, None)
        self.kick()

    def wanted(self) -> int | None:
        """The newest version a peer enforces, if it is above our high-water mark."""
        newest = max(self.versions.values(), default=0)
        return newest if newest > self.policy.high_water else None

    def kick(self) -> None:
        """Start a fetch round if one is due (main loop)."""
        if self._task is not None:
            return
        version = self.wanted()
        if version is None:
            return
        loop = asyncio.get_running_loop()
        failures, not_before = self._backoff.get(version, (0, 0.0))
        wait = not_before - loop.time()
        if wait > 0:
            if self._timer is None:
                self._timer = loop.call_later(wait, self._timer_fired)
            return
        self._task = asyncio.ensure_future(self._round(version))
        self._task.add_done_callback(self._round_done)

    def _timer_fired(self) -> None:
        self._timer = None
        self.kick()

    def _round_done(self, task: asyncio.Task[None]) -> None:
        self._task = None
        if not task.cancelled() and task.exception() is not None:
            log.error("policy peer fetch failed", exc_info=task.exception())
        asyncio.get_running_loop().call_soon(self.kick)

    async def _round(self, version: int) -> None:
        reachable = self._reachable()
        peers = [p for p, v in self.versions.items() if v >= version and p in reachable]
        self.rng.shuffle(peers)
        for peer in peers[:MAX_TRIES]:
            self.stats["fetches"] += 1
            try:
                reply = await self._request(peer, bytes([PEER_SERVICE]), PEER_TIMEOUT_S)
            except (ChannelUnavailable, TimeoutError) as exc:
                self.stats["fetch_failures"] += 1
                log.debug("policy fetch failed", extra=fields(peer=peer, why=str(exc)))
                continue
            if not reply:
                self.stats["fetch_empty"] += 1
                continue
            if await _offer(self.policy, reply, f"peer:{peer}"):
                self.stats["fetched"] += 1
            if self.policy.high_water >= version:
                self._backoff = {v: b for v, b in self._backoff.items() if v > version}
                return
        failures = self._backoff.get(version, (0, 0.0))[0] + 1
        now = asyncio.get_running_loop().time()
        self._backoff[version] = (failures, now + backoff_delay(failures, self.rng))
        while len(self._backoff) > MAX_BACKOFF_ENTRIES:
            del self._backoff[min(self._backoff)]

    async def serve(self, identity: CertIdentity, data: bytes) -> bytes:
        """A peer asks for our active envelope (exactly the service byte; else nothing)."""
        if data != bytes([PEER_SERVICE]):
            self.stats["bad_requests"] += 1
            return b""
        self.stats["served"] += 1
        return self.policy.envelope or b""

    async def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def backoff_of(self, version: int) -> tuple[int, float]:
        """(failed rounds, loop time before which no round starts) for ``version``."""
        return self._backoff.get(version, (0, 0.0))

    def status(self) -> dict[str, Any]:
        return {"peer_versions": len(self.versions), "wanted": self.wanted(), **self.stats}


# -- HTTPS ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    etag: str | None
    body: bytes


class TooLarge(Exception):
    pass


def tls_context(ca: Path | None) -> ssl.SSLContext:
    """Verify the endpoint against ``ca`` (a PEM file), else the system's CAs; name checked.
    A ``ca`` that cannot be read or holds no certificate is a ConfigError (one line)."""
    try:
        return ssl.create_default_context(cafile=str(ca) if ca is not None else None)
    except (OSError, ssl.SSLError) as exc:
        why = getattr(exc, "strerror", None) or "no PEM certificate in it"
        raise ConfigError(f"policy.ca: {ca}: cannot load the endpoint's CA ({why})") from None


def https(
    url: str,
    ctx: ssl.SSLContext,
    method: str = "GET",
    headers: Mapping[str, str] | None = None,
    body: bytes | None = None,
    limit: int = pol.MAX_ENVELOPE_BYTES,
) -> Answer:
    """One HTTPS request (blocking: run it in a thread). Raises OSError, ssl.SSLError,
    http.client.HTTPException or :class:`TooLarge` (a body over ``limit`` bytes)."""
    parts = urlsplit(url)
    assert parts.hostname is not None
    conn = http.client.HTTPSConnection(
        parts.hostname, parts.port, timeout=HTTP_TIMEOUT_S, context=ctx
    )
    try:
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        conn.request(
            method, path, body=body, headers={"User-Agent": "edgeagent", **(headers or {})}
        )
        resp = conn.getresponse()
        length = resp.getheader("Content-Length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise TooLarge(f"answer of {length} bytes, over {limit}")
        data = resp.read(limit + 1)
        if len(data) > limit:
            raise TooLarge(f"answer over {limit} bytes")
        etag = resp.getheader("ETag")
        return Answer(resp.status, etag if etag and len(etag) <= 256 else None, data)
    finally:
        conn.close()


HTTP_ERRORS = (OSError, ssl.SSLError, http.client.HTTPException, TooLarge, ValueError)


class Outage:
    """One warning when an endpoint becomes unreachable, one line when it is back."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.since: float | None = None
        self.failures = 0
        self.last_error: str | None = None

    def failed(self, why: str, url: str) -> int:
        self.failures += 1
        self.last_error = why[:MAX_DETAIL_CHARS]
        if self.since is None:
            self.since = time.monotonic()
            log.warning(f"{self.what} unreachable", extra=fields(url=url, why=self.last_error))
        return self.failures

    def ok(self, url: str) -> None:
        if self.since is not None:
            down = round(time.monotonic() - self.since, 1)
            log.info(f"{self.what} reachable again", extra=fields(url=url, down_s=down))
        self.since, self.failures = None, 0

    @property
    def reachable(self) -> bool:
        return self.since is None


# -- the cloud poll ------------------------------------------------------------------------


class CloudPoll:
    """GET ``url`` every ``interval`` (ETag / If-None-Match), offering what is new."""

    def __init__(
        self,
        policy: PolicyLike,
        url: str,
        ca: Path | None,
        interval: float,
        rng: random.Random | None = None,
    ) -> None:
        self.policy, self.url, self.interval = policy, url, interval
        self.ctx = tls_context(ca)
        self.rng = rng or random.Random()
        self.etag: str | None = None
        self.outage = Outage("policy endpoint")
        self.stats: Counter[str] = Counter()
        self.last_poll: float | None = None
        self.wake = asyncio.Event()

    async def run(self) -> None:
        while True:
            delay = await self.poll_once()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), delay)
            self.wake.clear()

    async def poll_once(self) -> float:
        """One GET; the seconds until the next."""
        headers = {"If-None-Match": self.etag} if self.etag else {}
        self.stats["polls"] += 1
        try:
            answer = await asyncio.to_thread(https, self.url, self.ctx, "GET", headers)
        except HTTP_ERRORS as exc:
            return self._failed(f"{type(exc).__name__}: {exc}")
        if answer.status not in (200, 304):
            return self._failed(f"HTTP {answer.status}")
        self.outage.ok(self.url)
        self.last_poll = time.time()
        if answer.status == 304:
            self.stats["not_modified"] += 1
            return self.interval
        self.stats["fetched"] += 1
        self.etag = answer.etag
        await _offer(self.policy, answer.body, "cloud")
        return self.interval

    def _failed(self, why: str) -> float:
        self.stats["failures"] += 1
        failures = self.outage.failed(why, self.url)
        return backoff_delay(failures, self.rng, high=max(self.interval, BACKOFF_MIN_S))

    def status(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "reachable": self.outage.reachable,
            "last_error": self.outage.last_error,
            "last_poll": self.last_poll,
            "etag": self.etag,
            **self.stats,
        }


# -- reporting upward ----------------------------------------------------------------------


class Reporter:
    """POST the reported state to ``url`` when it changed, rate-limited, one at a time."""

    def __init__(
        self,
        url: str,
        ca: Path | None,
        interval: float,
        reported: Callable[[], dict[str, Any]],
        rng: random.Random | None = None,
    ) -> None:
        self.url = url
        self.ctx = tls_context(ca)
        self.spacing = max(REPORT_MIN_S, interval)
        self.reported = reported
        self.rng = rng or random.Random()
        self.sent: dict[str, Any] | None = None
        self.outage = Outage("policy report endpoint")
        self.stats: Counter[str] = Counter()
        self.wake = asyncio.Event()

    def changed(self) -> None:
        self.wake.set()

    async def run(self) -> None:
        while True:
            delay = await self.report_once()
            await asyncio.sleep(delay)  # the rate limit: nothing sooner, whatever changes
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), self.spacing)
            self.wake.clear()

    async def report_once(self) -> float:
        """Send the reported state if it differs from the last sent; the pause before the next."""
        doc = self.reported()
        if doc == self.sent:
            return 0.0
        body = json.dumps({**doc, "reported_at": time.time()}, sort_keys=True).encode()
        headers = {"Content-Type": "application/json"}
        try:
            answer = await asyncio.to_thread(
                https, self.url, self.ctx, "POST", headers, body, MAX_REPLY_BYTES
            )
        except HTTP_ERRORS as exc:
            return self._failed(f"{type(exc).__name__}: {exc}")
        if not 200 <= answer.status < 300:
            return self._failed(f"HTTP {answer.status}")
        self.outage.ok(self.url)
        self.sent = doc
        self.stats["sent"] += 1
        return self.spacing

    def _failed(self, why: str) -> float:
        self.stats["failures"] += 1
        return backoff_delay(
            self.outage.failed(why, self.url), self.rng, high=max(self.spacing, BACKOFF_MIN_S)
        )

    def status(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "reachable": self.outage.reachable,
            "last_error": self.outage.last_error,
            **self.stats,
        }
