"""The core's counters: one mutable record, read as attributes or by name."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(slots=True)
class Stats:
    """Counters, mutable. Read as attributes or ``stats["name"]``.

    ``bytes_in`` / ``bytes_out`` count everything sealed (datagrams and stream
    frames); ``stream_bytes_*`` is the stream part of it.
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

    def __getitem__(self, name: str) -> int:
        value: int = getattr(self, name)
        return value

    def as_dict(self) -> dict[str, int]:
        """All counters as a plain dict."""
        return asdict(self)
