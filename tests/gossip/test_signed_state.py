"""Owner-signed replicated state in the core (gossip/signing.py), with fake keys.

The fakes stand in for the overlay's certificate signer and CA verifier: a
"credential" is public, the key behind it is a secret only its owner's signer
holds, and the verifier trusts a credential only for the owner it was issued
to. overlay/state_signing.py is tested with real certificates in tests/overlay.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import random
from collections import Counter
from typing import Any

import msgpack
import pytest

from gossip.codec import (
    MAX_SIG_BYTES,
    PROTOCOL_VERSION,
    DatagramHeader,
    decode_datagram,
    destination_tag,
    encode_datagram,
    encode_frame,
)
from gossip.config import lan
from gossip.core import HELD_MAX, InvalidArgument, Membership
from gossip.errors import DecodeError
from gossip.events import StateChanged
from gossip.messages import (
    Alive,
    MemberRecord,
    MemberState,
    PushPull,
    StateEntry,
    StateUpdate,
    StateValue,
)
from gossip.signing import CREDENTIAL_KEY, canonical_entry
from testbed.sim import TEST_AAD, Simulator, drain_events, make_keyring, seal, sent

A = ("10.0.0.1", 7946)
B = ("10.0.0.2", 7946)
C = ("10.0.0.3", 7946)
EVIL = ("10.0.0.66", 7946)
CLUSTER = lan().cluster_name


class Authority:
    """Issues credentials (a name -> a secret key); the trust anchor of the fakes."""

    def __init__(self) -> None:
        self.keys: dict[bytes, tuple[str, bytes]] = {}  # credential -> (owner, secret)
        self.calls: Counter[tuple[str, bytes]] = Counter()  # (owner, data) verified

    def issue(self, owner: str) -> FakeSigner:
        credential = b"cred:" + owner.encode() + b":" + bytes([len(self.keys)])
        secret = hashlib.sha256(credential + b"secret").digest()
        self.keys[credential] = (owner, secret)
        return FakeSigner(credential, secret)

    def verifier(self) -> FakeVerifier:
        return FakeVerifier(self)


class FakeSigner:
    def __init__(self, credential: bytes, secret: bytes) -> None:
        self._credential = credential
        self._secret = secret

    @property
    def credential(self) -> bytes:
        return self._credential

    def sign(self, data: bytes) -> bytes:
        return hmac.new(self._secret, data, hashlib.sha512).digest()  # 64 bytes, like P-256 r||s

    def entry(self, owner: str, key: str, version: int, value: StateValue, deleted: bool = False) -> StateUpdate:
        sig = self.sign(canonical_entry(CLUSTER, owner, key, version, value, deleted))
        return StateUpdate(owner, version, key, value, deleted, sig)


class FakeVerifier:
    def __init__(self, authority: Authority) -> None:
        self._authority = authority

    def verify(self, owner: str, credential: bytes, data: bytes, sig: bytes) -> bool:
        self._authority.calls[(owner, data)] += 1
        issued = self._authority.keys.get(credential)
        if issued is None or issued[0] != owner:
            return False
        return hmac.compare_digest(hmac.new(issued[1], data, hashlib.sha512).digest(), sig)


def make_core(authority: Authority | None, name: str = "a", addr: tuple[str, int] = A) -> Membership:
    kwargs: dict[str, Any] = {}
    if authority is not None:
        kwargs = {"signer": authority.issue(name), "verifier": authority.verifier()}
    return Membership(name, addr, lan(), random.Random(1), 0.0, keyring=make_keyring(random.Random(1)), **kwargs)


_counter = itertools.count()  # every datagram fresh to the receiver's anti-replay window


def sealed_raw(messages: list[list[Any]], key: bytes | None = None, to: str = "a") -> bytes:
    """A sealed datagram from raw wire arrays (what any cluster-key holder can send) to ``to``."""
    header = ["insider", 0, next(_counter), destination_tag(to)]
    plain = bytes((PROTOCOL_VERSION,)) + msgpack.packb([*header, *messages], use_bin_type=True)
    keys = [key] if key is not None else None
    ring = make_keyring(random.Random(2), keys) if keys else make_keyring(random.Random(2))
    return ring.encrypt(plain, TEST_AAD)


def sealed_frame(pp: PushPull) -> bytes:
    return make_keyring(random.Random(3)).encrypt(encode_frame(pp), TEST_AAD)


CLAIM_B = {"v": 1, "block": "10.99.1.0/28", "t": [5, 0], "id": "b-id"}
CLAIM_A = {"v": 1, "block": "10.99.0.0/28", "t": [3, 0], "id": "a-id"}


def with_signed_peer(core: Membership, b: FakeSigner) -> None:
    """``b`` is a member and ``core`` holds b's credential (v1) and address claim (v2)."""
    core.receive(seal([Alive("b", 1, B, b"")], to=core.name), B, 0.0)
    core.receive(seal([b.entry("b", CREDENTIAL_KEY, 1, b.credential), b.entry("b", "ipam", 2, CLAIM_B)], to=core.name), B, 0.1)
    assert core.state_of("b")["ipam"] == CLAIM_B
    drain_events(core)


