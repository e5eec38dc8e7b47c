"""The policy endpoint's TLS material: a throwaway CA and a server certificate, made at ``up``.

:func:`write_tls` writes ``ca.pem`` (what the agents trust: ``[policy] ca``), ``server.pem``
and ``server.key`` (only the ``policy`` service sees these) into a directory. The server
certificate names the service's DNS name and address (subjectAltName), has serverAuth and
the key identifiers a strict verifier (Python 3.13's ``VERIFY_X509_STRICT``) wants. P-256
keys, valid from an hour ago for :data:`VALID_DAYS` days. A fresh CA per testbed: nothing
outside it trusts the endpoint, and its key is not kept (only the server's).
"""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALID_DAYS = 7
CA_FILE, CERT_FILE, KEY_FILE = "ca.pem", "server.pem", "server.key"


def _name(text: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, text)])


def write_tls(directory: Path, dns_names: tuple[str, ...], ips: tuple[str, ...] = ()) -> Path:
    """Write the CA and the server's certificate and key into ``directory``; the CA's path."""
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC) - datetime.timedelta(hours=1)
    until = now + datetime.timedelta(days=VALID_DAYS)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca = (
        x509.CertificateBuilder().subject_name(_name("edgeagent testbed policy CA"))
        .issuer_name(_name("edgeagent testbed policy CA")).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now).not_valid_after(until)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .add_extension(ca_ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    key = ec.generate_private_key(ec.SECP256R1())
    alt: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
    alt += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    cert = (
        x509.CertificateBuilder().subject_name(_name(dns_names[0] if dns_names else ips[0]))
        .issuer_name(ca.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now).not_valid_after(until)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    pem = serialization.Encoding.PEM
    (directory / CA_FILE).write_bytes(ca.public_bytes(pem))
    (directory / CERT_FILE).write_bytes(cert.public_bytes(pem))
    key_path = directory / KEY_FILE
    key_path.write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))  # fmt: skip
    key_path.chmod(0o600)  # the container's root reads it (CAP_DAC_OVERRIDE)
    return directory / CA_FILE
