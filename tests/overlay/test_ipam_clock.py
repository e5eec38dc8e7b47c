"""A node whose wall clock is far behind (a Pi with no RTC booting in 1970) never evicts a
long-standing address holder: after a restart, nor after a heal. Unit tests on synthetic
claims, then the simulator on virtual time with seeds."""

from __future__ import annotations

import ipaddress

import pytest

from gossip.config import preset
from gossip.messages import MemberState
from overlay.hlc import HybridClock, Timestamp
from overlay.ipam import Allocator, Renumbered
from testbed.ipam_mesh import IpamMesh, start_index, twin_name
from testbed.sim import Simulator
from tests.overlay.test_ipam import Net, colliding_ids, start_of

PREFIX = "10.99.0.0/24"
Q = 30.0
WALL_2026 = 1_780_000_000.0  # wall-clock offset of a node whose clock is right
SEEDS = range(5)


def block_of(node_id: str) -> str:
    return str(ipaddress.ip_network(f"10.99.0.{start_of(node_id, PREFIX) * 16}/28"))


def claim(block: str, wall_s: float, node_id: str) -> dict[str, object]:
    return {"v": 1, "block": block, "t": [int(wall_s * 1000), 0], "id": node_id}


def test_restarted_1970_node_yields_to_the_holder_that_took_its_block() -> None:
    old_id, holder_id = colliding_ids(2, PREFIX)
    first = Allocator("old", old_id, PREFIX, 28, Q, 0.0, wall_offset=WALL_2026)
    first.synced(0.0)
    first.handle_timeout(0.0)
    saved = first.state_to_persist()
    block = str(first.block)
    # old died; an hour later holder took the block (quarantine over); old boots in 1970.
    back = Allocator("old", old_id, PREFIX, 28, Q, 5.0, persisted=saved, wall_offset=0.0)
    assert str(back.block) == block  # at once, provisionally
    back.on_member("holder", MemberState.ALIVE, 5.0)
    back.on_claim("holder", claim(block, WALL_2026 + 3600, holder_id), 5.0)
    back.handle_timeout(5.0)
    assert back.block is not None and str(back.block) != block
    events = []
    while (event := back.next_event()) is not None:
        events.append(event)
    assert [e.because for e in events if isinstance(e, Renumbered)] == ["holder"]


def test_restarted_1970_node_without_rival_keeps_its_block_restamped_after_the_mesh() -> None:
    a = Allocator("a", "id-a", PREFIX, 28, Q, 0.0, wall_offset=WALL_2026)
    a.synced(0.0)
    a.handle_timeout(0.0)
    saved, block = a.state_to_persist(), a.block
    back = Allocator("a", "id-a", PREFIX, 28, Q, 5.0, persisted=saved, wall_offset=0.0)
    back.claim_to_publish()
    for i, peer in enumerate(("p", "q")):  # two peers corroborate: the clock jumps a day on
        back.on_member(peer, MemberState.ALIVE, 5.0)
        back.on_claim(peer, claim(f"10.99.0.{224 + 16 * i}/28", WALL_2026 + 86_400 * 2, peer), 5.0)
    back.synced(5.0)
    back.handle_timeout(5.0)
    assert back.block == block
    assert back.claim is not None and back.claim.time > Timestamp(int((WALL_2026 + 172_800) * 1000), 0)
    assert back.claim_to_publish() is not None  # re-published with the fresh stamp


def test_1970_node_taking_a_dead_owners_block_loses_it_when_the_owner_comes_back() -> None:
    """After a heal the owner, alive all along, keeps the block it held first."""
    owner_id, pi_id = colliding_ids(2, PREFIX)
    block = block_of(owner_id)
    pi = Allocator("pi", pi_id, PREFIX, 28, Q, 0.0, revive_grace_s=1.0, wall_offset=0.0)
    pi.on_claim("owner", claim(block, WALL_2026, owner_id), 0.0)
    pi.on_member("owner", MemberState.DEAD, 0.0)  # the other side of a partition
    pi.synced(Q + 1)
    pi.handle_timeout(Q + 1)
    assert str(pi.block) == block  # quarantine over: it took the block, stamped after the owner's
    assert pi.claim is not None and pi.claim.time > Timestamp(int(WALL_2026 * 1000), 0)
    pi.on_member("owner", MemberState.ALIVE, 100.0)  # heal: the owner was alive all along
    pi.handle_timeout(101.0)
    assert pi.block is not None and str(pi.block) != block


