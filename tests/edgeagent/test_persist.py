"""Persistence: atomic writes, identity, keyring, JSON state; corrupt files are clear errors."""

from __future__ import annotations

import base64
import json
import os
import stat
from pathlib import Path

import pytest

from edgeagent.errors import ConfigError
from edgeagent.persist import (
    NodeIdentity,
    atomic_write,
    load_json,
    load_keyring,
    load_keyring_document,
    load_or_create_identity,
    load_or_create_keyring,
    renew_identity,
    save_identity,
    save_json,
    save_keyring,
)


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_atomic_write_replaces_content_and_sets_mode(tmp_path: Path) -> None:
    target = tmp_path / "f"
    target.write_bytes(b"old")
    atomic_write(target, b"new", mode=0o640)
    assert target.read_bytes() == b"new"
    assert mode_of(target) == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["f"]  # no temp file left after success


def test_crash_before_rename_leaves_old_file_and_temp_is_ignored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    save_json(tmp_path / "claim.json", {"block": "10.99.0.16/28"})

    def crash(src: object, dst: object) -> None:
        raise OSError("simulated power cut")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated"):
        save_json(tmp_path / "claim.json", {"block": "10.99.0.32/28"})
    monkeypatch.undo()
    assert load_json(tmp_path / "claim.json", None) == {"block": "10.99.0.16/28"}


def test_temp_file_left_by_kill_is_not_read(tmp_path: Path) -> None:
    """A kill -9 between write and rename leaves '.NAME.tmp-XXXX' behind; loading ignores it."""
    save_identity(tmp_path, NodeIdentity("n1", "ab" * 16, 7))
    (tmp_path / ".identity.json.tmp-deadbeef").write_bytes(b'{"half": ')
    assert load_or_create_identity(tmp_path, "n1").incarnation == 7
    save_identity(tmp_path, NodeIdentity("n1", "ab" * 16, 8))  # and writing still works
    assert load_or_create_identity(tmp_path, "n1").incarnation == 8


def test_identity_is_created_once_and_stable_across_loads(tmp_path: Path) -> None:
    state = tmp_path / "state"
    first = load_or_create_identity(state, "node-a")
    assert first.incarnation == 0 and len(first.node_id) == 32 and int(first.node_id, 16) >= 0
    assert load_or_create_identity(state, "node-a") == first
    assert mode_of(state) == 0o700 and mode_of(state / "identity.json") == 0o600
    assert load_or_create_identity(tmp_path / "other", "node-a").node_id != first.node_id


def test_incarnation_bump_is_persisted(tmp_path: Path) -> None:
    ident = load_or_create_identity(tmp_path, "n")
    save_identity(tmp_path, ident.bumped())
    save_identity(tmp_path, load_or_create_identity(tmp_path, "n").bumped())
    assert load_or_create_identity(tmp_path, "n").incarnation == 2


def test_boot_epoch_rises_with_every_start_and_survives_a_renewal(tmp_path: Path) -> None:
    ident = load_or_create_identity(tmp_path, "n")
    assert ident.boot_epoch == 0
    for _ in range(3):
        save_identity(tmp_path, load_or_create_identity(tmp_path, "n").bumped())
    ident = load_or_create_identity(tmp_path, "n")
    assert (ident.boot_epoch, ident.incarnation) == (3, 3)
    renewed = renew_identity(tmp_path, ident.with_incarnation(9), "host", None)
    assert renewed.incarnation == 0 and renewed.node_id != ident.node_id
    assert renewed.boot_epoch == 3 == load_or_create_identity(tmp_path, "n").boot_epoch


def test_identity_written_before_boot_epochs_loads_at_epoch_0(tmp_path: Path) -> None:
    ident = load_or_create_identity(tmp_path, "n")
    doc = json.loads((tmp_path / "identity.json").read_text())
    del doc["boot_epoch"]
    (tmp_path / "identity.json").write_text(json.dumps(doc))
    assert load_or_create_identity(tmp_path, "n") == ident
    doc["boot_epoch"] = -1
    (tmp_path / "identity.json").write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match="boot_epoch"):
        load_or_create_identity(tmp_path, "n")


def test_keyring_generation_is_saved_with_the_keys(tmp_path: Path) -> None:
    keys = [os.urandom(32), os.urandom(32)]
    save_keyring(tmp_path / "k", keys)
    assert json.loads((tmp_path / "k").read_text())[0] == base64.b64encode(keys[0]).decode()
    assert load_keyring_document(tmp_path / "k") == (keys, 0)
    save_keyring(tmp_path / "k", keys, 7)
    assert load_keyring_document(tmp_path / "k") == (keys, 7) and load_keyring(tmp_path / "k") == keys
    (tmp_path / "k").write_text('{"keys": [], "generation": true}')
    with pytest.raises(ConfigError, match="generation"):
        load_keyring(tmp_path / "k")


