"""Reading one TOML document (the config file or a firmware profile) with one-line errors.

:class:`TableReader` wraps a parsed document and its source name; every
problem it finds is a :class:`~edgeagent.errors.ConfigError` naming the source
and the dotted key (``gossip.probe_interval``), with a suggestion for a
mistyped key.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from gossip.config import PRESETS

from ..errors import ConfigError
from .checks import Invalid, check_bool, check_choice, check_positive_int, gossip_checkers, show
from .schema import GOSSIP_FIELDS_ELSEWHERE, Features, Limits


class TableReader:
    """Reads one parsed TOML document, turning every problem into a one-line ConfigError.

    ``source`` names the file in messages; keys are reported dotted (``gossip.probe_interval``).
    """

    def __init__(self, source: str, data: Mapping[str, Any]) -> None:
        self.source = source
        self.data = data

    def error(self, key: str, expected: str, value: object = dataclasses.MISSING) -> ConfigError:
        """A ConfigError ``SOURCE: KEY: expected ..., got ...``."""
        got = "" if value is dataclasses.MISSING else f", got {show(value)}"
        return ConfigError(f"{self.source}: {key}: expected {expected}{got}")

    def check_keys(
        self, table: Mapping[str, Any], allowed: Sequence[str], prefix: str = ""
    ) -> None:
        """Reject keys not in ``allowed``, suggesting the closest known key."""
        for key in table:
            if key in allowed:
                continue
            dotted = f"{prefix}{key}"
            if prefix == "gossip." and key in GOSSIP_FIELDS_ELSEWHERE:
                raise ConfigError(
                    f"{self.source}: {dotted}: set it as {GOSSIP_FIELDS_ELSEWHERE[key]}"
                )
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f' (did you mean "{close[0]}"?)' if close else ""
            raise ConfigError(
                f"{self.source}: {dotted}: unknown key{hint}; expected one of {', '.join(sorted(allowed))}"
            )

    def table(self, key: str) -> Mapping[str, Any]:
        """A sub-table (empty when absent)."""
        value = self.data.get(key, {})
        if not isinstance(value, dict):
            raise self.error(key, "a table", value)
        return value

    def get(
        self, table: Mapping[str, Any], key: str, check: Callable[[object], Any], prefix: str = ""
    ) -> Any:
        """``check(table[key])`` or None when absent; a failed check names the key."""
        if key not in table:
            return None
        try:
            return check(table[key])
        except Invalid as exc:
            raise self.error(prefix + key, exc.expected, table[key]) from None

    def gossip(self, table: Mapping[str, Any]) -> tuple[str | None, dict[str, Any]]:
        """Read a ``[gossip]`` table: (preset or None, validated overrides)."""
        checks = gossip_checkers()
        self.check_keys(table, ["preset", *checks], "gossip.")
        chosen = self.get(table, "preset", lambda v: check_choice(v, sorted(PRESETS)), "gossip.")
        overrides = {
            key: self.get(table, key, check, "gossip.")
            for key, check in checks.items()
            if key in table
        }
        return chosen, overrides

    def limits(self, table: Mapping[str, Any]) -> dict[str, int]:
        """Read a ``[limits]`` table into Limits field overrides."""
        names = [f.name for f in dataclasses.fields(Limits)]
        self.check_keys(table, names, "limits.")
        return {
            key: self.get(table, key, check_positive_int, "limits.")
            for key in names
            if key in table
        }

    def features(self, table: Mapping[str, Any]) -> dict[str, bool]:
        """Read a ``[features]`` table into Features field overrides."""
        names = [f.name for f in dataclasses.fields(Features)]
        self.check_keys(table, names, "features.")
        return {
            key: self.get(table, key, check_bool, "features.") for key in names if key in table
        }


def read_toml(path: Path) -> dict[str, Any]:
    """Parse a TOML file; unreadable files and syntax errors are one ConfigError line with the file (and line)."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: not UTF-8 (byte {exc.start})") from None
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        found = re.search(r"\(at line (\d+), column (\d+)\)$", message)
        if found:
            message = message[: found.start()].rstrip()
            raise ConfigError(f"{path}:{found[1]}:{found[2]}: invalid TOML: {message}") from None
        raise ConfigError(f"{path}: invalid TOML: {message}") from None
