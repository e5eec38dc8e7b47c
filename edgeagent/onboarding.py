"""Cluster material in a state dir: what ``init`` creates, ``join`` receives and ``run`` needs.

How it works
------------
A state dir holds, besides the agent's identity (:mod:`edgeagent.persist`)::

    identity.json  node name, node id, incarnation
    ca.crt         the mesh CA certificate (PEM)
    node.key       this node's private key (PEM, 0600)
    node.crt       this node's certificate from the CA, naming its node name and node id
    cluster.json   {"version": 1, "cluster": NAME, "seeds": ["HOST:PORT", ...]}
    keyring        the cluster's gossip keys, primary first (0600)
    ca.key         the mesh CA's private key (0600): only on the device that ran ``init``
    tokens.json    the join tokens issued here (:mod:`edgeagent.token_store`): next to ca.key

Every file is written with :func:`~edgeagent.persist.atomic_write`, and the keyring is
written *last*: it is the commit marker. ``run`` needs the keyring and nothing else (an
operator may also point ``--key-file`` at a keyring kept elsewhere); a crash halfway through
``init`` or ``join`` leaves files without a keyring, which ``run`` reports as "no cluster
material" and which a second ``init``/``join`` overwrites. ``init`` and ``join`` refuse a
state dir that already has a keyring, a CA key, a node certificate or a cluster file, except
that ``join`` enrolls again a copied state dir whose node key and certificate the agent
removed (:func:`renew_node_material`, :func:`needs_reenrollment`).

The seeds are the issuer's gossip address(es) received at enrollment: ``run`` joins them when
no ``--join`` is given. The cluster name saved here is the one ``run`` uses; a config or flag
naming another cluster is an error (the gossip would never decrypt).

Harnesses (``edgeagent demo``, the testbeds, the in-process tests) use :func:`create_cluster`
and :func:`provision_member`, which write the same files ``init`` and ``join`` would, with no
network enrollment.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from gossip.keyring import Keyring
from overlay import pki

from .advertise import advertised_host
from .config import AgentConfig, parse_hostport
from .errors import ConfigError, UsageError
from .netaddr import format_addr, is_wildcard
from .persist import (
    NodeIdentity,
    atomic_write,
    ensure_state_dir,
    load_json,
    load_keyring,
    load_or_create_identity,
    save_json,
    save_keyring,
)
from .token_store import TOKENS_FILE

KEYRING_FILE = "keyring"  # AgentConfig.keyring_path's default name
CA_CERT_FILE = "ca.crt"
CA_KEY_FILE = "ca.key"
NODE_CERT_FILE = "node.crt"
NODE_KEY_FILE = "node.key"
CLUSTER_FILE = "cluster.json"
CLUSTER_VERSION = 1
CERT_MODE = 0o644  # certificates are public
SECRET_MODE = 0o600
# Files whose presence means "this state dir already belongs to a cluster".
MATERIAL_FILES = (KEYRING_FILE, CA_KEY_FILE, NODE_CERT_FILE, CLUSTER_FILE)
# Files that name this node (the certificate's SAN carries the node id): a state dir copied to
# another machine must not keep them once it becomes a new node (:func:`renew_node_material`).
NODE_BOUND_FILES = (NODE_KEY_FILE, NODE_CERT_FILE)
MAX_SEEDS = 8  # overlay.tokens.MAX_ADDRESSES: what an enrollment reply carries

Address = tuple[str, int]


@dataclass(frozen=True, slots=True)
class ClusterCA:
    """A cluster's CA and keyring: what is needed to provision members."""

    cluster: str
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate
    keys: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class Material:
    """What ``run`` loads from a state dir: keys, the saved cluster name and seeds."""

    keys: tuple[bytes, ...]
    cluster: str | None  # None: no cluster file (a keyring placed by hand)
    seeds: tuple[Address, ...]
    issuer: bool  # the CA key is here: this node can issue join tokens


def _now(now: dt.datetime | None) -> dt.datetime:
    return now if now is not None else dt.datetime.now(dt.UTC)


def no_material_message(state_dir: Path) -> str:
    """The one line ``run`` prints for a state dir with no cluster material."""
    return (
        f"no cluster material in {state_dir}: run 'edgeagent init' on the first device, "
        "or 'edgeagent join TOKEN'"
    )


