"""``edgeagent status``: who this agent is and how its cluster looks."""

from __future__ import annotations

import argparse
import json
from typing import Any

from edgeagent.control import add_state_dir_argument, call_agent, state_dir_of
from edgeagent.table import format_pairs


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "status",
        help="show this agent's identity and cluster health",
        description="Show the local agent: name, node id, address, incarnation, cluster, "
        "profile, members by state, local health score (0 is healthy) and uptime.",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    add_state_dir_argument(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    status = call_agent(state_dir_of(args), "status")
    if args.json:
        print(json.dumps(status, indent=2, sort_keys=True))
        return 0
    members = status.get("members", {})
    print(
        format_pairs(
            [
                ("name", status["name"]),
                ("node id", status["node_id"]),
                ("address", status["address"]),
                ("overlay", f"{status.get('overlay_address') or 'none yet'} "
                 f"(block {status.get('overlay_block') or 'none yet'})"),
                ("incarnation", status["incarnation"]),
                ("cluster", status["cluster"]),
                ("profile", f"{status['profile']} (gossip preset {status.get('preset')})"),
                ("members", ", ".join(f"{n} {s}" for s, n in members.items())),
                ("health score", status["health_score"]),
                ("uptime", f"{status['uptime_s']:.0f} s"),
                ("state dir", status["state_dir"]),
                ("mdns", "on" if status.get("mdns") else "off"),
                ("metrics", status.get("metrics") or "off"),
            ]
        )
    )
    return 0
