"""Error types of the gossip layer.

Remote errors (the network sent something bad) all derive from
:class:`RemoteError`: callers drop the packet and count it. Local errors (the
caller misused the API) derive from :class:`LocalError`. Anything else escaping
the core is a bug.
"""

from __future__ import annotations


class GossipError(Exception):
    """Base of every error this package raises on purpose."""


class RemoteError(GossipError):
    """Input from the network was bad. Drop it and count it."""


class DecodeError(RemoteError):
    """A datagram or stream frame could not be decoded (the one error the codec raises)."""


class DecryptError(RemoteError):
    """No installed key opens the payload, or the cluster name (associated data) differs."""


class LocalError(GossipError):
    """The caller misused the API."""


class KeyringError(LocalError):
    """Bad key, or an operation the keyring refuses (e.g. removing the primary)."""


class BroadcastTooLarge(LocalError):
    """A broadcast, metadata or state entry can never fit in one datagram or the state budget."""


class CounterExhausted(LocalError):
    """Our incarnation or state version is at ``codec.MAX_COUNTER``: it cannot grow further."""
