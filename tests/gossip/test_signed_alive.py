"""Member-signed Alive records in the core (gossip/signing.canonical_alive), with fake keys.

Issue 14: any cluster-key holder could seal an Alive about another member with a higher
incarnation and its own address, and every receiver moved the member there. With a
verifier, a receiver that holds the member's credential refuses such an Alive (and such a
push-pull member record) unless the member's key signed it. The fakes are those of
test_signed_state (a credential is trusted only for the owner it was issued to).
"""

from __future__ import annotations

from typing import Any

from gossip.codec import DatagramHeader, decode_datagram, destination_tag, encode_datagram
from gossip.core import Membership
from gossip.events import MemberUpdated, NameConflict
from gossip.messages import Alive, MemberRecord, MemberState, PushPull
from gossip.signing import canonical_alive
from testbed.sim import drain_events, seal, sent
from tests.gossip.test_signed_state import (
    CLUSTER,
    EVIL,
    A,
    Authority,
    B,
    C,
    FakeSigner,
    make_core,
    sealed_frame,
    sealed_raw,
    with_signed_peer,
)


def signed_alive(signer: FakeSigner, name: str, inc: int, addr: tuple[str, int], meta: bytes = b"") -> Alive:
    return Alive(name, inc, addr, meta, signer.sign(canonical_alive(CLUSTER, name, inc, addr, meta)))


def forge_move(core: Membership, sig: bytes | None = None) -> None:
    """The insider's attack: b at a higher incarnation, at the insider's address."""
    fields: list[Any] = [5, "b", 7, list(EVIL), b""]
    if sig is not None:
        fields.append(sig)
    core.receive(sealed_raw([fields]), EVIL, 1.0)


def test_a_forged_alive_moved_a_member_without_a_verifier() -> None:
    core = make_core(None)
    core.receive(seal([Alive("b", 1, B, b"")], to=core.name), B, 0.0)
    forge_move(core)
    member = core.member("b")
    assert member is not None and member.addr == EVIL and member.incarnation == 7  # the defect


def test_a_forged_alive_is_refused_once_the_credential_is_known() -> None:
    authority = Authority()
    core = make_core(authority)
    with_signed_peer(core, authority.issue("b"))
    forge_move(core)  # unsigned
    forge_move(core, bytes(64))  # a bad signature
    forge_move(core, authority.issue("evil").sign(canonical_alive(CLUSTER, "b", 7, EVIL, b"")))  # another key
    member = core.member("b")
    assert member is not None and member.addr == B and member.incarnation == 1
    assert core.stats.alive_forged == 3
    assert not [e for e in drain_events(core) if isinstance(e, MemberUpdated)]
    assert all(m[0] != "b" or m[1] != 7 for m in _queued_alives(core))  # not spread either


def outgoing(core: Membership, until: float) -> list[Any]:
    """Every message the core sends until ``until`` (timers fired), flattened."""
    while (deadline := core.get_timer()) is not None and deadline <= until:
        core.handle_timeout(deadline)
    return [m for _, msgs in sent(core) for m in msgs]


def _queued_alives(core: Membership) -> list[tuple[str, int]]:
    return [(m.name, m.incarnation) for m in outgoing(core, 3.0) if isinstance(m, Alive)]


def test_a_genuine_alive_still_moves_the_member() -> None:
    authority = Authority()
    core = make_core(authority)
    b = authority.issue("b")
    with_signed_peer(core, b)
    core.receive(seal([signed_alive(b, "b", 2, C)], to=core.name), C, 1.0)
    member = core.member("b")
    assert member is not None and member.addr == C and member.incarnation == 2
    assert core.stats.alive_forged == 0


def test_before_the_credential_an_alive_is_taken_unverified() -> None:
    core = make_core(Authority())
    core.receive(seal([Alive("b", 1, B, b"")], to=core.name), B, 0.0)
    forge_move(core)
    member = core.member("b")
    assert member is not None and member.addr == EVIL  # startup must converge: nothing to check with
    assert core.stats.alive_forged == 0


def test_a_repeated_alive_is_verified_once() -> None:
    authority = Authority()
    core = make_core(authority)
    with_signed_peer(core, authority.issue("b"))
    data = canonical_alive(CLUSTER, "b", 7, EVIL, b"")
    for _ in range(5):
        forge_move(core, bytes(64))
    assert authority.calls[("b", data)] == 1
    assert core.stats.alive_forged == 5


