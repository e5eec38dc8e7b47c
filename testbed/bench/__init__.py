"""Benchmarks: ``python -m testbed.bench NAME [options] --json``.

Each benchmark is a module ``testbed/bench/<name>.py`` (``-`` in the command
name becomes ``_``) exposing ``add_arguments(parser)`` and ``run(args) -> dict``.
The dispatcher prints the dict as one JSON object (``--json``) or as aligned
``key value`` lines.
"""

from __future__ import annotations


class UsageError(SystemExit):
    """Bad options from a person: the dispatcher prints one line naming the problem and
    exits 2, argparse's convention (a failure while running stays a plain exit 1)."""

    def __init__(self, message: str) -> None:
        super().__init__(2)
        self.message = message