def test_rename_keeps_node_id_and_incarnation(tmp_path: Path) -> None:
    ident = load_or_create_identity(tmp_path, "old")
    save_identity(tmp_path, ident.bumped())
    renamed = load_or_create_identity(tmp_path, "new")
    assert (renamed.name, renamed.node_id, renamed.incarnation) == ("new", ident.node_id, 1)
    assert json.loads((tmp_path / "identity.json").read_text())["name"] == "new"


@pytest.mark.parametrize(
    "content",
    [b"{not json", b"[]", b'{"version": 1, "name": "n", "node_id": "xyz", "incarnation": 0}',
     b'{"version": 1, "name": "n", "node_id": "' + b"ab" * 16 + b'", "incarnation": -1}'],
)  # fmt: skip
def test_corrupt_identity_is_an_error_never_regenerated(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "identity.json"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as info:
        load_or_create_identity(tmp_path, "n")
    assert str(info.value).startswith(f"{path}: corrupt")
    assert path.read_bytes() == content


def test_keyring_is_generated_on_first_start_with_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "state" / "keyring"
    keys = load_or_create_keyring(path)
    assert len(keys) == 1 and len(keys[0]) == 32
    assert mode_of(path) == 0o600
    assert load_or_create_keyring(path) == keys
    assert json.loads(path.read_text()) == [base64.b64encode(keys[0]).decode()]


def test_keyring_round_trip_keeps_primary_first(tmp_path: Path) -> None:
    keys = [os.urandom(32), os.urandom(32)]
    save_keyring(tmp_path / "k", keys)
    assert load_keyring(tmp_path / "k") == keys


def test_keyring_reads_base64_lines_with_comments(tmp_path: Path) -> None:
    keys = [os.urandom(32), os.urandom(32)]
    text = "# primary first\n" + "".join(base64.b64encode(k).decode() + "\n" for k in keys)
    (tmp_path / "k").write_text(text)
    assert load_keyring(tmp_path / "k") == keys


@pytest.mark.parametrize(
    ("content", "needle"),
    [("[]", "at least one key"), ('["!!"]', "key 1: expected base64"),
     ('["' + base64.b64encode(b"short").decode() + '"]', "key 1: expected 32 bytes"), ("[1", "not JSON")],
)  # fmt: skip
def test_bad_keyring_names_the_file(tmp_path: Path, content: str, needle: str) -> None:
    path = tmp_path / "k"
    path.write_text(content)
    with pytest.raises(ConfigError) as info:
        load_or_create_keyring(path)
    assert str(info.value).startswith(f"{path}: ") and needle in str(info.value)
    assert path.read_text() == content


def test_missing_explicit_keyring_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="keyring file not found"):
        load_keyring(tmp_path / "absent")


def test_load_json_default_and_round_trip(tmp_path: Path) -> None:
    assert load_json(tmp_path / "x.json", {"empty": True}) == {"empty": True}
    save_json(tmp_path / "x.json", {"a": [1, 2]})
    assert load_json(tmp_path / "x.json", None) == {"a": [1, 2]}


def test_unusable_state_dir_is_config_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="state dir"):
        load_or_create_identity(blocker / "sub", "n")


def test_world_readable_keyring_logs_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "k"
    save_keyring(path, [os.urandom(32)])
    load_keyring(path)
    assert not caplog.records
    path.chmod(0o644)
    load_keyring(path)
    assert any("readable by other users" in r.getMessage() for r in caplog.records)


WRITER = """
import sys
from edgeagent.persist import save_json
path = sys.argv[1]
n = 1
save_json(path, {"n": n, "pad": "x" * 4096})
print("ready", flush=True)
while True:
    n += 1
    save_json(path, {"n": n, "pad": "x" * 4096})
"""


def test_kill_9_during_writes_leaves_a_complete_file(tmp_path: Path) -> None:
    """A real SIGKILL at arbitrary points of a write loop: the file always parses, never half-written."""
    import signal
    import subprocess
    import sys
    import time

    root = Path(__file__).resolve().parents[2]
    path = tmp_path / "state.json"
    seen = []
    for delay in (0.05, 0.11, 0.2, 0.37):
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(path)],
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(root)},
        )
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        time.sleep(delay)  # let it write for a while; when exactly it dies does not matter
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stdout.close()
        doc = load_json(path, None)
        assert doc is not None and doc["pad"] == "x" * 4096
        seen.append(doc["n"])
    assert all(n >= 1 for n in seen)
