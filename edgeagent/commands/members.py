"""``edgeagent members``: the membership as the local agent sees it."""

from __future__ import annotations

from typing import Any

from edgeagent.control import add_query_command
from edgeagent.table import format_table


def register(subparsers: Any) -> None:
    add_query_command(
        subparsers,
        "members",
        render,
        help="list cluster members and their state",
        description="List the members the local agent knows: name, address, state "
        "(alive|suspect|dead|left), incarnation and metadata.",
        json_help="print a JSON list of objects",
    )


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
