"""Subcommands of the edgeagent CLI, one module each (see edgeagent/cli.py)."""
