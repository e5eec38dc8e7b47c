"""The core's counters: one mutable record, read as attributes or by name."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

# Message kinds counted per kind (``kind_*`` below): the probe messages, the
# membership and state updates, user broadcasts, and the three parts of a
# push-pull frame (member records, state entries, and the rest: header,
# summary and want of a digest exchange).
KINDS = (
    "ping", "ack", "nack", "ping_req", "alive", "suspect", "dead", "state", "user",
    "push_pull_members", "push_pull_state", "push_pull_digest",
)
# The per-kind counters: messages (for push-pull: frames) and encoded bytes, each way.
KIND_COUNTERS = ("kind_msgs_out", "kind_bytes_out", "kind_msgs_in", "kind_bytes_in")


def _per_kind() -> dict[str, int]:
    return dict.fromkeys(KINDS, 0)


@dataclass(slots=True)
class Stats:
    """Counters, mutable. Read as attributes or ``stats["name"]``.

    ``bytes_in`` / ``bytes_out`` count everything sealed (datagrams and stream
    frames); ``stream_bytes_*`` is the stream part of it. ``kind_bytes_out[k]``
    and the other ``KIND_COUNTERS`` count the encoded bytes of each message of
    kind ``k`` (``KINDS``), without the datagram header and the keyring's seal;
    ``as_dict`` flattens them as ``kind_bytes_out_ping`` and so on.
    """

    datagrams_in: int = 0
    datagrams_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    streams_in: int = 0  # push-pull requests handled
    streams_out: int = 0  # push-pull requests sent
    stream_replies_in: int = 0
    stream_bytes_in: int = 0
    stream_bytes_out: int = 0
    stream_failures: int = 0
    decode_errors: int = 0
    decrypt_errors: int = 0
    # Datagrams dropped by the anti-replay window (replay.py: seen before, or from an
    # older boot epoch of their sender), and Alives no newer than a reaped member's last.
    replayed: int = 0
    dropped: int = 0  # decoded but unusable: misdirected, unexpected, over a limit
    state_rejected: int = 0  # remote replicated-state entries / maps over budget
    probes: int = 0
    probe_failures: int = 0
    refutes: int = 0
    gone_told: int = 0  # our Suspect (or its own leave) sent straight to a member still suspecting a gone one
    # Records about us, or state entries, whose incarnation / version jumps more
    # than codec.MAX_COUNTER_STEP ahead: forged, refused.
    out_of_range: int = 0
    push_pull_capped: int = 0  # our push-pull frames cut to fit max_stream_bytes
    # Members never heard from directly (verify.py): refused over the ceiling,
    # evicted for a verified one, dropped (in a flood) or suspected after
    # failed verification pings.
    unverified_refused: int = 0
    unverified_evicted: int = 0
    unverified_dropped: int = 0
    unverified_suspected: int = 0
    verify_pings: int = 0
    # Owner-signed state (signing.py), only with a verifier: remote entries refused
    # for a missing or bad signature, and entries whose owner's credential was not
    # known yet (held until it arrives, or dropped for anti-entropy to repair).
    state_forged: int = 0
    state_unverified: int = 0
    # Alive records (and push-pull member records) refused because the member's
    # credential is known and does not verify them, or a claim of our own name
    # that our credential does not verify (signing.canonical_alive).
    alive_forged: int = 0
    pending_state: int = 0  # state entries of members not yet known, kept for a while
    unknown_sender_asks: int = 0  # records asked of a member gossip had not told us of (core.UNKNOWN_SENDER_GRACE)
    kind_msgs_out: dict[str, int] = field(default_factory=_per_kind)
    kind_bytes_out: dict[str, int] = field(default_factory=_per_kind)
    kind_msgs_in: dict[str, int] = field(default_factory=_per_kind)
    kind_bytes_in: dict[str, int] = field(default_factory=_per_kind)

    def count(self, out: bool, kind: str, size: int, msgs: int = 1) -> None:
        """Count ``msgs`` messages of ``kind`` taking ``size`` encoded bytes."""
        if out:
            self.kind_msgs_out[kind] += msgs
            self.kind_bytes_out[kind] += size
        else:
            self.kind_msgs_in[kind] += msgs
            self.kind_bytes_in[kind] += size

    def __getitem__(self, name: str) -> int:
        return self.as_dict()[name]

    def as_dict(self) -> dict[str, int]:
        """All counters as a plain dict (per-kind ones as ``kind_bytes_out_ping`` ...)."""
        out = {name: getattr(self, name) for name in _SCALARS}
        for counter in KIND_COUNTERS:
            per_kind: dict[str, int] = getattr(self, counter)
            for kind, n in per_kind.items():
                out[f"{counter}_{kind}"] = n
        return out


_SCALARS = tuple(f.name for f in fields(Stats) if f.name not in KIND_COUNTERS)
