"""State that must survive a crash: node identity, keyring, small JSON documents.

Every write is atomic (:func:`atomic_write`): the bytes go to a temporary file
in the same directory (``.NAME.tmp-RANDOM``), which is fsynced, renamed over
the target, and then the directory is fsynced so the rename itself is durable.
A ``kill -9`` or power cut at any moment leaves either the old file or the new
one; a temporary file left behind by a crash is never read and is overwritten
by nothing (it has a random name), so it is harmless and may be deleted.

Reading is strict: a file that exists but cannot be parsed is a
:class:`~edgeagent.errors.ConfigError` naming the file. Nothing is silently
regenerated, above all not the identity (a new node id would be a new member).

Files in the state dir:

``identity.json``
    ``{"version": 1, "name": ..., "node_id": <32 hex digits>, "incarnation": N,
    "default_name": BOOL, "machine": <32 hex digits> | null, "boot_epoch": N}``. The last
    three are optional (files written before them load): ``boot_epoch`` counts the starts of
    this state dir (the gossip core's anti-replay epoch, :mod:`gossip.replay`: peers drop
    datagrams of an older epoch); ``default_name`` says the name was made up
    (:func:`default_node_name`) rather than configured; ``machine`` is a fingerprint of the
    machine that created the identity (:func:`machine_fingerprint`), so a state dir copied to
    another machine (a cloned SD card) is told apart (:func:`is_clone`) and becomes a new node
    (:func:`renew_identity`) instead of a second member with the same id and address.
``keyring`` (or the configured key file)
    A JSON array of base64 keys, primary first, as Serf's keyring file. A file
    of base64 lines (primary first, ``#`` comments) is read too. Once a key rotation
    happened it is ``{"keys": [...], "generation": N}``: the keyring generation, raised by
    every rotation step, saved in the same atomic write, so a replayed key operation of a
    generation not above it is ignored after a restart (:mod:`edgeagent.features.keys`).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import secrets
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gossip.codec import MAX_COUNTER
from gossip.keyring import KEY_SIZE, Keyring

from .errors import ConfigError
from .logs import fields

IDENTITY_FILE = "identity.json"
# The largest incarnation peers accept; a saved one at or above it (a corrupt or
# hand-edited file) is repaired on load (repair_incarnation).
MAX_INCARNATION = MAX_COUNTER
IDENTITY_VERSION = 1
NODE_ID_BYTES = 16  # 128 random bits: collisions are negligible at any mesh size
STATE_DIR_MODE = 0o700
MAX_STATE_FILE_BYTES = 16 * 1024 * 1024  # refuse to read anything larger (a corrupt or wrong file)
# A default name is the hostname plus this many hex digits of the node id (24 bits: two of
# 1000 identical images collide with odds of about 3 in 100 000), within the name limit.
DEFAULT_NAME_ID_DIGITS = 6
MAX_NODE_NAME_CHARS = 128  # config.schema.MAX_NAME_CHARS (persist must not import the config)
# machine-id(5): systemd's, then D-Bus's older copy. EDGEAGENT_MACHINE_ID_FILE replaces them
# (tests; machines without either file then compare nothing and never look cloned).
MACHINE_ID_PATHS = ("/etc/machine-id", "/var/lib/dbus/machine-id")
MACHINE_ID_ENV = "EDGEAGENT_MACHINE_ID_FILE"
MAX_MACHINE_ID_BYTES = 256
# machine-id(5): the id is confidential, so only a keyed hash of it is stored (as systemd's
# sd_id128_get_machine_app_specific does).
MACHINE_FINGERPRINT_KEY = b"edgeagent identity machine"

log = logging.getLogger(__name__)


def atomic_write(path: str | os.PathLike[str], data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` atomically and durably (temp file, fsync, rename, fsync dir)."""
    target = Path(path)
    directory = target.parent
    tmp = directory / f".{target.name}.tmp-{secrets.token_hex(4)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        try:
            os.fchmod(fd, mode)  # the umask may have narrowed or (never) widened O_CREAT's mode
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(exc, OSError) and exc.errno is not None:
            exc.filename = str(target)  # name the file saved, not its temporary copy
        raise
    fsync_dir(directory)


