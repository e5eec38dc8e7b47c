"""Policy bundles: validation, signatures, the accept rule, intentions (overlay/policy.py)."""

from __future__ import annotations

import base64
import json

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from overlay import policy as pol

NOW = 1_764_748_800.0

FULL = b"""
version = 7
issued = 1764748000
expires = 1767340800
[intentions]
default = "deny"
rules = [
  {source = "service:web", destination = "db", action = "allow"},
  {source = "node:cam-3", destination = "*", action = "deny"},
  {source = "*", destination = "health", action = "allow"},
]
[splits.api]
v1 = 90
v2 = 10
[retries.api]
attempts = 2
[timeouts]
api = 2.5
[faults.api]
delay_s = 0.1
delay_percent = 5
abort_code = "5.03"
abort_percent = 1
[rate_limits."service:web"]
rate = 50.0
burst = 100
[[mqtt.permissions]]
who = "node:gw-1"
publish = ["site/+/telemetry"]
subscribe = ["site/#"]
[[mqtt.uplink]]
local = "site/+/telemetry"
remote = "tenants/acme/"
direction = "up"
"""


def bundle(version: int = 1, **extra: object) -> bytes:
    doc: dict[str, object] = {"version": version, "issued": NOW - 60, **extra}
    return json.dumps(doc).encode()


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def test_full_toml_bundle_parses() -> None:
    b = pol.parse_bundle(FULL)
    assert b.version == 7 and b.expires == 1767340800.0
    assert b.intentions.default == "deny" and len(b.intentions.rules) == 3
    assert b.splits == {"api": {"v1": 90, "v2": 10}}
    assert b.retries["api"].attempts == 2 and b.timeouts["api"] == 2.5
    assert b.faults["api"].abort_percent == 1.0
    assert b.rate_limits["service:web"] == pol.RateLimit(50.0, 100)
    assert b.permissions[0].subscribe == ("site/#",)
    assert b.uplink[0].direction == "up"


def test_json_and_rfc3339_times() -> None:
    b = pol.parse_bundle(b'{"version": 3, "issued": "2025-12-03T08:00:00Z"}')
    assert b.version == 3 and b.issued == 1764748800.0


@pytest.mark.parametrize(
    ("doc", "field"),
    [
        (b'{"issued": 1}', "version: missing"),
        (b'{"version": 0, "issued": 1}', "version:"),
        (b'{"version": true, "issued": 1}', "version:"),
        (b'{"version": 1}', "issued: missing"),
        (b'{"version": 1, "issued": "2025-01-01T00:00:00"}', "issued: a time needs a zone"),
        (b'{"version": 1, "issued": 5, "expires": 4}', "expires:"),
        (b'{"version": 1, "issued": 1, "colour": 1}', "bundle.colour: unknown key"),
        (b'{"version": 1, "issued": 1, "intentions": {"default": "maybe"}}', "intentions.default"),
        (
            b'{"version": 1, "issued": 1, "intentions": {"rules": [{"source": "x", '
            b'"destination": "db", "action": "allow"}]}}',
            "intentions.rules[0].source",
        ),
        (
            b'{"version": 1, "issued": 1, "intentions": {"rules": [{"source": "*", '
            b'"destination": "db"}]}}',
            "intentions.rules[0].action: missing",
        ),
        (b'{"version": 1, "issued": 1, "splits": {"api": {"v1": 0}}}', "splits.api:"),
        (b'{"version": 1, "issued": 1, "retries": {"api": {"attempts": 99}}}', "retries.api.attempts"),
        (b'{"version": 1, "issued": 1, "timeouts": {"api": 0}}', "timeouts.api"),
        (b'{"version": 1, "issued": 1, "timeouts": {"Bad Name": 1}}', "timeouts.Bad Name"),
        (b'{"version": 1, "issued": 1, "faults": {"api": {"abort_code": "2.05"}}}', "faults.api.abort_code"),
        (b'{"version": 1, "issued": 1, "rate_limits": {"*": {"rate": 1}}}', "rate_limits.*.burst"),
        (
            b'{"version": 1, "issued": 1, "mqtt": {"permissions": [{"who": "*", "publish": ["a/#/b"]}]}}',
            "mqtt.permissions[0].publish[0]",
        ),
        (
            b'{"version": 1, "issued": 1, "mqtt": {"uplink": [{"local": "a", "remote": "x/#"}]}}',
            "mqtt.uplink[0].remote",
        ),
        (b"version = ", "bundle: not TOML or JSON"),
        (b"version = 1\nissued = 1" + b"0" * 400, "issued: expected a number"),
        (b'{"version": 1, "issued": 1, "timeouts": {"a": 1' + b"0" * 400 + b"}}", "timeouts.a"),
        (b"\xff\xfe", "bundle: not UTF-8"),
    ],
)
def test_invalid_bundles_name_the_field(doc: bytes, field: str) -> None:
    with pytest.raises(pol.PolicyError) as info:
        pol.parse_bundle(doc)
    message = str(info.value)
    assert message.startswith(field) or field in message, message
    assert "\n" not in message


