"""Owner-signed state in the agent: the signer and verifier from the state dir, real agents."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest

from edgeagent.errors import ConfigError
from edgeagent.features.addresses import Addresses
from edgeagent.logs import FIELDS_ATTR
from edgeagent.onboarding import CA_CERT_FILE, new_ca, provision_member
from edgeagent.persist import load_identity
from edgeagent.state_signing import ForgedStateLog, load_state_signing
from gossip.codec import PROTOCOL_VERSION, destination_tag
from gossip.keyring import Keyring
from tests.edgeagent import inprocess
from tests.edgeagent.inprocess import Running, wait_for
from tests.edgeagent.inprocess import start as start_agent


@pytest.fixture
def base_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="ea-signed-") as d:
        yield Path(d)


def test_a_member_signs_and_verifies(base_dir: Path) -> None:
    provision_member(new_ca("c"), base_dir, "node-1")
    identity = load_identity(base_dir)
    assert identity is not None
    signing = load_state_signing(base_dir, identity)
    assert signing.signer is not None and signing.verifier is not None and signing.problem is None
    data = b"edgeagent-state-v1\x00x"
    assert signing.verifier.verify("node-1", signing.signer.credential, data, signing.signer.sign(data))


def test_no_mesh_ca_keeps_the_unsigned_behaviour(base_dir: Path) -> None:
    provision_member(new_ca("c"), base_dir, "node-1")
    (base_dir / CA_CERT_FILE).unlink()  # a keyring-only cluster
    identity = load_identity(base_dir)
    assert identity is not None
    signing = load_state_signing(base_dir, identity)
    assert (signing.signer, signing.verifier) == (None, None)


def test_a_renamed_node_verifies_but_cannot_sign(base_dir: Path) -> None:
    provision_member(new_ca("c"), base_dir, "node-1")
    identity = load_identity(base_dir)
    assert identity is not None
    signing = load_state_signing(base_dir, dataclasses.replace(identity, name="node-2"))
    assert signing.signer is None and signing.verifier is not None
    assert signing.problem is not None and "'node-1'" in signing.problem and "'node-2'" in signing.problem


def test_a_corrupt_mesh_ca_is_one_config_error(base_dir: Path) -> None:
    provision_member(new_ca("c"), base_dir, "node-1")
    (base_dir / CA_CERT_FILE).write_bytes(b"-----BEGIN CERTIFICATE-----\nbroken\n")
    identity = load_identity(base_dir)
    assert identity is not None
    with pytest.raises(ConfigError, match="corrupt mesh CA"):
        load_state_signing(base_dir, identity)


def test_refused_entries_warn_once_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    warn = ForgedStateLog(interval=60.0)
    with caplog.at_level(logging.WARNING, logger="edgeagent.state_signing"):
        warn.observe({"state_forged": 0, "state_unverified": 3}, 0.0)  # held entries: routine
        warn.observe({"state_forged": 5}, 1.0)
        warn.observe({"state_forged": 9}, 30.0)
        warn.observe({"state_forged": 12}, 62.0)
    records = [r for r in caplog.records if "did not sign" in r.getMessage()]
    assert [getattr(r, FIELDS_ATTR)["refused"] for r in records] == [5, 7]


# --- real agents ----------------------------------------------------------------------------


async def start(base: Path, name: str, join: str | None) -> Running:
    flags = ["--dns", "off", *(["--join", join] if join else [])]
    return await start_agent(base / name, name, flags, shared=base)


def addresses(r: Running) -> Addresses:
    feature = r.agent.feature("addresses")
    assert isinstance(feature, Addresses)
    return feature


async def test_a_forged_claim_sent_with_the_cluster_key_changes_nothing(base_dir: Path) -> None:
    a = await start(base_dir, "a", None)
    b = await start(base_dir, "b", f"127.0.0.1:{a.agent.driver.address[1]}")
    try:
        await wait_for(
            lambda: addresses(a).alloc.owner_address("b") is not None
            and addresses(b).alloc.owner_address("a") is not None,
            "both claims known to both",
        )
        block_a, block_b = addresses(a).alloc.block, addresses(b).alloc.block
        assert block_a is not None and block_b is not None
        seen_b = addresses(a).alloc.owner_address("b")
        # The insider: the cluster key, and StateUpdates about owner b claiming a's block first.
        ring = Keyring(list(inprocess._CLUSTERS[base_dir.absolute()].keys))
        aad = a.agent.config.gossip.cluster_name.encode()
        top = await a.agent.host.call(lambda core, now: core._store.max_version("b"))
        claim = {"v": 1, "block": str(block_a), "t": [1, 0], "id": "evil"}
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            for i in range(38):
                header = ["insider", 1, i, destination_tag(a.agent.config.name)]
                wire = [*header, [8, "b", top + 1 + i, "ipam", claim, False]]
                plain = bytes((PROTOCOL_VERSION,)) + msgpack.packb(wire, use_bin_type=True)
                sock.sendto(ring.encrypt(plain, aad), a.agent.driver.address)

        async def forged() -> int:
            return await a.agent.host.call(lambda core, now: core.stats.state_forged)

        def moved() -> bool:
            alloc = addresses(a).alloc
            return alloc.block != block_a or alloc.owner_address("b") != seen_b

        deadline = asyncio.get_running_loop().time() + inprocess.TIMEOUT
        while await forged() < 38 and not moved():
            assert asyncio.get_running_loop().time() < deadline, "forged updates not seen"
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)  # time for a renumber, if there were one
        assert addresses(a).alloc.block == block_a  # a did not renumber
        assert addresses(a).alloc.owner_address("b") == seen_b  # nor changed its view of b
        assert addresses(b).alloc.block == block_b
    finally:
        for r in (b, a):
            await inprocess.stop(r)
