"""The ``edgeagent`` command line.

Each subcommand lives in ``edgeagent/commands/<name>.py`` and exposes
``register(subparsers)``, which adds its parser and sets ``func`` (called with
the parsed namespace, returning an exit code). Command modules import their
heavy dependencies inside ``func``, so ``edgeagent --help`` and the small
commands stay light.

Errors meant for a person (:class:`~edgeagent.errors.UsageError`) become one
line on stderr and exit code 2; an unreachable agent is one line and exit 1.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from .errors import AgentUnavailable, UsageError

# Order is the order shown by --help. A module missing from the tree is skipped,
# so partially built trees still run.
COMMANDS = (
    "init",
    "join",
    "token",
    "run",
    "members",
    "status",
    "leave",
    "keys",
    "addresses",
    "address",
    "profiles",
    "services",
    "service",
    "policy",
    "demo",
)


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line: ``edgeagent: error: ...``."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="edgeagent",
        description=(
            "Edge mesh agent: SWIM-gossip membership, overlay addresses and service discovery; "
            "CoAP routing between devices over mutual TLS with balancing and failover (MQTT next)."
        ),
        epilog="Run 'edgeagent COMMAND --help' for the options of one command.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"edgeagent.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"edgeagent.commands.{name}":
                continue
            raise
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.func(args) or 0)
    except (UsageError, AgentUnavailable) as exc:
        print(f"edgeagent: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # Output piped into something that closed early (`... --json | head`): not an error.
        # Point stdout at /dev/null so the interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
