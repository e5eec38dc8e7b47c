"""Mutual TLS for the agent-to-agent channel: both ends prove a node certificate of the mesh CA.

How it works
------------
Every enrolled node holds ``node.key`` + ``node.crt`` (issued by the mesh CA) and ``ca.crt``
(see :mod:`edgeagent.onboarding`). The channel (CoAP now, MQTT next) runs TLS 1.3 with the
stdlib :mod:`ssl`:

- **both sides** present their node certificate and require the peer's
  (``CERT_REQUIRED`` on the server too), trusting only the mesh CA: a peer with a certificate
  from another CA, or none, fails the handshake;
- OpenSSL checks the chain, signatures and purposes but **not the validity times**
  (``X509_V_FLAG_NO_CHECK_TIME``); after the handshake :func:`peer_identity` re-verifies the
  peer's certificate with :func:`overlay.pki.verify_node_cert` at the caller's ``now``. The
  agent's clock may be far from OpenSSL's view of time (a Pi without RTC boots at 1970 and is
  pulled forward by what it observes), so the time check uses the clock the agent trusts;
- the peer must be the member we meant to reach: :func:`check_peer` compares the node id
  (the stable identity, ``URI:edgeagent:node:<id>``) and the name in the certificate with the
  member record. Host names are not used: node names need not be DNS labels, and the
  channel dials member addresses, not names.

Everything here is synchronous and IO-free except :func:`load_channel_tls`, which reads the
state dir once at start.
"""

from __future__ import annotations

import datetime as dt
import os
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from overlay import pki

from .errors import ConfigError
from .onboarding import CA_CERT_FILE, NODE_CERT_FILE, NODE_KEY_FILE

# OpenSSL's X509_V_FLAG_NO_CHECK_TIME (x509_vfy.h, OpenSSL >= 1.1.0); the ssl module does not
# name it. Times are checked by peer_identity() against the agent's own clock instead.
NO_CHECK_TIME = 0x200000


class PeerRefused(Exception):
    """The peer completed TLS but is not who we meant to reach (or its certificate is unusable)."""


@dataclass(frozen=True, slots=True)
class ChannelTls:
    """This node's TLS material for the channel: contexts for both roles and who we are."""

    server: ssl.SSLContext
    client: ssl.SSLContext
    ca_cert: x509.Certificate
    own: pki.CertIdentity


def _context(server: bool, ca_file: Path, cert_file: Path, key_file: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False  # the identity check is check_peer(), on the node id
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.verify_flags |= NO_CHECK_TIME
    ctx.load_verify_locations(cafile=str(ca_file))
    ctx.load_cert_chain(str(cert_file), str(key_file))
    return ctx


def server_context(ca_file: Path, cert_file: Path, key_file: Path) -> ssl.SSLContext:
    """TLS 1.3, presents our node certificate, requires a client certificate of the mesh CA."""
    return _context(True, ca_file, cert_file, key_file)


def client_context(ca_file: Path, cert_file: Path, key_file: Path) -> ssl.SSLContext:
    """TLS 1.3, presents our node certificate, requires a server certificate of the mesh CA."""
    return _context(False, ca_file, cert_file, key_file)


def load_channel_tls(state_dir: str | os.PathLike[str], now: dt.datetime) -> ChannelTls:
    """Both contexts from a state dir; ConfigError (one line) when material is missing or bad."""
    directory = Path(state_dir)
    files = [directory / n for n in (CA_CERT_FILE, NODE_CERT_FILE, NODE_KEY_FILE)]
    missing = [str(p) for p in files if not p.is_file()]
    if missing:
        raise ConfigError(
            f"{', '.join(missing)}: missing; the channel needs a node certificate "
            "(enroll with `edgeagent join TOKEN`)"
        )
    ca_file, cert_file, key_file = files
    try:
        ca_cert = pki.load_cert_pem(ca_file.read_bytes())
        own = pki.verify_node_cert(ca_cert, cert_file.read_bytes(), now)
        server = server_context(ca_file, cert_file, key_file)
        client = client_context(ca_file, cert_file, key_file)
    except pki.PkiError as exc:
        raise ConfigError(f"{cert_file}: {exc}") from None
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"{directory}: cannot load the channel's TLS material ({exc})") from None
    return ChannelTls(server, client, ca_cert, own)


def peer_identity(
    ssl_object: ssl.SSLObject | ssl.SSLSocket, ca_cert: x509.Certificate, now: dt.datetime
) -> pki.CertIdentity:
    """Who the peer's certificate names, verified at ``now``; PeerRefused if unusable."""
    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        raise PeerRefused("peer presented no certificate")
    try:
        return pki.verify_node_cert(ca_cert, der, now)
    except pki.PkiError as exc:
        raise PeerRefused(str(exc)) from None


def check_peer(identity: pki.CertIdentity, name: str, node_id: str | None) -> None:
    """Refuse a peer whose certificate names another member than the one we dialled.

    ``node_id`` is the member's node id when the member record carries it (the stable
    identity); the name is checked too, so a renamed node must re-enroll to be reached.
    """
    if node_id is not None and identity.node_id != node_id:
        raise PeerRefused(
            f"certificate is for node id {identity.node_id}, expected {node_id} ({name})"
        )
    if identity.name != name:
        raise PeerRefused(f"certificate names {identity.name!r}, expected {name!r}")
