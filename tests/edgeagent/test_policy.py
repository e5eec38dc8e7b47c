"""Policy bundles end to end: the CLI (keygen, sign, verify exit codes), the agent's store
(apply, refusals, high-water mark across restarts, replicated ``pv``), the [policy] config."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import stat
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgeagent import cli
from edgeagent.config import load_config
from edgeagent.control import ControlError
from edgeagent.errors import ConfigError
from edgeagent.features.policy import STATE_FILE, STATE_KEY, load_store, store_document
from edgeagent.persist import atomic_write
from overlay import policy as pol
from tests.edgeagent import inprocess


def bundle_file(tmp: Path, version: int, expires: float | None = None, name: str = "") -> Path:
    path = tmp / (name or f"b{version}.toml")
    text = f"version = {version}\nissued = {int(time.time()) - 60}\n"
    if expires is not None:
        text += f"expires = {expires}\n"
    text += '[intentions]\ndefault = "deny"\nrules = [{source = "node:a", destination = "db", action = "allow"}]\n'
    path.write_text(text)
    return path


def sign_to(tmp: Path, key: Ed25519PrivateKey, version: int, expires: float | None = None) -> Path:
    out = tmp / f"v{version}{'-exp' if expires else ''}.signed"
    out.write_bytes(pol.sign(bundle_file(tmp, version, expires).read_bytes(), key))
    return out


# -- the operator CLI ------------------------------------------------------------------------


def test_keygen_sign_verify(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["policy", "keygen", "--out", str(tmp_path)]) == 0
    priv, pub = tmp_path / "policy-signing.key", tmp_path / "policy-signing.pub"
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600
    assert cli.main(["policy", "keygen", "--out", str(tmp_path)]) == 2  # no silent overwrite
    assert "exists" in capsys.readouterr().err
    signed = tmp_path / "b.signed"
    src = bundle_file(tmp_path, 3)
    assert cli.main(["policy", "sign", str(src), "--key", str(priv), "--out", str(signed)]) == 0
    assert cli.main(["policy", "verify", str(signed), "--pubkey", str(pub)]) == 0
    assert "version 3" in capsys.readouterr().out
    assert cli.main(["policy", "verify", str(signed), "--pubkey", str(pub), "--high-water", "3"]) == 1
    assert "rollback" in capsys.readouterr().err


def test_verify_refusals_exit_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key, other = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    pub, other_pub = tmp_path / "k.pub", tmp_path / "o.pub"
    pub.write_bytes(pol.public_pem(key.public_key()))
    other_pub.write_bytes(base64.b64encode(pol.raw_public_key(other.public_key())))
    signed = sign_to(tmp_path, key, 2)
    assert cli.main(["policy", "verify", str(signed), "--pubkey", str(other_pub)]) == 1
    assert "unknown_key" in capsys.readouterr().err
    env = json.loads(signed.read_bytes())
    env["bundle"] = base64.b64encode(bundle_file(tmp_path, 9).read_bytes()).decode()
    signed.write_text(json.dumps(env))
    assert cli.main(["policy", "verify", str(signed), "--pubkey", str(pub)]) == 1
    assert "bad_signature" in capsys.readouterr().err
    expired = sign_to(tmp_path, key, 4, expires=time.time() - 1 + 0.5)
    time.sleep(0.6)
    assert cli.main(["policy", "verify", str(expired), "--pubkey", str(pub)]) == 1
    assert "expired" in capsys.readouterr().err


def test_bad_input_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key = Ed25519PrivateKey.generate()
    priv = tmp_path / "k.key"
    priv.write_bytes(pol.private_pem(key))
    bad = tmp_path / "bad.toml"
    bad.write_text('version = 1\nissued = 1\n[intentions]\ndefault = "maybe"\n')
    assert cli.main(["policy", "sign", str(bad), "--key", str(priv)]) == 2
    assert capsys.readouterr().err.strip() == (
        "edgeagent: error: intentions.default: expected allow or deny"
    )
    assert cli.main(["policy", "sign", str(bad), "--key", str(tmp_path / "missing")]) == 2
    assert "--key" in capsys.readouterr().err
    assert cli.main(["policy", "verify", str(bad), "--pubkey", str(bad)]) == 2
    assert "public key" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        cli.main(["policy", "verify", str(bad)])  # --pubkey is required
    assert info.value.code == 2


# -- the [policy] config ---------------------------------------------------------------------


def _config(tmp_path: Path, keys: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(f"[policy]\ntrusted_keys = {keys}\n")
    return path


def test_config_reads_base64_and_pem_paths(tmp_path: Path) -> None:
    a, b = Ed25519PrivateKey.generate().public_key(), Ed25519PrivateKey.generate().public_key()
    (tmp_path / "b.pub").write_bytes(pol.public_pem(b))
    a64 = base64.b64encode(pol.raw_public_key(a)).decode()
    import argparse

    from edgeagent.config import add_agent_arguments

    parser = argparse.ArgumentParser()
    add_agent_arguments(parser)
    conf = _config(tmp_path, json.dumps([a64, "b.pub"]))
    config = load_config(parser.parse_args(["--config", str(conf), "--state-dir", str(tmp_path)]))
    assert config.policy_trusted_keys == (pol.raw_public_key(a), pol.raw_public_key(b))
    conf = _config(tmp_path, '["nope.pub"]')
    with pytest.raises(ConfigError, match=r"policy.trusted_keys\[0\]: expected a readable key file"):
        load_config(parser.parse_args(["--config", str(conf), "--state-dir", str(tmp_path)]))


# -- the store -------------------------------------------------------------------------------


def test_store_mark_never_below_its_bundle(tmp_path: Path) -> None:
    path = tmp_path / STATE_FILE
    assert load_store(path) == (0, None, None, None)
    atomic_write(path, json.dumps(store_document(9, b"{}", "local", 1.0)).encode())
    assert load_store(path)[:3] == (9, b"{}", "local")
    path.write_text('{"v": 1, "high_water": -1, "envelope": ""}')
    with pytest.raises(ConfigError, match="corrupt"):
        load_store(path)


def _flags(tmp_path: Path, key: Ed25519PrivateKey) -> list[str]:
    raw = base64.b64encode(pol.raw_public_key(key.public_key())).decode()
    return ["--config", str(_config(tmp_path, json.dumps([raw])))]


async def _pv(running: inprocess.Running) -> object:
    states = await running.agent.host.member_states(STATE_KEY)
    return next((value for member, value in states if member.name == "solo"), None)


def test_apply_refusals_and_restart(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    state = tmp_path / "state"
    v1, v2 = sign_to(tmp_path, key, 1), sign_to(tmp_path, key, 2)
    tampered = tmp_path / "tampered.signed"
    env = json.loads(v2.read_bytes())
    env["bundle"] = base64.b64encode(bundle_file(tmp_path, 5, name="t.toml").read_bytes()).decode()
    tampered.write_text(json.dumps(env))
    expired = sign_to(tmp_path, key, 7, expires=time.time() + 0.3)

    async def first_life() -> None:
        running = await inprocess.start(state, "solo", _flags(tmp_path, key))
        try:
            status = await inprocess.call(state, "policy-status")
            assert status["version"] is None and status["high_water"] == 0
            assert (await inprocess.call(state, "policy-apply", path=str(v2)))["accepted"]
            outcomes = [await inprocess.call(state, "policy-apply", path=str(p)) for p in (v1, v2, tampered)]
            assert [o["reason"] for o in outcomes] == ["rollback", "rollback", "bad_signature"]
            await asyncio.sleep(0.4)
            assert (await inprocess.call(state, "policy-apply", path=str(expired)))["reason"] == "expired"
            status = await inprocess.call(state, "policy-status")
            assert status["version"] == 2 and status["source"] == "local"
            assert status["refusals"]["rollback"] == 2 and status["refusals"]["expired"] == 1
            assert await _pv(running) == 2
            feature = running.agent.feature("policy")
            assert not feature.allows("b", [], "db") and feature.allows("a", [], "db")
        finally:
            await inprocess.stop(running)

    async def second_life() -> None:
        running = await inprocess.start(state, "solo", _flags(tmp_path, key))
        try:
            status = await inprocess.call(state, "policy-status")
            assert status["version"] == 2 and status["high_water"] == 2  # before any sync
            assert await _pv(running) == 2
            again = await inprocess.call(state, "policy-apply", path=str(v2))
            assert again["reason"] == "rollback"
        finally:
            await inprocess.stop(running)

    asyncio.run(first_life())
    saved = json.loads((state / STATE_FILE).read_text())
    assert saved["high_water"] == 2 and stat.S_IMODE(os.stat(state / STATE_FILE).st_mode) == 0o600
    asyncio.run(second_life())


def test_status_cli_when_policy_is_off(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "state"

    async def run() -> int:
        running = await inprocess.start(state, "solo")
        try:
            return await asyncio.to_thread(cli.main, ["policy", "status", "--state-dir", str(state)])
        finally:
            await inprocess.stop(running)

    assert asyncio.run(run()) == 2
    assert "policy is off on this agent" in capsys.readouterr().err


def test_kill_9_keeps_bundle_and_mark(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A real agent process: apply, SIGKILL at once, restart: the bundle is active before any
    sync and an older signed version is still refused; ``policy status`` and ``apply`` CLI."""
    import sys

    from edgeagent.agent_process import AgentProcess, agent_env
    from edgeagent.localmesh import free_port
    from edgeagent.persist import save_keyring
    from gossip.keyring import Keyring

    key = Ed25519PrivateKey.generate()
    key_file = tmp_path / "cluster.keyring"
    save_keyring(key_file, [Keyring.generate_key()])
    state = tmp_path / "state"
    argv = [sys.executable, "-m", "edgeagent", "run", "--bind", f"127.0.0.1:{free_port(['127.0.0.1'])}",
            "--no-mdns", "--preset", "local", "--state-dir", str(state), "--key-file", str(key_file),
            "--metrics", "off", "--coap", "off", "--mqtt", "off", *_flags(tmp_path, key)]  # fmt: skip
    root = str(Path(__file__).resolve().parents[2])
    agent = AgentProcess("p", argv, state, tmp_path / "p.log", agent_env({"PYTHONPATH": root}))
    v2, v3 = sign_to(tmp_path, key, 2), sign_to(tmp_path, key, 3)

    def started() -> None:  # the socket answers before the features have started
        agent.start()
        deadline = time.monotonic() + inprocess.TIMEOUT
        while True:
            try:
                agent.call("policy-status")
                return
            except ControlError:
                assert time.monotonic() < deadline, agent.log_tail()
                time.sleep(0.1)

    try:
        started()
        assert cli.main(["policy", "apply", str(v3), "--state-dir", str(state)]) == 0
        assert agent.kill()
        started()
        capsys.readouterr()
        assert cli.main(["policy", "status", "--json", "--state-dir", str(state)]) == 0
        status = json.loads(capsys.readouterr().out)
        assert status["version"] == 3 and status["high_water"] == 3
        assert cli.main(["policy", "apply", str(v2), "--state-dir", str(state)]) == 1
        assert "rollback" in capsys.readouterr().err
        assert cli.main(["policy", "status", "--state-dir", str(state)]) == 0
        out = capsys.readouterr().out
        assert "active version: 3 (source: local)" in out and "rollback 1" in out
    finally:
        agent.terminate()


