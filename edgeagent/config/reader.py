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
from overlay.catalog import CatalogError, Instance, check_tags, encode_instances, make_instance

from ..errors import ConfigError
from .checks import Invalid, check_bool, check_choice, check_positive_int, gossip_checkers, show
from .schema import GOSSIP_FIELDS_ELSEWHERE, SERVICE_KEYS, SERVICES_KEYS, Features, Limits


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

    def service_list(self, value: object) -> tuple[Instance, ...]:
        """Read the ``[[service]]`` tables: each a checked instance (``service[I].KEY`` in errors)."""
        if not isinstance(value, list):
            raise self.error("service", "[[service]] tables (an array of tables)", value)
        found: list[Instance] = []
        for index, table in enumerate(value):
            found.append(self._service(index, table))
        try:
            encode_instances(found)  # the count and size budget, and (name, uri) given twice
        except CatalogError as exc:
            raise ConfigError(f"{self.source}: service: {exc}") from None
        return tuple(found)

    def _service(self, index: int, table: object) -> Instance:
        where = f"service[{index}]"
        if not isinstance(table, dict):
            raise self.error(where, "a table with name and uri", table)
        self.check_keys(table, SERVICE_KEYS, f"{where}.")
        for key in ("name", "uri"):
            if not isinstance(table.get(key), str):
                raise self.error(f"{where}.{key}", "a string", table.get(key, dataclasses.MISSING))
        tags = table.get("tags", {})
        if not isinstance(tags, dict):
            raise self.error(f"{where}.tags", "a table such as { site = \"hall\" }", tags)
        weight = table.get("weight", 1)
        try:
            return make_instance(table["name"], table["uri"], weight=weight, tags=tags)
        except CatalogError as exc:
            key = _failed_key(str(exc))
            raise ConfigError(f"{self.source}: {where}.{key}: {exc}") from None

    def services_table(self, table: Mapping[str, Any]) -> dict[str, Any]:
        """Read the ``[services]`` table (this node's site, the mDNS import / export switches)."""
        self.check_keys(table, SERVICES_KEYS, "services.")
        found = {k: self.get(table, k, check_bool, "services.") for k in SERVICES_KEYS[1:] if k in table}
        if "site" in table:
            try:
                found["site"] = check_tags([("site", table["site"])])[0][1]
            except CatalogError:
                raise self.error("services.site", "1-64 printable characters", table["site"]) from None
        return found


def _failed_key(message: str) -> str:
    """Which key of a [[service]] table a CatalogError is about (by what it names first)."""
    for word, key in (("URI", "uri"), ("weight", "weight"), ("service name", "name")):
        if message.startswith(word):
            return key
    return "tags"  # "tag ...", "at most N tags"


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
