"""Fixtures shared by the edgeagent tests (in-process agent helpers: ``inprocess.py``)."""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture
def state_dir() -> Iterator[Path]:
    """A fresh state dir with a short path: a Unix socket path must fit in 108 bytes."""
    with tempfile.TemporaryDirectory(prefix="ea-") as d:
        yield Path(d)


@pytest.fixture
def multicast_netns() -> Iterator[str]:
    """A private network namespace whose loopback carries multicast: mDNS stays inside it
    (needs root: the tests using it are marked so)."""
    name = f"ea-mc-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up", "multicast", "on"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)