def test_bounds() -> None:
    with pytest.raises(pol.PolicyError, match="larger than"):
        pol.parse_bundle(b" " * (pol.MAX_BUNDLE_BYTES + 1))
    many = {f"s{i}": 1.0 for i in range(pol.MAX_ENTRIES + 1)}
    with pytest.raises(pol.PolicyError, match="timeouts: more than"):
        pol.parse_bundle(bundle(timeouts=many))
    deep = b'{"version": 1, "issued": 1, "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    with pytest.raises(pol.PolicyError):
        pol.parse_bundle(deep)


def test_sign_then_accept(key: Ed25519PrivateKey) -> None:
    trusted = pol.trusted_keys([key.public_key()])
    d = pol.decide(pol.sign(FULL, key), trusted, 6, NOW)
    assert d.accepted and d.reason is None and d.bundle is not None and d.bundle.version == 7
    assert d.raw == FULL


def test_tampered_bundle_refused(key: Ed25519PrivateKey) -> None:
    env = json.loads(pol.sign(bundle(2), key))
    env["bundle"] = base64.b64encode(bundle(3)).decode()
    d = pol.decide(json.dumps(env).encode(), pol.trusted_keys([key.public_key()]), 0, NOW)
    assert not d.accepted and d.reason == "bad_signature"


def test_unknown_key_refused(key: Ed25519PrivateKey) -> None:
    other = Ed25519PrivateKey.generate().public_key()
    d = pol.decide(pol.sign(bundle(), key), pol.trusted_keys([other]), 0, NOW)
    assert d.reason == "unknown_key"


def test_a_key_id_cannot_borrow_trust(key: Ed25519PrivateKey) -> None:
    """An envelope naming a trusted key id but signed by another key fails the signature."""
    trusted_key = Ed25519PrivateKey.generate()
    env = json.loads(pol.sign(bundle(), key))
    env["key"] = pol.key_id(trusted_key.public_key())
    d = pol.decide(json.dumps(env).encode(), pol.trusted_keys([trusted_key.public_key()]), 0, NOW)
    assert d.reason == "bad_signature"


@pytest.mark.parametrize("high_water", [5, 6])
def test_replay_of_an_old_or_same_version_refused(key: Ed25519PrivateKey, high_water: int) -> None:
    d = pol.decide(pol.sign(bundle(5), key), pol.trusted_keys([key.public_key()]), high_water, NOW)
    assert d.reason == "rollback" and "high-water mark" in d.detail


def test_expired_refused(key: Ed25519PrivateKey) -> None:
    env = pol.sign(bundle(2, expires=NOW), key)
    trusted = pol.trusted_keys([key.public_key()])
    assert pol.decide(env, trusted, 0, NOW - 1).accepted
    assert pol.decide(env, trusted, 0, NOW).reason == "expired"


def test_signed_invalid_bundle_refused_as_invalid(key: Ed25519PrivateKey) -> None:
    """sign() refuses an invalid bundle; one signed by hand still is refused at decide()."""
    with pytest.raises(pol.PolicyError):
        pol.sign(b'{"version": 1}', key)
    raw = b'{"version": 1}'
    env = {"v": 1, "bundle": base64.b64encode(raw).decode(), "key": pol.key_id(key.public_key()),
           "sig": base64.b64encode(key.sign(pol.SIG_CONTEXT + raw)).decode()}  # fmt: skip
    d = pol.decide(json.dumps(env).encode(), pol.trusted_keys([key.public_key()]), 0, NOW)
    assert d.reason == "invalid" and d.detail == "issued: missing"


