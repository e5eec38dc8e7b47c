"""Value checks for the config layers: each turns one raw value into a typed one or says what it expected.

A check raises :class:`Invalid` carrying only the expectation ("a positive
integer"); the caller knows where the value came from (file and key, or flag)
and makes the one-line :class:`~edgeagent.errors.ConfigError` from it.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from gossip.config import GossipConfig

from .schema import (
    DEFAULT_BIND_HOST,
    DEFAULT_GOSSIP_PORT,
    GOSSIP_FIELDS_ELSEWHERE,
    MAX_NAME_CHARS,
    HostPort,
)


class Invalid(ValueError):
    """A value failed a check; the caller adds where it came from."""

    def __init__(self, expected: str) -> None:
        super().__init__(expected)
        self.expected = expected


def show(value: object) -> str:
    """Render a bad value for an error line: strings quoted, TOML-style booleans."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        text = value if len(value) <= 60 else value[:57] + "..."
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "a list"
    return str(value)


_HOSTNAME_RE = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9_])?(\.[A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9_])?)*\.?$"
)
_HOSTPORT_RE = re.compile(r"^(?:\[(?P<v6>[^\]]*)\]|(?P<host>[^:\[\]]*))(?::(?P<port>[^:]*))?$")


def parse_hostport(
    text: object,
    *,
    default_port: int | None = None,
    empty_host: str | None = None,
    allow_port_zero: bool = False,
    ip_only: bool = False,
) -> HostPort:
    """Parse ``HOST:PORT``, ``[V6]:PORT``, ``:PORT`` (host ``empty_host``) or ``HOST`` (port ``default_port``).

    The host is an IP literal, or also a DNS name unless ``ip_only``; IPv6
    literals need brackets. Raises ValueError whose text says what was expected.
    """
    what = "HOST:PORT"
    if not isinstance(text, str):
        raise Invalid(what)
    match = _HOSTPORT_RE.match(text.strip())
    if match is None:
        raise Invalid(f"{what} (IPv6 as [ADDR]:PORT)" if text.count(":") > 1 else what)
    host = match["v6"] if match["v6"] is not None else match["host"]
    port_text = match["port"]
    if match["v6"] is not None:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise Invalid(f"{what} with an IPv6 address in the brackets") from None
    elif host == "":
        if empty_host is None:
            raise Invalid(f"{what} with a host")
        host = empty_host
    elif ip_only:
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise Invalid(f"{what} with HOST an IP address") from None
    elif not _HOSTNAME_RE.match(host):
        raise Invalid(f"{what} with HOST an IP address or host name")
    if port_text is None:
        if default_port is None:
            raise Invalid(f"{what} with a port")
        return host, default_port
    if not port_text.isdigit():
        raise Invalid(f"{what} with a numeric port")
    port = int(port_text)
    low = 0 if allow_port_zero else 1
    if not low <= port <= 65535:
        raise Invalid(f"{what} with a port in {low}..65535")
    return host, port


def check_name(value: object, what: str) -> str:
    if (
        not isinstance(value, str)
        or not value
        or len(value) > MAX_NAME_CHARS
        or any(ch.isspace() or not ch.isprintable() for ch in value)
    ):
        raise Invalid(f"a {what} of 1..{MAX_NAME_CHARS} printable characters without spaces")
    return value


