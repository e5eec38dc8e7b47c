"""Skip markers for tests that need root or a system program, so a fresh machine skips them with
a reason instead of failing.

`make test` must pass on a fresh Debian machine as root and as a normal user with nothing installed
by hand. Namespace tests need root (CAP_NET_ADMIN) and the programs ``ip`` (iproute2) and, for
packet faults and counters, ``nft`` (nftables); a minimal image may have neither. ``.ci/run``
installs both, so CI runs these tests rather than skipping them.
"""

from __future__ import annotations

import os
import shutil

import pytest

# The Debian package that provides each program the tests run.
PACKAGES = {"ip": "iproute2", "nft": "nftables"}


def missing(*programs: str) -> list[str]:
    """The programs not found on PATH (root's PATH includes /usr/sbin, where both live)."""
    return [p for p in programs if shutil.which(p) is None]


def needs_netns(*programs: str) -> pytest.MarkDecorator:
    """Skip unless root and every one of ``programs`` is installed; the reason names what to do."""
    if os.geteuid() != 0:
        return pytest.mark.skipif(True, reason="needs root (network namespaces)")
    absent = missing(*programs)
    packages = " ".join(PACKAGES.get(p, p) for p in absent)
    reason = f"needs {', '.join(absent)}: apt-get install -y {packages} (.ci/run does)"
    return pytest.mark.skipif(bool(absent), reason=reason)
