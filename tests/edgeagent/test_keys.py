"""Cluster-wide key rotation through the real CLI, across three real agents, without downtime."""

from __future__ import annotations

import base64
import hashlib
import json
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from edgeagent.persist import load_keyring
from testbed.loopback import LoopbackCluster

WAIT = 60.0


def cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgeagent", *args],
        input=stdin, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def fingerprint(key_b64: str) -> str:
    return hashlib.sha256(base64.b64decode(key_b64)).hexdigest()[:16]


def key_rows(cluster: LoopbackCluster, index: int) -> dict[str, dict[str, Any]]:
    out = cli("keys", "list", "--json", "--state-dir", str(cluster.agents[index].state_dir))
    assert out.returncode == 0, out.stderr
    return {row["fingerprint"]: row for row in json.loads(out.stdout)["keys"]}


def fingerprint_of(cluster: LoopbackCluster, key_b64: str) -> str:
    rows = key_rows(cluster, 0)
    return next(fp for fp, row in rows.items() if row["key"] == key_b64)


class LivenessWatch:
    """Polls every agent's view in the background; records any member seen dead or left.

    (A passing suspicion on a loaded machine is not a lost member; a death would be.)
    """

    def __init__(self, cluster: LoopbackCluster) -> None:
        self.cluster = cluster
        self.bad: list[tuple[str, str, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> LivenessWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            for agent in self.cluster.running():
                for name, state in agent.states().items():
                    if state in ("dead", "left"):
                        self.bad.append((agent.name, name, state))
            time.sleep(0.3)


@pytest.mark.slow
def test_rotation_across_three_agents_keeps_membership(tmp_path: Path) -> None:
    with LoopbackCluster(3) as cluster:
        cluster.wait_converged(WAIT)
        old = base64.b64encode(cluster.key).decode()
        key_file = tmp_path / "new.key"
        generated = cli("keys", "generate", "--file", str(key_file))
        new = key_file.read_text().strip()
        assert generated.stdout.strip() == fingerprint(new)
        state_dir = str(cluster.agents[0].state_dir)
        with LivenessWatch(cluster) as watch:
            refused = cli("keys", "use", "-", "--state-dir", state_dir, stdin=new)
            assert refused.returncode == 2
            assert "installed on 0 of 3 alive members" in refused.stderr
            assert refused.stderr.count("\n") == 1

            installed = cli("keys", "install", "--file", str(key_file), "--state-dir", state_dir)
            assert installed.returncode == 0 and fingerprint(new) in installed.stdout
            new_fp = fingerprint_of(cluster, new)
            assert new_fp == fingerprint(new)
            cluster.wait_for(
                lambda: all(key_rows(cluster, i)[new_fp]["installed"] == 3 for i in range(3)),
                WAIT,
                "new key installed everywhere",
            )
            refused = cli("keys", "remove", fingerprint(old), "--state-dir", state_dir)
            assert refused.returncode == 2 and "still the primary on 3 members" in refused.stderr

            assert cli("keys", "use", new_fp, "--state-dir", state_dir).returncode == 0
            cluster.wait_for(
                lambda: all(key_rows(cluster, i)[new_fp]["primary"] == 3 for i in range(3)),
                WAIT,
                "new key primary everywhere",
            )
            assert cli("keys", "remove", "--state-dir", state_dir, "-", stdin=old).returncode == 0
            cluster.wait_for(
                lambda: all(
                    load_keyring(a.state_dir / "keyring") == [base64.b64decode(new)]
                    for a in cluster.agents
                ),
                WAIT,
                "every keyring file holds only the new key",
            )
            time.sleep(2.0)  # gossip on the new key alone for a while
            assert cluster.views_agree({a.name: "alive" for a in cluster.agents})
        assert watch.bad == []

        # The rotated keyring survives a crash: the restarted agent rejoins on the new key.
        cluster.agents[1].restart()
        cluster.wait_converged(WAIT)
        rows = key_rows(cluster, 1)
        assert list(rows) == [new_fp] and rows[new_fp]["installed"] == 3


def test_generate_prints_a_fresh_base64_aes256_key() -> None:
    first, second = cli("keys", "generate").stdout.strip(), cli("keys", "generate").stdout.strip()
    assert len(base64.b64decode(first, validate=True)) == 32
    assert first != second


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ("not*base64", "KEY: expected base64 on stdin"),
        ("c2hvcnQ=", "KEY: expected base64 of 32 bytes on stdin"),
    ],
)
def test_bad_key_on_stdin_is_one_line_and_exit_2(key: str, message: str) -> None:
    out = cli("keys", "install", "--state-dir", "/nonexistent-edgeagent", stdin=key)
    assert out.returncode == 2
    assert out.stderr.startswith("edgeagent: error: " + message) and out.stderr.count("\n") == 1
    assert key not in out.stderr  # a key-like secret is never echoed