def check_choice(value: object, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise Invalid("one of " + ", ".join(choices))
    return value


def check_bool(value: object) -> bool:
    if not isinstance(value, bool):
        raise Invalid("true or false")
    return value


def check_positive_int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise Invalid("a positive integer")
    return value


def check_port(value: object) -> int:
    """A TCP port 0..65535 (0: any), as a number or (from a flag) its digits."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 65535:
        raise Invalid("a port number 0..65535")
    return value


def check_positive_number(value: object) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not value > 0
        or value != value
        or value == float("inf")
    ):
        raise Invalid("a positive number")
    return float(value)


def check_path(value: object, base: Path | None) -> Path:
    if not isinstance(value, str) or not value:
        raise Invalid("a path")
    path = Path(value).expanduser()
    if not path.is_absolute():
        path = (base if base is not None else Path.cwd()) / path
    return path


def gossip_checkers() -> dict[str, Callable[[object], Any]]:
    """One check per settable GossipConfig field, chosen from the field's default type."""
    checks: dict[str, Callable[[object], Any]] = {}
    defaults = GossipConfig()
    for f in dataclasses.fields(GossipConfig):
        if f.name in GOSSIP_FIELDS_ELSEWHERE:
            continue
        default = getattr(defaults, f.name)
        if isinstance(default, bool):
            checks[f.name] = check_bool
        elif isinstance(default, int):
            checks[f.name] = check_positive_int
        else:
            checks[f.name] = check_positive_number
    return checks


def check_bind(text: object) -> HostPort:
    """The gossip bind address: IP only, port 0 allowed, bare host means the gossip port."""
    return parse_hostport(
        text,
        default_port=DEFAULT_GOSSIP_PORT,
        empty_host=DEFAULT_BIND_HOST,
        allow_port_zero=True,
        ip_only=True,
    )


def check_advertise(text: object) -> HostPort:
    """The advertised address: an IP and a non-zero port (bare host: the gossip port)."""
    return parse_hostport(text, default_port=DEFAULT_GOSSIP_PORT, ip_only=True)


def check_peer(text: object) -> HostPort:
    """A seed: an IP or host name; a bare host means the gossip port."""
    return parse_hostport(text, default_port=DEFAULT_GOSSIP_PORT)


def check_listener(text: object) -> HostPort:
    """A metrics or DNS listener: IP only, ``:PORT`` binds all addresses."""
    return parse_hostport(text, empty_host=DEFAULT_BIND_HOST, allow_port_zero=True, ip_only=True)


def check_switch_or_address(value: object) -> tuple[bool, HostPort | None]:
    """A feature key that takes ``true`` / ``false`` or a listener address."""
    if isinstance(value, bool):
        return value, None
    try:
        return True, check_listener(value)
    except Invalid as exc:
        raise Invalid(f"{exc.expected}, true or false") from None


def check_join_list(value: object) -> tuple[HostPort, ...]:
    """The file's ``join``: a list of seeds."""
    if not isinstance(value, list):
        raise Invalid("a list of HOST:PORT strings")
    peers = []
    for item in value:
        try:
            peers.append(check_peer(item))
        except Invalid as exc:
            raise Invalid(f"a list of {exc.expected}") from None
    return tuple(peers)


def check_prefix(value: object) -> str:
    """An overlay prefix in canonical form, host bits clear."""
    try:
        if not isinstance(value, str):
            raise ValueError
        return str(ipaddress.ip_network(value, strict=True))
    except ValueError:
        raise Invalid("an IP network such as 10.99.0.0/16 (no host bits set)") from None


# DER prefix of an Ed25519 SubjectPublicKeyInfo (RFC 8410): the raw key follows, 32 bytes.
_ED25519_SPKI = bytes.fromhex("302a300506032b6570032100")


def check_trusted_key(value: object, base: Path | None) -> bytes:
    """An Ed25519 public key: base64 of its 32 bytes, or a path to a PEM / base64 key file.

    Parsed without importing cryptography (the config is read before any feature starts).
    """
    import base64
    import binascii

    if not isinstance(value, str) or not value:
        raise Invalid("base64 of a 32-byte Ed25519 public key, or a key file path")
    text = value.strip()
    try:
        raw = base64.b64decode(text, validate=True)
        if len(raw) == 32:
            return raw
    except (ValueError, binascii.Error):
        pass
    path = check_path(value, base)
    try:
        data = path.read_bytes()[:4096].decode("ascii").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise Invalid(
            f"a readable key file ({path}: {getattr(exc, 'strerror', None) or exc})"
        ) from None
    body = "".join(line for line in data.splitlines() if not line.startswith("-----"))
    try:
        raw = base64.b64decode(body, validate=True)
    except (ValueError, binascii.Error):
        raw = b""
    if len(raw) == 44 and raw.startswith(_ED25519_SPKI):
        return raw[12:]
    if len(raw) == 32:
        return raw
    raise Invalid(f"an Ed25519 public key in {path} (PEM or base64)")


def check_https_url(value: object) -> str:
    """An ``https://HOST[:PORT]/PATH`` URL (the policy endpoint and the report endpoint)."""
    from urllib.parse import urlsplit

    from .schema import MAX_URL_CHARS

    expected = f"an https:// URL of at most {MAX_URL_CHARS} characters"
    if (
        not isinstance(value, str)
        or len(value) > MAX_URL_CHARS
        or not value.isprintable()
        or " " in value
    ):
        raise Invalid(expected)
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        raise Invalid(expected) from None
    if parts.scheme != "https" or not parts.hostname:
        raise Invalid(expected)
    return value
