"""Errors meant for a person: the CLI prints ``str(err)`` on one line and exits 2."""

from __future__ import annotations


class UsageError(Exception):
    """Bad input from a person (flag, config file, CLI argument). Exit code 2."""

    exit_code = 2


class ConfigError(UsageError):
    """A config file or flag is wrong. The message names the file, the key and what was expected."""


class AgentUnavailable(Exception):
    """The CLI could not reach a running agent's control socket. Exit code 1."""

    exit_code = 1
