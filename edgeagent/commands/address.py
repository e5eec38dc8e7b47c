"""``edgeagent address allocate|release|list``: addresses for local services."""

from __future__ import annotations

import argparse
import json
from typing import Any

from edgeagent.control import add_state_dir_argument, call_agent, state_dir_of
from edgeagent.table import format_table


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "address",
        help="allocate or release an overlay address for a local service",
        description="Hand out addresses from this node's overlay block to named local services "
        "or containers. Allocation is idempotent per name and survives restarts; if the node "
        "is renumbered, each name keeps its offset in the new block.",
    )
    ops = parser.add_subparsers(dest="op", metavar="OP", required=True)
    for op, help_text in (
        ("allocate", "give NAME an address (the same one if it already has one)"),
        ("release", "return NAME's address to the block"),
    ):
        p = ops.add_parser(op, help=help_text, description=help_text)
        p.add_argument("name", metavar="NAME")
        p.add_argument("--json", action="store_true", help="print one JSON object")
        add_state_dir_argument(p)
        p.set_defaults(func=run)
    p = ops.add_parser(
        "list", help="list named local addresses", description="list named local addresses"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_state_dir_argument(p)
    p.set_defaults(func=run, name=None)


def run(args: argparse.Namespace) -> int:
    request: dict[str, Any] = {"op": args.op}
    if args.name is not None:
        request["name"] = args.name
    result = call_agent(state_dir_of(args), "address", **request)
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
    elif args.op == "list":
        print(format_table(("name", "address"), sorted(result.items())))
    elif args.op == "allocate":
        print(result["address"])
    elif not result["released"]:
        print(f"{args.name} had no address")
    return 0
