"""``edgeagent run``: start the agent in the foreground (see :mod:`edgeagent.agent`).

``--token TOKEN`` first enrolls, as ``edgeagent join TOKEN`` does, when the state dir has no
cluster material yet (a device image can carry the same command line from first boot on);
once enrolled the token is not needed and is ignored.
"""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: Any) -> None:
    from edgeagent.config import add_agent_arguments

    parser = subparsers.add_parser(
        "run",
        help="run the agent in the foreground",
        description=(
            "Run the agent in the foreground. It needs the cluster material in its state dir: "
            "run 'edgeagent init' on the first device, 'edgeagent join TOKEN' (or pass --token) "
            "on the others. It keeps its identity there, joins the seeds saved at enrollment "
            "when no --join is given, and finds peers by mDNS. SIGTERM or SIGINT: graceful "
            "leave, exit 0. SIGHUP: re-read log_level and log_format from the config file "
            "(flags still win); everything else applies at the next start."
        ),
    )
    add_agent_arguments(parser)
    parser.add_argument(
        "--token",
        metavar="TOKEN",
        help="join token: enroll first if the state dir has no cluster material ('-': stdin)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import asyncio

    from edgeagent.agent import Agent
    from edgeagent.config import load_config
    from edgeagent.logs import setup_logging

    config = load_config(args)
    setup_logging(config.log_format, config.log_level)
    if args.token is not None:
        _enroll_first(
            config.state_dir, config.name, args.token, config.name_is_default, config.mdns
        )

    def reload_logging() -> None:  # SIGHUP
        fresh = load_config(args)
        setup_logging(fresh.log_format, fresh.log_level)

    agent = Agent(config, reload=reload_logging, on_started=freeze_startup_objects)
    return asyncio.run(agent.run())


def freeze_startup_objects() -> None:
    """Keep what start-up made (modules, config, certificates, features) out of every later
    garbage collection: it lives as long as the process, and each generation-2 collection
    walked all of it again, a 20-45 ms stop of the event loop with every request in flight
    waiting (CoAP at 50 in flight, gc callbacks in the agents). Start-up's own garbage is
    collected first, so none of it is kept. Here, not in :class:`Agent`: it is the process's
    choice (agents run inside a test's process too)."""
    import gc

    gc.collect()
    gc.freeze()


def _enroll_first(
    state_dir: Any, name: str, token: str, default_name: bool, mdns: bool
) -> None:
    import logging

    from edgeagent.logs import fields
    from edgeagent.netaddr import format_addr
    from edgeagent.onboarding import existing_material, join_with_token, read_token_text

    log = logging.getLogger("edgeagent")
    if existing_material(state_dir):
        log.info("already enrolled: --token ignored", extra=fields(state_dir=str(state_dir)))
        return
    joined = join_with_token(
        state_dir, name, read_token_text(token), default_name=default_name, mdns=mdns
    )
    log.info(
        "enrolled",
        extra=fields(cluster=joined.cluster, issuer=format_addr(joined.issuer),
                     node_id=joined.identity.node_id),
    )  # fmt: skip
