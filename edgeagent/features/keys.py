"""Key rotation, cluster-wide: the ``keys`` control command and its broadcast protocol.

How it works. A key operation (``install`` | ``use`` | ``remove``) is applied to the local
keyring on the gossip thread (the keyring belongs to the core), saved (the command answers
once the keyring is on disk, or says it is not yet: the host's writer retries), and sent to every
member as a user broadcast prefixed :data:`KEY_OP_PREFIX`; each agent that hears it applies
and saves it in turn. Each member publishes the fingerprints of its keys (primary first) in
its replicated state under :data:`KEYS_STATE_KEY`; that is how ``keys list`` counts, on how
many alive members a key is installed or primary, and how ``use`` and ``remove`` refuse a
step that would cut members off (unless ``force``). ``use`` and ``remove`` name the key by
its fingerprint (not a secret) or carry the key; ``install`` always carries it. The CLI side
and the rotation order are in :mod:`edgeagent.commands.keys`.

Replays. Every operation carries the keyring *generation* it makes: one above the generation
of the agent that issues it. An agent applies a heard operation only if its generation is
above its own, then takes it; the generation is saved in the keyring file in the same atomic
write as the keys (:func:`~edgeagent.persist.save_keyring`). So a captured operation replayed
later, even after a restart (when the gossip layer's windows and duplicate filter are empty),
is ignored and logged. An agent that missed operations issues its next one at a generation
others already passed: they ignore it and log both generations (``keys list`` shows ours).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import re
from collections.abc import Coroutine, Mapping
from typing import TYPE_CHECKING, Any

from gossip import events as ev
from gossip.errors import KeyringError
from gossip.keyring import KEY_SIZE
from gossip.messages import MemberState

from ..control import ControlError
from ..host import FeatureHost
from ..logs import fields
from ..persist import keyring_bytes, load_keyring_document
from ..ratelimit import WarnLimiter

if TYPE_CHECKING:
    from gossip.core import Membership

KEYS_STATE_KEY = "keys"  # replicated state: this node's key fingerprints, primary first
RESEND_S = 5.0  # the issuer re-sends its last operation this often while members differ
MAX_RESENDS = 12  # ... this many times at most (a minute), then a person looks at keys list
REPAIR_TASK = "keys-repair"
KEY_OP_PREFIX = b"edgeagent/keys\0"  # user-broadcast payloads carrying a keyring operation
KEY_OPS = ("install", "use", "remove")
FINGERPRINT_BYTES = 8  # of SHA-256: identifies a key without revealing it
SAVE_WAIT_S = 5.0  # a key operation is answered once the keyring is on disk, or after this

log = FeatureHost.logger()  # the agent's logger, as before keys were a feature


def fingerprint(key: bytes) -> str:
    """A short public identifier of a key: the first bytes of its SHA-256, in hex."""
    return hashlib.sha256(key).hexdigest()[: 2 * FINGERPRINT_BYTES]


def decode_key(text: str) -> bytes:
    """Parse a base64 AES-256 key; raise ControlError with one clear line."""
    try:
        key = base64.b64decode(text.strip(), validate=True)
    except (ValueError, binascii.Error):
        raise ControlError("expected a base64 key") from None
    if len(key) != KEY_SIZE:
        raise ControlError(f"expected a {KEY_SIZE}-byte key (base64 of 32 bytes), got {len(key)}")
    return key


def key_rows(
    local_keys: tuple[bytes, ...], views: Mapping[str, object]
) -> list[dict[str, Any]]:
    """One row per fingerprint: ours (with the key), then those only other members hold."""
    rows: dict[str, dict[str, Any]] = {}
    for i, key in enumerate(local_keys):
        fp = fingerprint(key)
        rows[fp] = {"fingerprint": fp, "key": base64.b64encode(key).decode(),
                    "local_primary": i == 0, "installed": 0, "primary": 0}  # fmt: skip
    for fps in views.values():
        if not isinstance(fps, list):
            continue
        for i, fp in enumerate(fps):
            row = rows.setdefault(fp, {"fingerprint": fp, "key": None, "local_primary": False,
                                       "installed": 0, "primary": 0})  # fmt: skip
            row["installed"] += 1
            row["primary"] += i == 0
    return list(rows.values())


def _key_or_fingerprint(op: str, request: Mapping[str, Any]) -> tuple[bytes | None, str]:
    """The request's key (None when named by fingerprint) and its fingerprint."""
    key_text, fp = request.get("key"), request.get("fingerprint")
    if isinstance(key_text, str):
        key = decode_key(key_text)
        return key, fingerprint(key)
    if op == "install" or not isinstance(fp, str):
        raise ControlError(
            "key: expected a base64 key" + ("" if op == "install" else " or a fingerprint")
        )
    if not re.fullmatch(f"[0-9a-f]{{{2 * FINGERPRINT_BYTES}}}", fp.lower()):
        raise ControlError(f"fingerprint: expected {2 * FINGERPRINT_BYTES} hex digits")
    return None, fp.lower()


