"""Issued join tokens: lifetime, uses, revocation, and atomic persistence."""

from __future__ import annotations

import hashlib
import json
import os
import stat

import pytest

from edgeagent.errors import ConfigError, UsageError
from edgeagent.token_store import DEFAULT_TTL_S, FORGET_AFTER_S, Refusal, TokenStore

PIN = hashlib.sha256(b"ca").digest()
ADDRS = [("127.0.0.1", 7947)]
T0 = 1_767_225_600.0


def test_new_token_is_usable_until_it_expires(tmp_path) -> None:
    store = TokenStore(tmp_path)
    token = store.create(PIN, ADDRS, T0)
    assert store.lookup(token.token_id, T0 + DEFAULT_TTL_S - 1).secret == token.secret
    assert store.consume(token.token_id, T0 + DEFAULT_TTL_S) is Refusal.EXPIRED


def test_default_uses_are_unlimited_and_n_uses_run_out(tmp_path) -> None:
    store = TokenStore(tmp_path)
    many = store.create(PIN, ADDRS, T0)
    for _ in range(5):
        assert not isinstance(store.consume(many.token_id, T0 + 1), Refusal)
    once = store.create(PIN, ADDRS, T0, uses=1)
    assert store.consume(once.token_id, T0 + 1).uses_left == 0
    assert store.consume(once.token_id, T0 + 2) is Refusal.USED_UP
    assert store.lookup(once.token_id, T0 + 2) is Refusal.USED_UP


def test_revoked_and_unknown_tokens_are_refused(tmp_path) -> None:
    store = TokenStore(tmp_path)
    token = store.create(PIN, ADDRS, T0)
    assert store.revoke(token.token_id)
    assert store.consume(token.token_id, T0) is Refusal.REVOKED
    assert not store.revoke("zzzzzzzz")
    assert store.consume("zzzzzzzz", T0) is Refusal.UNKNOWN
    assert store.consume("not an id at all", T0) is Refusal.UNKNOWN


def test_uses_and_revocations_survive_a_restart_in_a_0600_file(tmp_path) -> None:
    store = TokenStore(tmp_path)
    once = store.create(PIN, ADDRS, T0, uses=2)
    gone = store.create(PIN, ADDRS, T0 + 0.5)
    store.consume(once.token_id, T0 + 1)
    store.revoke(gone.token_id)
    again = TokenStore(tmp_path)
    assert again.lookup(once.token_id, T0 + 2).uses_left == 1
    assert again.lookup(gone.token_id, T0 + 2) is Refusal.REVOKED
    mode = stat.S_IMODE(os.stat(tmp_path / "tokens.json").st_mode)
    assert mode == 0o600
    assert [t.token_id for t in again.list()] == [once.token_id, gone.token_id]


def test_a_failed_save_changes_nothing_in_memory(tmp_path, monkeypatch) -> None:
    store = TokenStore(tmp_path)
    token = store.create(PIN, ADDRS, T0, uses=1)

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("edgeagent.token_store.save_json", full_disk)
    with pytest.raises(OSError):
        store.consume(token.token_id, T0 + 1)
    assert store.lookup(token.token_id, T0 + 1).uses_left == 1


def test_tokens_long_expired_are_forgotten_on_the_next_create(tmp_path) -> None:
    store = TokenStore(tmp_path)
    old = store.create(PIN, ADDRS, T0, ttl_s=60)
    store.create(PIN, ADDRS, T0 + 60 + FORGET_AFTER_S)
    assert old.token_id not in [t.token_id for t in store.list()]


def test_bad_ttl_and_uses_are_usage_errors(tmp_path) -> None:
    store = TokenStore(tmp_path)
    for kwargs in ({"ttl_s": 0}, {"ttl_s": float("inf")}, {"uses": 0}, {"uses": True}):
        with pytest.raises(UsageError):
            store.create(PIN, ADDRS, T0, **kwargs)


@pytest.mark.parametrize(
    "content",
    [
        "not json",
        json.dumps({"version": 2, "tokens": []}),
        json.dumps({"version": 1, "tokens": [{"id": "abcdefgh"}]}),
        json.dumps(
            {
                "version": 1,
                "tokens": [
                    {
                        "id": "abcdefgh",
                        "secret": "!!",
                        "created": 1,
                        "expires": 2,
                        "uses_left": None,
                        "used": 0,
                        "revoked": False,
                    }
                ],
            }
        ),
    ],
)
def test_a_corrupt_file_is_a_config_error_naming_it(tmp_path, content: str) -> None:
    (tmp_path / "tokens.json").write_text(content)
    with pytest.raises(ConfigError, match="tokens.json"):
        TokenStore(tmp_path)
