"""Owner-signed replicated state: the interface the core calls, and the bytes it signs.

How it works
------------
Any holder of the cluster key can seal a datagram, so without more a member
could publish a ``StateUpdate`` about *another* owner (say, an overlay address
claim) and every receiver would take it. With owner signatures, every entry of
a replicated map carries ``sig``, made by the owner over :func:`canonical_entry`
(the cluster name, owner, key, version, value and deleted flag, msgpack-encoded
here and only here), and a receiver applies a remote entry only if the owner's
credential verifies it.

The core stays free of cryptography: it is given a :class:`StateSigner` (our
key) and a :class:`StateVerifier` (the trust anchor) and knows nothing of what
a credential is. The credential itself travels in the owner's own map, under
:data:`CREDENTIAL_KEY`, as a state value (for the daemon: the node
certificate in DER), though by push-pull only, never gossiped: a member that
learns of a member without it, or needs it, asks the owner
(``Membership._fetch_uncredentialed``, ``Membership._fetch_credential``). The entry carrying it is verified with the
credential it carries, so the verifier accepts it only if the credential is
trusted for that owner (the certificate chains to the mesh CA and names the
owner) and the owner's key signed the entry. Every other entry of that owner is
then verified with the credential the receiver holds for it.

Policy, in the core:

- no verifier: today's behaviour, signatures are neither required nor checked
  (legacy clusters with a cluster key only);
- a verifier: every remote entry must verify. Unsigned or badly signed ones
  are refused (``Stats.state_forged``); entries of an owner whose credential
  is not known yet are held (at most ``HELD_MAX``, oldest dropped) until the
  credential arrives, else dropped (``Stats.state_unverified``) for
  anti-entropy to repair. Entries about ourselves are checked with our own
  credential before they may make us re-stamp our map.

Each (owner, key, version) is verified at most once when valid: the core asks
the store whether an entry is newer than what it holds before verifying it.

Alive records are signed too, with the same key, over :func:`canonical_alive`
(the cluster name, member name, incarnation, address and meta; the meta bears
the node id). A receiver that holds the member's credential applies an Alive
(or a push-pull member record) only if it verifies (``Stats.alive_forged``
otherwise), so a cluster-key holder cannot move another member's address or
bump its incarnation; without the credential yet, an Alive is taken unverified
(startup must converge before credentials have spread). An Alive claiming our
own name counts as a name conflict only when our credential verifies it: the
CA issues a name once, so only a holder of a certificate naming us can claim us.
"""

from __future__ import annotations

from typing import Protocol

import msgpack

from .messages import StateValue

# The key under which an owner publishes its credential in its own map. Reserved:
# applications cannot set it (Membership.set_state refuses it when signing is on).
CREDENTIAL_KEY = "_cert"
# Domain separation: these bytes are never a valid signature input for anything else.
SIGNING_DOMAIN = b"edgeagent-state-v1\x00"
ALIVE_DOMAIN = b"edgeagent-alive-v1\x00"


class StateSigner(Protocol):
    """Our side: the credential we publish and the key behind it."""

    @property
    def credential(self) -> bytes:
        """Published under :data:`CREDENTIAL_KEY` in our map (a certificate, for the daemon)."""
        ...

    def sign(self, data: bytes) -> bytes:
        """A signature over ``data`` (bounded by ``codec.MAX_SIG_BYTES``)."""
        ...


class StateVerifier(Protocol):
    """The trust anchor: whether ``credential`` is trusted for ``owner`` and signed ``data``."""

    def verify(self, owner: str, credential: bytes, data: bytes, sig: bytes) -> bool:
        """True only if ``credential`` is trusted for ``owner`` and ``sig`` is its signature
        over ``data``. Must be total on hostile input (never raises)."""
        ...


def canonical_entry(
    cluster: str, owner: str, key: str, version: int, value: StateValue, deleted: bool
) -> bytes:
    """The bytes an owner signs for one entry of its map.

    msgpack is deterministic for the values the codec admits (the smallest
    encoding for every int, str and container; floats as float64; maps in the
    order they were built, which decoding preserves), so a receiver rebuilds
    exactly the sender's bytes from the decoded entry.
    """
    packed: bytes = msgpack.packb([cluster, owner, key, version, value, deleted], use_bin_type=True)
    return SIGNING_DOMAIN + packed


def canonical_alive(cluster: str, name: str, incarnation: int, addr: tuple[str, int], meta: bytes) -> bytes:
    """The bytes a member signs for one Alive about itself (its identity-bearing fields).

    A domain of its own, so an Alive signature is never a valid state entry signature.
    """
    packed: bytes = msgpack.packb([cluster, name, incarnation, [addr[0], addr[1]], meta], use_bin_type=True)
    return ALIVE_DOMAIN + packed
