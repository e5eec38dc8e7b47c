"""Keyring: AES-256-GCM over every datagram and stream frame.

Wire form of a sealed payload::

    version (1 byte, =1) | nonce (12 bytes) | ciphertext | tag (16 bytes)

The cluster name is the associated data, so two clusters sharing a LAN (or a
key) never accept each other's packets. The primary key encrypts; every
installed key is tried to decrypt, primary first. Rotation is memberlist's:
``install`` a new key everywhere, ``use`` it as primary everywhere, then
``remove`` the old one.

The nonce source is injected (``os.urandom`` by default) so the simulator can
stay deterministic; real agents must keep the default.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .errors import DecryptError, KeyringError

ENCRYPTION_VERSION = 1
KEY_SIZE = 32  # AES-256
NONCE_SIZE = 12  # GCM standard nonce (NIST SP 800-38D 8.2)
TAG_SIZE = 16
OVERHEAD = 1 + NONCE_SIZE + TAG_SIZE  # bytes added to every sealed payload


class Keyring:
    """A set of AES-256 keys, one primary."""

    def __init__(
        self,
        keys: Iterable[bytes],
        primary: bytes | None = None,
        *,
        nonce_source: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self._keys: list[bytes] = []
        self._ciphers: dict[bytes, AESGCM] = {}
        self._nonce = nonce_source
        for key in keys:
            self.install(key)
        if not self._keys:
            raise KeyringError("a keyring needs at least one key")
        if primary is not None:
            self.use(primary)

    @staticmethod
    def generate_key() -> bytes:
        """A new random 32-byte key (from the OS CSPRNG)."""
        return os.urandom(KEY_SIZE)

    @property
    def primary(self) -> bytes:
        return self._keys[0]

    @property
    def keys(self) -> list[bytes]:
        """All installed keys, primary first."""
        return list(self._keys)

    def install(self, key: bytes) -> None:
        """Add a key that may decrypt (not yet encrypt). Installing twice is a no-op."""
        if not isinstance(key, bytes) or len(key) != KEY_SIZE:
            raise KeyringError(f"a key must be {KEY_SIZE} bytes")
        if key not in self._ciphers:
            self._ciphers[key] = AESGCM(key)
            self._keys.append(key)

    def use(self, key: bytes) -> None:
        """Make an installed key the primary (the one that encrypts)."""
        if key not in self._ciphers:
            raise KeyringError("cannot use a key that is not installed")
        self._keys.remove(key)
        self._keys.insert(0, key)

    def remove(self, key: bytes) -> None:
        """Remove a key. The primary cannot be removed."""
        if key == self._keys[0]:
            raise KeyringError("cannot remove the primary key")
        if key in self._ciphers:
            del self._ciphers[key]
            self._keys.remove(key)

    def encrypt(self, plaintext: bytes, aad: bytes) -> bytes:
        """Seal ``plaintext`` under the primary key."""
        nonce = self._nonce(NONCE_SIZE)
        sealed = self._ciphers[self._keys[0]].encrypt(nonce, plaintext, aad)
        return bytes((ENCRYPTION_VERSION,)) + nonce + sealed

    def decrypt(self, data: bytes, aad: bytes) -> bytes:
        """Open a sealed payload with any installed key; raise :class:`DecryptError`."""
        if len(data) < OVERHEAD:
            raise DecryptError("sealed payload too short")
        if data[0] != ENCRYPTION_VERSION:
            raise DecryptError(f"unknown encryption version {data[0]}")
        nonce = data[1 : 1 + NONCE_SIZE]
        body = data[1 + NONCE_SIZE :]
        for key in self._keys:
            try:
                return self._ciphers[key].decrypt(nonce, body, aad)
            except InvalidTag:
                continue
        raise DecryptError("no installed key opens this payload (wrong key or other cluster)")
