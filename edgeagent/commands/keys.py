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

    edgeagent keys generate              # prints a new base64 key
    edgeagent keys install NEWKEY        # every member can now decrypt it
    edgeagent keys list                  # wait until it is installed on all alive members
    edgeagent keys use NEWKEY            # refused until then; every member encrypts with it
    edgeagent keys remove OLDKEY         # refused while any member still uses it as primary

Each member publishes the fingerprints of its keys (a SHA-256 prefix, never the key) in its
replicated state, which is how ``list`` counts them and how ``use`` / ``remove`` check safety.
A member that was down during a step missed its broadcast, and once the others encrypt with
the new key it cannot read their gossip any more: run ``keys install NEWKEY`` (then ``use``)
on that member itself; the operation is applied locally first, and install and use are
idempotent everywhere else.
"""

from __future__ import annotations

import argparse
import base64
import json
from typing import Any

from edgeagent.control import add_state_dir_argument, call_agent, state_dir_of
from edgeagent.table import format_table

KEY_BYTES = 32  # AES-256 (gossip.keyring.KEY_SIZE)


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
        epilog="Rotation: keys generate; keys install NEW; keys list; keys use NEW; keys remove OLD",
    )
    ops = parser.add_subparsers(dest="op", metavar="OP", required=True)
    p = ops.add_parser("list", help="keys on this agent and how many members hold each")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_state_dir_argument(p)
    for name, text in (
        ("install", "add a key every member can decrypt with"),
        ("use", "make an installed key the one every member encrypts with"),
        ("remove", "remove a key from every member"),
    ):
        p = ops.add_parser(name, help=text, description=text + " (cluster-wide).")
        p.add_argument("key", metavar="KEY", help="base64 of a 32-byte key")
        p.add_argument("--force", action="store_true", help="skip the cluster safety check")
        add_state_dir_argument(p)
    ops.add_parser("generate", help="print a new random base64 key (no agent needed)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.op == "generate":
        from gossip.keyring import Keyring

        print(base64.b64encode(Keyring.generate_key()).decode())
        return 0
    state_dir = state_dir_of(args)
    if args.op == "list":
        return _list(call_agent(state_dir, "keys", op="list"), args.json)
    _check_key(args.key)
    result = call_agent(state_dir, "keys", op=args.op, key=args.key, force=args.force)
    print(
        f"{args.op} key {result['fingerprint']}: applied here and sent to "
        f"{max(result['members'] - 1, 0)} other members"
    )
    return 0


def _check_key(text: str) -> None:
    from edgeagent.errors import UsageError

    try:
        key = base64.b64decode(text.strip(), validate=True)
    except ValueError:
        raise UsageError(f"KEY: expected base64, got {text!r}") from None
    if len(key) != KEY_BYTES:
        raise UsageError(f"KEY: expected base64 of {KEY_BYTES} bytes, got {len(key)} bytes")


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
