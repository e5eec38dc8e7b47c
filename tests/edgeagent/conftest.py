"""Fixtures shared by the edgeagent tests (in-process agent helpers: ``inprocess.py``)."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture
def state_dir() -> Iterator[Path]:
    """A fresh state dir with a short path: a Unix socket path must fit in 108 bytes."""
    with tempfile.TemporaryDirectory(prefix="ea-") as d:
        yield Path(d)
