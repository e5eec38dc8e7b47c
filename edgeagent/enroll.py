"""Enrollment: a new device trades a join token for a node certificate and the keyring.

How it works
------------
An issuing agent (one holding the CA key) listens on TCP with TLS 1.3 and its
own node certificate. The joiner has no CA yet, so its TLS layer does not
verify; it authenticates the issuer by the token's pin instead (kubeadm's
``--discovery-token-ca-cert-hash``). One connection, three frames::

    issuer -> joiner  {"v": 1, "ca": CA DER}
        joiner: SHA-256(CA SPKI) == token pin, else "wrong CA pin"; the TLS
        leaf (getpeercert(binary_form=True)) is a node certificate of that CA.
    joiner -> issuer  {"v": 1, "token": id, "csr": DER, "name": N, "node_id": I,
                       "proof": HMAC(secret, id | sha256(leaf) | sha256(csr))}
        issuer: token known, not revoked/expired/used up; proof matches (so the
        joiner holds the secret and saw *this* server); the request is signed by
        its key and names exactly N and I; the use is saved; the certificate issued.
    issuer -> joiner  {"v": 1, "ok": true, "cert": DER, "ca": DER, "keys": [bytes],
                       "cluster": name, "time": issuer wall clock,
                       "seeds": [[host, port], ...]}  (gossip addresses to join)
                   or {"v": 1, "ok": false, "code": "expired", "error": "token expired"}

Frames are a 4-byte big-endian length and one msgpack map, at most
:data:`MAX_FRAME_BYTES`, decoded with msgpack's size limits; anything else is a
:class:`FrameError` and the connection is dropped (and counted). The issuer
caps concurrent enrollments (:data:`MAX_CONCURRENT`) *before* the TLS handshake
and gives each connection :data:`EXCHANGE_TIMEOUT_S` for the whole exchange, so
a slow or hostile client holds a slot briefly and buffers at most one frame.
Outcomes are counted in :attr:`EnrollmentServer.counts` by code.

The joiner tries the token's addresses in order. A refusal by an issuer ends
the attempt (every address is the same issuer and token store); an unreachable
address or a wrong pin moves on to the next. When the token names no address, or
none answered, the joiner browses mDNS for issuers of the pinned CA for at most
``browse_s`` (``find_issuers``: :class:`overlay.mdns.IssuerBrowser` in the CLI, a
fake in tests) and tries each one found the same way. mDNS is only a hint: an
announced issuer is authenticated by the full pin like any other, so an impostor
is refused ("not the one in the token") and the next one is tried. A joiner whose clock is behind a
certificate's start (a Pi without RTC boots at 1970) judges that certificate at
its start time instead: the pin already authenticates the CA, and the issuer's
clock comes back in ``time`` so the caller can step its own forward.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import inspect
import logging
import ssl
import struct
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import msgpack
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from overlay import pki
from overlay.tokens import (
    MAX_ADDRESSES,
    Address,
    JoinToken,
    check_proof,
    format_address,
    make_proof,
)

from .token_store import IssuedToken, Refusal, TokenStore

PROTOCOL_VERSION = 1
# The largest frame is the reply: two ~600-byte certificates and a keyring of a
# few 32-byte keys. 64 KiB is generous and still a trivial buffer per connection.
MAX_FRAME_BYTES = 64 * 1024
MAX_KEYS = 64  # keyring entries in a reply (Serf installs a handful at most)
MAX_KEY_BYTES = 64
MAX_CONCURRENT = 4  # enrollments are rare; more at once is a flood, not a site
EXCHANGE_TIMEOUT_S = 10.0  # connect + handshake + three frames on a slow Wi-Fi link
CONNECT_TIMEOUT_S = 5.0  # per issuer address tried by the joiner
BROWSE_S = 4.0  # how long the joiner browses mDNS for issuers (announcements come in < 1 s)
_HEADER = struct.Struct("!I")
_UNPACK_LIMITS: dict[str, int] = {
    "max_str_len": 4096,
    "max_bin_len": pki.MAX_DER_BYTES,
    "max_array_len": MAX_KEYS,
    "max_map_len": 16,
    "max_ext_len": 0,
}

log = logging.getLogger(__name__)


class FrameError(ValueError):
    """A frame from the peer is malformed or too large (the connection is dropped)."""


class EnrollError(Exception):
    """Enrollment failed; ``str`` is one line for a person, ``code`` is for counters and tests."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class Enrollment:
    """What a joiner receives: its certificate, the CA, the keyring and the cluster name."""

    cert: x509.Certificate
    ca_cert: x509.Certificate
    keys: tuple[bytes, ...]
    cluster: str
    issuer: Address
    issuer_time: float  # the issuer's wall clock (seconds) when it answered
    seeds: tuple[Address, ...] = ()  # the issuer's gossip address(es): what to join


