"""Join tokens: what a new device needs to find, trust and be trusted by an issuer.

How it works
------------
A token is one copy-pastable line (``edgeagent init`` prints it)::

    ea1.<base64url, no padding, of: msgpack [id, secret, pin, [[host, port], ...]] + check>

- ``id``: 8 characters ``[a-z2-7]`` (40 random bits, base32), public: it names
  the token in ``edgeagent token list|revoke`` and in the issuer's log.
- ``secret``: 16 random bytes (128 bits), known to the issuer and the token
  holder only. It never crosses the wire: the joiner sends an HMAC proof.
- ``pin``: SHA-256 of the mesh CA's SubjectPublicKeyInfo (``overlay.pki.ca_pin``,
  kubeadm's ``--discovery-token-ca-cert-hash``): how the joiner authenticates an
  issuer before it holds the CA certificate.
- addresses: where issuers listen (at most :data:`MAX_ADDRESSES`), tried in order. None at
  all is allowed: the joiner then finds an issuer of the pinned CA by mDNS
  (``_edgeagent-join._tcp``, see :mod:`overlay.mdns`), as it does when none answers.
- ``check``: the first 4 bytes of SHA-256 of the msgpack bytes, so a token
  damaged by copying is reported as damaged, not as a forged proof later.

The proof (:func:`make_proof`) is ``HMAC-SHA256(secret, context)`` where the
context binds the token id, the SHA-256 of the issuer's TLS leaf certificate
as the joiner saw it, and the SHA-256 of the joiner's certificate request. A
proof captured in transit is useless elsewhere: another request (another key)
or another server (a relay presents its own certificate) needs another proof.
:func:`check_proof` compares in constant time (``cryptography``'s HMAC verify).

Parsing (:func:`parse_token`) is total and bounded: any input either gives a
:class:`JoinToken` or raises :class:`TokenError` with one line for a person.
Sans-IO: randomness comes from the ``randbytes`` argument (default
``secrets.token_bytes``); nothing here reads a clock or a socket.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import msgpack
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, hmac

TOKEN_PREFIX = "ea1."  # format version 1; a later format is ea2. and so on
TOKEN_ID_BYTES = 5  # 40 bits as 8 base32 characters: short to type, ids are public
TOKEN_ID_CHARS = 8
SECRET_BYTES = 16  # 128 bits: guessing is hopeless even without rate limits
PIN_BYTES = 32  # SHA-256
CHECK_BYTES = 4
PROOF_BYTES = 32  # HMAC-SHA256
MAX_ADDRESSES = 8
MAX_HOST_BYTES = 64  # gossip.codec.MAX_HOST_BYTES: IPv6 with zone, or a short DNS name
# 8 addresses of 64-byte hosts make ~640 bytes of msgpack, ~860 characters.
MAX_TOKEN_CHARS = 1024
PROOF_LABEL = b"edgeagent enroll proof v1\x00"
_ID_ALPHABET = frozenset("abcdefghijklmnopqrstuvwxyz234567")
_UNPACK_LIMITS: dict[str, int] = {
    "max_str_len": MAX_HOST_BYTES,
    "max_bin_len": PIN_BYTES,
    "max_array_len": MAX_ADDRESSES,
    "max_map_len": 0,
    "max_ext_len": 0,
}

Address = tuple[str, int]


class TokenError(ValueError):
    """A join token is unusable; the text is one line for a person."""


@dataclass(frozen=True, slots=True)
class JoinToken:
    """A parsed join token. ``repr`` hides the secret (tokens end up in logs)."""

    token_id: str
    secret: bytes
    ca_pin: bytes
    addresses: tuple[Address, ...]

    def __repr__(self) -> str:
        return f"JoinToken(token_id={self.token_id!r}, addresses={self.addresses!r})"

    def text(self) -> str:
        """The one-line text form (:func:`parse_token` reads it back)."""
        body = msgpack.packb(
            [self.token_id, self.secret, self.ca_pin, [[h, p] for h, p in self.addresses]],
            use_bin_type=True,
        )
        raw = body + hashlib.sha256(body).digest()[:CHECK_BYTES]
        return TOKEN_PREFIX + base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def new_token(
    ca_pin: bytes,
    addresses: Sequence[Address],
    randbytes: Callable[[int], bytes] = secrets.token_bytes,
) -> JoinToken:
    """A fresh token for issuers at ``addresses`` of the CA pinned by ``ca_pin``."""
    token_id = base64.b32encode(randbytes(TOKEN_ID_BYTES)).decode("ascii").lower()
    token = JoinToken(token_id, randbytes(SECRET_BYTES), ca_pin, tuple(addresses))
    _check(token)  # a local misuse (bad pin or address) fails here, not at the joiner
    return token


def parse_token(text: str) -> JoinToken:
    """The token in ``text`` (surrounding whitespace ignored), or TokenError."""
    if not isinstance(text, str):
        raise TokenError("join token: expected text")
    text = text.strip()
    if len(text) > MAX_TOKEN_CHARS:
        raise TokenError(f"join token: longer than {MAX_TOKEN_CHARS} characters; copy it again")
    if not text.startswith(TOKEN_PREFIX):
        if text[:2] == "ea" and text[2:3].isdigit():
            raise TokenError("join token: a newer format than this edgeagent reads; upgrade it")
        raise TokenError(f"join token: expected text starting with {TOKEN_PREFIX}")
    encoded = text[len(TOKEN_PREFIX) :]
    try:
        raw = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))
    except (binascii.Error, ValueError):
        raise TokenError("join token: damaged (not base64url); copy it again") from None
    body, check = raw[:-CHECK_BYTES], raw[-CHECK_BYTES:]
    if len(raw) <= CHECK_BYTES or hashlib.sha256(body).digest()[:CHECK_BYTES] != check:
        raise TokenError("join token: damaged (checksum mismatch); copy it again")
    return _check(_decode(body))


def _decode(body: bytes) -> JoinToken:
    try:
        doc = msgpack.unpackb(body, raw=False, strict_map_key=True, use_list=True, **_UNPACK_LIMITS)
    except Exception:  # msgpack raises a grab-bag (ValueError, ExtraData, StackError, ...)
        raise TokenError("join token: malformed") from None
    if not isinstance(doc, list) or len(doc) != 4 or not isinstance(doc[3], list):
        raise TokenError("join token: malformed")
    token_id, secret, pin, addrs = doc
    if not isinstance(token_id, str) or not isinstance(secret, bytes) or not isinstance(pin, bytes):
        raise TokenError("join token: malformed")
    addresses: list[Address] = []
    for addr in addrs:
        if not isinstance(addr, list) or len(addr) != 2:
            raise TokenError("join token: malformed address")
        host, port = addr
        if not isinstance(host, str) or type(port) is not int:
            raise TokenError("join token: malformed address")
        addresses.append((host, port))
    return JoinToken(token_id, secret, pin, tuple(addresses))


def valid_token_id(token_id: object) -> bool:
    """Whether ``token_id`` has the form of a token id (8 characters a-z, 2-7)."""
    return (
        isinstance(token_id, str)
        and len(token_id) == TOKEN_ID_CHARS
        and set(token_id) <= _ID_ALPHABET
    )


def _check(token: JoinToken) -> JoinToken:
    if not valid_token_id(token.token_id):
        raise TokenError(f"join token: id must be {TOKEN_ID_CHARS} characters a-z, 2-7")
    if len(token.secret) != SECRET_BYTES:
        raise TokenError(f"join token: secret must be {SECRET_BYTES} bytes")
    if len(token.ca_pin) != PIN_BYTES:
        raise TokenError(f"join token: CA pin must be {PIN_BYTES} bytes (SHA-256)")
    if len(token.addresses) > MAX_ADDRESSES:
        raise TokenError(f"join token: expected at most {MAX_ADDRESSES} issuer addresses")
    for host, port in token.addresses:
        if not host or len(host.encode()) > MAX_HOST_BYTES or not host.isprintable() or " " in host:
            raise TokenError(f"join token: issuer host must be 1..{MAX_HOST_BYTES} bytes")
        if not 1 <= port <= 65535:
            raise TokenError("join token: issuer port must be 1..65535")
    return token


def format_address(addr: Address) -> str:
    """``host:port``, IPv6 hosts in brackets (for messages)."""
    host, port = addr
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# --------------------------------------------------------------------------- proof


def proof_context(token_id: str, server_cert_der: bytes, csr_der: bytes) -> bytes:
    """What a proof signs: label, token id, SHA-256 of the server certificate and of the request."""
    # Fixed-size fields (hashes) keep the encoding unambiguous for any input.
    return (
        PROOF_LABEL
        + hashlib.sha256(token_id.encode("utf-8", "surrogatepass")).digest()
        + hashlib.sha256(server_cert_der).digest()
        + hashlib.sha256(csr_der).digest()
    )


def make_proof(secret: bytes, token_id: str, server_cert_der: bytes, csr_der: bytes) -> bytes:
    """HMAC-SHA256(secret, :func:`proof_context`)."""
    mac = hmac.HMAC(secret, hashes.SHA256())
    mac.update(proof_context(token_id, server_cert_der, csr_der))
    return mac.finalize()


def check_proof(
    secret: bytes, token_id: str, server_cert_der: bytes, csr_der: bytes, proof: bytes
) -> bool:
    """Whether ``proof`` is :func:`make_proof` of these inputs (constant-time compare)."""
    if not isinstance(proof, bytes) or len(proof) != PROOF_BYTES:
        return False
    mac = hmac.HMAC(secret, hashes.SHA256())
    mac.update(proof_context(token_id, server_cert_der, csr_der))
    try:
        mac.verify(proof)
    except InvalidSignature:
        return False
    return True
