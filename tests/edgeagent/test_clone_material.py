"""A state dir copied to another machine: the new node keeps nothing that names the original.

In-process agents; ``EDGEAGENT_MACHINE_ID_FILE`` stands in for /etc/machine-id. The node
certificate names the node id in its SAN, so a copy that becomes a new node must not keep it:
a member's copy drops its key and certificate (and may enroll again with ``join``), an
issuer's copy gets a new certificate from its CA key; the address claim and issued tokens go.
"""

from __future__ import annotations

import datetime as dt
import logging
import shutil
from pathlib import Path

import pytest

from edgeagent.errors import UsageError
from edgeagent.onboarding import (
    CA_CERT_FILE,
    NODE_CERT_FILE,
    NODE_KEY_FILE,
    create_cluster,
    needs_reenrollment,
    refuse_existing,
)
from edgeagent.persist import MACHINE_ID_ENV
from edgeagent.token_store import TOKENS_FILE
from overlay import pki
from tests.edgeagent.inprocess import call, start, stop, wait_for


def machine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, label: str) -> None:
    path = tmp_path / f"machine-{label}"
    path.write_text(label * 32 + "\n")
    monkeypatch.setenv(MACHINE_ID_ENV, str(path))


async def run_once(state_dir: Path, flags: tuple[str, ...] = ()) -> dict[str, object]:
    running = await start(state_dir, "pi", flags)
    try:
        await wait_for(
            lambda: running.agent.feature("addresses").alloc.block is not None, "a block"
        )
        return await call(state_dir, "status")
    finally:
        await stop(running)


def cert_node_id(state_dir: Path) -> str:
    ca = pki.load_cert_pem((state_dir / CA_CERT_FILE).read_bytes())
    cert = (state_dir / NODE_CERT_FILE).read_bytes()
    return pki.verify_node_cert(ca, cert, dt.datetime.now(dt.UTC)).node_id


async def test_a_members_copy_drops_its_certificate_and_can_enroll_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    original, copy = tmp_path / "a", tmp_path / "b"
    machine(tmp_path, monkeypatch, "1")
    first = await run_once(original)
    assert cert_node_id(original) == first["node_id"]
    shutil.copytree(original, copy)
    machine(tmp_path, monkeypatch, "2")
    with caplog.at_level(logging.WARNING, logger="edgeagent"):
        second = await run_once(copy)
    assert second["node_id"] != first["node_id"]
    assert not (copy / NODE_CERT_FILE).exists() and not (copy / NODE_KEY_FILE).exists()
    assert (original / NODE_CERT_FILE).exists()  # the original is untouched
    warned = [r.getMessage() for r in caplog.records if "certificate named" in r.getMessage()]
    assert len(warned) == 1 and f"edgeagent join TOKEN --state-dir {copy}" in warned[0]
    assert needs_reenrollment(copy) and not needs_reenrollment(original)
    refuse_existing(copy, "join")  # join may enroll the copy again ...
    with pytest.raises(UsageError):
        refuse_existing(copy, "init")  # ... but it is still no fresh state dir
    with pytest.raises(UsageError):
        refuse_existing(original, "join")


async def test_an_issuers_copy_gets_a_certificate_for_its_new_id_and_no_tokens(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original, copy = tmp_path / "a", tmp_path / "b"
    machine(tmp_path, monkeypatch, "1")
    create_cluster(original, "pi", "edgeagent")
    flags = ("--enroll-port", "0")
    first = await run_once(original, flags)
    (original / TOKENS_FILE).write_text('{"version": 1, "tokens": []}\n')
    shutil.copytree(original, copy)
    machine(tmp_path, monkeypatch, "2")
    second = await run_once(copy, flags)
    assert second["node_id"] != first["node_id"]
    assert cert_node_id(copy) == second["node_id"]  # re-issued with the copy's CA key
    assert cert_node_id(original) == first["node_id"]
    assert (copy / NODE_KEY_FILE).read_bytes() != (original / NODE_KEY_FILE).read_bytes()
    assert not (copy / TOKENS_FILE).exists() and (original / TOKENS_FILE).exists()
