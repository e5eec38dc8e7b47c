"""``python -m testbed.bench signing``: what owner-signed state costs per entry, on this machine.

Measures, each as the median of ``--rounds`` timed batches of ``--entries`` operations (µs per
operation): the canonical encoding of one entry (gossip/signing.py), signing it with the node
key (overlay/state_signing.CertSigner, ECDSA P-256), verifying it against the mesh CA with the
certificate cached (CaVerifier: what every entry after an owner's first costs), and the first
check of a certificate (a cache miss: chain, profile, then the signature). Then the same entries
through a real core: the whole receive path of a signed StateUpdate, minus that of an unsigned
one in a cluster with no verifier. Bytes: what the signature adds to every entry on the wire,
and the credential entry's size.
"""

from __future__ import annotations

import argparse
import datetime as dt
import random
import secrets
import statistics
import time
from collections.abc import Callable
from typing import Any

from gossip.codec import DatagramHeader, encode_datagram
from gossip.config import lan
from gossip.core import Membership
from gossip.messages import Alive, StateUpdate
from gossip.signing import CREDENTIAL_KEY, canonical_entry
from overlay import pki
from overlay.state_signing import CaVerifier, CertSigner
from testbed.sim import make_keyring, seal

VALUE = {"v": 1, "block": "10.99.1.0/28", "t": [1764676000123, 0], "id": "4f3c2a9be01d4c7fa2b9e4d1c0ffee01"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--entries", type=int, default=500, help="operations per timed batch (default 500)")
    parser.add_argument("--rounds", type=int, default=5, help="timed batches; the median is reported")


def _per_op(rounds: int, count: int, fn: Callable[[int], object]) -> float:
    """Median microseconds per call of ``fn(i)`` over ``rounds`` batches of ``count``."""
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        for i in range(count):
            fn(i)
        samples.append((time.perf_counter() - start) / count * 1e6)
    return round(statistics.median(samples), 2)


def _cores(ca: tuple[Any, Any], now: dt.datetime, signed: bool) -> tuple[Membership, CertSigner | None]:
    kwargs: dict[str, Any] = {}
    b_signer = None
    if signed:
        b_signer = _signer(ca, "b", now)
        kwargs = {"signer": _signer(ca, "a", now), "verifier": CaVerifier(ca[1], lambda: now)}
    core = Membership("a", ("10.0.0.1", 7946), lan(), random.Random(1), 0.0, keyring=make_keyring(random.Random(1)), **kwargs)
    core.receive(seal([Alive("b", 1, ("10.0.0.2", 7946), b"")], to=core.name), ("10.0.0.2", 7946), 0.0)
    if b_signer is not None:
        cred = b_signer.credential
        sig = b_signer.sign(canonical_entry("edgeagent", "b", CREDENTIAL_KEY, 1, cred, False))
        core.receive(seal([StateUpdate("b", 1, CREDENTIAL_KEY, cred, False, sig)], to=core.name), ("10.0.0.2", 7946), 0.0)
    return core, b_signer


def _signer(ca: tuple[Any, Any], name: str, now: dt.datetime) -> CertSigner:
    key = pki.new_node_key()
    node_id = secrets.token_hex(16)
    cert = pki.issue_node_cert(ca[0], ca[1], pki.make_csr(key, name, node_id), name, node_id, now)
    return CertSigner(key, cert)


def _receive_path(ca: tuple[Any, Any], now: dt.datetime, signed: bool, args: argparse.Namespace) -> float:
    """µs per StateUpdate received by a core (each a new version, so each is applied)."""
    core, signer = _cores(ca, now, signed)
    total = args.rounds * args.entries
    datagrams = []
    for version in range(2, 2 + total):
        sig = signer.sign(canonical_entry("edgeagent", "b", "ipam", version, VALUE, False)) if signer else b""
        datagrams.append(seal([StateUpdate("b", version, "ipam", VALUE, False, sig)], to=core.name))
    it = iter(datagrams)
    us = _per_op(args.rounds, args.entries, lambda i: core.receive(next(it), ("10.0.0.2", 7946), 1.0))
    assert core.stats.state_forged == 0 and core.state_of("b")["ipam"] == VALUE
    return us


_HDR = DatagramHeader("b", 1, 0, 0)  # any header: only the difference in size is reported


def run(args: argparse.Namespace) -> dict[str, Any]:
    now = dt.datetime.now(dt.UTC)
    ca = pki.create_ca("edgeagent", now)
    signer = _signer(ca, "b", now)
    verifier = CaVerifier(ca[1], lambda: now)
    n = args.entries
    data = [canonical_entry("edgeagent", "b", "ipam", v, VALUE, False) for v in range(n)]
    sigs = [signer.sign(d) for d in data]
    assert all(verifier.verify("b", signer.credential, d, s) for d, s in zip(data, sigs, strict=True))
    fresh = [_signer(ca, "b", now) for _ in range(min(n, 50))]
    fresh_sigs = [s.sign(data[0]) for s in fresh]

    def first_check(i: int) -> bool:
        j = i % len(fresh)
        return CaVerifier(ca[1], lambda: now).verify("b", fresh[j].credential, data[0], fresh_sigs[j])

    unsigned = StateUpdate("b", 7, "ipam", VALUE)
    signed = StateUpdate("b", 7, "ipam", VALUE, sig=sigs[0])
    signed_path = _receive_path(ca, now, True, args)
    plain_path = _receive_path(ca, now, False, args)
    return {
        "canonical_us": _per_op(args.rounds, n, lambda i: canonical_entry("edgeagent", "b", "ipam", i, VALUE, False)),
        "sign_us": _per_op(args.rounds, n, lambda i: signer.sign(data[i])),
        "verify_cached_us": _per_op(args.rounds, n, lambda i: verifier.verify("b", signer.credential, data[i], sigs[i])),
        "verify_first_cert_us": _per_op(args.rounds, min(n, 50), first_check),
        "receive_signed_us": signed_path,
        "receive_unsigned_us": plain_path,
        "receive_added_us": round(signed_path - plain_path, 2),
        "sig_bytes_per_entry": len(encode_datagram([signed], _HDR)) - len(encode_datagram([unsigned], _HDR)),
        "credential_der_bytes": len(signer.credential),
        "entries": n,
        "rounds": args.rounds,
    }
