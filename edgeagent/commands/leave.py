"""``edgeagent leave``: leave the cluster gracefully and stop the agent."""

from __future__ import annotations

from typing import Any

from edgeagent.control import add_query_command


def register(subparsers: Any) -> None:
    add_query_command(
        subparsers,
        "leave",
        lambda result: "left the cluster",
        help="leave the cluster gracefully and stop the agent",
        description="Tell the local agent to leave: it broadcasts the leave (peers record "
        "it as LEFT, not DEAD), waits for it to spread, then exits. Same as SIGTERM.",
    )
