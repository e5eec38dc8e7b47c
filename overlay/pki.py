"""The mesh CA and node certificates: who a node is, provable to any peer.

How it works
------------
``edgeagent init`` creates one CA per cluster (:func:`create_ca`); its private
key stays on the issuing device. Every node has its own key pair
(:func:`new_node_key`), sends a certificate request (:func:`make_csr`) when it
enrolls, and the issuer answers with a node certificate (:func:`issue_node_cert`)
that names the node twice:

- subject ``CN=<node name>`` (for people and logs);
- subjectAltName ``URI:edgeagent:node:<node id>`` (the stable identity: the
  32-hex-digit node id never changes, the name may), plus
  ``DNS:<name>.node.mesh`` when the name is a DNS label (the mesh DNS zone).

A node certificate is for TLS as client and server (extendedKeyUsage serverAuth
+ clientAuth, keyUsage digitalSignature), never a CA (basicConstraints CA=false).
The CA is ``CA=true, pathlen=0``: it signs node certificates, no intermediates.
:func:`verify_node_cert` checks a certificate received from the network with
``cryptography``'s RFC 5280 path validator (signature, validity at ``now``,
basic constraints, key usage) and then the node profile above, and returns who
it names, or raises :class:`PkiError` with one line saying what is wrong.

Keys are ECDSA P-256 with SHA-256 signatures: TLS 1.3 peers built on OpenSSL
(mosquitto, libcoap, curl) and small TLS stacks (mbedTLS, wolfSSL on
microcontrollers) all support it, it is fast on a Pi, and its certificates are
small (about 600 bytes). Ed25519 would be smaller still but mbedTLS and many
MQTT/CoAP clients do not accept it in certificates yet.

The CA pin (:func:`ca_pin`) is SHA-256 of the CA's SubjectPublicKeyInfo, as
``kubeadm join --discovery-token-ca-cert-hash`` (RFC 7469 pins): it survives
re-issuing the CA certificate with the same key (say, to extend its validity)
and can be recomputed with ``openssl x509 -pubkey | openssl pkey -pubin
-outform der | sha256sum``.

Everything is sans-IO: time is the caller's ``now`` (an aware UTC datetime);
key generation and serial numbers use the OS CSPRNG (``cryptography``).
Inputs from the network are bounded (:data:`MAX_PEM_BYTES`, :data:`MAX_DER_BYTES`)
before they reach a parser.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

# A P-256 certificate with our extensions is ~600 bytes of DER, ~900 of PEM; a
# CSR ~250. 8 KiB leaves room for long names and refuses anything absurd early.
MAX_DER_BYTES = 8 * 1024
MAX_PEM_BYTES = 12 * 1024  # base64 (4/3) plus header lines
MAX_NAME_CHARS = 128  # the agent's node-name limit (edgeagent.config.MAX_NAME_CHARS)
NODE_ID_HEX = 32  # 128-bit node id as hex (edgeagent.persist.NODE_ID_BYTES)
NODE_URI_PREFIX = "edgeagent:node:"
NODE_DNS_SUFFIX = ".node.mesh"  # overlay/dns.py serves NODE.node.mesh
CA_VALIDITY = dt.timedelta(days=3650)
# No renewal protocol exists yet, so a short node lifetime would be a time bomb on
# fielded devices; kubelet's default is one year with rotation. Revisit with renewal.
NODE_VALIDITY = dt.timedelta(days=365)
# Backdating not_valid_before tolerates peers whose clock is a little behind the
# issuer's (step-ca backdates 1 minute, cfssl 5 minutes).
BACKDATE = dt.timedelta(minutes=5)
_LABEL_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_NODE_ID_RE = re.compile(r"^[0-9a-f]{32}$")
_CURVE = ec.SECP256R1
_HASH = hashes.SHA256


class PkiError(ValueError):
    """A certificate, key or request is unusable; the text is one line for a person."""


@dataclass(frozen=True, slots=True)
class CertIdentity:
    """Who a verified node certificate names."""

    name: str
    node_id: str
    not_after: dt.datetime


# --------------------------------------------------------------------------- keys


def new_node_key() -> ec.EllipticCurvePrivateKey:
    """A fresh ECDSA P-256 private key (the OS CSPRNG)."""
    return ec.generate_private_key(_CURVE())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """The key as unencrypted PKCS#8 PEM: store it in a 0600 file."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def load_key_pem(data: bytes) -> ec.EllipticCurvePrivateKey:
    """A P-256 private key from PEM; anything else is PkiError."""
    _bounded(data, MAX_PEM_BYTES, "private key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise PkiError(f"private key: not an unencrypted PEM key ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, _CURVE):
        raise PkiError("private key: expected an ECDSA P-256 key")
    return key


# --------------------------------------------------------------------------- (de)serialisation


def cert_pem(cert: x509.Certificate) -> bytes:
    """The certificate as PEM."""
    return cert.public_bytes(serialization.Encoding.PEM)


