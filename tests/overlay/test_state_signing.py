"""overlay/state_signing.py: owner signatures with node certificates, checked against the mesh CA."""

from __future__ import annotations

import datetime as dt
import random
import secrets

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from gossip.config import lan
from gossip.core import Membership
from gossip.messages import Alive, StateUpdate
from gossip.signing import CREDENTIAL_KEY, canonical_alive, canonical_entry
from overlay import pki
from overlay.state_signing import SIG_BYTES, CaVerifier, CertSigner
from testbed.sim import make_keyring, seal, sent

NOW = dt.datetime(2026, 6, 1, tzinfo=dt.UTC)
DATA = canonical_entry("c", "node-1", "ipam", 3, {"block": "10.99.0.0/28"}, False)


def make_ca(cluster: str = "c") -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    return pki.create_ca(cluster, NOW)


def node(
    ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate], name: str, **kw: dt.timedelta
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = pki.new_node_key()
    node_id = secrets.token_hex(16)
    cert = pki.issue_node_cert(ca[0], ca[1], pki.make_csr(key, name, node_id), name, node_id, NOW, **kw)
    return key, cert


class Clock:
    def __init__(self, now: dt.datetime = NOW) -> None:
        self.now = now

    def __call__(self) -> dt.datetime:
        return self.now


def test_a_signature_is_64_bytes_and_verifies_for_its_owner_only() -> None:
    ca = make_ca()
    signer = CertSigner(*node(ca, "node-1"))
    verifier = CaVerifier(ca[1], Clock())
    sig = signer.sign(DATA)
    assert len(sig) == SIG_BYTES == 64
    assert verifier.verify("node-1", signer.credential, DATA, sig)
    assert not verifier.verify("node-2", signer.credential, DATA, sig)  # the cert names node-1
    assert not verifier.verify("node-1", signer.credential, DATA + b"x", sig)
    tampered = bytes([sig[0] ^ 1]) + sig[1:]
    assert not verifier.verify("node-1", signer.credential, DATA, tampered)


def test_a_certificate_from_another_ca_is_refused() -> None:
    ours, theirs = make_ca(), make_ca()
    signer = CertSigner(*node(theirs, "node-1"))  # same name, another mesh CA
    verifier = CaVerifier(ours[1], Clock())
    assert not verifier.verify("node-1", signer.credential, DATA, signer.sign(DATA))
    assert verifier.identity(signer.credential) is None


def test_a_certificate_verifies_only_while_it_is_valid() -> None:
    ca = make_ca()
    signer = CertSigner(*node(ca, "node-1", validity=dt.timedelta(days=2)))
    clock = Clock(NOW - dt.timedelta(hours=1))  # our clock behind the issuer's
    verifier = CaVerifier(ca[1], clock)
    sig = signer.sign(DATA)
    assert not verifier.verify("node-1", signer.credential, DATA, sig)
    clock.now = NOW + dt.timedelta(days=1)
    assert verifier.verify("node-1", signer.credential, DATA, sig)  # not refused for good
    clock.now = NOW + dt.timedelta(days=3)
    assert not verifier.verify("node-1", signer.credential, DATA, sig)  # expired
    assert verifier.cert_checks == 1


def test_certificates_are_checked_once_signatures_every_time() -> None:
    ca = make_ca()
    signer = CertSigner(*node(ca, "node-1"))
    verifier = CaVerifier(ca[1], Clock())
    for i in range(5):
        data = canonical_entry("c", "node-1", "k", i, i, False)
        assert verifier.verify("node-1", signer.credential, data, signer.sign(data))
    assert (verifier.cert_checks, verifier.signature_checks) == (1, 5)


@pytest.mark.parametrize(
    "credential, sig",
    [
        (b"", bytes(64)),
        (b"\x30\x82garbage", bytes(64)),
        (b"\x00" * 5000, bytes(64)),
        (None, bytes(64)),
        ("cert", b"short"),
        ("cert", bytes(64)),  # r = s = 0
        ("cert", b"\xff" * 64),  # r, s above the group order
        ("cert", None),
    ],
)
def test_hostile_credentials_and_signatures_are_false_never_an_exception(credential: object, sig: object) -> None:
    ca = make_ca()
    signer = CertSigner(*node(ca, "node-1"))
    verifier = CaVerifier(ca[1], Clock())
    if credential == "cert":
        credential = signer.credential
    assert verifier.verify("node-1", credential, DATA, sig) is False  # type: ignore[arg-type]


