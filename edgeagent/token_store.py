"""Join tokens issued by this node: created, listed, revoked, consumed; kept on disk.

How it works
------------
Only a node holding the CA key issues tokens, and only that node can honour
them. It keeps each token in ``<state dir>/tokens.json`` (mode 0600)::

    {"version": 1, "tokens": [{"id": "bylp7gtg", "secret": "<base64>",
      "created": 1767225600.0, "expires": 1767312000.0,
      "uses_left": null, "used": 0, "revoked": false}, ...]}

The secret itself is stored, not a hash of it: the issuer must compute the
HMAC proof (``overlay.tokens.check_proof``), and any value that lets it do so
is as good as the secret to an attacker. The file sits next to the CA key,
which is worth more, under the same 0600 mode.

Lifetime: ``ttl`` defaults to 24 hours and ``uses`` to unlimited within it, as
``kubeadm token create``: a site flashes one token into many identical images,
and the short lifetime bounds what a leaked token can do. ``--uses N`` limits
it (``uses_left`` counts down; 0 is "used up"). A token is refused, with a
:class:`Refusal` naming why, when it is unknown, revoked, expired or used up.

Every change is saved atomically (``persist.atomic_write``: temp file, fsync,
rename, fsync dir) before the call returns, so a use is on disk before the
caller hands out a certificate: a crash cannot give one use twice. Calls are
serialised by a lock, so the asyncio server may run them in a worker thread
(the fsync must not block the event loop). Tokens are forgotten
:data:`FORGET_AFTER` after they expire. Times are wall-clock seconds (the
caller's ``now``).
"""

from __future__ import annotations

import base64
import binascii
import enum
import math
import os
import secrets
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from overlay.tokens import Address, JoinToken, new_token, valid_token_id

from .errors import ConfigError, UsageError
from .persist import load_json, save_json

TOKENS_FILE = "tokens.json"
TOKENS_VERSION = 1
DEFAULT_TTL_S = 24 * 3600.0  # kubeadm token create's default
MAX_TTL_S = 365 * 24 * 3600.0  # a token is for onboarding, not a standing credential
FORGET_AFTER_S = 7 * 24 * 3600.0  # expired tokens stay listed (and refused as expired) a week
MAX_TOKENS = 1000  # keeps the file small; a site needs a handful


class Refusal(enum.Enum):
    """Why a token was refused; ``value`` is the line for a person."""

    UNKNOWN = "unknown token (not issued by this node, or forgotten)"
    REVOKED = "token revoked"
    EXPIRED = "token expired"
    USED_UP = "token used up"


@dataclass(frozen=True, slots=True)
class IssuedToken:
    """One token as the issuer keeps it. ``repr`` hides the secret."""

    token_id: str
    secret: bytes
    created: float
    expires: float
    uses_left: int | None  # None: unlimited until it expires
    used: int
    revoked: bool

    def __repr__(self) -> str:
        return (
            f"IssuedToken(token_id={self.token_id!r}, expires={self.expires}, "
            f"uses_left={self.uses_left}, used={self.used}, revoked={self.revoked})"
        )

    def refusal(self, now: float) -> Refusal | None:
        """Why this token cannot be used at ``now``, or None if it can."""
        if self.revoked:
            return Refusal.REVOKED
        if now >= self.expires:
            return Refusal.EXPIRED
        if self.uses_left is not None and self.uses_left <= 0:
            return Refusal.USED_UP
        return None