def test_signature_is_domain_separated(key: Ed25519PrivateKey) -> None:
    raw = bundle()
    env = {"v": 1, "bundle": base64.b64encode(raw).decode(), "key": pol.key_id(key.public_key()),
           "sig": base64.b64encode(key.sign(raw)).decode()}  # fmt: skip
    d = pol.decide(json.dumps(env).encode(), pol.trusted_keys([key.public_key()]), 0, NOW)
    assert d.reason == "bad_signature"


@pytest.mark.parametrize(
    "data",
    [b"", b"[]", b"{", b'{"v": 2}', b'{"v": 1, "bundle": "!!", "key": "0123456789abcdef", "sig": ""}',
     b'{"v": 1, "bundle": "", "key": "short", "sig": ""}', b"x" * (pol.MAX_ENVELOPE_BYTES + 1),
     b'{"v": 1, "bundle": "", "key": "0123456789abcdef", "sig": "AAAA"}',
     b'{"v": 1, "key": "0123456789abcdef", "sig": "' + b"A" * 86 + b'=="}'],
)  # fmt: skip
def test_malformed_envelopes(key: Ed25519PrivateKey, data: bytes) -> None:
    d = pol.decide(data, pol.trusted_keys([key.public_key()]), 0, NOW)
    assert not d.accepted and d.reason == "malformed" and d.detail


def test_key_files_round_trip(key: Ed25519PrivateKey) -> None:
    pub = key.public_key()
    assert pol.key_id(pol.load_public_key(pol.public_pem(pub))) == pol.key_id(pub)
    raw64 = base64.b64encode(pol.raw_public_key(pub))
    assert pol.key_id(pol.load_public_key(raw64)) == pol.key_id(pub)
    assert pol.private_pem(pol.load_private_key(pol.private_pem(key))) == pol.private_pem(key)
    for bad in (b"", b"AAAA", b"-----BEGIN PUBLIC KEY-----\nxx\n-----END PUBLIC KEY-----\n"):
        with pytest.raises(pol.PolicyError):
            pol.load_public_key(bad)
    with pytest.raises(pol.PolicyError):
        pol.load_private_key(pol.public_pem(pub))


def test_intentions_most_specific_wins_and_deny_breaks_ties() -> None:
    i = pol.parse_bundle(FULL).intentions
    assert i.allows("n1", ["web"], "db")  # service rule
    assert not i.allows("n1", ["other"], "db")  # default deny
    assert i.allows("n1", [], "health")  # wildcard source
    assert not i.allows("cam-3", [], "api")  # node rule, wildcard destination
    assert i.allows("cam-3", [], "health")  # an exact destination beats an exact source
    assert i.allows("cam-3", ["web"], "db")  # exact destination beats "*" destination
    tie = pol.Intentions(
        "allow", (pol.Rule("service:a", "db", "allow"), pol.Rule("service:b", "db", "deny"))
    )
    assert not tie.allows("n", ["a", "b"], "db")
    assert tie.allows("n", ["a"], "db")
    assert pol.Intentions().allows("anyone", [], "anything")


def test_mutated_bundles_and_envelopes_only_ever_refuse(key: Ed25519PrivateKey) -> None:
    """Total: 3,000 random byte mutations of a valid bundle and of its envelope give a
    PolicyError or a Decision, never another exception."""
    import random

    rng = random.Random(11)
    trusted = pol.trusted_keys([key.public_key()])
    envelope = pol.sign(FULL, key)
    for i in range(3000):
        data = bytearray(FULL if i % 2 else envelope)
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        if i % 2:
            try:
                pol.parse_bundle(bytes(data))
            except pol.PolicyError:
                pass
        else:
            assert isinstance(pol.decide(bytes(data), trusted, 0, NOW), pol.Decision)
