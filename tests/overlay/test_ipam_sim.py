"""Address allocation on the simulator: real gossip cores, partitions, churn, many seeds.

The property (issue 4): after convergence no two running nodes hold the same block,
every running node holds exactly one, and no node changed its block without losing
a conflict (``IpamMesh`` records a violation for any other change).
"""

from __future__ import annotations

import pytest

from gossip.config import preset
from overlay.ipam import Renumbered
from testbed.ipam_mesh import IpamMesh, one_run, prefix_for, start_index
from testbed.sim import Simulator

SEEDS = range(20)
SETTLE_TIMEOUT = 150.0  # virtual seconds: covers SWIM's reconnect and a push-pull round


def scenario(seed: str, nodes: int, **overrides: float) -> None:
    params: dict[str, float] = dict(quarantine_s=4.0, probes=0, churn=6, partition_s=15.0, cycles=1)
    params.update(overrides)
    result = one_run(
        seed,
        nodes,
        preset("lan"),
        prefix=prefix_for(nodes),
        block_prefixlen=28,
        quarantine_s=params["quarantine_s"],
        probes=int(params["probes"]),
        churn=int(params["churn"]),
        partition_s=params["partition_s"],
        settle_timeout=SETTLE_TIMEOUT,
        cycles=int(params["cycles"]),
    )
    assert result.settled, f"seed {seed}: did not converge in {SETTLE_TIMEOUT} s"
    assert result.duplicates == 0
    assert result.unclaimed == 0
    assert result.violations == []


@pytest.mark.parametrize("seed", SEEDS)
def test_no_duplicate_blocks_after_partitions_and_churn_at_50_nodes(seed: int) -> None:
    scenario(f"prop:{seed}", 50, cycles=1 + seed % 2)


@pytest.mark.slow
@pytest.mark.parametrize("nodes", [100, 200])
def test_no_duplicate_blocks_after_partitions_and_churn_at_scale(nodes: int) -> None:
    scenario(f"scale:{nodes}", nodes, churn=10, cycles=1)


def twin_ids(num_blocks: int, avoid: set[int]) -> tuple[str, str]:
    """Two node names whose hash start is the same block, not one in ``avoid``."""
    seen: dict[int, str] = {}
    for i in range(10_000):
        name = f"t{i}"
        start = start_index(f"id-{name}", num_blocks)
        if start in avoid:
            continue
        if start in seen:
            return seen[start], name
        seen[start] = name
    raise AssertionError("no twins")


def held(mesh: IpamMesh) -> set[int]:
    return {a.claim.index for a in mesh.allocs.values() if a.claim is not None}


def small_mesh(seed: str, quarantine_s: float = 600.0) -> IpamMesh:
    sim = Simulator(seed, preset("lan"))
    mesh = IpamMesh(sim, prefix="10.99.0.0/24", quarantine_s=quarantine_s)
    for i in range(6):
        mesh.add(f"n{i}", [f"n{j}" for j in range(i)][:2])
        sim.run_for(0.05)
    assert mesh.run_until_settled(60.0)
    return mesh


def test_same_block_claimed_on_both_sides_of_partition_is_resolved_by_claim_order() -> None:
    mesh = small_mesh("twins")
    sim = mesh.sim
    a, b = twin_ids(16, held(mesh))
    sim.partition([["n0", "n1", "n2"], ["n3", "n4", "n5"]])
    sim.run_for(30.0)  # each side declares the other dead
    mesh.add(a, ["n0"], lambda name: setattr(sim.nodes[name], "group", sim.nodes["n0"].group))
    sim.run_for(1.0)
    mesh.add(b, ["n3"], lambda name: setattr(sim.nodes[name], "group", sim.nodes["n3"].group))
    sim.run_for(5.0)
    assert mesh.allocs[a].block == mesh.allocs[b].block  # the race really happened
    sim.heal()
    assert mesh.run_until_settled(120.0)
    assert mesh.duplicates() == [] and mesh.violations == []
    renumbered = [(name, ev) for _, name, ev in mesh.events if isinstance(ev, Renumbered)]
    assert [(name, ev.because) for name, ev in renumbered] == [(b, a)]  # a claimed first


def test_restart_within_quarantine_keeps_block_in_simulation() -> None:
    mesh = small_mesh("restart")
    before = mesh.allocs["n4"].block
    mesh.crash("n4")
    mesh.sim.run_for(20.0)
    mesh.restart("n4", join=["n0"])
    assert mesh.run_until_settled(60.0)
    assert mesh.allocs["n4"].block == before
    assert mesh.duplicates() == [] and mesh.violations == []


def test_node_joining_during_quarantine_does_not_take_dead_owners_block() -> None:
    mesh = small_mesh("quarantine", quarantine_s=600.0)
    sim = mesh.sim
    victim = mesh.allocs["n2"].claim
    assert victim is not None
    mesh.crash("n2")
    sim.run_for(30.0)  # declared dead everywhere, quarantine running
    newcomer = next(f"e{i}" for i in range(100_000) if start_index(f"id-e{i}", 16) == victim.index)
    mesh.add(newcomer, ["n0"])
    sim.run_for(5.0)
    assert mesh.allocs[newcomer].block != victim.block


def test_owner_restarting_after_its_block_was_retaken_moves_not_the_newcomer() -> None:
    mesh = small_mesh("retaken", quarantine_s=600.0)
    sim = mesh.sim
    victim = mesh.allocs["n2"].claim
    assert victim is not None
    mesh.crash("n2")
    sim.run_for(30.0)
    newcomer = next(f"e{i}" for i in range(100_000) if start_index(f"id-e{i}", 16) == victim.index)
    mesh.add(newcomer, ["n0"])
    sim.run_for(5.0)
    taken = mesh.allocs[newcomer].block
    mesh.restart("n2", join=["n1"])
    assert mesh.run_until_settled(60.0)
    assert mesh.duplicates() == [] and mesh.violations == []
    assert mesh.allocs[newcomer].block == taken  # the newcomer was not renumbered
    moved = {name for _, name, ev in mesh.events if isinstance(ev, Renumbered)}
    assert newcomer not in moved
