"""``edgeagent members``: the membership as the local agent sees it.

The table is fetched in pages of :data:`~edgeagent.control_json.MEMBERS_PAGE` members (the
control command's ``after`` and ``limit``), so any table size fits the control socket's
reply limit (one reply of 10,000 members did not).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Iterator
from typing import Any

from edgeagent.control import add_state_dir_argument, call_agent, state_dir_of
from edgeagent.control_json import MEMBERS_PAGE
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
    state_dir = state_dir_of(args)
    members = list(pages(lambda **page: call_agent(state_dir, "members", **page)))
    print(json.dumps(members, indent=2, sort_keys=True) if args.json else render(members))
    return 0


def pages(call: Callable[..., Any], size: int = MEMBERS_PAGE) -> Iterator[dict[str, Any]]:
    """Every member, one control call per page of ``size``, in name order."""
    after: str | None = None
    while True:
        page = call(after=after, limit=size) if after is not None else call(limit=size)
        if not isinstance(page, list):
            return
        fresh = [m for m in page if after is None or m.get("name", "") > after]
        yield from fresh
        if len(page) < size or not fresh:  # the last page (or an agent that does not page)
            return
        after = fresh[-1]["name"]


def render(members: list[dict[str, Any]]) -> str:
    rows = [
        (m["name"], m["address"], m["state"], m["incarnation"], _short_meta(m.get("meta")))
        for m in members
    ]
    return format_table(("name", "address", "state", "incarnation", "meta"), rows)


def _short_meta(meta: Any) -> str:
    if isinstance(meta, dict):
        return ",".join(f"{k}={v}" for k, v in sorted(meta.items()))
    return "" if meta is None else str(meta)
