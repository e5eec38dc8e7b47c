"""``edgeagent profiles [--json]``: list the firmware profiles and mark the one this machine matches.

The match uses the same detection as ``edgeagent run`` (device-tree model,
then memory size, then generic-x86_64); ``--profile`` on ``run`` overrides it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any


def register(subparsers: Any) -> None:
    """Add the ``profiles`` subcommand."""
    parser = subparsers.add_parser(
        "profiles",
        help="list firmware profiles and mark the one this machine matches",
        description="List the firmware profiles shipped with edgeagent; '*' marks the one this machine matches.",
    )
    parser.add_argument(
        "--json", action="store_true", help="print a JSON list of objects instead of a table"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print the profiles; returns 0."""
    from edgeagent import config

    profiles = config.load_profiles()
    model = config.read_device_model()
    memory = config.read_memory_mb()
    matched = config.detect_profile(model, profiles, memory_mb=memory).name
    rows = [
        {
            "name": p.name,
            "description": p.description,
            "match": list(p.match),
            "matched": p.name == matched,
            "gossip_preset": p.gossip_preset,
            "gossip_overrides": dict(p.gossip_overrides),
            "limits": dataclasses.asdict(p.limits),
            "features": dataclasses.asdict(p.features),
        }
        for p in sorted(profiles.values(), key=lambda p: p.name)
    ]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    width = max(len(name) for name in profiles)
    print(f"device model: {model or '(none)'}; memory: {f'{memory} MB' if memory else 'unknown'}")
    print(f"  {'NAME':<{width}}  PRESET  DESCRIPTION")
    for r in rows:
        mark = "*" if r["matched"] else " "
        print(f"{mark} {r['name']:<{width}}  {r['gossip_preset']:<6}  {r['description']}")
    return 0
