"""Benchmarks: ``python -m testbed.bench NAME [options] --json``.

Each benchmark is a module ``testbed/bench/<name>.py`` (``-`` in the command
name becomes ``_``) exposing ``add_arguments(parser)`` and ``run(args) -> dict``.
The dispatcher prints the dict as one JSON object (``--json``) or as aligned
``key value`` lines.
"""
