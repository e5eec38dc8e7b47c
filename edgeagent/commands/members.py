"""``edgeagent members``: the membership as the local agent sees it."""

from __future__ import annotations

import argparse
import json
from typing import Any

from edgeagent.control import add_state_dir_argument, call_agent, state_dir_of
from edgeagent.table import format_table


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "members",
        help="list cluster members and their state",
        description="List the members the local agent knows: name, address, state "
        "(alive|suspect|dead|left), incarnation and metadata.",
    )
    parser.add_argument("--json", action="store_true", help="print a JSON list of objects")
    add_state_dir_argument(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    members = call_agent(state_dir_of(args), "members")
    if args.json:
        print(json.dumps(members, indent=2, sort_keys=True))
        return 0
    rows = [
        (
            m["name"],
            m["address"],
            m["state"],
            m["incarnation"],
            _short_meta(m.get("meta")),
        )
        for m in members
    ]
    print(format_table(("name", "address", "state", "incarnation", "meta"), rows))
    return 0


def _short_meta(meta: Any) -> str:
    if isinstance(meta, dict):
        return ",".join(f"{k}={v}" for k, v in sorted(meta.items()))
    return "" if meta is None else str(meta)
