"""Enrollment: the node holding the mesh CA key lets new devices join with a token.

How it works. On when the state dir holds the CA key (``ca.key``, written by ``edgeagent
init``; see :mod:`edgeagent.onboarding`). It starts an :class:`~edgeagent.enroll.EnrollmentServer`
(TLS 1.3 with this node's certificate) on the gossip bind host at ``config.enroll_port``
(default: the gossip port + 1). Each enrollment hands out the *live* keyring, read on the
gossip thread that owns it (a rotation made with ``edgeagent keys`` is what new devices get),
and this node's advertised gossip address followed by those of a few alive members, which the
joiner saves as its seeds.

With mDNS on (``mdns``, the default), the listener is also announced as
``_edgeagent-join._tcp.local.`` (:class:`overlay.mdns.EnrollAdvert`: the advertised host,
the bound enrollment port and a TXT with a prefix of the CA pin), so a joiner whose token names
no address, or none that answers, finds it; the announcement starts in a task (it takes a
second or two) and a LAN without multicast is a warning. zeroconf is imported only then.

Control commands: ``token-create`` (``ttl_s``, ``uses``, ``addresses``: false for a token
naming no address, found by mDNS) returns a token naming this node's advertised host and the
bound enrollment port; ``token-list``; ``token-revoke`` (``id``).
The tokens live in ``tokens.json`` next to the CA key (:mod:`edgeagent.token_store`).
``edgeagent status`` shows an ``enroll`` object (address, tokens usable, outcomes counted);
with metrics on, ``edgeagent_enrollments_total{outcome}`` counts the same outcomes.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from gossip.messages import Address, MemberState
from overlay import pki
from overlay.tokens import MAX_ADDRESSES

from ..control import ControlError
from ..enroll import EnrollmentServer
from ..errors import ConfigError, UsageError
from ..host import FeatureHost
from ..netaddr import format_addr, is_wildcard
from ..onboarding import NODE_CERT_FILE, NODE_KEY_FILE, load_ca
from ..token_store import DEFAULT_TTL_S, TOKENS_FILE, IssuedToken, TokenStore

if TYPE_CHECKING:
    from gossip.core import Membership
    from overlay.mdns import EnrollAdvert

log = FeatureHost.logger("enroll")
# Removed when a copied state dir becomes a new node (agent): tokens issued by the original
# are the original's to honour (they name its address), never used twice through a copy.
NODE_BOUND_FILES = (TOKENS_FILE,)

ADVERT_STOP_TIMEOUT = 2.0  # seconds for the mDNS goodbye at stop


class Enroll:
    """The enrollment listener and the token commands of an issuing node."""

    def __init__(self) -> None:
        self._host: FeatureHost | None = None
        self._server: EnrollmentServer | None = None
        self._store: TokenStore | None = None
        self._address: Address | None = None
        self._advert: EnrollAdvert | None = None
        self._advertising: asyncio.Task[None] | None = None

    async def start(self, host: FeatureHost) -> None:
        self._host = host
        config = host.config
        ca = load_ca(host.state_dir)
        self._store = TokenStore(host.state_dir)
        self._server = EnrollmentServer(
            ca.key,
            ca.cert,
            host.state_dir / NODE_CERT_FILE,
            host.state_dir / NODE_KEY_FILE,
            self._store,
            self._live_keys,
            config.cluster,
            seeds_provider=self._seeds,
        )
        bind = (config.bind[0], config.enroll_port)
        try:
            self._address = await self._server.start(*bind)
        except OSError as exc:
            raise ConfigError(
                f"enroll: bind {format_addr(bind)}: cannot listen: {exc.strerror or exc}; "
                "set --enroll-port (enroll_port)"
            ) from None
        host.register_command("token-create", self._cmd_create)
        host.register_command("token-list", self._cmd_list)
        host.register_command("token-revoke", self._cmd_revoke)
        host.add_status(self._status)
        if host.metrics is not None:
            host.metrics.counter_of(
                "edgeagent_enrollments_total",
                "Enrollment attempts at this issuer, by outcome (issued, expired, forged, ...).",
                "outcome",
                lambda: self._require_server().counts,
            )
        log.info(f"enrollment listening on {format_addr(self._address)}")
        if config.mdns:
            self._advertising = asyncio.get_running_loop().create_task(self._advertise(host))

    async def _advertise(self, host: FeatureHost) -> None:
        """Announce the listener by mDNS (a warning, not an error, when that fails)."""
        from overlay.mdns import EnrollAdvert

        bind_host = host.config.bind[0]
        advert = EnrollAdvert(
            node_name=host.identity.name,
            node_id=host.identity.node_id,
            ca_pin=pki.ca_pin(self._require_server().ca_cert),
            addr=self.token_addresses()[0],
            interfaces=None if is_wildcard(bind_host) else [bind_host],
        )
        self._advert = advert
        try:
            await advert.start()
        except Exception as exc:  # no multicast-capable interface, port 5353 refused, ...
            log.warning(f"enrollment not announced by mDNS: {exc!r}")
            self._advert = None
            with contextlib.suppress(Exception):
                await advert.stop()

    async def stop(self) -> None:
        if self._advertising is not None:
            self._advertising.cancel()
            with contextlib.suppress(BaseException):
                await self._advertising
            self._advertising = None
        advert, self._advert = self._advert, None
        if advert is not None:
            try:
                await asyncio.wait_for(advert.stop(), ADVERT_STOP_TIMEOUT)
            except Exception:  # a goodbye that cannot be sent must not block the stop
                log.warning("enrollment mDNS goodbye failed", exc_info=True)
        if self._server is not None:
            await self._server.close()
            self._server = None

    # -- what the server hands out -----------------------------------------------------------

    async def _live_keys(self) -> tuple[bytes, ...]:
        host = self._require_host()

        def read(core: Membership, now: float) -> tuple[bytes, ...]:
            return tuple(host.keyring.keys)

        return await host.call(read)

    def _seeds(self) -> list[Address]:
        """This node's advertised gossip address, then some alive members' (the joiner's seeds)."""
        host = self._require_host()
        seeds: list[Address] = [host.address]
        for member in host.view.members:
            if len(seeds) >= MAX_ADDRESSES:
                break
            if member.state is MemberState.ALIVE and member.addr not in seeds:
                seeds.append(member.addr)
        return seeds

    def token_addresses(self) -> list[Address]:
        """Where joiners dial: the advertised gossip host with the bound enrollment port."""
        host = self._require_host()
        assert self._address is not None
        return [(host.address[0], self._address[1])]

    # -- control commands --------------------------------------------------------------------

    async def _cmd_create(self, request: Mapping[str, Any]) -> dict[str, Any]:
        store, server = self._require_store(), self._require_server()
        ttl = request.get("ttl_s", DEFAULT_TTL_S)
        uses = request.get("uses")
        with_addresses = request.get("addresses", True)
        if not isinstance(with_addresses, bool):
            raise ControlError("addresses: expected true or false")
        if isinstance(ttl, bool) or not isinstance(ttl, int | float):
            raise ControlError("ttl_s: expected a number of seconds")
        if uses is not None and (isinstance(uses, bool) or not isinstance(uses, int)):
            raise ControlError("uses: expected a positive integer")
        pin = pki.ca_pin(server.ca_cert)
        try:
            token = await asyncio.to_thread(
                store.create,
                pin,
                self.token_addresses() if with_addresses else [],
                time.time(),
                float(ttl),
                uses,
            )
        except UsageError as exc:
            raise ControlError(str(exc)) from None
        issued = next(t for t in store.list() if t.token_id == token.token_id)
        log.info(f"join token {token.token_id} created")
        return {"token": token.text(), **_token_json(issued, time.time())}

    async def _cmd_list(self, request: Mapping[str, Any]) -> list[dict[str, Any]]:
        now = time.time()
        return [_token_json(t, now) for t in self._require_store().list()]

    async def _cmd_revoke(self, request: Mapping[str, Any]) -> dict[str, Any]:
        token_id = request.get("id")
        if not isinstance(token_id, str):
            raise ControlError("id: expected a token id")
        found = await asyncio.to_thread(self._require_store().revoke, token_id)
        if not found:
            raise ControlError(f"no token {token_id!r} (see 'edgeagent token list')")
        log.info(f"join token {token_id} revoked")
        return {"id": token_id, "revoked": True}

    # -- status and metrics ------------------------------------------------------------------

    def _status(self) -> dict[str, Any]:
        server, store = self._require_server(), self._require_store()
        now = time.time()
        usable = sum(1 for t in store.list() if t.refusal(now) is None)
        address = format_addr(self._address) if self._address is not None else None
        enroll = {"address": address, "tokens_usable": usable, **dict(server.counts)}
        return {"enroll": enroll, "enroll_mdns": self._advert is not None}

    def _require_host(self) -> FeatureHost:
        if self._host is None:
            raise RuntimeError("enroll feature not started")
        return self._host

    def _require_server(self) -> EnrollmentServer:
        if self._server is None:
            raise ControlError("enrollment is not running")
        return self._server

    def _require_store(self) -> TokenStore:
        if self._store is None:
            raise ControlError("enrollment is not running")
        return self._store


def _token_json(token: IssuedToken, now: float) -> dict[str, Any]:
    refusal = token.refusal(now)
    return {
        "id": token.token_id,
        "created": token.created,
        "expires": token.expires,
        "uses_left": token.uses_left,
        "used": token.used,
        "revoked": token.revoked,
        "state": "usable" if refusal is None else refusal.name.lower(),
    }