def cert_der(cert: x509.Certificate) -> bytes:
    """The certificate as DER (what TLS carries)."""
    return cert.public_bytes(serialization.Encoding.DER)


def load_cert_pem(data: bytes) -> x509.Certificate:
    """One certificate from PEM, bounded; anything else is PkiError."""
    _bounded(data, MAX_PEM_BYTES, "certificate")
    try:
        return _parsed(x509.load_pem_x509_certificate(data))
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise PkiError(f"certificate: not a PEM certificate ({exc})") from None


def load_cert_der(data: bytes) -> x509.Certificate:
    """One certificate from DER, bounded; anything else is PkiError."""
    _bounded(data, MAX_DER_BYTES, "certificate")
    try:
        return _parsed(x509.load_der_x509_certificate(data))
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise PkiError(f"certificate: not a DER certificate ({exc})") from None


def csr_der(csr: x509.CertificateSigningRequest) -> bytes:
    """The request as DER (what enrollment sends)."""
    return csr.public_bytes(serialization.Encoding.DER)


def load_csr_der(data: bytes) -> x509.CertificateSigningRequest:
    """One certificate request from DER, bounded; anything else is PkiError."""
    _bounded(data, MAX_DER_BYTES, "certificate request")
    try:
        csr = x509.load_der_x509_csr(data)
        _ = (csr.subject, csr.extensions, csr.public_key(), csr.is_signature_valid)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise PkiError(f"certificate request: not a DER request ({exc})") from None
    return csr


def _parsed(cert: x509.Certificate) -> x509.Certificate:
    """``cert`` after touching every field we use: ``cryptography`` parses lazily, and a
    malformed field must fail here (as PkiError), not later in a caller."""
    _ = (cert.issuer, cert.subject, cert.extensions, cert.public_key())
    _ = (cert.not_valid_before_utc, cert.not_valid_after_utc, cert.signature_hash_algorithm)
    return cert


def _bounded(data: bytes, limit: int, what: str) -> None:
    if not isinstance(data, bytes):
        raise PkiError(f"{what}: expected bytes")
    if len(data) > limit:
        raise PkiError(f"{what}: larger than {limit} bytes")


# --------------------------------------------------------------------------- fingerprints


def ca_pin(ca_cert: x509.Certificate) -> bytes:
    """SHA-256 of the CA's SubjectPublicKeyInfo (32 bytes; kubeadm's CA cert hash)."""
    spki = ca_cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(spki).digest()


def ca_fingerprint(ca_cert: x509.Certificate) -> str:
    """The pin as text for people: ``sha256:<64 hex digits>``."""
    return "sha256:" + ca_pin(ca_cert).hex()


def cert_fingerprint(cert_der_bytes: bytes) -> bytes:
    """SHA-256 of a certificate's DER: binds an enrollment proof to one server certificate."""
    return hashlib.sha256(cert_der_bytes).digest()


# --------------------------------------------------------------------------- CA


