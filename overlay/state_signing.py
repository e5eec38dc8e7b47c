"""Owner signatures on replicated state with the node's certificate key (gossip/signing.py).

How it works
------------
:class:`CertSigner` is a node's side: its credential is its node certificate
(DER, about 520 bytes), published in its own replicated map under
``gossip.signing.CREDENTIAL_KEY``, and it signs every entry it stamps with the
certificate's ECDSA P-256 key (SHA-256). Signatures travel as raw ``r || s``
(:data:`SIG_BYTES`, 64 bytes; the DER form is 70-72), so signing adds 66 bytes to
every state entry on the wire (a msgpack bin8 header and the 64 bytes).

:class:`CaVerifier` is the trust anchor, built from the mesh CA certificate. It
trusts a credential for an owner when it is a node certificate of this CA
(:func:`overlay.pki.verify_node_cert`: chain, validity at the injected clock's
time, node profile) whose common name is the owner's gossip name, and then
checks the signature with the certificate's public key. Parsing and validating
a certificate costs far more than one signature check, so the outcome is cached
per certificate (by its SHA-256, at most :data:`CERT_CACHE_SIZE`, least recently
used evicted). The cached check is made at a time inside the certificate's own
validity window, and the window is compared with the clock on every use, so a
certificate verifies exactly while it is valid (a peer's clock a little ahead
does not get its certificate refused for good).

Sans-IO: the clock is injected (``clock() -> aware datetime``), nothing here
touches the network or the disk. :meth:`CaVerifier.verify` is total: any
malformed credential or signature is ``False``, never an exception.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from . import pki

SIG_BYTES = 64  # P-256: r and s, 32 bytes each, big-endian
_HALF = SIG_BYTES // 2
CERT_CACHE_SIZE = 1024  # certificates remembered (one per member; GossipConfig.max_members is 10 000)

Clock = Callable[[], dt.datetime]


def _utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class CertSigner:
    """Signs state entries with the node key behind ``cert`` (gossip.signing.StateSigner)."""

    def __init__(self, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> None:
        if cert.public_key() != key.public_key():
            raise pki.PkiError("node key: does not match the node certificate")
        self._key = key
        self._credential = pki.cert_der(cert)

    @property
    def credential(self) -> bytes:
        """The node certificate, DER."""
        return self._credential

    def sign(self, data: bytes) -> bytes:
        """ECDSA P-256 / SHA-256 over ``data``, as raw ``r || s`` (64 bytes)."""
        r, s = decode_dss_signature(self._key.sign(data, ec.ECDSA(hashes.SHA256())))
        return r.to_bytes(_HALF, "big") + s.to_bytes(_HALF, "big")


@dataclass(frozen=True, slots=True)
class _Trusted:
    """A credential that verified against the CA once: who it names and its key."""

    name: str
    node_id: str
    not_before: dt.datetime
    not_after: dt.datetime
    key: ec.EllipticCurvePublicKey


class CaVerifier:
    """Verifies owners' signatures against the mesh CA (gossip.signing.StateVerifier)."""

    def __init__(self, ca_cert: x509.Certificate, clock: Clock = _utc_now) -> None:
        self._ca = ca_cert
        self._clock = clock
        self._certs: OrderedDict[bytes, _Trusted | None] = OrderedDict()
        self.cert_checks = 0  # certificates validated against the CA (cache misses)
        self.signature_checks = 0  # ECDSA verifications run

    def verify(self, owner: str, credential: bytes, data: bytes, sig: bytes) -> bool:
        """True only if ``credential`` is a valid node certificate of this CA naming
        ``owner`` and ``sig`` is its key's signature over ``data``."""
        if type(sig) is not bytes or len(sig) != SIG_BYTES or type(credential) is not bytes:
            return False
        now = self._clock()
        trusted = self._trusted(credential, now)
        if trusted is None or trusted.name != owner or not trusted.not_before <= now <= trusted.not_after:
            return False
        r, s = int.from_bytes(sig[:_HALF], "big"), int.from_bytes(sig[_HALF:], "big")
        if not (0 < r and 0 < s):
            return False
        self.signature_checks += 1
        try:
            trusted.key.verify(encode_dss_signature(r, s), data, ec.ECDSA(hashes.SHA256()))
        except (InvalidSignature, ValueError):
            return False
        return True

    def identity(self, credential: bytes) -> pki.CertIdentity | None:
        """Who a credential names if it is trusted now (for status and logs), else None."""
        trusted = self._trusted(credential, self._clock())
        if trusted is None:
            return None
        return pki.CertIdentity(trusted.name, trusted.node_id, trusted.not_after)

    def _trusted(self, credential: bytes, now: dt.datetime) -> _Trusted | None:
        digest = hashlib.sha256(credential).digest()
        cache = self._certs
        if digest in cache:
            cache.move_to_end(digest)
            return cache[digest]
        self.cert_checks += 1
        trusted = _check(self._ca, credential, now)
        cache[digest] = trusted
        if len(cache) > CERT_CACHE_SIZE:
            cache.popitem(last=False)
        return trusted


def _check(ca_cert: x509.Certificate, credential: bytes, now: dt.datetime) -> _Trusted | None:
    """The credential as a trusted node certificate of ``ca_cert``, or None."""
    try:
        cert = pki.load_cert_der(credential)
        # Validated at a time inside its validity window, so the cached outcome does not
        # depend on the clock; CaVerifier.verify checks the window itself on every use.
        at = min(max(now, cert.not_valid_before_utc), cert.not_valid_after_utc)
        who = pki.verify_node_cert(ca_cert, cert, at)
        key = cert.public_key()
    except (pki.PkiError, ValueError, TypeError):
        return None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        return None
    return _Trusted(who.name, who.node_id, cert.not_valid_before_utc, who.not_after, key)