def fsync_dir(directory: Path) -> None:
    """fsync a directory so a rename inside it survives a power cut."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def ensure_state_dir(state_dir: str | os.PathLike[str]) -> Path:
    """Create the state dir (and parents) if missing, 0700; return it as a Path.

    An unusable directory is a ConfigError naming it.
    """
    path = Path(state_dir)
    try:
        path.mkdir(mode=STATE_DIR_MODE, parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot create the state dir: {exc.strerror or exc}") from None
    if not path.is_dir():
        raise ConfigError(f"{path}: expected a directory for the state dir")
    return path


def _read(path: Path) -> bytes | None:
    """The file's bytes, or None when it does not exist; other failures are ConfigError."""
    try:
        with path.open("rb") as fh:
            data = fh.read(MAX_STATE_FILE_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if len(data) > MAX_STATE_FILE_BYTES:
        raise ConfigError(f"{path}: corrupt: larger than {MAX_STATE_FILE_BYTES} bytes")
    return data


def load_json(path: str | os.PathLike[str], default: Any) -> Any:
    """The JSON document at ``path``, or ``default`` when the file does not exist.

    A file that exists but is not valid JSON is a ConfigError naming it.
    """
    target = Path(path)
    data = _read(target)
    if data is None:
        return default
    try:
        return json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{target}: corrupt: not JSON ({exc}); restore or remove it") from None


def json_bytes(obj: Any) -> bytes:
    """``obj`` as the JSON text every state file holds."""
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8")


def save_json(path: str | os.PathLike[str], obj: Any, mode: int = 0o600) -> None:
    """Write ``obj`` as JSON to ``path`` atomically (see :func:`atomic_write`)."""
    atomic_write(path, json_bytes(obj), mode)


# --------------------------------------------------------------------------- identity


@dataclass(frozen=True, slots=True)
class NodeIdentity:
    """Who this node is across restarts.

    ``node_id`` (128 random bits as 32 hex digits) is generated once and never
    changes (unless the state dir turns out to be a copy: :func:`renew_identity`);
    ``incarnation`` is the SWIM incarnation number, which only this
    node raises. The runtime's start() loads the identity, bumps the
    incarnation by one and saves it *before* joining, so a restart after
    ``kill -9`` always announces a higher incarnation than anything the
    cluster has seen from the previous run (refutations raise it further in
    memory; the next start bumps from the saved value, so the runtime should
    also save when it refutes).
    """

    name: str
    node_id: str
    incarnation: int
    default_name: bool = False  # the name was made up (default_node_name), not configured
    machine: str | None = None  # machine_fingerprint() of the machine that created it
    # Starts so far: the gossip anti-replay epoch (never lowered, even by renew_identity).
    boot_epoch: int = 0

    def bumped(self) -> NodeIdentity:
        """The identity for a new start: incarnation + 1 and boot epoch + 1 (saved before joining)."""
        return dataclasses.replace(
            self, incarnation=self.incarnation + 1, boot_epoch=self.boot_epoch + 1
        )

    def with_incarnation(self, incarnation: int) -> NodeIdentity:
        """The same identity at ``incarnation``."""
        return dataclasses.replace(self, incarnation=incarnation)


def default_node_name(hostname: str, node_id: str) -> str:
    """``HOSTNAME-XXXXXX``: unique on a site of identical images (same hostname everywhere)."""
    suffix = "-" + node_id[:DEFAULT_NAME_ID_DIGITS]
    return hostname[: MAX_NODE_NAME_CHARS - len(suffix)] + suffix


def machine_id_paths(environ: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """Where this machine's id is read: :data:`MACHINE_ID_ENV` if set, else :data:`MACHINE_ID_PATHS`."""
    env = os.environ if environ is None else environ
    override = env.get(MACHINE_ID_ENV)
    return (override,) if override else MACHINE_ID_PATHS


def machine_fingerprint(paths: Sequence[str | os.PathLike[str]] = MACHINE_ID_PATHS) -> str | None:
    """A keyed hash of the first non-empty machine id in ``paths``, or None if there is none."""
    for path in paths:
        try:
            with open(path, "rb") as fh:
                raw = fh.read(MAX_MACHINE_ID_BYTES).strip()
        except OSError:
            continue
        if raw:
            return hashlib.blake2b(raw, key=MACHINE_FINGERPRINT_KEY, digest_size=16).hexdigest()
    return None


def is_clone(identity: NodeIdentity, machine: str | None) -> bool:
    """True when ``identity`` was created on another machine than ``machine`` (a copied state dir)."""
    return identity.machine is not None and machine is not None and identity.machine != machine


def _parse_identity(path: Path, doc: Any, hostname: str | None = None) -> NodeIdentity:
    def bad(what: str) -> ConfigError:
        return ConfigError(
            f"{path}: corrupt identity: {what}; restore it from a backup (removing it makes this a new node)"
        )

    if not isinstance(doc, dict):
        raise bad("expected a JSON object")
    if doc.get("version") != IDENTITY_VERSION:
        raise bad(f"expected version {IDENTITY_VERSION}, got {doc.get('version')!r}")
    node_id = doc.get("node_id")
    if not isinstance(node_id, str) or not _is_hex(node_id, 2 * NODE_ID_BYTES):
        raise bad(f"node_id: expected {2 * NODE_ID_BYTES} lowercase hex digits")
    name = doc.get("name")
    if not isinstance(name, str) or not name:
        raise bad("name: expected a non-empty string")
    incarnation = doc.get("incarnation")
    if isinstance(incarnation, bool) or not isinstance(incarnation, int) or incarnation < 0:
        raise bad("incarnation: expected a non-negative integer")
    # Written before default names were marked: the name is a default one if it is the
    # hostname (the old default).
    default_name = doc.get("default_name", name == hostname)
    if not isinstance(default_name, bool):
        raise bad("default_name: expected true or false")
    machine = doc.get("machine")
    if machine is not None and not _is_hex(machine, 32):
        raise bad("machine: expected 32 lowercase hex digits or null")
    boot_epoch = doc.get("boot_epoch", 0)
    if isinstance(boot_epoch, bool) or not isinstance(boot_epoch, int) or boot_epoch < 0:
        raise bad("boot_epoch: expected a non-negative integer")
    return NodeIdentity(name, node_id, incarnation, default_name, machine, boot_epoch)


def _is_hex(value: object, digits: int) -> bool:
    return (
        isinstance(value, str)
        and len(value) == digits
        and all(c in "0123456789abcdef" for c in value)
    )


def load_identity(
    state_dir: str | os.PathLike[str], hostname: str | None = None
) -> NodeIdentity | None:
    """The saved identity, or None if there is none yet (corrupt: ConfigError).

    ``hostname``: an identity saved before names were marked default has a default name
    if it is this hostname.
    """
    path = Path(state_dir) / IDENTITY_FILE
    doc = load_json(path, None)
    return None if doc is None else _parse_identity(path, doc, hostname)


def load_or_create_identity(
    state_dir: str | os.PathLike[str],
    name: str,
    *,
    default_name: bool = False,
    machine: str | None = None,
) -> NodeIdentity:
    """Load the identity from ``state_dir``, creating (and saving) it on first start.

    ``name`` is the configured name, or with ``default_name`` the hostname a default name is
    made from (:func:`default_node_name`) when the identity is created. A configured name
    replaces the saved one (the node id and incarnation survive a rename); with no name
    configured the saved name is kept, so an upgrade or a hostname change renames nothing.
    An identity saved without a machine fingerprint adopts ``machine``; one created on
    another machine is returned as it is (check :func:`is_clone`). Does not bump the
    incarnation: start() does that (``save_identity(state_dir, identity.bumped())``)
    before joining.
    """
    directory = ensure_state_dir(state_dir)
    saved = load_identity(directory, name if default_name else None)
    if saved is None:
        node_id = secrets.token_hex(NODE_ID_BYTES)
        chosen = default_node_name(name, node_id) if default_name else name
        identity = NodeIdentity(chosen, node_id, 0, default_name, machine)
    else:
        identity = repair_incarnation(directory, saved)
        if not default_name and saved.name != name:
            identity = dataclasses.replace(identity, name=name, default_name=False)
        if identity.machine is None and machine is not None:
            identity = dataclasses.replace(identity, machine=machine)
        if identity == saved:
            return identity
    save_identity(directory, identity)
    return identity


def repair_incarnation(state_dir: Path, identity: NodeIdentity) -> NodeIdentity:
    """``identity`` with an incarnation start() can bump and peers accept: one at or above
    :data:`MAX_INCARNATION` becomes 0, with one warning (never a refusal to start).

    0 is safe: peers that hold this node at a higher incarnation tell it so (their push-pull,
    a suspicion), and it refutes above that, as after any restart; a number near the ceiling
    would leave it nothing to refute with.
    """
    if identity.incarnation < MAX_INCARNATION:
        return identity
    log.warning(
        f"{Path(state_dir) / IDENTITY_FILE}: incarnation {identity.incarnation} is above the "
        f"most peers accept ({MAX_INCARNATION}); reset to 0 (peers' records of this node are "
        "refuted from there)",
        extra=fields(incarnation=identity.incarnation),
    )
    return identity.with_incarnation(0)


def renew_identity(
    state_dir: str | os.PathLike[str], identity: NodeIdentity, hostname: str, machine: str | None
) -> NodeIdentity:
    """Make ``identity`` (a copy of another node's) a new node: new node id, incarnation 0,
    and a new default name if its name was a default one (from ``hostname``); saved. The
    boot epoch is kept: a configured name stays, and peers drop an older epoch under it."""
    node_id = secrets.token_hex(NODE_ID_BYTES)
    name = default_node_name(hostname, node_id) if identity.default_name else identity.name
    renewed = NodeIdentity(name, node_id, 0, identity.default_name, machine, identity.boot_epoch)
    save_identity(state_dir, renewed)
    return renewed


def save_identity(state_dir: str | os.PathLike[str], identity: NodeIdentity) -> None:
    """Persist ``identity`` atomically to ``<state_dir>/identity.json`` (0600)."""
    save_json(Path(state_dir) / IDENTITY_FILE, identity_doc(identity))


def identity_doc(identity: NodeIdentity) -> dict[str, Any]:
    """The JSON document of ``identity.json``."""
    return {
        "version": IDENTITY_VERSION,
        "name": identity.name,
        "node_id": identity.node_id,
        "incarnation": identity.incarnation,
        "default_name": identity.default_name,
        "machine": identity.machine,
        "boot_epoch": identity.boot_epoch,
    }


# --------------------------------------------------------------------------- keyring


def _decode_key(path: Path, text: object, index: int) -> bytes:
    try:
        if not isinstance(text, str):
            raise ValueError
        key = base64.b64decode(text.strip(), validate=True)
    except (ValueError, binascii.Error):
        raise ConfigError(f"{path}: key {index + 1}: expected base64 text") from None
    if len(key) != KEY_SIZE:
        raise ConfigError(
            f"{path}: key {index + 1}: expected {KEY_SIZE} bytes (AES-256), got {len(key)}"
        )
    return key


def load_keyring(path: str | os.PathLike[str]) -> list[bytes]:
    """The keys in a keyring file, primary first. Missing, empty or malformed: ConfigError."""
    return load_keyring_document(path)[0]


def _keyring_entries(target: Path, doc: Any) -> tuple[list[Any], int]:
    """The key entries and generation of a parsed JSON keyring (array or object)."""
    if isinstance(doc, list):
        return doc, 0
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise ConfigError(f"{target}: corrupt keyring: expected a JSON array of base64 keys")
    generation = doc.get("generation", 0)
    if isinstance(generation, bool) or not isinstance(generation, int) or generation < 0:
        raise ConfigError(f"{target}: corrupt keyring: generation: expected a non-negative integer")
    return doc["keys"], generation


def load_keyring_document(path: str | os.PathLike[str]) -> tuple[list[bytes], int]:
    """The keys (primary first) and the keyring generation (0 before any rotation)."""
    target = Path(path)
    data = _read(target)
    if data is None:
        raise ConfigError(f"{target}: keyring file not found")
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise ConfigError(
            f"{target}: corrupt keyring: expected a JSON array or lines of base64 text"
        ) from None
    generation = 0
    if text.lstrip().startswith(("[", "{")):
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{target}: corrupt keyring: not JSON ({exc})") from None
        entries, generation = _keyring_entries(target, doc)
    else:
        entries = [
            line.strip()
            for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")
        ]
    keys: list[bytes] = []
    for index, entry in enumerate(entries):
        key = _decode_key(target, entry, index)
        if key not in keys:
            keys.append(key)
    if not keys:
        raise ConfigError(f"{target}: expected at least one key in the keyring")
    _warn_if_readable_by_others(target)
    return keys, generation


def _warn_if_readable_by_others(path: Path) -> None:
    """Keys readable by other users defeat the encryption; say so (the operator may want 0640 for a group)."""
    with contextlib.suppress(OSError):
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o007:
            log.warning(
                "keyring file is readable by other users; chmod 600 it",
                extra=fields(path=str(path), mode=oct(mode)),
            )


def save_keyring(path: str | os.PathLike[str], keys: list[bytes], generation: int = 0) -> None:
    """Write ``keys`` (primary first) atomically, mode 0600 (see :func:`keyring_bytes`)."""
    atomic_write(path, keyring_bytes(keys, generation), 0o600)


def keyring_bytes(keys: list[bytes], generation: int = 0) -> bytes:
    """The keyring file's content: a JSON array of base64 keys (primary first), or with a
    ``generation`` above 0 ``{"keys": [...], "generation": N}``; ValueError on a bad key."""
    if not keys:
        raise ValueError("a keyring needs at least one key")
    for key in keys:
        if len(key) != KEY_SIZE:
            raise ValueError(f"a key must be {KEY_SIZE} bytes")
    encoded = [base64.b64encode(k).decode("ascii") for k in keys]
    doc: Any = {"keys": encoded, "generation": generation} if generation > 0 else encoded
    return (json.dumps(doc, indent=2) + "\n").encode("ascii")


def load_or_create_keyring(path: str | os.PathLike[str]) -> list[bytes]:
    """The keyring at ``path``, primary first; on first start a new random key is generated and saved (0600)."""
    target = Path(path)
    if _read(target) is None:
        ensure_state_dir(target.parent)
        keys = [Keyring.generate_key()]
        save_keyring(target, keys)
        return keys
    return load_keyring(target)