def test_corrupt_store_stops_the_agent(tmp_path: Path) -> None:
    """Losing the mark silently would re-open rollback: a corrupt policy.json is an error."""
    key = Ed25519PrivateKey.generate()
    state = tmp_path / "state"
    state.mkdir()
    (state / STATE_FILE).write_text('{"v": 1, "high_water": "lots"}')

    async def run() -> None:
        await inprocess.start(state, "solo", _flags(tmp_path, key))

    with pytest.raises(ConfigError, match="policy.json: corrupt"):
        asyncio.run(run())


def test_refusals_reach_the_metrics_counter() -> None:
    from edgeagent.features.policy import Policy
    from edgeagent.metrics import Registry

    registry = Registry()
    policy = Policy()
    counter = registry.counter_of(
        "edgeagent_policy_refusals_total", "refusals", "reason", lambda: policy.refusals
    )
    key = Ed25519PrivateKey.generate()
    for data in (b"not json", pol.sign(b"version = 1\nissued = 1\n", key)):  # key not trusted
        policy._refuse(pol.decide(data, {}, 0, time.time()), "local")
    registry.render()
    registry.render()  # exported once, not again
    assert counter.value(reason="malformed") == 1 and counter.value(reason="unknown_key") == 1
    assert policy.last_refusal is not None and policy.last_refusal.startswith("unknown_key: ")
