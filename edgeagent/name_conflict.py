"""Who keeps a node name that two live nodes claim: decided alike on both sides, so nothing flaps.

How it works. The gossip core reports a :class:`~gossip.events.NameConflict` when an Alive
about our own name arrives from another address, and no longer outbids it (two live
claimants outbidding each other is the flapping: incarnations climbing, the address changing
twice a second). Every agent puts its node id and its start time (``since``, wall-clock
milliseconds) in its member meta (:func:`member_meta`), so both claimants see the same two
facts and reach opposite halves of one :func:`verdict`: the claimant that started later
gives the name up (equal start times: the larger node id, then the larger address).

- Another node id: two nodes were given one name. The later one logs one error saying what
  to set (``--name`` or ``name =`` in the config) and exits 2, as Serf leaves when it loses
  a name; the earlier one logs a warning and keeps the name (:data:`REFUSE` / :data:`KEEP`).
- The same node id: a state dir copied with an image that kept ``/etc/machine-id`` (the
  machine fingerprint in the identity cannot tell the copies apart). The later one becomes
  a new node: new node id, a new default name if its name was a default one, its copied
  address claim dropped, and restarts (:data:`RENEW`).

``since`` is read from the agent's hybrid clock (:mod:`edgeagent.clock_store`), not from the
bare wall clock: a node that boots in 1970 (no RTC) starts at its saved clock or at the
issuer's time from enrollment, so it does not look like the oldest claimant of every name.

An established holder never yields: once this life has held the name for
:data:`ESTABLISHED_S` with no conflict, a claim that would make it exit or renew is refused
with an error instead (rate-limited). Any cluster-key holder can forge an Alive with our name
and an earlier ``since``; without this one datagram stopped a long-running agent for good
(the systemd unit does not restart on exit 2). The claimant that really has to give the name
up is the one that just started: it sees the conflict within its first seconds. Two real
nodes that both held one name for long (a partition healing) both keep it and both log the
error naming the other.

A claim must be signed (issue 14). With the mesh CA (``ca.crt``) and our node certificate,
the core reports a conflict only for an Alive that our own certificate's key signed
(``gossip.signing.canonical_alive``): the CA issues a name once, so only a copy of this
node (same state dir, same key) can claim our name. An unsigned or forged claim is counted
(``alive_forged``) and dropped, never reported, so it cannot make even a just-started agent
yield. Without signing (a keyring-only cluster) every claim counts, as before.

A meta that is not ours (no ``since``) counts as started at 0: an older agent, established.
Known limit: an earlier life of this very node, at another address and with an incarnation
this life did not save (killed right after a refutation), looks like a copy that started
earlier; this node then becomes a new node, with the warning.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass

from gossip.messages import Address

ESTABLISHED_S = 120.0  # held this long without a conflict: never given up to a later claim


class Verdict(enum.Enum):
    KEEP = "keep"  # we keep the name; the other claimant gives it up
    REFUSE = "refuse"  # another node holds the name: exit 2, the operator sets another
    RENEW = "renew"  # a copy of this very node holds it: become a new node and restart


KEEP, REFUSE, RENEW = Verdict.KEEP, Verdict.REFUSE, Verdict.RENEW


@dataclass(frozen=True, slots=True)
class Claimant:
    """One node claiming a name: what the verdict compares."""

    node_id: str
    since_ms: int
    addr: Address


def member_meta(node_id: str, profile: str, since_ms: int) -> bytes:
    """Our member meta: the JSON object every agent gossips about itself."""
    doc = {"id": node_id, "profile": profile, "since": since_ms}
    return json.dumps(doc, separators=(",", ":")).encode()


def claimant(meta: bytes, addr: Address) -> Claimant:
    """The claimant described by a member's ``meta`` (not ours: no id, started at 0)."""
    try:
        doc = json.loads(meta)
    except (UnicodeDecodeError, ValueError):
        doc = None
    if not isinstance(doc, dict):
        doc = {}
    node_id, since = doc.get("id"), doc.get("since")
    return Claimant(
        node_id if isinstance(node_id, str) else "",
        since if isinstance(since, int) and not isinstance(since, bool) else 0,
        addr,
    )


def verdict(me: Claimant, other: Claimant) -> Verdict:
    """What ``me`` does about ``other`` claiming its name (``other`` reaches the opposite)."""
    if (me.since_ms, me.node_id, me.addr) < (other.since_ms, other.node_id, other.addr):
        return KEEP
    return RENEW if me.node_id == other.node_id else REFUSE
