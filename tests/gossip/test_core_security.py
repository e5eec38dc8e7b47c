"""Sealing through the core: keyring rotation across members, other clusters rejected."""

from __future__ import annotations

import random

from gossip.codec import DatagramHeader, encode_datagram
from gossip.config import lan
from gossip.core import Membership
from gossip.events import MemberFailed, MemberSuspected
from gossip.messages import Alive
from testbed.sim import Simulator, make_keyring, seal

SRC = ("10.0.9.9", 7946)
NEW_KEY = bytes(range(100, 132))


def make_core(cluster: str = "edgeagent", host: str = "10.0.0.1") -> Membership:
    return Membership("a", (host, 7946), lan(cluster_name=cluster), random.Random(1), 0.0,
                      keyring=make_keyring(random.Random(1)))


def test_datagram_from_another_cluster_is_rejected_and_counted() -> None:
    core = make_core()
    core.receive(seal([Alive("intruder", 1, SRC, b"")], aad=b"other-cluster", to=core.name), SRC, 0.0)
    assert core.member("intruder") is None
    assert core.stats.decrypt_errors == 1


def test_datagram_under_an_unknown_key_is_rejected_and_counted() -> None:
    core = make_core()
    stranger = make_keyring(random.Random(5), keys=[NEW_KEY])
    core.receive(seal([Alive("intruder", 1, SRC, b"")], keyring=stranger, to=core.name), SRC, 0.0)
    plain = encode_datagram([Alive("plain", 1, SRC, b"")], DatagramHeader("plain", 1, 0, 0))
    core.receive(plain, SRC, 0.0)  # not sealed at all
    assert core.member("intruder") is None and core.member("plain") is None
    assert core.stats.decrypt_errors == 2


def test_push_pull_from_another_cluster_gets_no_reply() -> None:
    ours, theirs = make_core(), make_core("other", "10.0.0.2")
    theirs.join([ours.addr], 0.0)
    (_, frame), = theirs.streams_to_send()
    assert ours.handle_stream(frame, theirs.addr, 0.0) is None
    assert ours.stats.decrypt_errors == 1 and len(ours.members()) == 1


def test_two_clusters_sharing_a_key_never_merge() -> None:
    sim = Simulator(31, lan())
    sim.add_node("a1")
    sim.add_node("b1", config=lan(cluster_name="other"), join=["a1"])
    sim.run_for(30.0)
    a1, b1 = sim.nodes["a1"].core, sim.nodes["b1"].core
    assert [m.name for m in a1.members()] == ["a1"]
    assert [m.name for m in b1.members()] == ["b1"]
    assert a1.stats.decrypt_errors >= 1


def test_key_rotation_install_use_remove_keeps_the_cluster_whole() -> None:
    sim = Simulator(32, lan(), record_events=True)
    names = sim.converge_cluster(5, width=1)
    rings = {n: sim.nodes[n].keyring for n in names}
    for ring in rings.values():
        ring.install(NEW_KEY)
    sim.run_for(3.0)
    for name in names:  # one member at a time, as an operator would
        rings[name].use(NEW_KEY)
        sim.run_for(2.0)
    for ring in rings.values():
        ring.remove(sim.key)
    sim.run_for(30.0)
    assert sim.converged(names)
    for name in names:
        assert sim.nodes[name].core.stats.decrypt_errors == 0
        assert not sim.events_of(name, MemberSuspected) and not sim.events_of(name, MemberFailed)
    old = make_keyring(random.Random(9), keys=[sim.key])
    n0 = sim.nodes["n0"].core
    n0.receive(seal([Alive("late", 1, SRC, b"")], keyring=old, to=n0.name), SRC, sim.now)
    assert n0.stats.decrypt_errors == 1
