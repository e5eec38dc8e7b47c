"""A second address claiming our name is reported once, not refuted; accusations still are."""

from __future__ import annotations

import random

from gossip.codec import encode_frame
from gossip.config import lan
from gossip.core import Membership
from gossip.events import NameConflict
from gossip.messages import Alive, Dead, MemberRecord, MemberState, PushPull, Suspect
from testbed.sim import TEST_AAD, drain_events, make_keyring, seal, sent

ME = ("10.0.0.1", 7946)
OTHER = ("10.0.0.2", 7946)
THIRD = ("10.0.0.3", 7946)


def make_core() -> Membership:
    core = Membership("a", ME, lan(), random.Random(1), 0.0, keyring=make_keyring(random.Random(2)),
                      incarnation=3, meta=b"mine")
    core.receive(seal([Alive("p1", 1, ("10.0.1.1", 7946), b"")], to=core.name), ("10.0.1.1", 7946), 0.0)
    sent(core)
    drain_events(core)
    return core


def test_alive_about_our_name_from_another_address_is_reported_once_and_not_refuted() -> None:
    core = make_core()
    for inc in (3, 4, 9):
        core.receive(seal([Alive("a", inc, OTHER, b"theirs")], to=core.name), OTHER, 1.0)
    assert drain_events(core) == [NameConflict("a", OTHER, 3, b"theirs")]
    assert core.incarnation == 3 and core.stats.refutes == 0
    assert core.local_member.addr == ME and core.local_member.meta == b"mine"
    core.receive(seal([Alive("a", 5, THIRD, b"")], to=core.name), THIRD, 2.0)
    assert drain_events(core) == [NameConflict("a", THIRD, 5, b"")]


def test_conflicting_record_in_a_push_pull_is_reported_too() -> None:
    core = make_core()
    remote = PushPull("b", True, False, (MemberRecord("a", OTHER, 7, MemberState.ALIVE, b"x"),), ())
    core.handle_stream(make_keyring(random.Random(0)).encrypt(encode_frame(remote), TEST_AAD), OTHER, 1.0)
    assert [e for e in drain_events(core) if isinstance(e, NameConflict)] == [
        NameConflict("a", OTHER, 7, b"x")
    ]
    assert core.incarnation == 3


def test_accusations_and_an_earlier_life_at_our_address_are_still_refuted() -> None:
    core = make_core()
    core.receive(seal([Suspect("a", 3, "p1")], to=core.name), OTHER, 1.0)
    assert core.incarnation == 4
    core.receive(seal([Dead("a", 4, "p1")], to=core.name), OTHER, 1.0)
    assert core.incarnation == 5
    core.receive(seal([Alive("a", 5, ME, b"old life")], to=core.name), OTHER, 1.0)
    assert core.incarnation == 6 and core.stats.refutes == 3
    assert not [e for e in drain_events(core) if isinstance(e, NameConflict)]

