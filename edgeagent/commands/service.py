"""``edgeagent service install|register|deregister``: the systemd unit, and mesh services.

``register NAME URI [--weight W] [--tag KEY=VALUE]...`` and ``deregister NAME URI`` ask the
running agent (control command ``service``, :mod:`edgeagent.features.services`) to publish or
withdraw an instance of a mesh service; the agent saves registrations in its state dir, so
they survive restarts. Bad input is one line and exit 2, checked here before the agent is
asked (the agent checks again).

``install``:

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
        help="register a mesh service instance, or install the systemd unit",
        description=(
            "register / deregister: publish or withdraw an instance of a mesh service on the "
            "local agent (kept across restarts). install: write the systemd unit shipped with "
            "the package (Type=notify with a watchdog, Restart=on-failure, state in "
            "/var/lib/edgeagent, hardened); it is written, not started: the command prints "
            "the systemctl lines to run next."
        ),
    )
    ops = parser.add_subparsers(dest="op", metavar="OP", required=True)
    p = ops.add_parser("install", help=f"write {UNIT_DIR / UNIT_NAME} (root)")
    p.add_argument("--dry-run", action="store_true", help="print the unit and its path only")
    p.add_argument("--force", action="store_true", help="replace a unit that differs")
    p.add_argument(
        "--unit-dir", type=Path, default=UNIT_DIR, metavar="DIR", help=f"default: {UNIT_DIR}"
    )
    p.set_defaults(func=run)
    _add_registration_parsers(ops)


def _add_registration_parsers(ops: Any) -> None:
    from edgeagent.control import add_state_dir_argument

    p = ops.add_parser(
        "register",
        help="publish an instance of service NAME at URI (coap://HOST:PORT[/path])",
        description="Publish an instance of the mesh service NAME (reached as NAME.mesh) "
        "served at URI, e.g. coap://127.0.0.1:5684/sensors. Registering the same NAME and "
        "URI again replaces its weight and tags.",
    )
    p.add_argument("name", metavar="NAME", help="service name: one DNS label (letters, digits, -)")
    p.add_argument("uri", metavar="URI", help="coap://HOST:PORT[/path] (port default 5683)")
    p.add_argument("--weight", metavar="W", help="relative share of traffic, 1..1000 (default 1)")
    p.add_argument(
        "--tag", metavar="KEY=VALUE", action="append", default=[],
        help="a tag such as site=hall or version=1.2; repeatable",
    )  # fmt: skip
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_state_dir_argument(p)
    p.set_defaults(func=run_registration)
    p = ops.add_parser(
        "deregister",
        help="withdraw the instance of NAME at URI",
        description="Withdraw an instance registered with 'edgeagent service register'.",
    )
    p.add_argument("name", metavar="NAME")
    p.add_argument("uri", metavar="URI")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_state_dir_argument(p)
    p.set_defaults(func=run_registration)


def registration_request(args: argparse.Namespace) -> dict[str, Any]:
    """The control request for register / deregister; UsageError (exit 2) on bad input."""
    from edgeagent.errors import UsageError
    from overlay.catalog import CatalogError, make_instance, parse_tag

    request: dict[str, Any] = {"op": args.op, "name": args.name, "uri": args.uri}
    try:
        if args.op == "register":
            weight_text = args.weight if args.weight is not None else "1"
            if not weight_text.strip().isdigit():
                raise CatalogError(f"--weight {weight_text!r} must be a whole number from 1 to 1000")
            tags = dict(parse_tag(t) for t in args.tag)
            if len(tags) != len(args.tag):
                raise CatalogError("--tag: the same KEY given twice")
            inst = make_instance(args.name, args.uri, weight=int(weight_text), tags=tags)
            request.update(weight=inst.weight, tags=dict(inst.tags))
        else:
            inst = make_instance(args.name, args.uri)
    except CatalogError as exc:
        raise UsageError(f"service {args.op}: {exc}") from None
    return request


def run_registration(args: argparse.Namespace) -> int:
    import json

    from edgeagent.control import call_agent, state_dir_of

    result = call_agent(state_dir_of(args), "service", **registration_request(args))
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
    elif args.op == "register":
        verb = "updated" if result.get("replaced") else "registered"
        print(f"{result['name']} at {result['uri']}: {verb}")
    else:
        print(f"{result['name']} at {result['uri']}: deregistered")
    return 0


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
