"""``edgeagent keys``: rotate the cluster's encryption keys without downtime.

Cluster-wide, as Serf's keyring commands: run a command on any one agent and it applies the
operation to its own keyring, saves it, and sends it to every member as a user broadcast
(encrypted like all gossip); each agent applies it and saves its keyring in turn. Why
cluster-wide: a rotation is only safe in lock-step. Every member must be able to decrypt a
new key before anyone encrypts with it, and nobody may drop the old key while someone still
encrypts with it; doing this node by node on a fleet of Pis is exactly the error-prone
choreography the cluster can do by itself. Any member holding the current key may rotate,
because that key is already the cluster's credential.

Rotation (memberlist's order, checked by the agent):

    edgeagent keys generate --file new.key    # a new key, 0600; prints its fingerprint NEWFP
    edgeagent keys install --file new.key     # every member can now decrypt it
    edgeagent keys list                       # wait until it is installed on all alive members
    edgeagent keys use NEWFP                  # refused until then; every member encrypts with it
    edgeagent keys remove OLDFP               # refused while any member still uses it as primary

A key is a secret, so it never goes on the command line (where ``ps`` and the shell history
show it to others): it is read from a file (``--file F``) or stdin (``-``, the default of
``install``; ``keys install < new.key``). ``use`` and ``remove`` take the key's fingerprint
instead (``keys list`` shows them), or the key itself from a file or stdin.

Each member publishes the fingerprints of its keys (a SHA-256 prefix, never the key) in its
replicated state, which is how ``list`` counts them and how ``use`` / ``remove`` check safety.
A member that was down during a step missed its broadcast, and once the others encrypt with
the new key it cannot read their gossip any more: run ``keys install --file new.key`` (then
``use``) on that member itself; the operation is applied locally first, and install and use are
idempotent everywhere else.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

from edgeagent.control import add_state_dir_argument, call_agent, state_dir_of
from edgeagent.table import format_table

KEY_BYTES = 32  # AES-256 (gossip.keyring.KEY_SIZE)
FINGERPRINT = re.compile(r"[0-9a-fA-F]{16}")  # edgeagent.features.keys.fingerprint: 8 bytes, hex
MAX_KEY_TEXT = 4096  # characters read from a key file or stdin: one base64 key and whitespace
KEY_FILE_MODE = 0o600
ON_ARGV = (
    "a key on the command line is visible to other users (ps) and kept in shell history: "
    "pass it on stdin (edgeagent keys {op} < FILE) or with --file FILE"
)


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "keys",
        help="list, install, use or remove cluster encryption keys (cluster-wide)",
        description=(
            "Manage the cluster's AES-256 keys. Cluster-wide: a change made on one agent is "
            "applied and saved by every member (it travels as an encrypted broadcast), because "
            "a rotation is only safe in lock-step: install a new key everywhere, then use it, "
            "then remove the old one. 'use' is refused until every alive member has the key "
            "and 'remove' while any member still encrypts with it (override: --force)."
        ),
        epilog=(
            "Rotation: keys generate --file new.key; keys install --file new.key; keys list; "
            "keys use NEWFP; keys remove OLDFP. Keys are read from a file or stdin, never argv."
        ),
    )
    ops = parser.add_subparsers(dest="op", metavar="OP", required=True)
    p = ops.add_parser("list", help="keys on this agent and how many members hold each")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_state_dir_argument(p)
    for name, text, target in (
        ("install", "add a key every member can decrypt with", "-"),
        ("use", "make an installed key the one every member encrypts with", "FINGERPRINT"),
        ("remove", "remove a key from every member", "FINGERPRINT"),
    ):
        p = ops.add_parser(name, help=text, description=text + " (cluster-wide).")
        p.add_argument(
            "target",
            nargs="?",
            metavar=target if name == "install" else "FINGERPRINT|-",
            help="- reads the base64 key from stdin (the default); never the key itself"
            if name == "install"
            else "the key's fingerprint (keys list), or - to read the key itself from stdin",
        )
        p.add_argument("--file", metavar="FILE", type=Path, help="read the base64 key from FILE")
        p.add_argument("--force", action="store_true", help="skip the cluster safety check")
        add_state_dir_argument(p)
    p = ops.add_parser("generate", help="print a new random base64 key (no agent needed)")
    p.add_argument(
        "--file", metavar="FILE", type=Path,
        help="write the key to FILE (new, mode 0600) and print its fingerprint instead",
    )  # fmt: skip
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.op == "generate":
        return _generate(args.file)
    state_dir = state_dir_of(args)
    if args.op == "list":
        return _list(call_agent(state_dir, "keys", op="list"), args.json)
    named = _key_argument(args.op, args.target, args.file)
    result = call_agent(state_dir, "keys", op=args.op, force=args.force, **named)
    print(
        f"{args.op} key {result['fingerprint']}: applied here and sent to "
        f"{max(result['members'] - 1, 0)} other members"
    )
    return 0


def _generate(path: Path | None) -> int:
    from edgeagent.errors import UsageError
    from edgeagent.features.keys import fingerprint
    from gossip.keyring import Keyring

    key = Keyring.generate_key()
    text = base64.b64encode(key).decode()
    if path is None:
        print(text)
        return 0
    try:  # O_EXCL: never overwrite a key, never widen an existing file's mode
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, KEY_FILE_MODE)
    except OSError as exc:
        raise UsageError(f"{path}: cannot create the key file: {exc.strerror or exc}") from None
    with os.fdopen(fd, "w") as out:
        out.write(text + "\n")
    print(fingerprint(key))
    return 0


def _key_argument(op: str, target: str | None, path: Path | None) -> dict[str, str]:
    """``{"key": ...}`` from a file or stdin, or ``{"fingerprint": ...}`` (use / remove)."""
    from edgeagent.errors import UsageError

    if path is not None and target is not None:
        raise UsageError(f"give the key with --file or as {target!r}, not both")
    if path is None and (target == "-" or (target is None and op == "install")):
        return {"key": _checked_key(_read_stdin(), "stdin")}
    if path is not None:
        try:
            with path.open(encoding="utf-8") as fh:
                text = fh.read(MAX_KEY_TEXT)
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"{path}: cannot read the key: {exc}") from None
        return {"key": _checked_key(text, str(path))}
    if target is None:
        raise UsageError(f"{op}: give the key's FINGERPRINT (keys list), - (stdin) or --file FILE")
    if FINGERPRINT.fullmatch(target) and op != "install":
        return {"fingerprint": target.lower()}
    if _is_key(target):
        raise UsageError(ON_ARGV.format(op=op))
    expected = "- or --file FILE" if op == "install" else "a FINGERPRINT, - or --file FILE"
    raise UsageError(f"{op}: expected {expected}, got {target!r}")


def _read_stdin() -> str:
    if sys.stdin.isatty():
        import getpass

        return getpass.getpass("base64 key (not echoed): ")
    return sys.stdin.read(MAX_KEY_TEXT)


def _is_key(text: str) -> bool:
    try:
        return len(base64.b64decode(text.strip(), validate=True)) == KEY_BYTES
    except ValueError:
        return False


def _checked_key(text: str, source: str) -> str:
    """The base64 key in ``text``, checked; UsageError naming ``source`` (never the text)."""
    from edgeagent.errors import UsageError

    text = text.strip()
    try:
        key = base64.b64decode(text, validate=True)
    except ValueError:
        raise UsageError(f"KEY: expected base64 on {source}") from None
    if len(key) != KEY_BYTES:
        raise UsageError(
            f"KEY: expected base64 of {KEY_BYTES} bytes on {source}, got {len(key)} bytes"
        )
    return text


def _list(listing: dict[str, Any], as_json: bool) -> int:
    if as_json:
        print(json.dumps(listing, indent=2, sort_keys=True))
        return 0
    alive = listing["alive"]
    rows = [
        (
            row["fingerprint"],
            row["key"] or "(not on this agent)",
            "yes" if row["local_primary"] else "",
            f"{row['installed']}/{alive}",
            f"{row['primary']}/{alive}",
        )
        for row in listing["keys"]
    ]
    print(format_table(("fingerprint", "key", "primary here", "installed", "primary on"), rows))
    return 0