def create_ca(
    cluster_name: str, now: dt.datetime, validity: dt.timedelta = CA_VALIDITY
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A new self-signed mesh CA for ``cluster_name``: (private key, certificate)."""
    _check_name(cluster_name, "cluster name")
    key = ec.generate_private_key(_CURVE())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{cluster_name} mesh CA")])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    start = _utc(now)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start - BACKDATE)
        .not_valid_after(start + validity)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, _HASH())
    )
    return key, cert


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


# --------------------------------------------------------------------------- requests


def node_san(node_name: str, node_id: str) -> x509.SubjectAlternativeName:
    """The subjectAltName a node certificate carries (URI always, DNS when the name is a label)."""
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(NODE_URI_PREFIX + node_id)]
    label = node_name.lower()  # DNS is case-insensitive; mesh DNS matches lower-cased labels
    if _LABEL_RE.match(label):
        names.append(x509.DNSName(label + NODE_DNS_SUFFIX))
    return x509.SubjectAlternativeName(names)


def make_csr(
    key: ec.EllipticCurvePrivateKey, node_name: str, node_id: str
) -> x509.CertificateSigningRequest:
    """A certificate request naming this node, signed by its key (proof of possession)."""
    _check_name(node_name, "node name")
    _check_node_id(node_id)
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node_name)]))
        .add_extension(node_san(node_name, node_id), critical=False)
        .sign(key, _HASH())
    )


def check_csr(csr: x509.CertificateSigningRequest, node_name: str, node_id: str) -> None:
    """Raise PkiError unless ``csr`` is signed by its own P-256 key and names exactly this node."""
    _check_name(node_name, "node name")
    _check_node_id(node_id)
    try:
        _check_csr(csr, node_name, node_id)
    except PkiError:
        raise
    except (ValueError, UnsupportedAlgorithm) as exc:  # a malformed field, parsed lazily
        raise PkiError(f"certificate request: malformed ({exc})") from None


def _check_csr(csr: x509.CertificateSigningRequest, node_name: str, node_id: str) -> None:
    if not csr.is_signature_valid:
        raise PkiError("certificate request: bad signature")
    key = csr.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, _CURVE):
        raise PkiError("certificate request: expected an ECDSA P-256 key")
    cns = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(cns) != 1 or cns[0].value != node_name:
        raise PkiError(f"certificate request: names another node than {node_name!r}")
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise PkiError("certificate request: no subjectAltName with the node id") from None
    if san.get_values_for_type(x509.UniformResourceIdentifier) != [NODE_URI_PREFIX + node_id]:
        raise PkiError(f"certificate request: names another node id than {node_id}")


# --------------------------------------------------------------------------- node certificates


def issue_node_cert(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    csr: x509.CertificateSigningRequest,
    node_name: str,
    node_id: str,
    now: dt.datetime,
    validity: dt.timedelta = NODE_VALIDITY,
) -> x509.Certificate:
    """A node certificate for the key in ``csr``, after :func:`check_csr`.

    The extensions come from our profile, never from the request, so a request
    cannot ask for CA rights. The certificate never outlives the CA.
    """
    check_csr(csr, node_name, node_id)
    start = _utc(now)
    end = min(start + validity, ca_cert.not_valid_after_utc)
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(csr.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start - BACKDATE)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(node_san(node_name, node_id), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(csr.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
        .sign(ca_key, _HASH())
    )


def verify_node_cert(
    ca_cert: x509.Certificate, cert: x509.Certificate | bytes, now: dt.datetime
) -> CertIdentity:
    """Check that ``cert`` (object, PEM or DER) is a valid node certificate of this CA at ``now``.

    Raises PkiError naming the first problem: not a certificate, another CA,
    not yet valid or expired, bad signature or constraints, not a node
    certificate (no node id, CA rights, wrong key usage).
    """
    at = _utc(now)
    if isinstance(cert, bytes):
        cert = load_cert_pem(cert) if cert.startswith(b"-----") else load_cert_der(cert)
    try:
        return _verify(ca_cert, cert, at)
    except PkiError:
        raise
    except (ValueError, UnsupportedAlgorithm) as exc:  # a malformed field, parsed lazily
        raise PkiError(f"certificate: malformed ({exc})") from None


def _verify(ca_cert: x509.Certificate, cert: x509.Certificate, at: dt.datetime) -> CertIdentity:
    if cert.issuer != ca_cert.subject:
        raise PkiError(f"certificate issued by another CA ({cert.issuer.rfc4514_string()})")
    if at < cert.not_valid_before_utc:
        raise PkiError(
            f"certificate not valid before {cert.not_valid_before_utc:%Y-%m-%dT%H:%M:%SZ}"
        )
    if at > cert.not_valid_after_utc:
        raise PkiError(f"certificate expired at {cert.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}")
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        raise PkiError("certificate not signed by this mesh CA") from None
    verifier = PolicyBuilder().store(Store([ca_cert])).time(at).build_client_verifier()
    try:
        verifier.verify(cert, [])
    except VerificationError as exc:
        raise PkiError(f"certificate rejected: {exc}") from None
    return _node_identity(cert)


def _node_identity(cert: x509.Certificate) -> CertIdentity:
    """The node profile on top of RFC 5280: both TLS usages, one CN, one node-id URI."""
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        basic = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        raise PkiError("not a node certificate: missing a node extension") from None
    if basic.ca:
        raise PkiError("not a node certificate: it is a CA")
    if not {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH} <= set(eku):
        raise PkiError("not a node certificate: not for TLS client and server")
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    uris = [
        u
        for u in san.get_values_for_type(x509.UniformResourceIdentifier)
        if u.startswith(NODE_URI_PREFIX)
    ]
    if len(cns) != 1 or len(uris) != 1:
        raise PkiError("not a node certificate: expected one node name and one node id")
    name = cns[0].value
    node_id = uris[0][len(NODE_URI_PREFIX) :]
    if not isinstance(name, str) or not _NODE_ID_RE.match(node_id):
        raise PkiError("not a node certificate: malformed node name or node id")
    return CertIdentity(name=name, node_id=node_id, not_after=cert.not_valid_after_utc)


# --------------------------------------------------------------------------- checks


def _check_name(name: object, what: str) -> None:
    """The agent's name rule (1..128 printable characters, no spaces)."""
    if (
        not isinstance(name, str)
        or not name
        or len(name) > MAX_NAME_CHARS
        or any(ch.isspace() or not ch.isprintable() for ch in name)
    ):
        raise PkiError(f"{what}: expected 1..{MAX_NAME_CHARS} printable characters without spaces")


def _check_node_id(node_id: object) -> None:
    if not isinstance(node_id, str) or not _NODE_ID_RE.match(node_id):
        raise PkiError(f"node id: expected {NODE_ID_HEX} lowercase hex digits")


def _utc(now: dt.datetime) -> dt.datetime:
    """``now`` as an aware UTC datetime; a naive one is refused (ambiguous on a device)."""
    if now.tzinfo is None:
        raise TypeError("now must be an aware datetime (datetime.now(datetime.UTC))")
    return now.astimezone(dt.UTC)