# --- the defect of issue 14: another key holder rewrites an owner's state ----------


def forge_claims(core: Membership, count: int) -> None:
    """The insider's attack: StateUpdates about owner b claiming a's block, earlier in time."""
    for i in range(count):
        claim = {"v": 1, "block": CLAIM_A["block"], "t": [1, 0], "id": "evil"}
        core.receive(sealed_raw([[8, "b", 10 + i, "ipam", claim, False]]), EVIL, 1.0 + i)


def test_unsigned_state_about_another_owner_rewrote_it_without_a_verifier() -> None:
    core = make_core(None)
    core.receive(seal([Alive("b", 1, B, b""), StateUpdate("b", 2, "ipam", CLAIM_B)], to=core.name), B, 0.0)
    forge_claims(core, 38)
    assert core.state_of("b")["ipam"]["id"] == "evil"  # the defect, where nobody signs


def test_forged_state_about_another_owner_is_refused_and_counted() -> None:
    authority = Authority()
    core = make_core(authority)
    with_signed_peer(core, authority.issue("b"))
    forge_claims(core, 38)
    assert core.state_of("b")["ipam"] == CLAIM_B
    assert not [e for e in drain_events(core) if isinstance(e, StateChanged)]
    assert core.stats.state_forged == 38


def test_state_signed_by_another_members_key_is_refused() -> None:
    authority = Authority()
    core = make_core(authority)
    with_signed_peer(core, authority.issue("b"))
    evil = authority.issue("evil")  # a real member with a real credential of its own
    forged = evil.entry("b", "ipam", 9, {"v": 1, "block": CLAIM_A["block"], "t": [1, 0], "id": "evil"})
    core.receive(seal([forged], to=core.name), EVIL, 1.0)
    # ... nor by publishing its own credential as b's.
    core.receive(seal([evil.entry("b", CREDENTIAL_KEY, 10, evil.credential), forged], to=core.name), EVIL, 2.0)
    assert core.state_of("b")["ipam"] == CLAIM_B
    assert core.state_of("b")[CREDENTIAL_KEY] != evil.credential
    assert core.stats.state_forged == 3


def test_a_replayed_entry_from_another_cluster_does_not_verify() -> None:
    authority = Authority()
    core = make_core(authority)
    b = authority.issue("b")
    with_signed_peer(core, b)
    sig = b.sign(canonical_entry("other-cluster", "b", "ipam", 7, {"x": 1}, False))
    core.receive(seal([StateUpdate("b", 7, "ipam", {"x": 1}, False, sig)], to=core.name), EVIL, 1.0)
    assert core.state_of("b")["ipam"] == CLAIM_B and core.stats.state_forged == 1


def test_a_genuine_update_still_applies_and_spreads_signed() -> None:
    authority = Authority()
    core = make_core(authority)
    b = authority.issue("b")
    with_signed_peer(core, b)
    core.receive(seal([Alive("c", 1, C, b"")], to=core.name), C, 0.5)  # someone to relay it to
    newer = b.entry("b", "ipam", 3, {"v": 1, "block": "10.99.2.0/28", "t": [6, 0], "id": "b-id"})
    core.receive(seal([newer], to=core.name), B, 1.0)
    assert core.state_of("b")["ipam"]["block"] == "10.99.2.0/28"
    core.handle_timeout(2.0)
    relayed = [m for _, msgs in sent(core) for m in msgs if isinstance(m, StateUpdate) and m.owner == "b"]
    assert newer in relayed  # forwarded with its signature


def test_the_forged_push_pull_map_of_another_owner_is_refused() -> None:
    authority = Authority()
    core = make_core(authority)
    with_signed_peer(core, authority.issue("b"))
    forged = (StateEntry("ipam", 50, {"v": 1, "block": CLAIM_A["block"], "t": [1, 0], "id": "evil"}, sig=bytes(64)),)
    members = (MemberRecord("evil", EVIL, 1, MemberState.ALIVE, b""),)
    core.handle_stream(sealed_frame(PushPull("evil", False, False, members, (("b", forged),))), EVIL, 1.0)
    assert core.state_of("b")["ipam"] == CLAIM_B and core.stats.state_forged == 1