def existing_material(state_dir: str | os.PathLike[str]) -> list[str]:
    """The cluster-material files already present in ``state_dir`` (empty: a fresh dir)."""
    directory = Path(state_dir)
    return [name for name in MATERIAL_FILES if (directory / name).exists()]


def refuse_existing(state_dir: str | os.PathLike[str], command: str) -> None:
    """UsageError (one line) when ``state_dir`` already holds cluster material.

    ``join`` may enroll again a state dir whose node certificate was removed because it was a
    copy of another node's (:func:`needs_reenrollment`).
    """
    if command == "join" and needs_reenrollment(state_dir):
        return
    found = existing_material(state_dir)
    if found:
        raise UsageError(
            f"{command}: {state_dir} already holds cluster material ({', '.join(found)}); "
            "use another --state-dir, or remove it to start over"
        )


def enroll_addresses(config: AgentConfig) -> list[Address]:
    """Where joiners will reach this node's enrollment listener, for a token made before ``run``.

    The advertised host (``advertise``, else a non-wildcard bind host, else the address the agent
    derives for a wildcard bind: :func:`edgeagent.advertise.advertised_host`) with the enrollment port.
    """
    if config.enroll_port == 0:
        raise UsageError(
            "init: the enrollment port is 0 (any): set --enroll-port so the token can name it"
        )
    if config.advertise is not None:
        host = config.advertise[0]
    elif not is_wildcard(config.bind[0]):
        host = config.bind[0]
    else:
        host = advertised_host(config.bind)
    return [(host, config.enroll_port)]


def needs_reenrollment(state_dir: str | os.PathLike[str]) -> bool:
    """Enrolled (a cluster file) but without a node certificate or the CA key: a copied state
    dir whose certificate named the original node (:func:`renew_node_material`)."""
    directory = Path(state_dir)
    return (directory / CLUSTER_FILE).exists() and not any(
        (directory / name).exists() for name in (NODE_CERT_FILE, NODE_KEY_FILE, CA_KEY_FILE)
    )


def renew_node_material(
    state_dir: str | os.PathLike[str], identity: NodeIdentity, now: dt.datetime | None = None
) -> bool | None:
    """After a copied identity became ``identity`` (a new node id): replace or remove the node
    key and certificate, which name the old node id.

    With the CA key here a new key and certificate are issued for ``identity`` (True). Else
    both are removed (False): the node runs on the keyring, and ``edgeagent join TOKEN``
    enrolls it again (:func:`needs_reenrollment`). None: there was no certificate.
    """
    directory = Path(state_dir)
    if not any((directory / name).exists() for name in NODE_BOUND_FILES):
        return None
    if (directory / CA_KEY_FILE).exists():
        ca = load_ca(directory)
        key = pki.new_node_key()
        csr = pki.make_csr(key, identity.name, identity.node_id)
        cert = pki.issue_node_cert(
            ca.key, ca.cert, csr, identity.name, identity.node_id, _now(now)
        )
        atomic_write(directory / NODE_KEY_FILE, pki.key_pem(key), SECRET_MODE)
        atomic_write(directory / NODE_CERT_FILE, pki.cert_pem(cert), CERT_MODE)
        return True
    for name in NODE_BOUND_FILES:
        (directory / name).unlink(missing_ok=True)
    return False


def remove_stale_tokens(state_dir: str | os.PathLike[str]) -> None:
    """Drop a token file left by an ``init`` that crashed before its keyring (no CA key here)."""
    if not (Path(state_dir) / CA_KEY_FILE).exists():
        with contextlib.suppress(FileNotFoundError):
            (Path(state_dir) / TOKENS_FILE).unlink()


# --------------------------------------------------------------------------- creating


def new_ca(cluster: str, now: dt.datetime | None = None) -> ClusterCA:
    """A new cluster in memory: a mesh CA and a fresh one-key keyring (PkiError on a bad name)."""
    key, cert = pki.create_ca(cluster, _now(now))
    return ClusterCA(cluster, key, cert, (Keyring.generate_key(),))


def load_ca(state_dir: str | os.PathLike[str]) -> ClusterCA:
    """The CA of the cluster created in ``state_dir`` by ``init`` (ConfigError if absent)."""
    directory = Path(state_dir)
    try:
        key = pki.load_key_pem((directory / CA_KEY_FILE).read_bytes())
        cert = pki.load_cert_pem((directory / CA_CERT_FILE).read_bytes())
    except OSError as exc:
        raise ConfigError(f"{directory}: no mesh CA here: {exc.strerror or exc}") from None
    except pki.PkiError as exc:
        raise ConfigError(f"{directory}: corrupt mesh CA: {exc}") from None
    cluster, _ = _load_cluster_file(directory)
    if cluster is None:
        raise ConfigError(f"{directory / CLUSTER_FILE}: missing next to the mesh CA")
    return ClusterCA(cluster, key, cert, tuple(load_keyring(directory / KEYRING_FILE)))