def heal_after_overlap(b_clock: HybridClock, side_two_at: float) -> Net:
    """a claims at 0 on one side; r and s claim at ``side_two_at`` on the other side; at 3600 a
    new node b whose wall clock says 1970 joins that side and claims a's block; then heal."""
    ids = colliding_ids(2, PREFIX)
    net = Net()
    net.groups = [{"a", "p", "q"}, {"b", "r", "s"}]
    net.add("a", 0.0, prefix=PREFIX, node_id=ids[0], wall_offset=WALL_2026)
    for name, at in (("p", 0.0), ("q", 0.0), ("r", side_two_at), ("s", side_two_at)):
        net.add(name, at, prefix=PREFIX, wall_offset=WALL_2026)
    for name in ("a", "p", "q", "r", "s"):
        at = 0.0 if name in "apq" else side_two_at
        net.introduce(name, at)
        net.run(at)
    net.add("b", 3600.0, prefix=PREFIX, node_id=ids[1], wall_offset=-3600.0, clock=b_clock)
    net.introduce("b", 3600.0)
    net.run(3600.0)
    assert net.nodes["a"].block == net.nodes["b"].block  # the overlap really happened
    net.groups = None
    for x, y in (("a", "b"), ("b", "a")):
        net.nodes[x].on_member(y, MemberState.ALIVE, 3700.0)
    net.resync(3700.0)
    net.run(3700.0)
    return net


def assert_b_moved_not_a(net: Net) -> None:
    assert net.nodes["a"].block != net.nodes["b"].block
    assert not [e for e in net.events["a"] if isinstance(e, Renumbered)]
    assert [e.because for e in net.events["b"] if isinstance(e, Renumbered)] == ["a"]


def test_1970_node_pulled_forward_by_its_side_loses_the_overlap_to_the_earlier_holder() -> None:
    clock = HybridClock()
    assert_b_moved_not_a(heal_after_overlap(clock, side_two_at=1800.0))
    assert clock.stats["jumps"] >= 1  # r and s pulled b's clock forward (two sources)


def test_1970_node_anchored_at_enrollment_loses_the_overlap_to_the_earlier_holder() -> None:
    clock = HybridClock()
    clock.restore(Timestamp(int((WALL_2026 + 3590) * 1000), 0), 0.0)  # the issuer's time
    assert_b_moved_not_a(heal_after_overlap(clock, side_two_at=0.0))


# ---- the simulator ----------------------------------------------------------------------


def mesh_of_six(seed: str) -> IpamMesh:
    sim = Simulator(seed, preset("lan"))
    mesh = IpamMesh(sim, prefix=PREFIX, quarantine_s=Q, wall_offset=WALL_2026)
    for i in range(6):
        mesh.add(f"n{i}", [f"n{j}" for j in range(i)][:2])
        sim.run_for(0.05)
    assert mesh.run_until_settled(60.0)
    return mesh


@pytest.mark.parametrize("seed", SEEDS)
def test_sim_owner_rebooting_in_1970_after_its_block_was_taken_moves_not_the_holder(
    seed: int,
) -> None:
    mesh = mesh_of_six(f"clock-restart:{seed}")
    sim = mesh.sim
    victim = mesh.allocs["n2"].claim
    assert victim is not None
    mesh.leave("n2")  # shut down (a joiner would see a crashed owner's block quarantined)
    sim.run_for(10.0)
    holder = next(f"h{i}" for i in range(100_000) if start_index(f"id-h{i}", 16) == victim.index)
    mesh.add(holder, ["n0"])
    sim.run_for(60.0)  # a long-standing holder by now
    assert mesh.allocs[holder].block == victim.block
    mesh.wall_offsets["n2"] = 0.0  # no RTC: it boots in 1970
    mesh.restart("n2", join=["n1"])
    assert mesh.run_until_settled(60.0)
    assert mesh.duplicates() == [] and mesh.violations == []
    assert mesh.allocs[holder].block == victim.block
    moved = [(name, ev.because) for _, name, ev in mesh.events if isinstance(ev, Renumbered)]
    assert moved == [("n2", holder)]


@pytest.mark.parametrize("seed", SEEDS)
def test_sim_1970_node_claiming_in_a_partition_loses_to_the_holder_at_heal(seed: int) -> None:
    mesh = mesh_of_six(f"clock-heal:{seed}")
    sim = mesh.sim
    held = {a.claim.index for a in mesh.allocs.values() if a.claim is not None}
    a = next(f"a{i}" for i in range(100_000) if start_index(f"id-a{i}", 16) not in held)
    b = twin_name(a, 16, set(mesh.allocs) | {a, "c0", "c1"}, "b")
    sim.partition([["n0", "n1", "n2"], ["n3", "n4", "n5"]])
    sim.run_for(30.0)
    mesh.add(a, ["n0"], lambda name: setattr(sim.nodes[name], "group", sim.nodes["n0"].group))
    sim.run_for(60.0)
    for name in ("c0", "c1"):  # newcomers on the other side claim after a did
        mesh.add(name, ["n3"], lambda n: setattr(sim.nodes[n], "group", sim.nodes["n3"].group))
    sim.run_for(60.0)  # a has held its block for two minutes
    mesh.wall_offsets[b] = 0.0  # no RTC, no NTP: its clock says 1970
    mesh.add(b, ["n3"], lambda name: setattr(sim.nodes[name], "group", sim.nodes["n3"].group))
    sim.run_for(5.0)
    assert mesh.allocs[a].block == mesh.allocs[b].block  # the race really happened
    sim.heal()
    assert mesh.run_until_settled(120.0)
    assert mesh.duplicates() == [] and mesh.violations == []
    renumbered = [(name, ev.because) for _, name, ev in mesh.events if isinstance(ev, Renumbered)]
    assert renumbered == [(b, a)]
