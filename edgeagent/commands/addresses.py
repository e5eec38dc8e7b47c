"""``edgeagent addresses``: overlay address blocks as the local agent knows them."""

from __future__ import annotations

import argparse
import json
from typing import Any

from edgeagent.control import add_state_dir_argument, call_agent, state_dir_of
from edgeagent.table import format_table


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "addresses",
        help="list overlay address blocks: node, block, address, state",
        description="List every overlay address claim the local agent knows: node, block, "
        "the node's address (first usable of its block) and the claim's state (active, "
        "conflict: it must move, quarantined: owner dead, free: owner left or quarantine over).",
    )
    parser.add_argument("--json", action="store_true", help="print a JSON list of objects")
    add_state_dir_argument(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    rows = call_agent(state_dir_of(args), "addresses")
    if args.json:
        print(json.dumps(rows, indent=2, sort_keys=True))
        return 0
    table = [(r["node"], r["block"], r["address"], r["state"], r["member_state"]) for r in rows]
    print(format_table(("node", "block", "address", "state", "member"), table))
    return 0