def test_the_ca_certificate_itself_is_not_a_node_credential() -> None:
    ca = make_ca()
    verifier = CaVerifier(ca[1], Clock())
    assert not verifier.verify("c mesh CA", pki.cert_der(ca[1]), DATA, bytes(64))


def test_a_signer_refuses_a_key_that_is_not_its_certificates() -> None:
    ca = make_ca()
    _, cert = node(ca, "node-1")
    with pytest.raises(pki.PkiError):
        CertSigner(pki.new_node_key(), cert)


def test_real_certificates_in_the_core_refuse_a_forged_claim() -> None:
    ca = make_ca("edgeagent")  # lan()'s cluster name
    verifier = CaVerifier(ca[1], Clock())
    b_signer = CertSigner(*node(ca, "b"))
    a = Membership(
        "a", ("10.0.0.1", 7946), lan(), random.Random(1), 0.0,
        keyring=make_keyring(random.Random(1)), signer=CertSigner(*node(ca, "a")), verifier=verifier,
    )  # fmt: skip
    b = Membership(
        "b", ("10.0.0.2", 7946), lan(), random.Random(2), 0.0,
        keyring=make_keyring(random.Random(2)), signer=b_signer, verifier=CaVerifier(ca[1], Clock()),
    )  # fmt: skip
    b.set_state("ipam", {"block": "10.99.1.0/28"}, 0.0)
    a.receive(seal([Alive("b", 0, ("10.0.0.2", 7946), b"")], to=a.name), ("10.0.0.2", 7946), 0.0)
    b.receive(seal([Alive("a", 0, ("10.0.0.1", 7946), b"")], to=b.name), ("10.0.0.1", 7946), 0.0)
    b.handle_timeout(1.0)
    for _, msgs in sent(b):
        assert all(not (isinstance(m, StateUpdate) and m.key == CREDENTIAL_KEY) for m in msgs)
        a.receive(seal(msgs, to=a.name), ("10.0.0.2", 7946), 1.0)
    assert a.state_of("b") == {}  # the claim is held: b's certificate is not gossiped
    # a asks b for it (a push-pull with a Want); b's answer carries the certificate and the claim.
    (dst, frame), = a.streams_to_send()
    assert dst == ("10.0.0.2", 7946)
    reply = b.handle_stream(frame, ("10.0.0.1", 7946), 1.1)
    assert reply is not None
    a.receive_stream_reply(reply, ("10.0.0.2", 7946), 1.2)
    assert a.state_of("b") == {"ipam": {"block": "10.99.1.0/28"}, CREDENTIAL_KEY: b_signer.credential}
    # An insider with its own valid certificate signs a claim in b's name.
    evil = CertSigner(*node(ca, "evil"))
    forged_value = {"block": "10.99.0.0/28"}
    sig = evil.sign(canonical_entry("edgeagent", "b", "ipam", 9, forged_value, False))
    a.receive(seal([StateUpdate("b", 9, "ipam", forged_value, False, sig)], to=a.name), ("10.0.0.66", 7946), 2.0)
    assert a.state_of("b")["ipam"] == {"block": "10.99.1.0/28"}
    assert a.stats.state_forged == 1
    # The same insider signs an Alive moving b to its own address: refused; b's own still moves b.
    evil_alive = Alive("b", 5, ("10.0.0.66", 7946), b"", evil.sign(canonical_alive("edgeagent", "b", 5, ("10.0.0.66", 7946), b"")))
    a.receive(seal([evil_alive], to=a.name), ("10.0.0.66", 7946), 3.0)
    member = a.member("b")
    assert member is not None and member.addr == ("10.0.0.2", 7946) and a.stats.alive_forged == 1
    b.set_meta(b"m", 3.0)
    b.handle_timeout(4.0)
    for _, msgs in sent(b):
        a.receive(seal(msgs, to=a.name), ("10.0.0.2", 7946), 4.0)
    member = a.member("b")
    assert member is not None and member.meta == b"m" and a.stats.alive_forged == 1
