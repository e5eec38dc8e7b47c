"""What the config reads from the machine: the state dir convention, the board model and RAM size."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from .schema import DEVICE_MODEL_PATH, MEMINFO_PATH, ROOT_STATE_DIR


def default_state_dir(euid: int | None = None, environ: Mapping[str, str] | None = None) -> Path:
    """``/var/lib/edgeagent`` as root, else ``$XDG_STATE_HOME/edgeagent`` (fallback ``~/.local/state/edgeagent``)."""
    euid = os.geteuid() if euid is None else euid
    environ = os.environ if environ is None else environ
    if euid == 0:
        return ROOT_STATE_DIR
    xdg = environ.get("XDG_STATE_HOME", "")
    if xdg and Path(xdg).is_absolute():  # the XDG spec says to ignore relative values
        return Path(xdg) / "edgeagent"
    home = environ.get("HOME") or str(Path.home())
    return Path(home) / ".local" / "state" / "edgeagent"


def read_device_model(path: Path = DEVICE_MODEL_PATH) -> str | None:
    """The device-tree model string (``Raspberry Pi 4 Model B Rev 1.4``), or None off ARM boards."""
    try:
        return path.read_bytes().rstrip(b"\0\n").decode("utf-8", "replace") or None
    except OSError:
        return None


def read_memory_mb(path: Path = MEMINFO_PATH) -> int | None:
    """Total RAM in MiB from /proc/meminfo, or None when unknown."""
    try:
        for line in path.read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024  # the kernel reports kB (KiB)
    except (OSError, ValueError, IndexError):
        return None
    return None
