"""Join tokens: text round trip, bounded total parsing, and the HMAC proof."""

from __future__ import annotations

import base64
import hashlib
import random

import msgpack
import pytest

from overlay import tokens
from overlay.tokens import JoinToken, TokenError, make_proof, parse_token

PIN = hashlib.sha256(b"ca spki").digest()
ADDRS = [("192.168.1.20", 7947), ("fd00::1", 7947)]


def _seeded(seed: int):
    rng = random.Random(seed)
    return rng.randbytes


def _encode(doc: object, check: bytes | None = None) -> str:
    body = msgpack.packb(doc, use_bin_type=True)
    check = hashlib.sha256(body).digest()[:4] if check is None else check
    return "ea1." + base64.urlsafe_b64encode(body + check).decode().rstrip("=")


def test_text_round_trips_and_is_one_short_line() -> None:
    token = tokens.new_token(PIN, ADDRS, _seeded(1))
    text = token.text()
    assert text.startswith("ea1.") and "\n" not in text and len(text) < 200
    assert parse_token(text) == token
    assert parse_token(f"  {text}\n") == token  # copy-paste whitespace


def test_ids_are_short_public_base32_and_secrets_128_bits() -> None:
    token = tokens.new_token(PIN, ADDRS, _seeded(2))
    assert len(token.token_id) == 8 and tokens.valid_token_id(token.token_id)
    assert len(token.secret) == 16
    assert token.secret.hex() not in repr(token)


def test_new_token_uses_the_injected_randomness() -> None:
    a = tokens.new_token(PIN, ADDRS, _seeded(3))
    b = tokens.new_token(PIN, ADDRS, _seeded(3))
    assert a == b
    assert tokens.new_token(PIN, ADDRS, _seeded(4)) != a


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "starting with ea1."),
        ("kubeadm.abcdef", "starting with ea1."),
        ("ea2.AAAA", "newer format"),
        ("ea1.!!!!", "damaged"),
        ("ea1.AAAAAAAAAAAA", "checksum"),
        ("ea1." + "A" * 2000, "longer than"),
    ],
)
def test_bad_text_gives_one_clear_line(text: str, reason: str) -> None:
    with pytest.raises(TokenError, match=reason) as info:
        parse_token(text)
    assert "\n" not in str(info.value)


def test_a_changed_character_is_reported_as_damaged() -> None:
    text = tokens.new_token(PIN, ADDRS, _seeded(5)).text()
    i = len(text) // 2
    flipped = text[:i] + ("B" if text[i] != "B" else "C") + text[i + 1 :]
    with pytest.raises(TokenError, match="damaged"):
        parse_token(flipped)


@pytest.mark.parametrize(
    ("doc", "reason"),
    [
        ({"a": 1}, "malformed"),
        (["abcdefgh", b"s" * 16, PIN], "malformed"),
        (["ABCDEFGH", b"s" * 16, PIN, [["h", 1]]], "id must be"),
        (["abcdefgh", b"s" * 15, PIN, [["h", 1]]], "secret"),
        (["abcdefgh", b"s" * 16, PIN[:31], [["h", 1]]], "pin"),
        (["abcdefgh", b"s" * 16, PIN, [["h", 0]]], "port"),
        (["abcdefgh", b"s" * 16, PIN, [["h", True]]], "malformed address"),
        (["abcdefgh", b"s" * 16, PIN, [["a b", 1]]], "host"),
        (["abcdefgh", b"s" * 16, PIN, [["h", 1]] * 9], "malformed"),
    ],
)
def test_well_encoded_but_invalid_content_is_refused(doc: object, reason: str) -> None:
    with pytest.raises(TokenError, match=reason):
        parse_token(_encode(doc))


def test_random_input_only_raises_token_error() -> None:
    rng = random.Random(8)
    good = tokens.new_token(PIN, ADDRS, _seeded(6)).text()
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_=.!é"
    for _ in range(2000):
        choice = rng.randrange(3)
        if choice == 0:
            text = "ea1." + "".join(rng.choice(alphabet) for _ in range(rng.randrange(300)))
        elif choice == 1:
            chars = list(good)
            chars[rng.randrange(4, len(chars))] = rng.choice(alphabet)
            text = "".join(chars)
        else:
            text = _encode(msgpack.unpackb(msgpack.packb(rng.randbytes(rng.randrange(80)))))
        try:
            parse_token(text)
        except TokenError:
            pass


def test_random_msgpack_bodies_with_valid_checksums_only_raise_token_error() -> None:
    rng = random.Random(9)
    for _ in range(2000):
        body = rng.randbytes(rng.randrange(1, 120))
        text = "ea1." + base64.urlsafe_b64encode(
            body + hashlib.sha256(body).digest()[:4]
        ).decode().rstrip("=")
        try:
            parse_token(text)
        except TokenError:
            pass


def test_proof_checks_with_the_same_inputs_only() -> None:
    token = tokens.new_token(PIN, ADDRS, _seeded(7))
    proof = make_proof(token.secret, token.token_id, b"server-cert", b"csr")
    assert tokens.check_proof(token.secret, token.token_id, b"server-cert", b"csr", proof)
    wrong = [
        (b"x" * 16, token.token_id, b"server-cert", b"csr"),  # another secret
        (token.secret, "aaaaaaaa", b"server-cert", b"csr"),  # another token id
        (token.secret, token.token_id, b"relay-cert", b"csr"),  # another server
        (token.secret, token.token_id, b"server-cert", b"other csr"),  # another request
    ]
    for args in wrong:
        assert not tokens.check_proof(*args, proof)
    assert not tokens.check_proof(token.secret, token.token_id, b"server-cert", b"csr", proof[:31])


def test_format_address_brackets_ipv6() -> None:
    assert tokens.format_address(("fd00::1", 7947)) == "[fd00::1]:7947"
    assert tokens.format_address(("10.0.0.1", 7947)) == "10.0.0.1:7947"


def test_token_equality_covers_all_fields() -> None:
    token = tokens.new_token(PIN, ADDRS, _seeded(10))
    assert token != JoinToken(token.token_id, token.secret, PIN, (ADDRS[0],))


def test_a_token_without_addresses_round_trips_and_is_shorter() -> None:
    # No address: the joiner finds an issuer of the pinned CA by mDNS.
    token = tokens.new_token(PIN, [], _seeded(11))
    assert token.addresses == ()
    assert parse_token(token.text()) == token
    assert len(token.text()) < len(tokens.new_token(PIN, ADDRS, _seeded(11)).text())
