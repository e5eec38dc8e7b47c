"""Keyring: AES-256-GCM sealing, rotation, and every way a payload is refused."""

from __future__ import annotations

import pytest

from gossip.errors import DecryptError, KeyringError
from gossip.keyring import KEY_SIZE, NONCE_SIZE, OVERHEAD, Keyring

AAD = b"edgeagent"
KEY_A = bytes(range(32))
KEY_B = bytes(range(32, 64))
KEY_C = bytes(range(64, 96))


def test_sealed_payload_opens_and_adds_exactly_overhead_bytes() -> None:
    ring = Keyring([KEY_A])
    sealed = ring.encrypt(b"hello", AAD)
    assert len(sealed) == len(b"hello") + OVERHEAD
    assert ring.decrypt(sealed, AAD) == b"hello"


def test_each_seal_uses_a_fresh_nonce_so_ciphertexts_differ() -> None:
    ring = Keyring([KEY_A])
    assert ring.encrypt(b"same", AAD) != ring.encrypt(b"same", AAD)


def test_injected_nonce_source_makes_sealing_deterministic() -> None:
    def fixed(n: int) -> bytes:
        return b"\x07" * n

    one = Keyring([KEY_A], nonce_source=fixed).encrypt(b"x", AAD)
    two = Keyring([KEY_A], nonce_source=fixed).encrypt(b"x", AAD)
    assert one == two
    assert one[1 : 1 + NONCE_SIZE] == b"\x07" * NONCE_SIZE


def test_wrong_key_is_rejected() -> None:
    sealed = Keyring([KEY_A]).encrypt(b"secret", AAD)
    with pytest.raises(DecryptError):
        Keyring([KEY_B]).decrypt(sealed, AAD)


def test_other_cluster_name_is_rejected_even_with_the_same_key() -> None:
    ring = Keyring([KEY_A])
    sealed = ring.encrypt(b"secret", b"cluster-one")
    with pytest.raises(DecryptError):
        ring.decrypt(sealed, b"cluster-two")


@pytest.mark.parametrize("keep", [0, 1, OVERHEAD - 1, OVERHEAD, OVERHEAD + 3])
def test_truncated_payload_is_rejected(keep: int) -> None:
    ring = Keyring([KEY_A])
    sealed = ring.encrypt(b"four", AAD)
    with pytest.raises(DecryptError):
        ring.decrypt(sealed[:keep], AAD)


def test_tampered_ciphertext_or_tag_is_rejected() -> None:
    ring = Keyring([KEY_A])
    sealed = bytearray(ring.encrypt(b"payload", AAD))
    for index in (1 + NONCE_SIZE, len(sealed) - 1):
        tampered = bytearray(sealed)
        tampered[index] ^= 0x01
        with pytest.raises(DecryptError):
            ring.decrypt(bytes(tampered), AAD)


def test_unknown_encryption_version_is_rejected() -> None:
    ring = Keyring([KEY_A])
    sealed = ring.encrypt(b"payload", AAD)
    with pytest.raises(DecryptError):
        ring.decrypt(b"\x02" + sealed[1:], AAD)


def test_rotation_install_use_remove() -> None:
    old_ring = Keyring([KEY_A])
    ring = Keyring([KEY_A])
    before = old_ring.encrypt(b"under A", AAD)

    ring.install(KEY_B)  # step 1: B may decrypt, A still encrypts
    assert ring.primary == KEY_A
    assert ring.decrypt(before, AAD) == b"under A"

    ring.use(KEY_B)  # step 2: B encrypts; A still decrypts stragglers
    assert ring.primary == KEY_B
    assert ring.keys == [KEY_B, KEY_A]
    assert ring.decrypt(before, AAD) == b"under A"
    with pytest.raises(DecryptError):
        old_ring.decrypt(ring.encrypt(b"under B", AAD), AAD)  # A-only peers cannot read B yet

    ring.remove(KEY_A)  # step 3: A is gone
    assert ring.keys == [KEY_B]
    with pytest.raises(DecryptError):
        ring.decrypt(before, AAD)
    assert ring.decrypt(ring.encrypt(b"under B", AAD), AAD) == b"under B"


def test_a_peer_that_installed_the_new_key_reads_the_rotated_sender() -> None:
    sender = Keyring([KEY_A, KEY_B])
    receiver = Keyring([KEY_A, KEY_B])
    sender.use(KEY_B)
    assert receiver.primary == KEY_A
    assert receiver.decrypt(sender.encrypt(b"x", AAD), AAD) == b"x"


def test_primary_cannot_be_removed() -> None:
    ring = Keyring([KEY_A, KEY_B])
    with pytest.raises(KeyringError):
        ring.remove(KEY_A)
    assert ring.keys == [KEY_A, KEY_B]


def test_use_of_a_key_not_installed_is_refused() -> None:
    ring = Keyring([KEY_A])
    with pytest.raises(KeyringError):
        ring.use(KEY_C)


@pytest.mark.parametrize("bad", [b"", b"\x00" * 16, b"\x00" * 33, "k" * KEY_SIZE])
def test_keys_must_be_32_bytes(bad: object) -> None:
    with pytest.raises(KeyringError):
        Keyring([bad])  # type: ignore[list-item]


def test_a_keyring_needs_a_key() -> None:
    with pytest.raises(KeyringError):
        Keyring([])


def test_primary_argument_selects_the_encrypting_key() -> None:
    ring = Keyring([KEY_A, KEY_B], primary=KEY_B)
    assert ring.primary == KEY_B
    assert Keyring([KEY_B]).decrypt(ring.encrypt(b"x", AAD), AAD) == b"x"


def test_installing_twice_is_a_no_op() -> None:
    ring = Keyring([KEY_A])
    ring.install(KEY_B)
    ring.install(KEY_B)
    assert ring.keys == [KEY_A, KEY_B]


def test_generated_keys_are_usable_and_distinct() -> None:
    one, two = Keyring.generate_key(), Keyring.generate_key()
    assert len(one) == KEY_SIZE and one != two
    assert Keyring([one]).decrypt(Keyring([one]).encrypt(b"x", AAD), AAD) == b"x"
