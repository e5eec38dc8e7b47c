"""``edgeagent run``: start the agent in the foreground (see :mod:`edgeagent.agent`)."""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: Any) -> None:
    from edgeagent.config import add_agent_arguments

    parser = subparsers.add_parser(
        "run",
        help="run the agent in the foreground",
        description=(
            "Run the agent in the foreground. With no options it uses the defaults and the "
            "detected firmware profile, keeps its identity and a generated cluster key in the "
            "state dir, and finds peers by mDNS. SIGTERM or SIGINT: graceful leave, exit 0. "
            "SIGHUP: re-read log_level and log_format from the config file (flags still win); "
            "everything else applies at the next start."
        ),
    )
    add_agent_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import asyncio

    from edgeagent.agent import Agent
    from edgeagent.config import load_config
    from edgeagent.logs import setup_logging

    config = load_config(args)
    setup_logging(config.log_format, config.log_level)

    def reload_logging() -> None:  # SIGHUP
        fresh = load_config(args)
        setup_logging(fresh.log_format, fresh.log_level)

    return asyncio.run(Agent(config, reload=reload_logging).run())