class IssuerFinder(Protocol):
    """Issuers announced on the LAN, as they are found (:class:`overlay.mdns.IssuerBrowser`)."""

    async def __aenter__(self) -> IssuerFinder: ...

    async def __aexit__(self, *exc: object) -> None: ...

    async def next(self) -> Address | None:
        """The next issuer address found, or None once the browse time is over."""
        ...


FindIssuers = Callable[[bytes, float], IssuerFinder]  # (CA pin, browse seconds) -> finder
KeyringProvider = Callable[[], Sequence[bytes] | Awaitable[Sequence[bytes]]]
SeedsProvider = Callable[[], Sequence[Address]]


def _wall_clock() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


# --------------------------------------------------------------------------- frames (sans-IO)


def encode_frame(doc: dict[str, Any]) -> bytes:
    """One frame: length header and the msgpack map (ValueError if over the limit)."""
    body: bytes = msgpack.packb({"v": PROTOCOL_VERSION, **doc}, use_bin_type=True)
    if len(body) > MAX_FRAME_BYTES:
        raise ValueError(f"frame of {len(body)} bytes exceeds {MAX_FRAME_BYTES}")
    return _HEADER.pack(len(body)) + body


def frame_length(header: bytes) -> int:
    """The body length announced by a 4-byte header, or FrameError if over the limit."""
    (length,) = _HEADER.unpack(header)
    if not 0 < length <= MAX_FRAME_BYTES:
        raise FrameError(f"frame length {length} outside 1..{MAX_FRAME_BYTES}")
    return int(length)


def decode_body(body: bytes) -> dict[str, Any]:
    """The msgpack map in a frame body, version checked; anything else is FrameError."""
    try:
        doc = msgpack.unpackb(body, raw=False, strict_map_key=True, **_UNPACK_LIMITS)
    except Exception:  # msgpack raises a grab-bag (ValueError, ExtraData, StackError, ...)
        raise FrameError("frame is not one msgpack map") from None
    if not isinstance(doc, dict):
        raise FrameError("frame is not one msgpack map")
    if doc.get("v") != PROTOCOL_VERSION:
        raise FrameError(f"unsupported enrollment protocol version {doc.get('v')!r}")
    return doc


def _field(doc: dict[str, Any], key: str, kind: type) -> Any:
    value = doc.get(key)
    if type(value) is not kind:
        raise FrameError(f"frame field {key!r}: expected {kind.__name__}")
    return value


async def read_frame(reader: asyncio.StreamReader) -> dict[str, Any]:
    """Read one frame (the caller bounds the time)."""
    try:
        header = await reader.readexactly(_HEADER.size)
        body = await reader.readexactly(frame_length(header))
    except asyncio.IncompleteReadError:
        raise FrameError("connection closed mid-frame") from None
    return decode_body(body)


# --------------------------------------------------------------------------- TLS contexts


def server_tls_context(cert_file: str | Path, key_file: str | Path) -> ssl.SSLContext:
    """TLS 1.3 only, presenting this node's certificate; no client certificate asked."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(str(cert_file), str(key_file))
    return ctx


def joiner_tls_context() -> ssl.SSLContext:
    """TLS 1.3 only, no verification by the TLS layer: the joiner checks the pin itself."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


# --------------------------------------------------------------------------- server


