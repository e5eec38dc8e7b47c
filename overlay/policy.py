"""Signed policy bundles (issue 11), sans-IO: the document, its signature, the accept rule.

The bundle. A TOML or JSON document (JSON when its first non-blank byte is ``{``), at most
:data:`MAX_BUNDLE_BYTES`, every section at most :data:`MAX_ENTRIES` entries::

    version = 7                         # integer >= 1, raised by every new bundle
    issued = 1764748800                 # unix seconds (or an RFC 3339 time with a zone)
    expires = 1767340800                # optional; after it the bundle is refused
    [intentions]
    default = "allow"                   # allow | deny when no rule matches
    rules = [{source = "service:web", destination = "db", action = "allow"},
             {source = "node:cam-3", destination = "*", action = "deny"}]
    [splits.api]                        # per service: version tag -> weight
    v1 = 90
    v2 = 10
    [retries.api]                       # per service
    attempts = 2
    [timeouts]                          # per service, seconds
    api = 2.5
    [faults.api]                        # per service
    delay_s = 0.1
    delay_percent = 5
    abort_code = "5.03"
    abort_percent = 1
    [rate_limits."service:web"]         # token bucket per source
    rate = 50.0                         # tokens per second
    burst = 100
    [[mqtt.permissions]]                # who may publish / subscribe what
    who = "node:gw-1"
    publish = ["site/+/telemetry"]
    subscribe = ["site/#"]
    [[mqtt.uplink]]                     # topic mappings to and from the cloud broker
    local = "site/+/telemetry"
    remote = "tenants/acme/"
    direction = "up"                    # up | down

Every error is one :class:`PolicyError` line naming the field (``intentions.rules[2].action:
expected allow or deny``); unknown keys are errors, so a typo never silently drops a rule.

A source selector is ``node:NAME`` (the peer's mTLS identity), ``service:NAME`` (any node
that runs that service) or ``*``; a destination is a service name or ``*``.

The signed envelope. The signature covers the exact bundle bytes (no canonicalisation to get
wrong: the operator's file is what is signed, and what is persisted and passed on)::

    {"v": 1, "bundle": "<base64 file bytes>", "key": "<key id>", "sig": "<base64 Ed25519>"}

signed over ``SIG_CONTEXT + bundle bytes`` (domain separation). The key id is the first 16
hex digits of SHA-256 of the raw 32-byte public key (:func:`key_id`).

The decision (:func:`decide`): given envelope bytes, the trusted keys, the persisted
high-water version and ``now``: refused as ``malformed`` (not an envelope), ``unknown_key``,
``bad_signature``, ``invalid`` (the bundle fails validation), ``rollback`` (version not above
the high-water mark) or ``expired``; else accepted. The signature is checked before the bundle
is parsed, so unsigned bytes never reach the TOML parser.

Intentions (:meth:`Intentions.allows`): of the matching rules the most specific wins (an
exact destination beats ``*``; then ``node:`` beats ``service:`` beats ``*`` as source); at
equal specificity ``deny`` wins. No rule matches: the default.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import json
import math
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .balancer import FaultPolicy as Fault  # a bundle's faults are the balancer's, as is
from .catalog import CatalogError, check_service_name
from .mqtt.topics import valid_filter

MAX_BUNDLE_BYTES: Final = 256 * 1024
MAX_ENVELOPE_BYTES: Final = MAX_BUNDLE_BYTES * 4 // 3 + 1024
MAX_ENTRIES: Final = 1024  # per section (rules, services, sources, permissions, mappings)
MAX_FILTERS: Final = 64  # topic filters per permission entry
MAX_TOPIC_LEVELS: Final = 32
MAX_RETRY_ATTEMPTS: Final = 10
MAX_TIMEOUT_S: Final = 300.0
MAX_WEIGHT: Final = 10_000
MAX_NAME_CHARS: Final = 128
ENVELOPE_VERSION: Final = 1
SIG_CONTEXT: Final = b"edgeagent-policy-v1\0"
KEY_ID_HEX: Final = 16

Action = Literal["allow", "deny"]
Reason = Literal["malformed", "unknown_key", "bad_signature", "invalid", "rollback", "expired"]
REASONS: Final[tuple[Reason, ...]] = (
    "malformed", "unknown_key", "bad_signature", "invalid", "rollback", "expired",
)  # fmt: skip
_TOP_KEYS: Final = frozenset(
    {"version", "issued", "expires", "intentions", "splits", "retries", "timeouts", "faults",
     "rate_limits", "mqtt"}
)  # fmt: skip


class PolicyError(ValueError):
    """A bundle, envelope or key that is not valid: one line naming the field."""


@dataclass(frozen=True, slots=True)
class Rule:
    source: str  # "node:NAME" | "service:NAME" | "*"
    destination: str  # service name | "*"
    action: Action


@dataclass(frozen=True, slots=True)
class Intentions:
    default: Action = "allow"
    rules: tuple[Rule, ...] = ()

    def allows(self, node: str, services: Iterable[str], destination: str) -> bool:
        """Whether a request from ``node`` (running ``services``) may reach ``destination``."""
        running = frozenset(services)
        best: tuple[int, int] | None = None
        action: Action = self.default
        for rule in self.rules:
            rank = _rank(rule, node, running, destination)
            if rank is None:
                continue
            if best is None or rank > best or (rank == best and rule.action == "deny"):
                best, action = rank, rule.action
        return action == "allow"


def _rank(rule: Rule, node: str, running: frozenset[str], dest: str) -> tuple[int, int] | None:
    if rule.destination not in ("*", dest):
        return None
    kind, _, name = rule.source.partition(":")
    if rule.source == "*":
        source_rank = 0
    elif kind == "service" and name in running:
        source_rank = 1
    elif kind == "node" and name == node:
        source_rank = 2
    else:
        return None
    return (0 if rule.destination == "*" else 1, source_rank)


@dataclass(frozen=True, slots=True)
class Retry:
    attempts: int


@dataclass(frozen=True, slots=True)
class RateLimit:
    rate: float  # tokens per second
    burst: int


@dataclass(frozen=True, slots=True)
class Permission:
    who: str
    publish: tuple[str, ...] = ()
    subscribe: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Uplink:
    local: str
    remote: str
    direction: Literal["up", "down"]


@dataclass(frozen=True, slots=True)
class Bundle:
    version: int
    issued: float
    expires: float | None = None
    intentions: Intentions = field(default_factory=Intentions)
    splits: Mapping[str, Mapping[str, int]] = field(default_factory=dict)
    retries: Mapping[str, Retry] = field(default_factory=dict)
    timeouts: Mapping[str, float] = field(default_factory=dict)
    faults: Mapping[str, Fault] = field(default_factory=dict)
    rate_limits: Mapping[str, RateLimit] = field(default_factory=dict)
    permissions: tuple[Permission, ...] = ()
    uplink: tuple[Uplink, ...] = ()


# -- validation helpers: each raises PolicyError naming `where` ------------------------------


def _table(value: object, where: str, keys: Iterable[str] | None = None) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise PolicyError(f"{where}: expected a table")
    if len(value) > MAX_ENTRIES:
        raise PolicyError(f"{where}: more than {MAX_ENTRIES} entries")
    if keys is not None:
        allowed = frozenset(keys)
        for key in value:
            if key not in allowed:
                raise PolicyError(f"{where}.{key}: unknown key (expected {', '.join(sorted(allowed))})")
    return value


def _list(value: object, where: str, limit: int = MAX_ENTRIES) -> list[Any]:
    if not isinstance(value, list):
        raise PolicyError(f"{where}: expected a list")
    if len(value) > limit:
        raise PolicyError(f"{where}: more than {limit} entries")
    return value


def _int(value: object, where: str, low: int, high: int) -> int:
    if type(value) is not int or not low <= value <= high:
        raise PolicyError(f"{where}: expected an integer from {low} to {high}")
    return value


def _number(value: object, where: str, low: float, high: float, *, open_low: bool = False) -> float:
    if type(value) not in (int, float):
        raise PolicyError(f"{where}: expected a number")
    try:
        number = float(value)  # type: ignore[arg-type]
    except OverflowError:  # an integer beyond any float
        raise PolicyError(f"{where}: expected a number from {low} to {high}") from None
    if not math.isfinite(number) or number < low or number > high or (open_low and number == low):
        raise PolicyError(f"{where}: expected a number {'above' if open_low else 'from'} {low} to {high}")
    return number


def _time(value: object, where: str) -> float:
    if isinstance(value, str):
        try:
            value = dt.datetime.fromisoformat(value)
        except ValueError:
            raise PolicyError(f"{where}: expected unix seconds or an RFC 3339 time") from None
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            raise PolicyError(f"{where}: a time needs a zone (e.g. Z or +01:00)")
        return value.timestamp()
    return _number(value, where, 0.0, 1e11)


def _choice(value: object, where: str, options: tuple[str, ...]) -> str:
    if value not in options:
        raise PolicyError(f"{where}: expected {' or '.join(options)}")
    assert isinstance(value, str)
    return value


def _service(value: object, where: str, wildcard: bool = False) -> str:
    if wildcard and value == "*":
        return "*"
    if not isinstance(value, str):
        raise PolicyError(f"{where}: expected a service name")
    try:
        return check_service_name(value)
    except CatalogError as exc:
        raise PolicyError(f"{where}: {exc}") from None


def _source(value: object, where: str) -> str:
    if value == "*":
        return "*"
    if isinstance(value, str):
        kind, sep, name = value.partition(":")
        if kind == "service" and sep:
            return f"service:{_service(name, where)}"
        if kind == "node" and sep and 0 < len(name) <= MAX_NAME_CHARS and name.isprintable():
            return value
    raise PolicyError(f"{where}: expected node:NAME, service:NAME or *")


def _filters(value: object, where: str) -> tuple[str, ...]:
    out = []
    for i, item in enumerate(_list(value, where, MAX_FILTERS)):
        if not isinstance(item, str) or not valid_filter(item, MAX_TOPIC_LEVELS):
            raise PolicyError(f"{where}[{i}]: expected an MQTT topic filter")
        out.append(item)
    return tuple(out)


def _per_service(doc: dict[str, Any], name: str, parse: Callable[[object, str], Any]) -> dict[str, Any]:
    section = _table(doc.get(name, {}), name)
    return {_service(svc, f"{name}.{svc}"): parse(value, f"{name}.{svc}") for svc, value in section.items()}


# -- sections ------------------------------------------------------------------------------------


def _intentions(value: object) -> Intentions:
    table = _table(value, "intentions", ("default", "rules"))
    default = _choice(table.get("default", "allow"), "intentions.default", ("allow", "deny"))
    rules = []
    for i, raw in enumerate(_list(table.get("rules", []), "intentions.rules")):
        where = f"intentions.rules[{i}]"
        item = _table(raw, where, ("source", "destination", "action"))
        for key in ("source", "destination", "action"):
            if key not in item:
                raise PolicyError(f"{where}.{key}: missing")
        rules.append(
            Rule(
                _source(item["source"], f"{where}.source"),
                _service(item["destination"], f"{where}.destination", wildcard=True),
                _choice(item["action"], f"{where}.action", ("allow", "deny")),  # type: ignore[arg-type]
            )
        )
    return Intentions(default, tuple(rules))  # type: ignore[arg-type]


def _split(value: object, where: str) -> dict[str, int]:
    table = _table(value, where)
    weights = {}
    for tag, weight in table.items():
        if not tag or len(tag) > MAX_NAME_CHARS or not tag.isprintable():
            raise PolicyError(f"{where}.{tag}: expected a version tag")
        weights[tag] = _int(weight, f"{where}.{tag}", 0, MAX_WEIGHT)
    if not weights or sum(weights.values()) == 0:
        raise PolicyError(f"{where}: expected at least one weight above 0")
    return weights


def _retry(value: object, where: str) -> Retry:
    table = _table(value, where, ("attempts",))
    return Retry(_int(table.get("attempts"), f"{where}.attempts", 0, MAX_RETRY_ATTEMPTS))


def _timeout(value: object, where: str) -> float:
    return _number(value, where, 0.0, MAX_TIMEOUT_S, open_low=True)


def _fault(value: object, where: str) -> Fault:
    table = _table(value, where, ("delay_s", "delay_percent", "abort_code", "abort_percent"))
    code = table.get("abort_code", "5.03")
    if not isinstance(code, str) or len(code) != 4 or code[1] != "." or code[0] not in "45":
        raise PolicyError(f"{where}.abort_code: expected a CoAP error code such as 5.03")
    if not code[2:].isdigit():
        raise PolicyError(f"{where}.abort_code: expected a CoAP error code such as 5.03")
    return Fault(
        _number(table.get("delay_s", 0.0), f"{where}.delay_s", 0.0, MAX_TIMEOUT_S),
        _number(table.get("delay_percent", 0.0), f"{where}.delay_percent", 0.0, 100.0),
        code,
        _number(table.get("abort_percent", 0.0), f"{where}.abort_percent", 0.0, 100.0),
    )


def _rate_limits(value: object) -> dict[str, RateLimit]:
    out = {}
    for source, raw in _table(value, "rate_limits").items():
        where = f"rate_limits.{source}"
        _source(source, where)
        table = _table(raw, where, ("rate", "burst"))
        out[source] = RateLimit(
            _number(table.get("rate"), f"{where}.rate", 0.0, 1e6, open_low=True),
            _int(table.get("burst"), f"{where}.burst", 1, 1_000_000),
        )
    return out


def _mqtt(value: object) -> tuple[tuple[Permission, ...], tuple[Uplink, ...]]:
    table = _table(value, "mqtt", ("permissions", "uplink"))
    perms = []
    for i, raw in enumerate(_list(table.get("permissions", []), "mqtt.permissions")):
        where = f"mqtt.permissions[{i}]"
        item = _table(raw, where, ("who", "publish", "subscribe"))
        perms.append(
            Permission(
                _source(item.get("who"), f"{where}.who"),
                _filters(item.get("publish", []), f"{where}.publish"),
                _filters(item.get("subscribe", []), f"{where}.subscribe"),
            )
        )
    maps = []
    for i, raw in enumerate(_list(table.get("uplink", []), "mqtt.uplink")):
        where = f"mqtt.uplink[{i}]"
        item = _table(raw, where, ("local", "remote", "direction"))
        local = _filters([item.get("local")], f"{where}.local")[0]
        remote = item.get("remote", "")
        if not isinstance(remote, str) or len(remote) > 1024 or any(c in remote for c in "+#\0"):
            raise PolicyError(f"{where}.remote: expected a topic prefix without wildcards")
        direction = _choice(item.get("direction", "up"), f"{where}.direction", ("up", "down"))
        maps.append(Uplink(local, remote, direction))  # type: ignore[arg-type]
    return tuple(perms), tuple(maps)


def _document(data: bytes) -> dict[str, Any]:
    if len(data) > MAX_BUNDLE_BYTES:
        raise PolicyError(f"bundle: larger than {MAX_BUNDLE_BYTES} bytes")
    try:
        text = data.decode("utf-8")
        if text.lstrip().startswith("{"):
            doc = json.loads(text)
        else:
            doc = tomllib.loads(text)
    except UnicodeDecodeError:
        raise PolicyError("bundle: not UTF-8 text") from None
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and TOMLDecodeError
        raise PolicyError(f"bundle: not TOML or JSON ({str(exc).splitlines()[0]})") from None
    return _table(doc, "bundle", _TOP_KEYS)


def parse_bundle(data: bytes) -> Bundle:
    """The bundle in ``data`` (TOML or JSON), fully validated; PolicyError naming the field."""
    doc = _document(data)
    if "version" not in doc:
        raise PolicyError("version: missing")
    if "issued" not in doc:
        raise PolicyError("issued: missing")
    version = _int(doc["version"], "version", 1, 2**53)
    issued = _time(doc["issued"], "issued")
    expires = _time(doc["expires"], "expires") if "expires" in doc else None
    if expires is not None and expires <= issued:
        raise PolicyError("expires: must be after issued")
    permissions, uplink = _mqtt(doc.get("mqtt", {}))
    return Bundle(
        version=version,
        issued=issued,
        expires=expires,
        intentions=_intentions(doc.get("intentions", {})),
        splits=_per_service(doc, "splits", _split),
        retries=_per_service(doc, "retries", _retry),
        timeouts=_per_service(doc, "timeouts", _timeout),
        faults=_per_service(doc, "faults", _fault),
        rate_limits=_rate_limits(doc.get("rate_limits", {})),
        permissions=permissions,
        uplink=uplink,
    )


# -- keys, signatures, envelopes -------------------------------------------------------------


def raw_public_key(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(key: Ed25519PublicKey) -> str:
    """The public name of an operator key: 16 hex digits of SHA-256 of its raw bytes."""
    return hashlib.sha256(raw_public_key(key)).hexdigest()[:KEY_ID_HEX]


def load_public_key(data: bytes) -> Ed25519PublicKey:
    """An Ed25519 public key from PEM (SubjectPublicKeyInfo) or base64 of the raw 32 bytes."""
    text = data.strip()
    try:
        if text.startswith(b"-----BEGIN"):
            key = serialization.load_pem_public_key(text)
            if not isinstance(key, Ed25519PublicKey):
                raise PolicyError("public key: not an Ed25519 key")
            return key
        raw = base64.b64decode(text, validate=True)
        if len(raw) != 32:
            raise PolicyError(f"public key: expected 32 bytes (base64), got {len(raw)}")
        return Ed25519PublicKey.from_public_bytes(raw)
    except (ValueError, binascii.Error, TypeError):
        raise PolicyError("public key: expected an Ed25519 PEM public key or base64 of 32 bytes") from None


def load_private_key(data: bytes) -> Ed25519PrivateKey:
    """An Ed25519 private key from unencrypted PKCS#8 PEM."""
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise PolicyError("private key: expected an unencrypted Ed25519 PEM private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise PolicyError("private key: not an Ed25519 key")
    return key


def private_pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def public_pem(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def sign(bundle: bytes, key: Ed25519PrivateKey) -> bytes:
    """The envelope (JSON bytes) carrying ``bundle`` signed with ``key``; the bundle is
    validated first, so an operator cannot sign a bundle agents would refuse as invalid."""
    parse_bundle(bundle)
    doc = {
        "v": ENVELOPE_VERSION,
        "bundle": base64.b64encode(bundle).decode(),
        "key": key_id(key.public_key()),
        "sig": base64.b64encode(key.sign(SIG_CONTEXT + bundle)).decode(),
    }
    return json.dumps(doc, sort_keys=True).encode() + b"\n"


@dataclass(frozen=True, slots=True)
class Envelope:
    bundle: bytes
    key: str
    sig: bytes


def parse_envelope(data: bytes) -> Envelope:
    """The envelope's parts, bounded and total (PolicyError for anything else)."""
    if len(data) > MAX_ENVELOPE_BYTES:
        raise PolicyError(f"envelope: larger than {MAX_ENVELOPE_BYTES} bytes")
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):
        raise PolicyError("envelope: not JSON") from None
    table = _table(doc, "envelope", ("v", "bundle", "key", "sig"))
    if table.get("v") != ENVELOPE_VERSION:
        raise PolicyError(f"envelope.v: expected {ENVELOPE_VERSION}")
    key = table.get("key")
    if not isinstance(key, str) or len(key) != KEY_ID_HEX:
        raise PolicyError(f"envelope.key: expected a key id of {KEY_ID_HEX} hex digits")
    parts = []
    for name in ("bundle", "sig"):
        text = table.get(name)
        if not isinstance(text, str):
            raise PolicyError(f"envelope.{name}: missing")
        try:
            parts.append(base64.b64decode(text, validate=True))
        except (ValueError, binascii.Error):
            raise PolicyError(f"envelope.{name}: expected base64") from None
    if len(parts[1]) != 64:
        raise PolicyError("envelope.sig: expected a 64-byte Ed25519 signature")
    return Envelope(parts[0], key, parts[1])


@dataclass(frozen=True, slots=True)
class Decision:
    accepted: bool
    reason: Reason | None  # None when accepted
    detail: str  # one line for logs and the CLI
    bundle: Bundle | None = None
    raw: bytes = b""  # the signed bundle bytes (when the signature verified)


def trusted_keys(keys: Iterable[Ed25519PublicKey]) -> dict[str, Ed25519PublicKey]:
    return {key_id(k): k for k in keys}


def decide(
    envelope: bytes, trusted: Mapping[str, Ed25519PublicKey], high_water: int, now: float
) -> Decision:
    """Accept or refuse a signed bundle (see the module docstring for the order of checks)."""
    try:
        env = parse_envelope(envelope)
    except PolicyError as exc:
        return Decision(False, "malformed", str(exc))
    key = trusted.get(env.key)
    if key is None:
        return Decision(False, "unknown_key", f"signed by key {env.key}, which is not trusted")
    try:
        key.verify(env.sig, SIG_CONTEXT + env.bundle)
    except InvalidSignature:
        return Decision(False, "bad_signature", f"signature does not verify with key {env.key}")
    try:
        bundle = parse_bundle(env.bundle)
    except PolicyError as exc:
        return Decision(False, "invalid", str(exc), raw=env.bundle)
    if bundle.version <= high_water:
        detail = f"version {bundle.version} is not above the high-water mark {high_water}"
        return Decision(False, "rollback", detail, bundle, env.bundle)
    if bundle.expires is not None and now >= bundle.expires:
        return Decision(False, "expired", f"version {bundle.version} expired", bundle, env.bundle)
    return Decision(True, None, f"version {bundle.version} accepted", bundle, env.bundle)