def create_cluster(
    state_dir: str | os.PathLike[str],
    name: str,
    cluster: str,
    *,
    ca: ClusterCA | None = None,
    now: dt.datetime | None = None,
    default_name: bool = False,
) -> ClusterCA:
    """Make ``state_dir`` the first node of a new cluster (what ``edgeagent init`` writes).

    Writes the CA key, so this node issues join tokens. Returns the cluster's CA.
    """
    refuse_existing(state_dir, "init")
    ca = ca if ca is not None else new_ca(cluster, now)
    _write_member(state_dir, name, ca, (), now, ca_key=ca.key, default_name=default_name)
    return ca


def provision_member(
    ca: ClusterCA | str | os.PathLike[str],
    state_dir: str | os.PathLike[str],
    name: str,
    *,
    seeds: Sequence[Address] = (),
    now: dt.datetime | None = None,
) -> NodeIdentity:
    """Make ``state_dir`` a member of ``ca``'s cluster (a CA object, or an issuer's state dir).

    Writes what ``edgeagent join`` would receive (no CA key), with ``seeds`` to join.
    """
    refuse_existing(state_dir, "join")
    if not isinstance(ca, ClusterCA):
        ca = load_ca(ca)
    return _write_member(state_dir, name, ca, seeds, now)


def _write_member(
    state_dir: str | os.PathLike[str],
    name: str,
    ca: ClusterCA,
    seeds: Sequence[Address],
    now: dt.datetime | None,
    *,
    ca_key: ec.EllipticCurvePrivateKey | None = None,
    default_name: bool = False,
) -> NodeIdentity:
    identity = _identity(state_dir, name, default_name)
    key = pki.new_node_key()
    csr = pki.make_csr(key, identity.name, identity.node_id)
    cert = pki.issue_node_cert(ca.key, ca.cert, csr, identity.name, identity.node_id, _now(now))
    directory = Path(state_dir)
    if ca_key is not None:
        atomic_write(directory / CA_KEY_FILE, pki.key_pem(ca_key), SECRET_MODE)
    save_node_material(directory, key, cert, ca.cert, ca.cluster, seeds, ca.keys)
    return identity


def save_node_material(
    state_dir: str | os.PathLike[str],
    key: ec.EllipticCurvePrivateKey,
    cert: x509.Certificate,
    ca_cert: x509.Certificate,
    cluster: str,
    seeds: Sequence[Address],
    keys: Sequence[bytes],
) -> None:
    """Write a member's files, the keyring last (the commit marker, see the module docstring)."""
    directory = ensure_state_dir(state_dir)
    atomic_write(directory / NODE_KEY_FILE, pki.key_pem(key), SECRET_MODE)
    atomic_write(directory / NODE_CERT_FILE, pki.cert_pem(cert), CERT_MODE)
    atomic_write(directory / CA_CERT_FILE, pki.cert_pem(ca_cert), CERT_MODE)
    doc = {
        "version": CLUSTER_VERSION,
        "cluster": cluster,
        "seeds": [format_addr(s) for s in seeds[:MAX_SEEDS]],
    }
    save_json(directory / CLUSTER_FILE, doc, SECRET_MODE)
    save_keyring(directory / KEYRING_FILE, list(keys))


# --------------------------------------------------------------------------- loading


def _load_cluster_file(directory: Path) -> tuple[str | None, tuple[Address, ...]]:
    path = directory / CLUSTER_FILE
    doc: Any = load_json(path, None)
    if doc is None:
        return None, ()

    def bad(what: str) -> ConfigError:
        return ConfigError(f"{path}: corrupt cluster file: {what}; restore or remove it")

    if not isinstance(doc, dict) or doc.get("version") != CLUSTER_VERSION:
        raise bad(f"expected an object with version {CLUSTER_VERSION}")
    cluster, seeds = doc.get("cluster"), doc.get("seeds")
    if not isinstance(cluster, str) or not cluster:
        raise bad("cluster: expected a name")
    if not isinstance(seeds, list) or not all(isinstance(s, str) for s in seeds):
        raise bad("seeds: expected a list of HOST:PORT")
    try:
        addresses = tuple(parse_hostport(s) for s in seeds[:MAX_SEEDS])
    except ValueError:
        raise bad("seeds: expected a list of HOST:PORT") from None
    return cluster, addresses


