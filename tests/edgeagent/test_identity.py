"""Node identity: unique default names, copied state dirs, who keeps a contested name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgeagent.name_conflict import KEEP, REFUSE, RENEW, Claimant, claimant, member_meta, verdict
from edgeagent.persist import (
    MACHINE_ID_ENV,
    MACHINE_ID_PATHS,
    default_node_name,
    is_clone,
    load_or_create_identity,
    machine_fingerprint,
    machine_id_paths,
    renew_identity,
)

ID_A, ID_B = "a" * 32, "b" * 32


def test_default_name_is_hostname_plus_node_id_chosen_once(tmp_path: Path) -> None:
    first = load_or_create_identity(tmp_path, "raspberrypi", default_name=True)
    assert first.name == f"raspberrypi-{first.node_id[:6]}" and first.default_name
    assert load_or_create_identity(tmp_path, "raspberrypi", default_name=True) == first
    assert load_or_create_identity(tmp_path, "renamed-host", default_name=True).name == first.name
    other = load_or_create_identity(tmp_path / "other", "raspberrypi", default_name=True)
    assert other.name != first.name


def test_configured_name_wins_and_is_kept_when_the_name_is_dropped(tmp_path: Path) -> None:
    load_or_create_identity(tmp_path, "host", default_name=True)
    named = load_or_create_identity(tmp_path, "gateway")
    assert (named.name, named.default_name) == ("gateway", False)
    assert load_or_create_identity(tmp_path, "host", default_name=True).name == "gateway"


def test_identity_saved_before_default_names_keeps_its_name_on_upgrade(tmp_path: Path) -> None:
    (tmp_path / "identity.json").write_text(
        json.dumps({"version": 1, "name": "raspberrypi", "node_id": ID_A, "incarnation": 4})
    )
    identity = load_or_create_identity(tmp_path, "raspberrypi", default_name=True, machine="c" * 32)
    assert (identity.name, identity.node_id, identity.incarnation) == ("raspberrypi", ID_A, 4)
    assert identity.default_name  # it was the hostname: a clone of it gets a new default name
    saved = json.loads((tmp_path / "identity.json").read_text())
    assert saved["machine"] == "c" * 32


def test_default_name_fits_the_name_limit() -> None:
    assert len(default_node_name("h" * 200, ID_A)) == 128


def test_machine_fingerprint_is_a_keyed_hash_of_the_first_machine_id(tmp_path: Path) -> None:
    empty, real = tmp_path / "empty", tmp_path / "real"
    empty.write_text("\n")
    real.write_text("0123456789abcdef0123456789abcdef\n")
    fingerprint = machine_fingerprint([tmp_path / "missing", empty, real])
    assert fingerprint is not None and len(fingerprint) == 32
    assert "0123456789abcdef" not in fingerprint  # the machine id itself is never stored
    assert machine_fingerprint([real]) == fingerprint
    assert machine_fingerprint([tmp_path / "missing"]) is None
    assert machine_id_paths({MACHINE_ID_ENV: str(real)}) == (str(real),)
    assert machine_id_paths({}) == MACHINE_ID_PATHS


def test_a_state_dir_from_another_machine_is_a_clone_and_renews(tmp_path: Path) -> None:
    original = load_or_create_identity(tmp_path, "pi", default_name=True, machine="1" * 32)
    assert not is_clone(original, "1" * 32)
    assert not is_clone(original, None)  # no machine id here: nothing to compare
    copied = load_or_create_identity(tmp_path, "pi", default_name=True, machine="2" * 32)
    assert copied == original and is_clone(copied, "2" * 32)
    renewed = renew_identity(tmp_path, copied, "pi", "2" * 32)
    assert renewed.node_id != original.node_id and renewed.name == f"pi-{renewed.node_id[:6]}"
    assert renewed.incarnation == 0 and not is_clone(renewed, "2" * 32)
    assert load_or_create_identity(tmp_path, "pi", default_name=True, machine="2" * 32) == renewed


def test_renewing_keeps_a_configured_name(tmp_path: Path) -> None:
    named = load_or_create_identity(tmp_path, "gateway", machine="1" * 32)
    renewed = renew_identity(tmp_path, named, "host", "2" * 32)
    assert renewed.name == "gateway" and renewed.node_id != named.node_id


@pytest.mark.parametrize(
    ("mine", "theirs", "expected"),
    [
        (Claimant(ID_B, 2000, ("10.0.0.2", 1)), Claimant(ID_A, 1000, ("10.0.0.1", 1)), REFUSE),
        (Claimant(ID_A, 1000, ("10.0.0.1", 1)), Claimant(ID_B, 2000, ("10.0.0.2", 1)), KEEP),
        (Claimant(ID_A, 2000, ("10.0.0.2", 1)), Claimant(ID_A, 1000, ("10.0.0.1", 1)), RENEW),
        (Claimant(ID_A, 1000, ("10.0.0.2", 1)), Claimant(ID_B, 1000, ("10.0.0.1", 1)), KEEP),
        (Claimant(ID_B, 1000, ("10.0.0.1", 1)), Claimant(ID_A, 1000, ("10.0.0.2", 1)), REFUSE),
    ],
)  # fmt: skip
def test_the_claimant_that_started_later_gives_the_name_up(
    mine: Claimant, theirs: Claimant, expected: object
) -> None:
    assert verdict(mine, theirs) is expected
    assert (verdict(theirs, mine) is KEEP) == (expected is not KEEP)  # exactly one yields


def test_claimant_reads_our_meta_and_takes_a_foreign_one_for_established() -> None:
    addr = ("10.0.0.1", 7946)
    assert claimant(member_meta(ID_A, "pi-zero-2", 1234), addr) == Claimant(ID_A, 1234, addr)
    assert claimant(b"\xff not json", addr) == Claimant("", 0, addr)
    assert claimant(b'{"id": 5, "since": true}', addr) == Claimant("", 0, addr)
