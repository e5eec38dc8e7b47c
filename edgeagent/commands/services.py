"""``edgeagent services``: the mesh's service instances as the local agent knows them."""

from __future__ import annotations

from typing import Any

from edgeagent.control import add_query_command
from edgeagent.table import format_table


def register(subparsers: Any) -> None:
    add_query_command(
        subparsers,
        "services",
        render,
        help="list mesh service instances: name, node, endpoint, state",
        description="List every service instance the local agent knows: service name, "
        "protocol, owning node, endpoint, state (healthy; suspect: its node is suspected, "
        "used only when nothing healthy is left; ejected: failing, out of rotation for a "
        "while; down: its node is dead or left), weight and tags.",
        json_help="print a JSON list of {name, protocol, node, endpoint, state, weight, tags}",
    )


def render(rows: list[dict[str, Any]]) -> str:
    table = [
        (
            r["name"], r["node"], r["endpoint"], r["state"], r["weight"],
            ",".join(f"{k}={v}" for k, v in sorted(r["tags"].items())),
        )
        for r in rows
    ]  # fmt: skip
    if not table:
        return "no services (register one: edgeagent service register NAME coap://HOST:PORT)"
    return format_table(("service", "node", "endpoint", "state", "weight", "tags"), table)