@pytest.mark.parametrize("op", ["install", "use", "remove"])
def test_a_raw_key_on_argv_is_refused_in_one_line_saying_how_to_pass_it(op: str) -> None:
    key = cli("keys", "generate").stdout.strip()
    out = cli("keys", op, key, "--state-dir", "/nonexistent-edgeagent")
    assert out.returncode == 2 and out.stderr.count("\n") == 1
    assert "visible to other users" in out.stderr and "--file FILE" in out.stderr
    assert f"edgeagent keys {op} < FILE" in out.stderr and key not in out.stderr


def test_keys_are_read_from_stdin_or_a_file_and_use_takes_a_fingerprint(
    tmp_path: Path,
) -> None:
    # Parsing happens before the agent is called, so an absent agent shows a key was accepted.
    key = cli("keys", "generate").stdout.strip()
    (tmp_path / "k").write_text(key + "\n")
    absent = ("--state-dir", str(tmp_path / "none"))
    for args, stdin in [
        (("install",), key),
        (("install", "-"), key),
        (("install", "--file", str(tmp_path / "k")), ""),
        (("use", fingerprint(key)), ""),
        (("remove", "-"), key),
    ]:
        out = cli("keys", *args, *absent, stdin=stdin)
        assert out.returncode == 1 and "no agent running" in out.stderr, (args, out.stderr)
    bad = [
        (("install", fingerprint(key)), "install: expected - or --file FILE"),
        (("use",), "use: give the key's FINGERPRINT"),
        (("use", "nothex"), "use: expected a FINGERPRINT, - or --file FILE"),
        (("install", "-", "--file", str(tmp_path / "k")), "not both"),
        (("install", "--file", str(tmp_path / "missing")), "cannot read the key"),
    ]
    for args, message in bad:
        out = cli("keys", *args, *absent)
        assert out.returncode == 2 and message in out.stderr, (args, out.stderr)


def test_generate_to_a_file_is_0600_and_never_overwrites(tmp_path: Path) -> None:
    path = tmp_path / "new.key"
    out = cli("keys", "generate", "--file", str(path))
    assert out.returncode == 0 and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert out.stdout.strip() == fingerprint(path.read_text().strip())
    again = cli("keys", "generate", "--file", str(path))
    assert again.returncode == 2 and "cannot create the key file" in again.stderr
    assert out.stdout.strip() == fingerprint(path.read_text().strip())


async def test_a_member_that_missed_a_key_operation_gets_it_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """User broadcasts can be missed and nothing repaired them: a member that missed an
    ``install`` stayed without the key for good (seen in CI). The issuer now sends its last
    operation again while an alive member publishes other fingerprints than its own."""
    from edgeagent.features import keys as keys_module
    from gossip.keyring import Keyring
    from tests.edgeagent.inprocess import call, start, stop, wait_for
    from tests.edgeagent.test_replay_agents import keys_of

    monkeypatch.setattr(keys_module, "RESEND_S", 0.5)
    a = await start(tmp_path / "a", "a", shared=tmp_path)
    host, port = a.agent.driver.address
    b = await start(tmp_path / "b", "b", ["--join", f"{host}:{port}"], shared=tmp_path)
    await wait_for(lambda: len(b.agent.host.view.members) == 2, "b to join a")
    b_keys = b.agent.feature("keys")
    hear = b_keys._on_update
    missed: list[object] = []

    def deaf_once(events: tuple[object, ...], view: object) -> None:
        if not missed and any(getattr(e, "payload", b"").startswith(keys_module.KEY_OP_PREFIX) for e in events):
            missed.append(events)  # b misses the first broadcast of the operation
            return
        hear(events, view)  # type: ignore[arg-type]

    b.agent.host._listeners = [deaf_once if f == hear else f for f in b.agent.host._listeners]
    new = Keyring.generate_key()
    await call(a.state_dir, "keys", op="install", key=base64.b64encode(new).decode())
    await wait_for(lambda: bool(missed), "b to miss the install")
    await wait_for(lambda: fingerprint(base64.b64encode(new).decode()) in keys_of(b), "b to get it")
    assert a.agent.feature("keys").resent >= 1
    await stop(b)
    await stop(a)
