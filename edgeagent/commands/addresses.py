"""``edgeagent addresses``: overlay address blocks as the local agent knows them."""

from __future__ import annotations

from typing import Any

from edgeagent.control import add_query_command
from edgeagent.table import format_table


def register(subparsers: Any) -> None:
    add_query_command(
        subparsers,
        "addresses",
        render,
        help="list overlay address blocks: node, block, address, state",
        description="List every overlay address claim the local agent knows: node, block, "
        "the node's address (first usable of its block) and the claim's state (active, "
        "conflict: it must move, quarantined: owner dead, free: owner left or quarantine over).",
        json_help="print a JSON list of objects",
    )


def render(rows: list[dict[str, Any]]) -> str:
    table = [(r["node"], r["block"], r["address"], r["state"], r["member_state"]) for r in rows]
    return format_table(("node", "block", "address", "state", "member"), table)
