"""The agent's policy store (issue 11): the last-known-good signed bundle and its high-water mark.

How it works. On with ``[policy] trusted_keys`` (the operators' Ed25519 public keys). Every
bundle offered to the agent, from ``edgeagent policy apply`` (control command
``policy-apply``; later the cloud poll and peers), goes through the one accept rule,
:func:`overlay.policy.decide`, against the trusted keys, the high-water mark and the agent's
clock. A refusal (``malformed``, ``unknown_key``, ``bad_signature``, ``invalid``, ``rollback``,
``expired``) changes nothing: it is counted (``edgeagent_policy_refusals_total{reason}``,
``policy status``) and logged with the reason. An accepted bundle is first saved, then made
active and its version published in this node's replicated state under :data:`STATE_KEY`
(``pv``), so peers see which version each node enforces.

Persistence. ``<state_dir>/policy.json`` = ``{"v": 1, "high_water": N, "envelope": "<the
signed envelope as received>", "source": "local", "applied_at": unix seconds}``, one atomic
write (temp, fsync, rename, fsync dir) through the state writer, completed before the
command answers, so ``kill -9`` leaves the old or the new file, never a bundle without its
mark. The mark is the version of the newest bundle ever accepted; on load it is the larger of
the saved mark and the saved bundle's version, so it never decreases. At start the saved
envelope is checked again (signature against today's trusted keys, validity, expiry) and,
if it passes, is active at once, before any network: a reboot with the cloud down enforces
the last-known-good. A saved bundle that has since expired or whose key is no longer trusted
is not applied (logged); the mark stays.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from gossip import events as ev
from gossip.messages import MemberState
from overlay import policy as pol
from overlay.policy_enforce import RateLimiter

from ..control import ControlError
from ..driver import View
from ..errors import ConfigError
from ..host import FeatureHost
from ..logs import fields
from ..persist import load_json
from ..policy_sync import MAX_DETAIL_CHARS, PEER_SERVICE, CloudPoll, PeerFetch, Reporter

STATE_FILE = "policy.json"
STATE_KEY = "pv"  # replicated state: the policy version this node enforces
FILE_VERSION = 1
SAVE_WAIT_S = 5.0
MAX_APPLY_FILE_BYTES = pol.MAX_ENVELOPE_BYTES

log = FeatureHost.logger()


def load_store(path: Path) -> tuple[int, bytes | None, str | None, float | None]:
    """(high-water mark, saved envelope or None, its source, when it was applied)."""
    doc = load_json(path, None)
    if doc is None:
        return 0, None, None, None
    ok = isinstance(doc, dict) and doc.get("v") == FILE_VERSION
    mark = doc.get("high_water") if ok else None
    envelope = doc.get("envelope") if ok else None
    if type(mark) is not int or mark < 0 or not isinstance(envelope, str):
        raise ConfigError(
            f"{path}: corrupt: expected a policy store (v {FILE_VERSION}); restore it"
        )
    source = doc.get("source") if isinstance(doc.get("source"), str) else None
    applied = doc.get("applied_at") if isinstance(doc.get("applied_at"), (int, float)) else None
    return mark, envelope.encode(), source, applied


def store_document(mark: int, envelope: bytes, source: str, applied_at: float) -> dict[str, Any]:
    return {"v": FILE_VERSION, "high_water": mark, "envelope": envelope.decode(),
            "source": source, "applied_at": applied_at}  # fmt: skip


class Policy:
    """Holds the active bundle; serves ``policy-apply`` and ``policy-status``."""

    def __init__(self) -> None:
        self._host: FeatureHost | None = None
        self.trusted: dict[str, Ed25519PublicKey] = {}
        self.active: pol.Bundle | None = None
        self.source: str | None = None
        self.last_sync: float | None = None
        self.high_water = 0
        self.refusals: dict[str, int] = dict.fromkeys(pol.REASONS, 0)
        self.last_refusal: str | None = None
        self.denied = 0  # channel requests refused by the intentions (CoAP 4.03)
        self.limiter = RateLimiter({})
        self._listeners: list[Callable[[pol.Bundle | None], None]] = []
        self.envelope: bytes | None = None  # the active bundle's envelope, as received
        self._lock = asyncio.Lock()
        self.peers: PeerFetch | None = None
        self.cloud: CloudPoll | None = None
        self.reporter: Reporter | None = None
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def host(self) -> FeatureHost:
        if self._host is None:
            raise RuntimeError("policy feature not started")
        return self._host

    @property
    def path(self) -> Path:
        return self.host.state_dir / STATE_FILE

    def now(self) -> float:
        """Wall time for expiry, corrected by the agent's clock when it knows better."""
        wall = time.time()
        return max(wall, self.host.clock.wall_ms(wall) / 1000.0)

    async def start(self, host: FeatureHost) -> None:
        self._host = host
        keys = (Ed25519PublicKey.from_public_bytes(raw) for raw in host.config.policy_trusted_keys)
        self.trusted = pol.trusted_keys(keys)
        self._restore()
        version = self.active.version if self.active is not None else None
        if version is not None:
            await asyncio.wrap_future(host.set_state(STATE_KEY, version))
        host.register_command("policy-apply", self.cmd_apply)
        host.register_command("policy-status", lambda request: self.status())
        host.add_status(
            lambda: {"policy_version": self.version, "policy_refusals": dict(self.refusals)}
        )
        await self._start_sync(host)
        if host.metrics is not None:
            host.metrics.counter_of(
                "edgeagent_policy_refusals_total",
                "Signed policy bundles refused, by reason (bad_signature, rollback, expired, ...).",
                "reason",
                lambda: self.refusals,
            )

    async def _start_sync(self, host: FeatureHost) -> None:
        """Peers (over the channel, when it is on), the cloud poll and the report, if set."""
        config = host.config
        channel = host.feature("channel")
        if channel is not None:
            self.peers = PeerFetch(self, channel.request, channel.peers.names)
            channel.register(PEER_SERVICE, self.peers.serve)
            host.add_listener(self._on_update)
            for member, value in await host.member_states(STATE_KEY):
                if member.name != host.identity.name:
                    self.peers.seen(member.name, value)
        if config.policy_url:
            self.cloud = CloudPoll(
                self, config.policy_url, config.policy_ca, config.policy_interval_s
            )
            self._tasks.append(asyncio.ensure_future(self.cloud.run()))
        if config.policy_report_url:
            url, ca, every = config.policy_report_url, config.policy_ca, config.policy_interval_s
            self.reporter = Reporter(url, ca, every, self.reported)
            self._tasks.append(asyncio.ensure_future(self.reporter.run()))

    def _on_update(self, events: tuple[ev.Event, ...], view: View) -> None:
        assert self.peers is not None
        for event in events:
            if (
                isinstance(event, ev.StateChanged)
                and event.key == STATE_KEY
                and event.owner != view.local.name
            ):
                self.peers.seen(event.owner, None if event.deleted else event.value)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.peers is not None:
            await self.peers.stop()

    def reported(self) -> dict[str, Any]:
        """This node's reported state (what :class:`~edgeagent.policy_sync.Reporter` sends)."""
        view = self.host.view
        alive = sum(1 for m in view.members if m.state == MemberState.ALIVE)
        return {
            "node": self.host.identity.name,
            "version": self.version,
            "high_water": self.high_water,
            "source": self.source,
            "last_sync": self.last_sync,
            "refusals": dict(self.refusals),
            "last_refusal": self.last_refusal[:MAX_DETAIL_CHARS] if self.last_refusal else None,
            "denied": self.denied,
            "health": {
                "members_alive": alive,
                "members": len(view.members),
                "health_score": view.health_score,
            },
        }

    @property
    def version(self) -> int | None:
        return self.active.version if self.active is not None else None

    def _restore(self) -> None:
        """Load the saved mark and make the saved bundle active if it still passes."""
        mark, envelope, source, applied = load_store(self.path)
        if envelope is None:
            return
        decision = pol.decide(envelope, self.trusted, 0, self.now())
        if decision.bundle is not None:
            mark = max(mark, decision.bundle.version)  # never below a bundle we accepted
        self.high_water = mark
        if not decision.accepted:
            log.warning(
                "saved policy bundle not applied",
                extra=fields(reason=decision.reason, detail=decision.detail, high_water=mark),
            )
            return
        self.active, self.source, self.last_sync = decision.bundle, source, applied
        self._changed()
        self.envelope = envelope
        log.info("policy restored", extra=fields(version=self.version, source=source))

    async def cmd_apply(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """``path``: a signed envelope file on this machine (the CLI sends its absolute path)."""
        path = request.get("path")
        if not isinstance(path, str) or not path:
            raise ControlError("path: expected the envelope file's path")
        try:
            with open(path, "rb") as f:
                envelope = f.read(MAX_APPLY_FILE_BYTES + 1)
        except OSError as exc:
            raise ControlError(f"{path}: {exc.strerror}") from None
        return await self.offer(envelope, "local")

    async def offer(self, envelope: bytes, source: str) -> dict[str, Any]:
        """Check ``envelope`` and, if accepted, save and apply it. The outcome as a dict."""
        async with self._lock:
            decision = pol.decide(envelope, self.trusted, self.high_water, self.now())
            if not decision.accepted:
                return self._refuse(decision, source)
            assert decision.bundle is not None
            version = decision.bundle.version
            applied_at = time.time()
            doc = store_document(version, envelope, source, applied_at)
            saved = asyncio.wrap_future(self.host.saver.save_json(self.path, doc))
            try:
                await asyncio.wait_for(asyncio.shield(saved), SAVE_WAIT_S)
            except TimeoutError:
                raise ControlError(
                    f"policy version {version} not applied: {self.path} not saved"
                ) from None
            self.high_water = version
            self.active, self.source, self.last_sync = decision.bundle, source, applied_at
            self._changed()
            self.envelope = envelope
        await asyncio.wrap_future(self.host.set_state(STATE_KEY, version))
        if self.reporter is not None:
            self.reporter.changed()
        log.info("policy applied", extra=fields(version=version, source=source))
        return {"accepted": True, "version": version, "reason": None, "detail": decision.detail}

    def on_change(self, listener: Callable[[pol.Bundle | None], None]) -> None:
        """Call ``listener`` with the active bundle now and after every change (the data
        plane's enforcement: the balancer's per-service policies)."""
        self._listeners.append(listener)
        listener(self.active)

    def _changed(self) -> None:
        limits = self.active.rate_limits if self.active is not None else {}
        limited = self.limiter.limited
        self.limiter = RateLimiter(limits)
        self.limiter.limited = limited  # the count is the agent's, not the bundle's
        for listener in self._listeners:
            try:
                listener(self.active)
            except Exception:  # a listener's bug must not undo an accepted, saved bundle
                log.exception("policy listener failed")

    def _refuse(self, decision: pol.Decision, source: str) -> dict[str, Any]:
        reason = decision.reason or "invalid"
        self.refusals[reason] = self.refusals.get(reason, 0) + 1
        self.last_refusal = f"{reason}: {decision.detail}"
        if self.reporter is not None:
            self.reporter.changed()
        log.warning(
            "policy bundle refused",
            extra=fields(
                reason=reason, detail=decision.detail, source=source, high_water=self.high_water
            ),
        )
        return {"accepted": False, "version": None, "reason": reason, "detail": decision.detail}

    def status(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "high_water": self.high_water,
            "source": self.source,
            "last_sync": self.last_sync,
            "refusals": dict(self.refusals),
            "last_refusal": self.last_refusal,
            "trusted_keys": sorted(self.trusted),
            "expires": self.active.expires if self.active is not None else None,
            "denied": self.denied,
            "rate_limited": self.limiter.limited,
            "peers": self.peers.status() if self.peers is not None else None,
            "cloud": self.cloud.status() if self.cloud is not None else None,
            "report": self.reporter.status() if self.reporter is not None else None,
        }

    def allows(self, node: str, services: Iterable[str], destination: str) -> bool:
        """The active intentions (no bundle: allow, as before policy existed)."""
        if self.active is None:
            return True
        return self.active.intentions.allows(node, services, destination)

    def allows_peer(self, node: str, destination: str) -> bool:
        """Intentions for a channel request from ``node`` (its mTLS identity): its services are
        the ones it publishes in the catalog. Denials are counted (``policy_denied``)."""
        if self.active is None:
            return True
        running = self.host.feature("services").catalog.services_of(node)
        allowed = self.allows(node, running, destination)
        if not allowed:
            self.denied += 1
        return allowed

    def within_rate(self, node: str) -> bool:
        """The bundle's ``rate_limits`` for one request from ``node`` (a peer's mTLS identity,
        or this node for its own clients), whatever service it is for; a refusal is counted."""
        if not self.limiter.limits:
            return True
        running = self.host.feature("services").catalog.services_of(node)
        return self.limiter.allow(node, running, time.monotonic())
