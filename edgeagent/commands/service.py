"""``edgeagent service install``: run the agent as a systemd service.

The unit ships in the package (``edgeagent/data/edgeagent.service``: ``Type=notify`` with a
watchdog, ``Restart=on-failure``, ``StateDirectory=edgeagent``, no capabilities, a read-only
system). ``install`` writes it to ``/etc/systemd/system/edgeagent.service`` with ``ExecStart``
pointing at the Python running this command (so a virtualenv install works as well as a
system one) and prints the ``systemctl`` commands to run next; it does not run them, so
nothing starts behind the user's back. ``--dry-run`` prints the unit and where it would go.
"""

from __future__ import annotations

import argparse
import os
import sys
from importlib import resources
from pathlib import Path
from typing import Any

UNIT_NAME = "edgeagent.service"
UNIT_DIR = Path("/etc/systemd/system")  # systemd.unit(5): the administrator's units
UNIT_MODE = 0o644
HOME_DIRS = ("/home", "/root", "/run/user")  # what ProtectHome=yes hides (systemd.exec(5))
SHIPPED_EXEC_START = "ExecStart=/usr/local/bin/edgeagent run"


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "service",
        help="install the systemd unit that runs the agent as a service",
        description=(
            "Install the systemd unit shipped with the package (Type=notify with a watchdog, "
            "Restart=on-failure, state in /var/lib/edgeagent, hardened). It is written, not "
            "started: the command prints the systemctl lines to run next."
        ),
    )
    ops = parser.add_subparsers(dest="op", metavar="OP", required=True)
    p = ops.add_parser("install", help=f"write {UNIT_DIR / UNIT_NAME} (root)")
    p.add_argument("--dry-run", action="store_true", help="print the unit and its path only")
    p.add_argument("--force", action="store_true", help="replace a unit that differs")
    p.add_argument(
        "--unit-dir", type=Path, default=UNIT_DIR, metavar="DIR", help=f"default: {UNIT_DIR}"
    )
    parser.set_defaults(func=run)


def unit_text(python: str | None = None) -> str:
    """The shipped unit with ExecStart running ``python -m edgeagent run``."""
    text = resources.files("edgeagent").joinpath("data", UNIT_NAME).read_text(encoding="utf-8")
    exec_start = f"ExecStart={python or sys.executable} -m edgeagent run"
    return text.replace(SHIPPED_EXEC_START, exec_start)


def _in_home(path: Path) -> bool:
    return any(path.is_relative_to(home) for home in HOME_DIRS)


def run(args: argparse.Namespace) -> int:
    from edgeagent.errors import UsageError
    from edgeagent.persist import atomic_write

    text = unit_text()
    path = args.unit_dir / UNIT_NAME
    if any(_in_home(Path(p)) for p in (sys.executable, Path(sys.executable).resolve())):
        print(
            f"edgeagent: warning: {sys.executable} is (or links) under a home directory, which "
            "the unit's ProtectHome=yes hides: install edgeagent outside it (e.g. /opt/edgeagent)",
            file=sys.stderr,
        )
    if args.dry_run:
        print(f"# would write {path}:")
        print(text, end="")
        return 0
    if not os.access(args.unit_dir, os.W_OK):
        raise UsageError(
            f"{args.unit_dir}: not writable; run as root (sudo edgeagent service install), "
            "or see the unit with --dry-run"
        )
    try:
        current = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        current = None
    except OSError as exc:
        raise UsageError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if current is not None and current != text and not args.force:
        raise UsageError(f"{path}: exists and differs; --force replaces it (--dry-run shows it)")
    if current != text:
        atomic_write(path, text.encode(), mode=UNIT_MODE)
    print(f"{path}: {'unchanged' if current == text else 'written'}. Next:")
    print("  edgeagent init   # or: edgeagent join TOKEN (as root: the service's state dir)")
    print("  systemctl daemon-reload && systemctl enable --now edgeagent")
    print("  journalctl -u edgeagent -f   # logs; systemctl reload edgeagent re-reads log_level")
    return 0