class EnrollmentServer:
    """Issues node certificates to joiners holding a valid token (see the module docstring).

    ``cert_file``/``key_file`` are this node's certificate (signed by ``ca_cert``)
    and key, as saved in the state dir; ``keyring_provider`` returns (or
    returns an awaitable of) the keyring to hand out at the time of each
    enrollment, primary first; ``seeds_provider`` the gossip addresses a joiner
    should join (at most :data:`~overlay.tokens.MAX_ADDRESSES` are sent).
    """

    def __init__(
        self,
        ca_key: ec.EllipticCurvePrivateKey,
        ca_cert: x509.Certificate,
        cert_file: str | Path,
        key_file: str | Path,
        store: TokenStore,
        keyring_provider: KeyringProvider,
        cluster: str,
        *,
        seeds_provider: SeedsProvider = tuple,
        clock: Callable[[], dt.datetime] = _wall_clock,
        max_concurrent: int = MAX_CONCURRENT,
        timeout_s: float = EXCHANGE_TIMEOUT_S,
        cert_validity: dt.timedelta = pki.NODE_VALIDITY,
    ) -> None:
        self._ca_key = ca_key
        self._ca_cert = ca_cert
        self._ca_der = pki.cert_der(ca_cert)
        self._node_der = pki.cert_der(pki.load_cert_pem(Path(cert_file).read_bytes()))
        self._tls = server_tls_context(cert_file, key_file)
        self._store = store
        self._keyring = keyring_provider
        self._seeds = seeds_provider
        self._cluster = cluster
        self._clock = clock
        self._max = max_concurrent
        self._timeout = timeout_s
        self._validity = cert_validity
        self._active = 0
        self._server: asyncio.Server | None = None
        self.counts: Counter[str] = Counter()

    @property
    def ca_cert(self) -> x509.Certificate:
        """The mesh CA this server issues for (its pin goes into tokens)."""
        return self._ca_cert

    async def start(self, host: str, port: int) -> Address:
        """Listen on ``host:port`` (port 0: any); return the bound address."""
        self._server = await asyncio.start_server(self._handle, host, port)
        sockname = self._server.sockets[0].getsockname()
        return (str(sockname[0]), int(sockname[1]))

    async def close(self) -> None:
        """Stop listening and wait for the server to close."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        if self._active >= self._max:
            self.counts["busy"] += 1
            writer.close()
            return
        self._active += 1
        try:
            async with asyncio.timeout(self._timeout):
                await writer.start_tls(self._tls)
                writer.write(encode_frame({"ca": self._ca_der}))
                await writer.drain()
                reply = await self._answer(await read_frame(reader), peer)
                writer.write(encode_frame(reply))
                await writer.drain()
        except FrameError as exc:
            self._drop("bad_frame", peer, str(exc))
        except TimeoutError:
            self._drop("timeout", peer, "exchange took too long")
        except (ssl.SSLError, ConnectionError, OSError) as exc:
            self._drop("tls_error", peer, str(exc) or type(exc).__name__)
        except Exception:  # a bug must cost one enrollment, not the listener
            self.counts["error"] += 1
            log.exception("enrollment failed (peer %s)", peer)
        finally:
            self._active -= 1
            writer.close()

    def _drop(self, code: str, peer: object, why: str) -> None:
        self.counts[code] += 1
        log.info("enrollment connection dropped: %s (peer %s)", why, peer)

    async def _answer(self, request: dict[str, Any], peer: object) -> dict[str, Any]:
        """The reply frame for one request: a certificate or a refusal with its reason."""
        token_id = _field(request, "token", str)
        csr_bytes = _field(request, "csr", bytes)
        name = _field(request, "name", str)
        node_id = _field(request, "node_id", str)
        proof = _field(request, "proof", bytes)
        found = self._store.lookup(token_id, self._clock().timestamp())
        if isinstance(found, Refusal):
            return self._refuse(found.name.lower(), found.value, token_id, peer)
        if not check_proof(found.secret, token_id, self._node_der, csr_bytes, proof):
            return self._refuse(
                "forged", "token proof does not match (wrong or altered token)", token_id, peer
            )
        try:
            csr = pki.load_csr_der(csr_bytes)
            pki.check_csr(csr, name, node_id)
        except pki.PkiError as exc:
            return self._refuse("bad_request", str(exc), token_id, peer)
        now = self._clock()
        used = await asyncio.to_thread(self._store.consume, token_id, now.timestamp())
        if isinstance(used, Refusal):  # revoked or used up by a concurrent enrollment
            return self._refuse(used.name.lower(), used.value, token_id, peer)
        return await self._issue(csr, name, node_id, now, used, peer)

    async def _issue(
        self,
        csr: x509.CertificateSigningRequest,
        name: str,
        node_id: str,
        now: dt.datetime,
        used: IssuedToken,
        peer: object,
    ) -> dict[str, Any]:
        cert = pki.issue_node_cert(
            self._ca_key, self._ca_cert, csr, name, node_id, now, self._validity
        )
        keys = self._keyring()
        if inspect.isawaitable(keys):
            keys = await keys
        seeds = [[host, port] for host, port in list(self._seeds())[:MAX_ADDRESSES]]
        self.counts["issued"] += 1
        log.info("enrolled node %s (%s) with token %s from %s", name, node_id, used.token_id, peer)
        return {
            "ok": True,
            "cert": pki.cert_der(cert),
            "ca": self._ca_der,
            "keys": [bytes(k) for k in keys],
            "cluster": self._cluster,
            "time": now.timestamp(),
            "seeds": seeds,
        }

    def _refuse(self, code: str, why: str, token_id: str, peer: object) -> dict[str, Any]:
        self.counts[code] += 1
        log.warning("enrollment refused: %s (token %r, peer %s)", why, token_id[:16], peer)
        return {"ok": False, "code": code, "error": why}


# --------------------------------------------------------------------------- joiner


async def enroll(
    token: JoinToken,
    node_name: str,
    node_id: str,
    key: ec.EllipticCurvePrivateKey,
    *,
    clock: Callable[[], dt.datetime] = _wall_clock,
    timeout_s: float = CONNECT_TIMEOUT_S,
    find_issuers: FindIssuers | None = None,
    browse_s: float = BROWSE_S,
) -> Enrollment:
    """Enroll with the first issuer in ``token`` that answers, else with one found by
    ``find_issuers`` (mDNS; None: do not browse); EnrollError says why not."""
    csr_bytes = pki.csr_der(pki.make_csr(key, node_name, node_id))
    failures: list[str] = []
    tried: set[Address] = set()

    async def attempt(addr: Address, how: str) -> Enrollment | None:
        tried.add(addr)
        try:
            return await _enroll_at(
                addr, token, csr_bytes, node_name, node_id, key, clock, timeout_s
            )
        except EnrollError as exc:
            if exc.code.startswith("refused"):
                raise
            failures.append(f"{format_address(addr)}{how}: {exc}")
            return None

    for addr in token.addresses:
        if (got := await attempt(addr, "")) is not None:
            return got
    if find_issuers is None:
        if not token.addresses:
            failures.append("the token names no issuer address and mDNS browsing is off")
    else:
        got, found = await _enroll_found(
            lambda: find_issuers(token.ca_pin, browse_s), tried, attempt, browse_s
        )
        if got is not None:
            return got
        if found is not None:
            failures.append(found)
    raise EnrollError("unreachable", "could not enroll: " + "; ".join(failures))


async def _enroll_found(
    make_finder: Callable[[], IssuerFinder],
    tried: set[Address],
    attempt: Callable[[Address, str], Awaitable[Enrollment | None]],
    browse_s: float,
) -> tuple[Enrollment | None, str | None]:
    """Try each issuer ``finder`` finds that was not tried yet: the enrollment, or None and
    what to report when no issuer was found at all (attempts report their own failures)."""
    async with AsyncExitStack() as stack:
        try:
            found = await stack.enter_async_context(make_finder())
        except Exception as exc:  # no multicast-capable interface, socket refused, ...
            return None, f"mDNS unavailable ({exc or type(exc).__name__})"
        seen = 0
        while (addr := await found.next()) is not None:
            seen += 1
            if addr not in tried and (got := await attempt(addr, " (mDNS)")) is not None:
                return got, None
    if seen:
        return None, None
    return None, f"no issuer of this CA announced itself on mDNS within {browse_s:g} s"


def mdns_issuers(ca_pin: bytes, browse_s: float) -> IssuerFinder:
    """The CLI's finder: browse ``_edgeagent-join._tcp`` (zeroconf is imported only now)."""
    from overlay.mdns import IssuerBrowser, Links, interface_addresses

    return IssuerBrowser(ca_pin, Links.of(interface_addresses(), None), browse_s)


