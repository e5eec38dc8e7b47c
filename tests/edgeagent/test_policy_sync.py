"""Policy sync and spread (issue 11): bundles fetched from peers over the agent channel, from a
cloud HTTPS endpoint (ETag, 304, outage, bad certificate), and the reported state sent up.

Peers: three in-process agents of one cluster on 127.0.0.x (one gossip port each, the
channel at gossip port + 2). The HTTPS endpoint is a stdlib ``http.server`` with ``ssl`` on
127.0.0.1, its certificate from a CA the test makes with ``cryptography``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgeagent.features.policy import Policy
from edgeagent.localmesh import free_port
from overlay import policy as pol
from tests.edgeagent import inprocess
from tests.edgeagent.inprocess import Running, call, wait_for

HOSTS = ("127.0.0.21", "127.0.0.22", "127.0.0.23")


@pytest.fixture
def base() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="ea-pol-") as d:  # short: control socket paths
        yield Path(d)


def envelope(key: Ed25519PrivateKey, version: int, deny: str = "node:x") -> bytes:
    text = (
        f"version = {version}\nissued = {int(time.time()) - 60}\n[intentions]\n"
        f'rules = [{{source = "{deny}", destination = "db", action = "deny"}}]\n'
    )
    return pol.sign(text.encode(), key)


def write_config(base: Path, key: Ed25519PrivateKey, extra: str = "") -> Path:
    raw = base64.b64encode(pol.raw_public_key(key.public_key())).decode()
    path = base / "agent.toml"
    path.write_text(f'[policy]\ntrusted_keys = ["{raw}"]\n{extra}')
    return path


def policy_of(running: Running) -> Policy:
    feature = running.agent.feature("policy")
    assert isinstance(feature, Policy)
    return feature


class Mesh:
    """Agents a, b, c on their own loopback addresses, one port (channel at port + 2)."""

    def __init__(self, base: Path, conf: Path) -> None:
        self.base, self.conf = base, conf
        self.port = free_port([*HOSTS])
        while not all(_tcp_free(h, self.port + 2) for h in HOSTS):
            self.port = free_port([*HOSTS])
        self.agents: dict[str, Running] = {}

    async def start(self, name: str, join: str | None = None) -> Running:
        host = HOSTS["abc".index(name)]
        flags = ["--bind", f"{host}:{self.port}", "--config", str(self.conf)]
        if join is not None:
            flags += ["--join", f"{HOSTS['abc'.index(join)]}:{self.port}"]
        running = await inprocess.start(self.base / name, name, flags, shared=self.base)
        self.agents[name] = running
        return running

    async def apply(self, name: str, data: bytes, version: int) -> dict[str, Any]:
        path = self.base / f"v{version}.signed"
        path.write_bytes(data)
        return dict(await call(self.agents[name].state_dir, "policy-apply", path=str(path)))

    async def stop_all(self) -> None:
        for running in list(self.agents.values()):
            if not running.task.done():
                await inprocess.stop(running)


def _tcp_free(host: str, port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


async def enforcing(mesh: Mesh, names: str, version: int) -> None:
    await wait_for(
        lambda: all(policy_of(mesh.agents[n]).version == version for n in names),
        f"{names} to enforce version {version}",
    )


async def test_peers_spread_a_bundle_and_an_offline_node_catches_up(base: Path) -> None:
    key = Ed25519PrivateKey.generate()
    mesh = Mesh(base, write_config(base, key))
    try:
        await mesh.start("a")
        await mesh.start("b", join="a")
        await mesh.start("c", join="a")
        await wait_for(lambda: len(mesh.agents["c"].agent.host.view.members) == 3, "3 members")
        assert (await mesh.apply("a", envelope(key, 1), 1))["accepted"]
        await enforcing(mesh, "abc", 1)
        status = await call(mesh.agents["b"].state_dir, "policy-status")
        assert status["source"] == "peer:a" and status["high_water"] == 1
        assert not policy_of(mesh.agents["c"]).allows("x", [], "db")  # c enforces v1's rule

        await inprocess.stop(mesh.agents["c"])  # c is offline during three updates
        for version in (2, 3, 4):
            assert (await mesh.apply("a", envelope(key, version), version))["accepted"]
            await enforcing(mesh, "ab", version)
        await mesh.start("c", join="b")
        await enforcing(mesh, "abc", 4)
        status = await call(mesh.agents["c"].state_dir, "policy-status")
        assert status["source"] in ("peer:a", "peer:b") and status["high_water"] == 4
        assert status["refusals"] == dict.fromkeys(pol.REASONS, 0)
    finally:
        await mesh.stop_all()


async def test_forged_or_rolled_back_bundles_from_a_peer_are_refused(base: Path) -> None:
    """b claims a newer version in its replicated state but serves a tampered envelope, then
    an old one, then one signed by a key c does not trust: c refuses each (counted), keeps
    its version, and does not hammer b (backoff per version)."""
    key, rogue = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    mesh = Mesh(base, write_config(base, key))
    try:
        await mesh.start("b")
        await mesh.start("c", join="b")
        await wait_for(lambda: len(mesh.agents["c"].agent.host.view.members) == 2, "2 members")
        assert (await mesh.apply("b", envelope(key, 2), 2))["accepted"]
        await enforcing(mesh, "bc", 2)
        b, c = policy_of(mesh.agents["b"]), policy_of(mesh.agents["c"])
        good = envelope(key, 9)
        doc = json.loads(good)
        doc["bundle"] = base64.b64encode(
            pol.parse_envelope(envelope(key, 9, deny="node:c")).bundle
        ).decode()
        served = [json.dumps(doc).encode(), envelope(key, 1), envelope(rogue, 9)]
        reasons = ["bad_signature", "rollback", "unknown_key"]
        for bad, reason in zip(served, reasons, strict=True):
            b.envelope = bad
            version = 10 + reasons.index(reason)
            await asyncio.wrap_future(b.host.set_state("pv", version))  # b lies about its version
            await wait_for(lambda r=reason: c.refusals[r] >= 1, f"c to refuse with {reason}")  # type: ignore[misc]
        assert c.version == 2 and c.high_water == 2 and c.source == "peer:b"
        assert c.peers is not None and c.peers.stats["fetched"] == 1  # only the honest v2
        status = await call(mesh.agents["c"].state_dir, "policy-status")
        assert status["last_refusal"].startswith("unknown_key")
        assert status["refusals"]["bad_signature"] == c.refusals["bad_signature"] >= 1
        assert c.peers.backoff_of(12)[0] >= 1  # version 12 is backed off, not fetched in a loop
    finally:
        await mesh.stop_all()
