"""Owner-signed replicated state for the agent: the signer and verifier from the state dir.

How it works. :func:`load_state_signing` reads the cluster material :mod:`edgeagent.onboarding`
wrote: with the mesh CA certificate (``ca.crt``) the agent verifies every remote state entry
against it (:class:`overlay.state_signing.CaVerifier`, wall clock), and with this node's key and
certificate (``node.key``, ``node.crt``) it signs its own (:class:`~overlay.state_signing.CertSigner`).
The agent hands both to its gossip core (``Membership(signer=, verifier=)``, gossip/signing.py).

- No ``ca.crt`` (a keyring placed by hand, a legacy key-only cluster): neither; the core keeps the
  unsigned behaviour.
- A corrupt ``ca.crt``: ConfigError (one line, exit 2): running without the trust anchor would
  silently accept forged state.
- A node certificate that is missing, unreadable, not this CA's, expired, or that names another
  node than this identity (a renamed node, a cloned state dir made a new node): the agent still
  verifies others but cannot sign; :attr:`StateSigning.problem` says why and the agent logs it
  once at start, since peers will refuse this node's replicated state until it re-enrolls.

:class:`ForgedStateLog` turns growth of the core's ``state_forged`` / ``state_unverified``
counters into at most one warning per :data:`WARN_INTERVAL_S` (main loop, from the views).
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from overlay import pki
from overlay.state_signing import CaVerifier, CertSigner

from .errors import ConfigError
from .logs import fields
from .onboarding import CA_CERT_FILE, NODE_CERT_FILE, NODE_KEY_FILE
from .persist import NodeIdentity

log = logging.getLogger("edgeagent.state_signing")

WARN_INTERVAL_S = 60.0


@dataclass(frozen=True, slots=True)
class StateSigning:
    """What the core gets: both None in a cluster without a mesh CA."""

    signer: CertSigner | None
    verifier: CaVerifier | None
    problem: str | None = None  # why there is a verifier but no signer


def _utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def load_state_signing(state_dir: Path, identity: NodeIdentity) -> StateSigning:
    """The signer and verifier for ``identity`` from ``state_dir`` (see the module docstring)."""
    ca_path = state_dir / CA_CERT_FILE
    try:
        ca_pem = ca_path.read_bytes()
    except FileNotFoundError:
        return StateSigning(None, None)
    except OSError as exc:
        raise ConfigError(f"{ca_path}: cannot read the mesh CA: {exc.strerror or exc}") from None
    try:
        ca_cert = pki.load_cert_pem(ca_pem)
    except pki.PkiError as exc:
        raise ConfigError(f"{ca_path}: corrupt mesh CA certificate: {exc}") from None
    verifier = CaVerifier(ca_cert, _utc_now)
    try:
        signer = _signer(state_dir, ca_cert, identity)
    except pki.PkiError as exc:
        return StateSigning(None, verifier, str(exc))
    return StateSigning(signer, verifier)


def _signer(state_dir: Path, ca_cert: x509.Certificate, identity: NodeIdentity) -> CertSigner:
    try:
        key = pki.load_key_pem((state_dir / NODE_KEY_FILE).read_bytes())
        cert = pki.load_cert_pem((state_dir / NODE_CERT_FILE).read_bytes())
    except OSError as exc:
        raise pki.PkiError(f"no node key or certificate: {exc.strerror or exc}") from None
    who = pki.verify_node_cert(ca_cert, cert, _utc_now())
    if (who.name, who.node_id) != (identity.name, identity.node_id):
        raise pki.PkiError(
            f"the node certificate names {who.name!r} (node id {who.node_id}), "
            f"this node is {identity.name!r} (node id {identity.node_id})"
        )
    return CertSigner(key, cert)


def log_problem(problem: str) -> None:
    """The one warning for an agent that verifies others but cannot sign its own state."""
    log.warning(
        f"cannot sign this node's replicated state ({problem}): peers will refuse its state "
        "(its overlay address claim included) until it is enrolled again with "
        "`edgeagent join TOKEN`",
        extra=fields(problem=problem),
    )


class ForgedStateLog:
    """One warning per interval while remote state entries are refused (main loop)."""

    def __init__(self, interval: float = WARN_INTERVAL_S) -> None:
        self._interval = interval
        self._seen = (0, 0)  # (state_forged, state_unverified) already reported
        self._warned_at = float("-inf")

    def observe(self, core_stats: Mapping[str, int], now: float) -> None:
        """Look at a view's core counters (``now``: the view's clock)."""
        forged = core_stats.get("state_forged", 0)
        unverified = core_stats.get("state_unverified", 0)
        if forged == self._seen[0] or now - self._warned_at < self._interval:
            return  # entries held for an unknown owner alone are routine at joins: not a warning
        log.warning(
            "refused replicated-state entries that their owner did not sign: a member holding "
            "the cluster key is sending forged state (or a peer's certificate is not this "
            "mesh CA's)",
            extra=fields(
                refused=forged - self._seen[0],
                unverified=unverified - self._seen[1],
                refused_total=forged,
            ),
        )
        self._seen = (forged, unverified)
        self._warned_at = now