def test_a_forged_push_pull_record_is_refused() -> None:
    authority = Authority()
    core = make_core(authority)
    b = authority.issue("b")
    with_signed_peer(core, b)
    forged = MemberRecord("b", EVIL, 7, MemberState.ALIVE, b"", bytes(64))
    pp = PushPull("c", False, False, (MemberRecord("c", C, 1, MemberState.ALIVE, b""), forged), ())
    core.handle_stream(sealed_frame(pp), C, 1.0)
    member = core.member("b")
    assert member is not None and member.addr == B and core.stats.alive_forged == 1
    genuine = signed_alive(b, "b", 8, C)
    record = MemberRecord("b", C, 8, MemberState.ALIVE, b"", genuine.sig)
    core.handle_stream(sealed_frame(PushPull("c", False, False, (record,), ())), C, 2.0)
    member = core.member("b")
    assert member is not None and member.addr == C and member.incarnation == 8


def test_our_alives_and_records_go_out_signed() -> None:
    authority = Authority()
    core = make_core(authority)
    verifier = authority.verifier()
    credential = core._signer.credential  # type: ignore[union-attr]
    core.join([B], 0.0)
    core.receive(seal([Alive("b", 1, B, b"")], to=core.name), B, 0.0)
    alives = [m for m in outgoing(core, 0.5) if isinstance(m, Alive) and m.name == "a"]
    assert alives
    for a in alives:
        assert verifier.verify("a", credential, canonical_alive(CLUSTER, "a", a.incarnation, A, a.meta), a.sig)
    core.set_meta(b"new", 1.0)
    alive = [m for m in outgoing(core, 2.0) if isinstance(m, Alive) and m.name == "a"][-1]
    assert alive.meta == b"new"
    assert verifier.verify("a", credential, canonical_alive(CLUSTER, "a", alive.incarnation, A, b"new"), alive.sig)
    me = next(r for r in core._capped_state(False, False, 1 << 20).members if r.name == "a")
    assert me.sig == alive.sig


def test_unsigned_alives_are_unchanged_on_the_wire() -> None:
    head = DatagramHeader("s", 1, 1, destination_tag("a"))
    plain, signed = Alive("n", 1, A, b"m"), Alive("n", 1, A, b"m", bytes(range(64)))
    assert decode_datagram(encode_datagram([signed], head)) == (head, [signed])
    assert len(encode_datagram([signed], head)) - len(encode_datagram([plain], head)) == 66
    assert decode_datagram(encode_datagram([plain], head)) == (head, [plain])


# --- a claim of our own name ------------------------------------------------------------


def test_an_unsigned_claim_of_our_name_is_no_conflict() -> None:
    core = make_core(Authority())
    drain_events(core)
    inc = core.incarnation
    core.receive(sealed_raw([[5, "a", 1, list(EVIL), b"forged"]]), EVIL, 1.0)
    assert not [e for e in drain_events(core) if isinstance(e, NameConflict)]
    assert core.stats.alive_forged == 1
    assert core.incarnation == inc and core.stats.refutes == 0  # dropped: a flood costs no signatures
    assert core.local_member.addr == A


def test_a_claim_signed_with_our_key_is_a_conflict() -> None:
    authority = Authority()
    core = make_core(authority)
    drain_events(core)
    copy = core._signer  # a copy of our state dir at another address  # type: ignore[assignment]
    assert isinstance(copy, FakeSigner)
    core.receive(seal([signed_alive(copy, "a", 1, EVIL, b"copy")], to=core.name), EVIL, 1.0)
    conflicts = [e for e in drain_events(core) if isinstance(e, NameConflict)]
    assert [c.addr for c in conflicts] == [EVIL]
    assert core.stats.alive_forged == 0


def test_without_a_verifier_any_claim_is_a_conflict() -> None:
    core = make_core(None)
    drain_events(core)
    core.receive(sealed_raw([[5, "a", 1, list(EVIL), b"forged"]]), EVIL, 1.0)
    assert [e.addr for e in drain_events(core) if isinstance(e, NameConflict)] == [EVIL]
