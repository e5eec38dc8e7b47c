"""Mesh CA and node certificates: issue, verify, and refuse what is not ours."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID

from overlay import pki

NOW = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
NODE_ID = "0123456789abcdef0123456789abcdef"


@pytest.fixture(scope="module")
def ca() -> tuple[object, x509.Certificate]:
    return pki.create_ca("home", NOW)


def _node(ca: tuple[object, x509.Certificate], name: str = "pi-1", node_id: str = NODE_ID):
    ca_key, ca_cert = ca
    key = pki.new_node_key()
    csr = pki.make_csr(key, name, node_id)
    return key, pki.issue_node_cert(ca_key, ca_cert, csr, name, node_id, NOW)


def test_issued_node_cert_verifies_and_names_the_node(ca) -> None:
    _, cert = _node(ca)
    identity = pki.verify_node_cert(ca[1], cert, NOW + dt.timedelta(days=1))
    assert (identity.name, identity.node_id) == ("pi-1", NODE_ID)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["pi-1.node.mesh"]
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["edgeagent:node:" + NODE_ID]


def test_ca_is_pathlen_zero_ca_and_node_cert_is_not_a_ca(ca) -> None:
    basic = ca[1].extensions.get_extension_for_class(x509.BasicConstraints).value
    assert basic.ca and basic.path_length == 0
    _, cert = _node(ca)
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_verify_accepts_pem_and_der(ca) -> None:
    _, cert = _node(ca)
    for data in (pki.cert_pem(cert), pki.cert_der(cert)):
        assert pki.verify_node_cert(ca[1], data, NOW).node_id == NODE_ID


def test_name_that_is_not_a_dns_label_gets_no_dns_san(ca) -> None:
    _, cert = _node(ca, name="Küche/1")
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == []
    assert pki.verify_node_cert(ca[1], cert, NOW).name == "Küche/1"


def test_cert_from_another_ca_is_refused(ca) -> None:
    other = pki.create_ca("home", NOW)  # same subject, different key
    _, cert = _node(other)
    with pytest.raises(pki.PkiError, match="not signed by this mesh CA"):
        pki.verify_node_cert(ca[1], cert, NOW)
    third = pki.create_ca("office", NOW)
    _, cert = _node(third)
    with pytest.raises(pki.PkiError, match="another CA"):
        pki.verify_node_cert(ca[1], cert, NOW)


def test_expired_and_not_yet_valid_certs_are_refused(ca) -> None:
    _, cert = _node(ca)
    with pytest.raises(pki.PkiError, match="expired"):
        pki.verify_node_cert(ca[1], cert, NOW + pki.NODE_VALIDITY + dt.timedelta(seconds=1))
    with pytest.raises(pki.PkiError, match="not valid before"):
        pki.verify_node_cert(ca[1], cert, NOW - dt.timedelta(hours=1))


def test_node_cert_never_outlives_its_ca() -> None:
    ca_key, ca_cert = pki.create_ca("short", NOW, validity=dt.timedelta(days=10))
    key = pki.new_node_key()
    cert = pki.issue_node_cert(ca_key, ca_cert, pki.make_csr(key, "n", NODE_ID), "n", NODE_ID, NOW)
    assert cert.not_valid_after_utc == ca_cert.not_valid_after_utc


def test_the_ca_itself_is_not_a_node_cert(ca) -> None:
    with pytest.raises(pki.PkiError):
        pki.verify_node_cert(ca[1], ca[1], NOW)


def test_a_cert_signed_by_the_ca_without_the_node_profile_is_refused(ca) -> None:
    ca_key, ca_cert = ca
    key = pki.new_node_key()
    bare = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - dt.timedelta(days=1))
        .not_valid_after(NOW + dt.timedelta(days=1))
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("x.example")]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    with pytest.raises(pki.PkiError):
        pki.verify_node_cert(ca_cert, bare, NOW)


def test_csr_for_another_name_or_id_is_refused(ca) -> None:
    key = pki.new_node_key()
    csr = pki.make_csr(key, "pi-1", NODE_ID)
    with pytest.raises(pki.PkiError, match="another node than"):
        pki.issue_node_cert(ca[0], ca[1], csr, "pi-2", NODE_ID, NOW)
    with pytest.raises(pki.PkiError, match="another node id"):
        pki.issue_node_cert(ca[0], ca[1], csr, "pi-1", "f" * 32, NOW)


def test_csr_with_a_bad_signature_is_refused() -> None:
    key = pki.new_node_key()
    der = bytearray(pki.csr_der(pki.make_csr(key, "pi-1", NODE_ID)))
    der[-5] ^= 0xFF  # inside the signature
    try:
        csr = pki.load_csr_der(bytes(der))
    except pki.PkiError:
        return  # corrupt enough not to parse: also refused
    with pytest.raises(pki.PkiError, match="bad signature"):
        pki.check_csr(csr, "pi-1", NODE_ID)


def test_bad_names_and_ids_are_refused() -> None:
    key = pki.new_node_key()
    for name in ("", "a b", "x" * 129, "tab\t"):
        with pytest.raises(pki.PkiError, match="node name"):
            pki.make_csr(key, name, NODE_ID)
    with pytest.raises(pki.PkiError, match="node id"):
        pki.make_csr(key, "n", "ABC")


def test_ca_fingerprint_is_sha256_of_spki_as_openssl_computes_it(ca) -> None:
    import hashlib

    spki = (
        ca[1]
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    assert pki.ca_fingerprint(ca[1]) == "sha256:" + hashlib.sha256(spki).hexdigest()
    assert len(pki.ca_pin(ca[1])) == 32


def test_pem_round_trip_and_bounded_loads(ca) -> None:
    key = pki.new_node_key()
    assert pki.load_key_pem(pki.key_pem(key)).private_numbers() == key.private_numbers()
    assert pki.load_cert_pem(pki.cert_pem(ca[1])) == ca[1]
    with pytest.raises(pki.PkiError, match="larger than"):
        pki.load_cert_pem(b"-----BEGIN CERTIFICATE-----" + b"A" * pki.MAX_PEM_BYTES)
    with pytest.raises(pki.PkiError, match="larger than"):
        pki.load_cert_der(b"\x30" * (pki.MAX_DER_BYTES + 1))
    for junk in (b"", b"\x30\x03\x02\x01\x01", b"-----BEGIN CERTIFICATE-----\nAA==\n"):
        with pytest.raises(pki.PkiError):
            pki.verify_node_cert(ca[1], junk, NOW)


def test_naive_now_is_a_local_error(ca) -> None:
    with pytest.raises(TypeError):
        pki.verify_node_cert(ca[1], ca[1], dt.datetime(2026, 1, 1))


@pytest.mark.filterwarnings("ignore::cryptography.utils.CryptographyDeprecationWarning")
def test_random_bytes_only_raise_pki_error(ca) -> None:
    import random

    rng = random.Random(8)
    good = pki.cert_der(_node(ca)[1])
    for _ in range(300):
        data = bytearray(good)
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        for blob in (bytes(data), bytes(data[: rng.randrange(len(data))]), rng.randbytes(64)):
            try:
                pki.verify_node_cert(ca[1], blob, NOW)
            except pki.PkiError:
                pass
            try:
                pki.load_csr_der(blob)
            except pki.PkiError:
                pass
