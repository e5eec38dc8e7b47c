"""``edgeagent leave``: leave the cluster gracefully and stop the agent."""

from __future__ import annotations

import argparse
from typing import Any

from edgeagent.control import add_state_dir_argument, call_agent, state_dir_of


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "leave",
        help="leave the cluster gracefully and stop the agent",
        description="Tell the local agent to leave: it broadcasts the leave (peers record "
        "it as LEFT, not DEAD), waits for it to spread, then exits. Same as SIGTERM.",
    )
    add_state_dir_argument(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    call_agent(state_dir_of(args), "leave")
    print("left the cluster")
    return 0