# --- credentials: known, unknown, held ---------------------------------------------


def test_entries_before_the_owners_credential_are_held_then_applied() -> None:
    authority = Authority()
    core = make_core(authority)
    b = authority.issue("b")
    core.receive(seal([Alive("b", 1, B, b""), b.entry("b", "ipam", 2, CLAIM_B)], to=core.name), B, 0.0)
    assert "ipam" not in core.state_of("b") and core.stats.state_unverified == 1
    core.receive(seal([b.entry("b", CREDENTIAL_KEY, 1, b.credential)], to=core.name), B, 0.5)
    assert core.state_of("b")["ipam"] == CLAIM_B
    assert core.stats.state_forged == 0


def test_held_entries_are_bounded() -> None:
    authority = Authority()
    core = make_core(authority)
    b = authority.issue("b")
    core.receive(seal([Alive("b", 1, B, b"")], to=core.name), B, 0.0)
    for version in range(2, 2 + 3 * HELD_MAX):
        core.receive(seal([b.entry("b", f"k{version}", version, version)], to=core.name), B, 0.1)
    assert len(core._held) == HELD_MAX and core.stats.state_unverified == 3 * HELD_MAX
    core.receive(seal([b.entry("b", CREDENTIAL_KEY, 1, b.credential)], to=core.name), B, 0.5)
    assert len(core.state_of("b")) == 1 + HELD_MAX  # the newest ones; the rest by anti-entropy


def test_a_push_pull_map_is_verified_with_the_credential_it_carries() -> None:
    authority = Authority()
    core = make_core(authority)
    c = authority.issue("c")
    entries = tuple(
        StateEntry(u.key, u.version, u.value, u.deleted, u.sig)
        for u in (c.entry("c", "ipam", 2, CLAIM_B), c.entry("c", CREDENTIAL_KEY, 1, c.credential))
    )
    members = (MemberRecord("c", C, 1, MemberState.ALIVE, b""),)
    core.handle_stream(sealed_frame(PushPull("c", True, False, members, (("c", entries),))), C, 1.0)
    assert core.state_of("c") == {"ipam": CLAIM_B, CREDENTIAL_KEY: c.credential}


def test_a_map_without_a_known_credential_is_dropped_and_counted() -> None:
    authority = Authority()
    core = make_core(authority)
    c = authority.issue("c")
    u = c.entry("c", "ipam", 2, CLAIM_B)
    members = (MemberRecord("c", C, 1, MemberState.ALIVE, b""),)
    entries = (StateEntry(u.key, u.version, u.value, u.deleted, u.sig),)
    core.handle_stream(sealed_frame(PushPull("c", True, False, members, (("c", entries),))), C, 1.0)
    assert core.state_of("c") == {} and core.stats.state_unverified == 1


def test_each_version_is_verified_once() -> None:
    authority = Authority()
    core = make_core(authority)
    b = authority.issue("b")
    with_signed_peer(core, b)
    update = b.entry("b", "svc", 3, {"port": 5683})
    for t in (1.0, 1.1, 1.2):
        core.receive(seal([update], to=core.name), B, t)
    entries = tuple(StateEntry(e.key, e.version, e.value, e.deleted, e.sig) for e in core._store.entries("b"))
    members = (MemberRecord("b", B, 1, MemberState.ALIVE, b""),)
    core.handle_stream(sealed_frame(PushPull("b", False, False, members, (("b", entries),))), B, 2.0)
    data = canonical_entry(CLUSTER, "b", "svc", 3, {"port": 5683}, False)
    assert authority.calls[("b", data)] == 1
    assert all(n == 1 for n in authority.calls.values())


# --- our own state: re-asserted only against entries we signed ---------------------


def test_forged_entries_about_us_do_not_make_us_restamp() -> None:
    authority = Authority()
    core = make_core(authority)
    core.set_state("ipam", CLAIM_A, 0.0)
    version = core._store.version
    evil = authority.issue("evil")
    forged = [
        [8, "a", version + 100, "ipam", {"x": 1}, False],  # unsigned
        [8, "a", version + 200, "ipam", {"x": 1}, False, bytes(64)],  # a bad signature
        [8, "a", version + 300, "gone", 1, False, evil.entry("a", "gone", version + 300, 1).sig],
    ]
    core.receive(sealed_raw(forged), EVIL, 1.0)
    assert core._store.version == version and core.state_of("a")["ipam"] == CLAIM_A
    assert core.stats.state_forged == 3