class TokenStore:
    """The tokens in ``<state_dir>/tokens.json``; loaded at construction (corrupt: ConfigError)."""

    def __init__(self, state_dir: str | os.PathLike[str]) -> None:
        self._path = Path(state_dir) / TOKENS_FILE
        self._lock = threading.Lock()
        self._tokens: dict[str, IssuedToken] = _parse(self._path, load_json(self._path, None))

    def create(
        self,
        ca_pin: bytes,
        addresses: Sequence[Address],
        now: float,
        ttl_s: float = DEFAULT_TTL_S,
        uses: int | None = None,
        randbytes: Callable[[int], bytes] = secrets.token_bytes,
    ) -> JoinToken:
        """A new token, saved before it is returned. Bad ttl/uses or too many tokens: UsageError."""
        if not (math.isfinite(ttl_s) and 0 < ttl_s <= MAX_TTL_S):
            raise UsageError(f"token ttl: expected 1s..{MAX_TTL_S / 86400:g} days")
        if uses is not None and (isinstance(uses, bool) or uses < 1):
            raise UsageError("token uses: expected a positive number")
        with self._lock:
            tokens = self._forget_old(now)
            if len(tokens) >= MAX_TOKENS:
                raise UsageError(f"{MAX_TOKENS} tokens outstanding; revoke some first")
            token = new_token(ca_pin, addresses, randbytes)
            while token.token_id in tokens:  # 40 random bits: practically never
                token = new_token(ca_pin, addresses, randbytes)
            tokens[token.token_id] = IssuedToken(
                token.token_id, token.secret, now, now + ttl_s, uses, 0, False
            )
            self._save(tokens)
            return token

    def list(self) -> list[IssuedToken]:
        """All tokens kept, oldest first."""
        with self._lock:
            return sorted(self._tokens.values(), key=lambda t: (t.created, t.token_id))

    def revoke(self, token_id: str) -> bool:
        """Revoke a token (saved); False if there is no such token."""
        with self._lock:
            token = self._tokens.get(token_id)
            if token is None:
                return False
            if not token.revoked:
                self._save({**self._tokens, token_id: replace(token, revoked=True)})
            return True

    def lookup(self, token_id: str, now: float) -> IssuedToken | Refusal:
        """The token if it may be used at ``now`` (nothing changes), else why not."""
        with self._lock:
            token = self._tokens.get(token_id) if valid_token_id(token_id) else None
            if token is None:
                return Refusal.UNKNOWN
            return token.refusal(now) or token

    def consume(self, token_id: str, now: float) -> IssuedToken | Refusal:
        """Use the token once (saved before returning), or say why it cannot be used."""
        with self._lock:
            token = self._tokens.get(token_id) if valid_token_id(token_id) else None
            if token is None:
                return Refusal.UNKNOWN
            refusal = token.refusal(now)
            if refusal is not None:
                return refusal
            left = None if token.uses_left is None else token.uses_left - 1
            used = replace(token, uses_left=left, used=token.used + 1)
            self._save({**self._tokens, token_id: used})
            return used

    def _forget_old(self, now: float) -> dict[str, IssuedToken]:
        return {k: t for k, t in self._tokens.items() if now < t.expires + FORGET_AFTER_S}

    def _save(self, tokens: dict[str, IssuedToken]) -> None:
        """Write, then adopt: if the write fails, memory still matches the disk."""
        doc = {"version": TOKENS_VERSION, "tokens": [_doc(t) for t in tokens.values()]}
        save_json(self._path, doc, 0o600)
        self._tokens = tokens


def _doc(token: IssuedToken) -> dict[str, Any]:
    return {
        "id": token.token_id,
        "secret": base64.b64encode(token.secret).decode("ascii"),
        "created": token.created,
        "expires": token.expires,
        "uses_left": token.uses_left,
        "used": token.used,
        "revoked": token.revoked,
    }


def _parse(path: Path, doc: Any) -> dict[str, IssuedToken]:
    if doc is None:
        return {}

    def bad(what: str) -> ConfigError:
        return ConfigError(f"{path}: corrupt token file: {what}; restore or remove it")

    if not isinstance(doc, dict) or doc.get("version") != TOKENS_VERSION:
        raise bad(f"expected an object with version {TOKENS_VERSION}")
    entries = doc.get("tokens")
    if not isinstance(entries, list):
        raise bad("tokens: expected a list")
    tokens: dict[str, IssuedToken] = {}
    for index, entry in enumerate(entries):
        try:
            token = _parse_entry(entry)
        except (KeyError, TypeError, ValueError, binascii.Error):
            raise bad(f"token {index + 1}: malformed") from None
        tokens[token.token_id] = token
    return tokens


def _parse_entry(entry: Any) -> IssuedToken:
    if not isinstance(entry, dict) or not valid_token_id(entry["id"]):
        raise ValueError
    secret = base64.b64decode(entry["secret"], validate=True)
    uses_left = entry["uses_left"]
    numbers = (entry["created"], entry["expires"], entry["used"])
    if (
        not all(isinstance(n, int | float) and not isinstance(n, bool) for n in numbers)
        or not (uses_left is None or (type(uses_left) is int and uses_left >= 0))
        or type(entry["revoked"]) is not bool
    ):
        raise ValueError
    return IssuedToken(
        entry["id"],
        secret,
        float(entry["created"]),
        float(entry["expires"]),
        uses_left,
        int(entry["used"]),
        entry["revoked"],
    )