def load_material(config: AgentConfig) -> Material:
    """The cluster material ``run`` needs; a one-line ConfigError when it is missing.

    An explicit key file (``--key-file`` / ``key_file``) must exist: it is never generated.
    """
    directory = Path(config.state_dir)
    path = config.keyring_path
    if not path.exists():
        if config.key_file is not None:
            raise ConfigError(
                f"key file {path} not found; an explicit key file is never generated: "
                "copy the cluster keyring there, or leave --key-file out"
            )
        raise ConfigError(no_material_message(directory))
    keys = tuple(load_keyring(path))
    cluster, seeds = _load_cluster_file(directory)
    return Material(keys, cluster, seeds, (directory / CA_KEY_FILE).exists())


def apply_material(config: AgentConfig, material: Material) -> AgentConfig:
    """``config`` with the saved cluster name and, when no ``--join`` was given, the saved seeds.

    A config or flag that names another cluster than the saved one is a ConfigError.
    """
    cluster = material.cluster
    if cluster is not None and cluster != config.cluster:
        if config.cluster_source:
            raise ConfigError(
                f"{config.cluster_source}: names cluster {config.cluster!r}, but "
                f"{config.state_dir} is enrolled in cluster {cluster!r}; remove the setting "
                "or use another --state-dir"
            )
        gossip = dataclasses.replace(config.gossip, cluster_name=cluster)
        config = dataclasses.replace(config, cluster=cluster, gossip=gossip)
    if not config.join and material.seeds:
        config = dataclasses.replace(config, join=material.seeds)
    return config


# --------------------------------------------------------------------------- joining


@dataclass(frozen=True, slots=True)
class Joined:
    """The outcome of :func:`join_with_token`: who we are now, and in which cluster."""

    identity: NodeIdentity
    cluster: str
    issuer: Address
    seeds: tuple[Address, ...]


def read_token_text(text: str, stdin: Any = None) -> str:
    """The token argument, or the first line of stdin when it is ``-``."""
    if text != "-":
        return text
    import sys

    line: str = (stdin or sys.stdin).readline()
    if not line.strip():
        raise UsageError("join token: expected a token on stdin")
    return line


def _identity(state_dir: str | os.PathLike[str], name: str, default_name: bool) -> NodeIdentity:
    """The node's identity, created as the agent creates it (default names, machine id)."""
    from .persist import machine_fingerprint, machine_id_paths

    machine = machine_fingerprint(machine_id_paths())
    return load_or_create_identity(state_dir, name, default_name=default_name, machine=machine)


def join_with_token(
    state_dir: str | os.PathLike[str],
    name: str,
    token_text: str,
    *,
    default_name: bool = False,
    mdns: bool = True,
) -> Joined:
    """Enroll with the issuer named in the token and save what it sends (``edgeagent join``).

    With ``mdns``, an issuer of the token's CA is looked for by mDNS when the token names no
    address or none answers. A bad, expired, revoked or forged token, a wrong CA pin or an
    unreachable issuer is one UsageError line; nothing but the identity is written until
    enrollment succeeded.
    """
    import asyncio

    from overlay.tokens import TokenError, parse_token

    from .enroll import EnrollError, enroll, mdns_issuers

    try:
        token = parse_token(token_text)
    except TokenError as exc:
        raise UsageError(str(exc)) from None
    refuse_existing(state_dir, "join")
    identity = _identity(state_dir, name, default_name)
    key = pki.new_node_key()
    try:
        finder = mdns_issuers if mdns else None
        got = asyncio.run(enroll(token, identity.name, identity.node_id, key, find_issuers=finder))
    except EnrollError as exc:
        raise UsageError(f"join: {exc}") from None
    save_node_material(state_dir, key, got.cert, got.ca_cert, got.cluster, got.seeds, got.keys)
    if math.isfinite(got.issuer_time) and got.issuer_time > 0:  # a clock behind starts here
        from .clock_store import advance_saved

        advance_saved(state_dir, got.issuer_time)
    return Joined(identity, got.cluster, got.issuer, got.seeds)
