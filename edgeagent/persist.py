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
    ``{"version": 1, "name": ..., "node_id": <32 hex digits>, "incarnation": N}``.
``keyring`` (or the configured key file)
    A JSON array of base64 keys, primary first, as Serf's keyring file. A file
    of base64 lines (primary first, ``#`` comments) is read too.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import logging
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gossip.keyring import KEY_SIZE, Keyring

from .errors import ConfigError
from .logs import fields

IDENTITY_FILE = "identity.json"
IDENTITY_VERSION = 1
NODE_ID_BYTES = 16  # 128 random bits: collisions are negligible at any mesh size
STATE_DIR_MODE = 0o700
MAX_STATE_FILE_BYTES = 16 * 1024 * 1024  # refuse to read anything larger (a corrupt or wrong file)

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
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
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


def save_json(path: str | os.PathLike[str], obj: Any, mode: int = 0o600) -> None:
    """Write ``obj`` as JSON to ``path`` atomically (see :func:`atomic_write`)."""
    text = json.dumps(obj, indent=2, sort_keys=True) + "\n"
    atomic_write(path, text.encode("utf-8"), mode)


# --------------------------------------------------------------------------- identity


@dataclass(frozen=True, slots=True)
class NodeIdentity:
    """Who this node is across restarts.

    ``node_id`` (128 random bits as 32 hex digits) is generated once and never
    changes; ``incarnation`` is the SWIM incarnation number, which only this
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

    def bumped(self) -> NodeIdentity:
        """The same identity with incarnation + 1."""
        return NodeIdentity(self.name, self.node_id, self.incarnation + 1)


def _parse_identity(path: Path, doc: Any) -> NodeIdentity:
    def bad(what: str) -> ConfigError:
        return ConfigError(
            f"{path}: corrupt identity: {what}; restore it from a backup (removing it makes this a new node)"
        )

    if not isinstance(doc, dict):
        raise bad("expected a JSON object")
    if doc.get("version") != IDENTITY_VERSION:
        raise bad(f"expected version {IDENTITY_VERSION}, got {doc.get('version')!r}")
    node_id = doc.get("node_id")
    if (
        not isinstance(node_id, str)
        or len(node_id) != 2 * NODE_ID_BYTES
        or not all(c in "0123456789abcdef" for c in node_id)
    ):
        raise bad(f"node_id: expected {2 * NODE_ID_BYTES} lowercase hex digits")
    name = doc.get("name")
    if not isinstance(name, str) or not name:
        raise bad("name: expected a non-empty string")
    incarnation = doc.get("incarnation")
    if isinstance(incarnation, bool) or not isinstance(incarnation, int) or incarnation < 0:
        raise bad("incarnation: expected a non-negative integer")
    return NodeIdentity(name=name, node_id=node_id, incarnation=incarnation)


def load_identity(state_dir: str | os.PathLike[str]) -> NodeIdentity | None:
    """The saved identity, or None if there is none yet (corrupt: ConfigError)."""
    path = Path(state_dir) / IDENTITY_FILE
    doc = load_json(path, None)
    return None if doc is None else _parse_identity(path, doc)


def load_or_create_identity(state_dir: str | os.PathLike[str], name: str) -> NodeIdentity:
    """Load the identity from ``state_dir``, creating (and saving) it on first start.

    The node id and incarnation survive a change of ``name``; the new name is
    saved. Does not bump the incarnation: start() does that (``save_identity(
    state_dir, identity.bumped())``) before joining.
    """
    directory = ensure_state_dir(state_dir)
    identity = load_identity(directory)
    if identity is None:
        identity = NodeIdentity(name=name, node_id=secrets.token_hex(NODE_ID_BYTES), incarnation=0)
    elif identity.name == name:
        return identity
    else:
        identity = NodeIdentity(
            name=name, node_id=identity.node_id, incarnation=identity.incarnation
        )
    save_identity(directory, identity)
    return identity


def save_identity(state_dir: str | os.PathLike[str], identity: NodeIdentity) -> None:
    """Persist ``identity`` atomically to ``<state_dir>/identity.json`` (0600)."""
    doc = {
        "version": IDENTITY_VERSION,
        "name": identity.name,
        "node_id": identity.node_id,
        "incarnation": identity.incarnation,
    }
    save_json(Path(state_dir) / IDENTITY_FILE, doc)


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
    if text.lstrip().startswith("["):
        try:
            entries = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{target}: corrupt keyring: not JSON ({exc})") from None
        if not isinstance(entries, list):
            raise ConfigError(f"{target}: corrupt keyring: expected a JSON array of base64 keys")
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
    return keys


def _warn_if_readable_by_others(path: Path) -> None:
    """Keys readable by other users defeat the encryption; say so (the operator may want 0640 for a group)."""
    with contextlib.suppress(OSError):
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o007:
            log.warning(
                "keyring file is readable by other users; chmod 600 it",
                extra=fields(path=str(path), mode=oct(mode)),
            )


def save_keyring(path: str | os.PathLike[str], keys: list[bytes]) -> None:
    """Write ``keys`` (primary first) as a JSON array of base64 strings, atomically, mode 0600."""
    if not keys:
        raise ValueError("a keyring needs at least one key")
    for key in keys:
        if len(key) != KEY_SIZE:
            raise ValueError(f"a key must be {KEY_SIZE} bytes")
    text = json.dumps([base64.b64encode(k).decode("ascii") for k in keys], indent=2) + "\n"
    atomic_write(path, text.encode("ascii"), 0o600)


def load_or_create_keyring(path: str | os.PathLike[str]) -> list[bytes]:
    """The keyring at ``path``, primary first; on first start a new random key is generated and saved (0600)."""
    target = Path(path)
    if _read(target) is None:
        ensure_state_dir(target.parent)
        keys = [Keyring.generate_key()]
        save_keyring(target, keys)
        return keys
    return load_keyring(target)