async def _enroll_at(
    addr: Address,
    token: JoinToken,
    csr_bytes: bytes,
    node_name: str,
    node_id: str,
    key: ec.EllipticCurvePrivateKey,
    clock: Callable[[], dt.datetime],
    timeout_s: float,
) -> Enrollment:
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection(
                addr[0], addr[1], ssl=joiner_tls_context()
            )
            ca_cert, leaf_der = await _check_issuer(reader, writer, token, clock)
            proof = make_proof(token.secret, token.token_id, leaf_der, csr_bytes)
            writer.write(
                encode_frame(
                    {
                        "token": token.token_id,
                        "csr": csr_bytes,
                        "name": node_name,
                        "node_id": node_id,
                        "proof": proof,
                    }
                )
            )
            await writer.drain()
            reply = await read_frame(reader)
    except TimeoutError:
        raise EnrollError("timeout", f"no answer within {timeout_s:g} s") from None
    except FrameError as exc:
        raise EnrollError("protocol", f"issuer sent a bad frame: {exc}") from None
    except (ssl.SSLError, ConnectionError, OSError) as exc:
        raise EnrollError("unreachable", exc.strerror or str(exc) or type(exc).__name__) from None
    finally:
        if writer is not None:
            writer.close()
    return _accept(addr, reply, ca_cert, node_name, node_id, key, clock)