def test_our_own_earlier_life_still_makes_us_restamp() -> None:
    authority = Authority()
    core = make_core(authority)
    signer = core._signer
    assert isinstance(signer, FakeSigner)
    core.receive(seal([Alive("b", 1, B, b"")], to=core.name), B, 0.0)
    old = signer.entry("a", "ipam", 40, {"old": True})  # what we said before a restart
    core.receive(seal([old], to=core.name), B, 1.0)
    assert core._store.version > 40 and core.state_of("a") == {CREDENTIAL_KEY: signer.credential}


def test_the_credential_key_is_reserved() -> None:
    core = make_core(Authority())
    with pytest.raises(InvalidArgument):
        core.set_state(CREDENTIAL_KEY, b"mine", 0.0)
    with pytest.raises(InvalidArgument):
        core.delete_state(CREDENTIAL_KEY, 0.0)


# --- wire ---------------------------------------------------------------------------


def test_signature_travels_at_the_end_and_unsigned_bytes_are_unchanged() -> None:
    unsigned = StateUpdate("b", 2, "k", 1)
    signed = StateUpdate("b", 2, "k", 1, sig=bytes(range(64)))
    head = DatagramHeader("s", 1, 1, destination_tag("a"))
    wire_head = ["s", 1, 1, destination_tag("a")]
    assert decode_datagram(encode_datagram([signed], head)) == (head, [signed])
    assert len(encode_datagram([signed], head)) - len(encode_datagram([unsigned], head)) == 66  # bin8 + 64
    assert msgpack.unpackb(encode_datagram([unsigned], head)[1:]) == [*wire_head, [8, "b", 2, "k", 1, False]]
    too_long = [*wire_head, [8, "b", 2, "k", 1, False, bytes(MAX_SIG_BYTES + 1)]]
    with pytest.raises(DecodeError):
        decode_datagram(bytes((PROTOCOL_VERSION,)) + msgpack.packb(too_long))
    with pytest.raises(DecodeError):
        decode_datagram(bytes((PROTOCOL_VERSION,)) + msgpack.packb([*wire_head, [8, "b", 2, "k", 1, False, "not bytes"]]))


# --- a signed cluster in the simulator ----------------------------------------------


def test_a_signed_cluster_converges_and_refuses_an_insider() -> None:
    authority = Authority()

    def factory(*args: Any, **kwargs: Any) -> Membership:
        return Membership(*args, signer=authority.issue(args[0]), verifier=authority.verifier(), **kwargs)

    sim = Simulator(41, lan(), loss=0.05, core_factory=factory)
    names = sim.converge_cluster(6, width=1)
    sim.call("n2", lambda m, now: m.set_state("ipam", CLAIM_B, now))
    assert sim.wait_for(lambda: all(sim.nodes[n].core.state_of("n2").get("ipam") == CLAIM_B for n in names), 10.0)
    late = sim.add_node("late", join=["n0"]).core
    sim.run_for(1.0)
    assert late.state_of("n2").get("ipam") == CLAIM_B  # by push-pull, with n2's credential
    target = sim.nodes["n0"]
    claim = {"v": 1, "block": CLAIM_A["block"], "t": [1, 0], "id": "evil"}
    for i in range(38):
        forged = sealed_raw([[8, "n2", 100 + i, "ipam", claim, False]], sim.key, to="n0")
        sim.schedule(sim.now + 0.1 * i, lambda forged=forged: target.core.receive(forged, EVIL, sim.now))
    sim.run_for(5.0)
    assert all(sim.nodes[n].core.state_of("n2")["ipam"] == CLAIM_B for n in names)
    assert sum(sim.nodes[n].core.stats.state_forged for n in names) == 38


# --- credentials travel by push-pull and on demand, not by gossip (issue 13) -------


def _updates(core: Membership) -> list[StateUpdate]:
    return [m for _, msgs in sent(core) for m in msgs if isinstance(m, StateUpdate)]


def test_a_rebroadcast_entry_keeps_its_signature() -> None:
    authority = Authority()
    core = make_core(authority)
    core.receive(seal([Alive("b", 1, B, b"")], to=core.name), B, 0.0)
    core.set_state("ipam", CLAIM_A, 0.0)
    core.handle_timeout(1.0)
    first = [u for u in _updates(core) if u.key == "ipam"]
    for t in range(2, 30):  # until the queue has forgotten it
        core.handle_timeout(float(t))
        sent(core)
    core.rebroadcast_state("ipam", 30.0)
    core.handle_timeout(31.0)
    again = [u for u in _updates(core) if u.key == "ipam"]
    assert first and again and again[0] == first[0]
    u = again[0]
    data = canonical_entry(CLUSTER, "a", "ipam", u.version, u.value, u.deleted)
    assert authority.verifier().verify("a", core.state_of("a")[CREDENTIAL_KEY], data, u.sig)  # type: ignore[arg-type]


