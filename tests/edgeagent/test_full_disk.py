"""A real agent started on a full filesystem: one line naming the state dir and the error.

The state dir lives on a 64 KiB tmpfs mounted for the test (root only: skipped otherwise,
saying so), provisioned as a cluster member and then filled up. ``edgeagent run`` must save
the bumped incarnation before it joins; on a full disk that is one error line and exit 2
(the CLI's code for "fix your environment or flags"), never a traceback.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgeagent.agent_process import agent_env
from edgeagent.onboarding import new_ca, provision_member

TIMEOUT = 60.0


@pytest.fixture
def tiny_fs() -> Iterator[Path]:
    """A 64 KiB tmpfs, unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a tmpfs (a full filesystem for the agent)")
    base = Path(tempfile.mkdtemp(prefix="ea-full-"))
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(base)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        base.rmdir()
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield base
    finally:
        subprocess.run(["umount", str(base)], check=True)
        base.rmdir()


def fill(directory: Path) -> None:
    """Write a filler file until the filesystem is full."""
    fd = os.open(directory / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, b"\0" * 4096)
    finally:
        os.close(fd)
    with pytest.raises(OSError) as info:
        (directory / "probe").write_bytes(b"\0" * 8192)
    assert info.value.errno == errno.ENOSPC


def test_full_disk_at_start_is_one_line_and_exit_2(tiny_fs: Path) -> None:
    state_dir = tiny_fs / "state"
    provision_member(new_ca("full"), state_dir, "pi-1")
    identity_before = (state_dir / "identity.json").read_bytes()
    fill(tiny_fs)
    argv = [sys.executable, "-m", "edgeagent", "run", "--state-dir", str(state_dir),
            "--bind", "127.0.0.1:0", "--no-mdns", "--metrics", "off", "--preset", "local"]  # fmt: skip
    out = subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT, env=agent_env())
    assert out.returncode == 2, out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("edgeagent: error:")]
    assert len(errors) == 1, out.stderr
    assert f"{state_dir}: cannot save identity.json: " in errors[0]
    assert "No space left on device (ENOSPC)" in errors[0]
    assert "Traceback" not in out.stderr
    assert (state_dir / "identity.json").read_bytes() == identity_before  # old file intact
    assert not [p.name for p in state_dir.iterdir() if ".tmp-" in p.name]  # no temp left