async def _check_issuer(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    token: JoinToken,
    clock: Callable[[], dt.datetime],
) -> tuple[x509.Certificate, bytes]:
    """The pinned CA from the hello frame and the issuer's TLS leaf, both checked."""
    ssl_object = writer.get_extra_info("ssl_object")
    leaf_der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    if not leaf_der:
        raise EnrollError("protocol", "issuer presented no TLS certificate")
    hello = await read_frame(reader)
    try:
        ca_cert = pki.load_cert_der(_field(hello, "ca", bytes))
    except pki.PkiError as exc:
        raise EnrollError("protocol", f"issuer sent a bad CA certificate: {exc}") from None
    if pki.ca_pin(ca_cert) != token.ca_pin:
        raise EnrollError(
            "pin",
            f"issuer's CA {pki.ca_fingerprint(ca_cert)} is not the one in the token "
            f"(sha256:{token.ca_pin.hex()}): another cluster or an impostor",
        )
    try:
        leaf = pki.load_cert_der(leaf_der)
        pki.verify_node_cert(ca_cert, leaf, _judge_time(clock(), leaf))
    except pki.PkiError as exc:
        raise EnrollError("bad_issuer", f"issuer's TLS certificate: {exc}") from None
    return ca_cert, leaf_der


def _judge_time(now: dt.datetime, cert: x509.Certificate) -> dt.datetime:
    """``now``, or the certificate's start when our clock is behind it (no RTC, see above)."""
    return max(now, cert.not_valid_before_utc)


def _accept(
    addr: Address,
    reply: dict[str, Any],
    ca_cert: x509.Certificate,
    node_name: str,
    node_id: str,
    key: ec.EllipticCurvePrivateKey,
    clock: Callable[[], dt.datetime],
) -> Enrollment:
    """Check the issuer's reply: a refusal becomes EnrollError; a certificate must be ours."""
    try:
        if reply.get("ok") is not True:
            code = _field(reply, "code", str)[:32]
            raise EnrollError(
                f"refused:{code}", f"issuer refused: {_field(reply, 'error', str)[:200]}"
            )
        cert = pki.load_cert_der(_field(reply, "cert", bytes))
        keys = tuple(_field(reply, "keys", list))
        cluster = _field(reply, "cluster", str)
        issuer_time = _field(reply, "time", float)
        seeds = _seeds(reply.get("seeds", []))
        if pki.cert_der(ca_cert) != _field(reply, "ca", bytes):
            raise EnrollError("protocol", "issuer changed CA certificates mid-exchange")
        if not all(type(k) is bytes and 0 < len(k) <= MAX_KEY_BYTES for k in keys) or not keys:
            raise EnrollError("protocol", "issuer sent a malformed keyring")
        identity = pki.verify_node_cert(ca_cert, cert, _judge_time(clock(), cert))
    except (FrameError, pki.PkiError) as exc:
        raise EnrollError("protocol", f"issuer sent a bad reply: {exc}") from None
    if (identity.name, identity.node_id) != (node_name, node_id):
        raise EnrollError("protocol", "issuer's certificate names another node")
    if cert.public_key() != key.public_key():
        raise EnrollError("protocol", "issuer's certificate is for another key")
    return Enrollment(cert, ca_cert, keys, cluster, addr, issuer_time, seeds)


def _seeds(value: object) -> tuple[Address, ...]:
    """The reply's gossip seeds: a short list of ``[host, port]`` (FrameError otherwise)."""
    if not isinstance(value, list) or len(value) > MAX_ADDRESSES:
        raise FrameError(f"frame field 'seeds': expected at most {MAX_ADDRESSES} addresses")
    seeds: list[Address] = []
    for item in value:
        if (
            not isinstance(item, list)
            or len(item) != 2
            or not isinstance(item[0], str)
            or not 0 < len(item[0]) <= 255
            or type(item[1]) is not int
            or not 1 <= item[1] <= 65535
        ):
            raise FrameError("frame field 'seeds': expected [host, port] pairs")
        seeds.append((item[0], item[1]))
    return tuple(seeds)