def test_the_credential_is_not_gossiped_nor_relayed() -> None:
    authority = Authority()
    core = make_core(authority)
    core.receive(seal([Alive("b", 1, B, b"")], to=core.name), B, 0.0)
    core.set_state("ipam", CLAIM_A, 0.0)
    b = authority.issue("b")
    core.receive(seal([b.entry("b", CREDENTIAL_KEY, 1, b.credential)], to=core.name), B, 0.1)
    assert core.state_of("b") == {CREDENTIAL_KEY: b.credential}  # taken from an older peer
    core.handle_timeout(1.0)
    keys = [u.key for u in _updates(core)]
    assert "ipam" in keys and CREDENTIAL_KEY not in keys


def test_an_unknown_credential_is_fetched_from_its_owner_and_held_entries_are_not_regossiped() -> None:
    """The fetch's answer brought the held claim too: every member that lacked b's credential
    asks b itself, so gossiping the claim on only repeated it (issue 13)."""
    authority = Authority()
    a = make_core(authority)
    b = make_core(authority, "b", B)
    b.set_state("ipam", CLAIM_B, 0.0)
    a.receive(seal([Alive("b", 1, B, b"")], to=a.name), B, 0.0)
    b.receive(seal([Alive("a", 1, A, b"")], to=b.name), A, 0.0)
    b.handle_timeout(1.0)
    for _, msgs in sent(b):
        a.receive(seal(msgs, to=a.name), B, 1.0)
    assert "ipam" not in a.state_of("b") and a.stats.state_unverified >= 1
    (dst, frame), = a.streams_to_send()
    assert dst == B
    a.receive(seal([b._store.local_update("ipam")], to=a.name), B, 1.5)  # type: ignore[list-item]
    assert a.streams_to_send() == []  # one request per owner at a time
    reply = b.handle_stream(frame, A, 1.1)
    assert reply is not None
    a.receive_stream_reply(reply, B, 1.2)
    assert a.state_of("b") == {"ipam": CLAIM_B, CREDENTIAL_KEY: b.state_of("b")[CREDENTIAL_KEY]}
    a.handle_timeout(2.0)
    assert not [u for u in _updates(a) if u.owner == "b"]


def test_a_member_learnt_without_its_credential_is_asked_for_its_map_at_once() -> None:
    """Issue 13: waiting for the member's first state update to ask made every member hold,
    fetch and then re-gossip every claim of a cold start, a second after membership had
    converged (N = 50, simulator: state complete 9.8 s after membership; now with it)."""
    authority = Authority()
    core = make_core(authority)
    core.receive(seal([Alive("b", 1, B, b"")], to=core.name), B, 0.0)
    (dst, _frame), = core.streams_to_send()
    assert dst == B
    core.receive(seal([Alive("b", 1, B, b"")], to=core.name), B, 0.1)
    assert core.streams_to_send() == []  # known now: asked once, not per Alive heard


def test_a_member_whose_credential_came_in_the_same_push_pull_is_not_asked() -> None:
    authority = Authority()
    core = make_core(authority)
    c = authority.issue("c")
    cred = c.entry("c", CREDENTIAL_KEY, 1, c.credential)
    entries = (StateEntry(cred.key, cred.version, cred.value, cred.deleted, cred.sig),)
    members = (MemberRecord("c", C, 1, MemberState.ALIVE, b""), MemberRecord("d", EVIL, 1, MemberState.ALIVE, b""))
    core.handle_stream(sealed_frame(PushPull("c", True, False, members, (("c", entries),))), C, 1.0)
    assert [dst for dst, _ in core.streams_to_send()] == [EVIL]  # d's credential did not come


def test_without_a_verifier_nobody_is_asked_for_a_credential() -> None:
    core = make_core(None)
    core.receive(seal([Alive("b", 1, B, b"")], to=core.name), B, 0.0)
    assert core.streams_to_send() == []


def test_credential_requests_are_rate_limited_and_retried() -> None:
    authority = Authority()
    core = make_core(authority)
    b = authority.issue("b")
    core.receive(seal([Alive("b", 1, B, b"")], to=core.name), B, 0.0)
    for i, t in enumerate((0.1, 0.5, 1.9, 2.2, 2.3)):
        core.receive(seal([b.entry("b", f"k{i}", 2 + i, i)], to=core.name), B, t)
    requests = core.streams_to_send()
    assert [dst for dst, _ in requests] == [B, B]  # at 0.1 and again at 2.2, not in between