class Keys:
    """The ``keys`` command and the keyring operations heard from other members."""

    def __init__(self) -> None:
        self._host: FeatureHost | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        # Rotations heard from others are hostile input: one warning per origin a minute.
        self._warnings = WarnLimiter(log)
        self.generation = 0  # the keyring's, as saved (main loop only)
        self.replays_ignored = 0  # heard operations of a generation below ours
        self.repeats_ignored = 0  # heard again at our own generation (a resend: silent)
        self.resent = 0  # our last operation broadcast again (a member had missed it)
        self._resend: tuple[bytes, int, int] | None = None  # (payload, generation, resends)
        self._applied: tuple[str, bytes] | None = None  # (op, key) of our generation's op
        self._lock = asyncio.Lock()  # one operation at a time: check, apply and save together

    @property
    def host(self) -> FeatureHost:
        if self._host is None:
            raise RuntimeError("keys feature not started")
        return self._host

    async def start(self, host: FeatureHost) -> None:
        """Publish our fingerprints, serve ``keys`` and listen for broadcast key operations."""
        self._host = host
        self.generation = load_keyring_document(host.config.keyring_path)[1]
        keyring = host.keyring
        await host.call(
            lambda core, now: core.set_state(
                KEYS_STATE_KEY, [fingerprint(k) for k in keyring.keys], now
            )
        )
        host.register_command("keys", self.cmd_keys)
        host.add_status(
            lambda: {
                "keyring_generation": self.generation,
                "key_ops_replayed": self.replays_ignored,
                "key_ops_resent": self.resent,
            }
        )
        host.add_listener(self._on_update)
        self._spawn(self._repair(), REPAIR_TASK)

    async def stop(self) -> None:
        """Let key operations in progress finish (they are short and save the keyring)."""
        for task in [t for t in self._tasks if t.get_name() == REPAIR_TASK]:
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def cmd_keys(self, request: Mapping[str, Any]) -> Any:
        """``op``: list | install ``key`` | use / remove ``key`` or ``fingerprint``.

        ``force`` skips the cluster safety checks.
        """
        op = request.get("op")
        if op == "list":
            return await self.listing()
        if op not in KEY_OPS:
            raise ControlError(f"op: expected one of list, {', '.join(KEY_OPS)}")
        key, fp = _key_or_fingerprint(op, request)
        if not request.get("force"):
            await self._check(op, fp)
        if key is None:
            key = await self._local_key(op, fp)
        async with self._lock:
            generation = self.generation + 1
            keys = await self.apply(op, key, generation)
        payload = {"op": op, "key": base64.b64encode(key).decode(), "gen": generation}
        data = KEY_OP_PREFIX + json.dumps(payload).encode()
        await self.host.broadcast(data)
        self._resend = (data, generation, 0)
        members = await self.host.num_alive()
        return {"op": op, "fingerprint": fp, "keys": len(keys), "members": members}

    async def _local_key(self, op: str, fp: str) -> bytes:
        """The key on this agent's keyring with fingerprint ``fp`` (ControlError if none)."""
        keyring = self.host.keyring
        local = await self.host.call(lambda core, now: tuple(keyring.keys))
        key = next((k for k in local if fingerprint(k) == fp), None)
        if key is None:
            hint = "install it first" if op == "use" else "give the key itself (stdin or --file)"
            raise ControlError(f"key {fp} is not on this agent: {hint}")
        return key

    async def listing(self) -> dict[str, Any]:
        """Our keys and, for every fingerprint, on how many alive members it is installed."""
        keyring = self.host.keyring

        def collect(core: Membership, now: float) -> tuple[tuple[bytes, ...], dict[str, Any]]:
            views = {
                m.name: core.state_of(m.name).get(KEYS_STATE_KEY)
                for m in core.members()
                if m.state is MemberState.ALIVE
            }
            return tuple(keyring.keys), views

        local_keys, views = await self.host.call(collect)
        return {"alive": len(views), "generation": self.generation, "keys": key_rows(local_keys, views)}

    async def _check(self, op: str, fp: str) -> None:
        """Refuse a rotation step that would cut members off (override with force)."""
        if op == "install":
            return
        listing = await self.listing()
        row = next((r for r in listing["keys"] if r["fingerprint"] == fp), None)
        alive = listing["alive"]
        if op == "use":
            installed = row["installed"] if row else 0
            if installed < alive:
                raise ControlError(
                    f"key {fp} is installed on {installed} of {alive} alive members; "
                    "install it everywhere first (or use --force)"
                )
        elif op == "remove" and row is not None and row["primary"] > 0:
            raise ControlError(
                f"key {fp} is still the primary on {row['primary']} members; "
                "make another key primary first (or use --force)"
            )

    async def apply(self, op: str, key: bytes, generation: int) -> tuple[bytes, ...]:
        """Apply ``op`` to the keyring on the gossip thread, republish, save the keys with
        ``generation`` (now ours); the new keys."""
        keyring = self.host.keyring

        def apply(core: Membership, now: float) -> tuple[bytes, ...]:
            getattr(keyring, op)(key)
            core.set_state(KEYS_STATE_KEY, [fingerprint(k) for k in keyring.keys], now)
            return tuple(keyring.keys)

        try:
            keys = await self.host.call(apply)
        except KeyringError as exc:
            raise ControlError(str(exc)) from None
        log.info(
            f"keyring {op}", extra=fields(key=fingerprint(key), keys=len(keys), generation=generation)
        )
        self.generation = generation  # applied: the writer keeps retrying until it is on disk
        self._applied = (op, key)
        path = self.host.config.keyring_path
        saved = asyncio.wrap_future(self.host.saver.save(path, keyring_bytes(list(keys), generation)))
        try:  # the writer keeps retrying after a timeout: the newest keyring wins on disk
            await asyncio.wait_for(asyncio.shield(saved), SAVE_WAIT_S)
        except TimeoutError:
            failing = self.host.saver.status().failing.get(str(path), "still writing")
            raise ControlError(
                f"keyring {op} applied, but {path} is not saved yet ({failing}); "
                "the agent keeps retrying: see edgeagent status"
            ) from None
        return keys

    def _on_update(self, events: tuple[ev.Event, ...], view: object) -> None:
        for event in events:
            if isinstance(event, ev.UserMessage) and event.payload.startswith(KEY_OP_PREFIX):
                self._spawn(self._apply_remote(event.origin, event.payload))

    async def _apply_remote(self, origin: str, payload: bytes) -> None:
        try:
            doc = json.loads(payload[len(KEY_OP_PREFIX) :])
            op, key, generation = doc["op"], decode_key(doc["key"]), doc["gen"]
            if op not in KEY_OPS or type(generation) is not int:
                raise ValueError(op)
            async with self._lock:
                if generation == self.generation and (op, key) == self._applied:
                    self.repeats_ignored += 1  # the issuer's resend of what we applied
                    return
                if generation <= self.generation:
                    self._ignore(origin, op, generation)
                    return
                await self.apply(op, key, generation)
        except ControlError as exc:
            now = asyncio.get_running_loop().time()
            self._warnings.warn(
                origin, now, "keyring operation not applied", origin=origin, reason=str(exc)
            )
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            now = asyncio.get_running_loop().time()
            self._warnings.warn(origin, now, "malformed keyring operation dropped", origin=origin)

    def _ignore(self, origin: str, op: str, generation: int) -> None:
        self.replays_ignored += 1
        log.warning(
            "keyring operation of an old generation ignored (a replay, or its sender missed "
            "rotations)",
            extra=fields(origin=origin, op=op, generation=generation, ours=self.generation),
        )

    async def _repair(self) -> None:
        """Key operations go by user broadcast, which a member can miss (a few sends each,
        no anti-entropy), and then it never gets the key. So the issuer of the last
        operation sends it again every :data:`RESEND_S` while an alive member publishes
        other fingerprints than ours, at most :data:`MAX_RESENDS` times, and stops once a
        newer operation is applied here. Members that have it ignore it silently."""
        while True:
            await asyncio.sleep(RESEND_S)
            pending = self._resend
            if pending is None:
                continue
            data, generation, sent = pending
            if generation != self.generation or sent >= MAX_RESENDS:
                self._resend = None
                continue
            listing = await self.listing()
            if all(r["installed"] == listing["alive"] for r in listing["keys"]) and all(
                r["primary"] in (0, listing["alive"]) for r in listing["keys"]
            ):
                self._resend = None  # every alive member holds what we hold
                continue
            self._resend = (data, generation, sent + 1)
            self.resent += 1
            await self.host.broadcast(data)

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str | None = None) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
