"""Control API: JSON lines over a Unix socket in the state dir.

How it works. The agent listens on ``<state_dir>/control.sock`` (mode 0600: only the agent's
user may drive it). A client connects and writes one JSON object per line,
``{"cmd": NAME, ...arguments}``; the server answers each line with one line,
``{"ok": true, "result": ...}`` or ``{"ok": false, "error": "one line for a person"}``.
Handlers are registered by name (``server.register("members", fn)``), so features add their
own commands; a handler takes the request dict and returns a JSON-able value (or an awaitable
of one) and raises :class:`ControlError` for a clean refusal.

:class:`ControlClient` is the synchronous side the CLI uses: no asyncio, no heavy imports.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import inspect
import json
import logging
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import AgentUnavailable, UsageError

log = logging.getLogger(__name__)

SOCKET_NAME = "control.sock"
SOCKET_MODE = 0o600
MAX_LINE_BYTES = 64 * 1024  # one request or reply line; requests are small
CLIENT_TIMEOUT = 30.0  # seconds; a graceful leave answers within a few
CLOSE_GRACE = 2.0  # seconds a closing server gives requests in progress to answer

Handler = Callable[[dict[str, Any]], Any]


class ControlError(Exception):
    """A handler refuses a request; the message goes back to the client as ``error``."""


def socket_path(state_dir: Path) -> Path:
    """Where the agent using ``state_dir`` listens."""
    return Path(state_dir) / SOCKET_NAME


class ControlServer:
    """Serves registered handlers on a Unix socket."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._handlers: dict[str, Handler] = {}
        self._server: asyncio.AbstractServer | None = None
        self._busy: set[asyncio.Task[Any]] = set()  # connections inside a request

    def register(self, name: str, handler: Handler) -> None:
        """Serve ``{"cmd": name, ...}`` with ``handler(request)``."""
        if name in self._handlers:
            raise ValueError(f"control command {name!r} registered twice")
        self._handlers[name] = handler

    @property
    def commands(self) -> list[str]:
        return sorted(self._handlers)

    async def start(self) -> None:
        """Listen; refuse (UsageError) if another agent already serves this socket."""
        if self.path.exists() or self.path.is_symlink():
            if _is_served(self.path):
                raise UsageError(f"an agent is already running at {self.path}")
            self.path.unlink()
        # The umask makes the socket 0600 from birth (no window where others could connect).
        old_umask = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(
                self._serve, path=str(self.path), limit=MAX_LINE_BYTES
            )
        except OSError as exc:  # e.g. a path longer than sun_path (108 bytes on Linux)
            raise UsageError(f"{self.path}: cannot listen on the control socket: {exc}") from None
        finally:
            os.umask(old_umask)
        os.chmod(self.path, SOCKET_MODE)

    async def close(self) -> None:
        """Stop listening, let requests in progress answer (briefly), remove the socket file."""
        if self._server is not None:
            self._server.close()
            self._server = None
        if self._busy:
            await asyncio.wait(set(self._busy), timeout=CLOSE_GRACE)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    line = await reader.readline()
                except (ValueError, asyncio.LimitOverrunError):
                    await self._reply(writer, {"ok": False, "error": "request line too long"})
                    return
                if not line:
                    return
                task = asyncio.current_task()
                assert task is not None
                self._busy.add(task)
                try:
                    await self._reply(writer, await self.dispatch(line))
                finally:
                    self._busy.discard(task)
        except (ConnectionError, OSError):
            return
        finally:
            writer.close()

    async def dispatch(self, line: bytes) -> dict[str, Any]:
        """Answer one request line (exposed for tests)."""
        try:
            request = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError):
            return {"ok": False, "error": "request is not valid JSON"}
        if not isinstance(request, dict) or not isinstance(request.get("cmd"), str):
            return {"ok": False, "error": 'request must be a JSON object with a string "cmd"'}
        handler = self._handlers.get(request["cmd"])
        if handler is None:
            return {"ok": False, "error": f"unknown command {request['cmd']!r}"}
        try:
            result = handler(request)
            if inspect.isawaitable(result):
                result = await result
        except (ControlError, UsageError) as exc:
            return {"ok": False, "error": str(exc)}
        except Exception as exc:
            log.exception("control command %s failed", request["cmd"])
            return {"ok": False, "error": f"internal error: {exc}"}
        return {"ok": True, "result": result}

    @staticmethod
    async def _reply(writer: asyncio.StreamWriter, reply: dict[str, Any]) -> None:
        writer.write(json.dumps(reply, default=str).encode() + b"\n")
        await writer.drain()


def _is_served(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        try:
            sock.connect(str(path))
        except OSError:
            return False
    return True


class ControlClient:
    """Blocking client: ``ControlClient(path).call("members")`` returns the result."""

    def __init__(self, path: Path, timeout: float = CLIENT_TIMEOUT) -> None:
        self.path = Path(path)
        self.timeout = timeout

    def call(self, cmd: str, **args: Any) -> Any:
        """Send one request; raise :class:`AgentUnavailable` or :class:`ControlError`."""
        request = json.dumps({"cmd": cmd, **args}).encode() + b"\n"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(self.timeout)
            try:
                sock.connect(str(self.path))
            except PermissionError:
                raise AgentUnavailable(
                    f"permission denied: {self.path} (the control socket is the agent's user's "
                    "only): run as the agent's user or root (sudo)"
                ) from None
            except OSError:
                raise AgentUnavailable(
                    f"no agent running at {self.path}{_system_hint(self.path)}"
                ) from None
            try:
                sock.sendall(request)
                reply = _read_line(sock)
            except TimeoutError:
                raise AgentUnavailable(
                    f"agent at {self.path} did not answer within {self.timeout:g} s"
                ) from None
            except OSError as exc:
                raise AgentUnavailable(
                    f"agent at {self.path} closed the connection ({exc})"
                ) from None
        try:
            answer = json.loads(reply)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise AgentUnavailable(f"agent at {self.path} sent an unreadable reply") from None
        if not isinstance(answer, dict) or "ok" not in answer:
            raise AgentUnavailable(f"agent at {self.path} sent an unreadable reply")
        if not answer["ok"]:
            raise ControlError(str(answer.get("error", "unknown error")))
        return answer.get("result")


def _system_hint(path: Path) -> str:
    """Point a normal user at the system agent (root's state dir) when they missed it."""
    from .config.schema import ROOT_STATE_DIR

    if os.geteuid() == 0 or ROOT_STATE_DIR in path.parents or not ROOT_STATE_DIR.is_dir():
        return ""
    return f" (a system agent keeps its socket in {ROOT_STATE_DIR}: run as root, or --state-dir)"


def _read_line(sock: socket.socket) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("connection closed before the reply ended")
        chunks.append(chunk)
        size += len(chunk)
        if b"\n" in chunk:
            return b"".join(chunks).split(b"\n", 1)[0]
        if size > 64 * MAX_LINE_BYTES:
            raise ConnectionError("reply too long")


def add_state_dir_argument(parser: argparse.ArgumentParser) -> None:
    """The ``--state-dir`` option of every command that talks to a running agent."""
    from .config.schema import STATE_DIR_DEFAULT_TEXT

    parser.add_argument(
        "--state-dir",
        metavar="DIR",
        help=f"state dir of the agent to talk to (default: {STATE_DIR_DEFAULT_TEXT})",
    )


def state_dir_of(args: argparse.Namespace) -> Path:
    """The state dir named by ``--state-dir``, or the default one."""
    from .config import default_state_dir

    given = getattr(args, "state_dir", None)
    return Path(given).expanduser() if given else default_state_dir()


def add_query_command(
    subparsers: Any,
    name: str,
    render: Callable[[Any], str],
    *,
    help: str,
    description: str,
    json_help: str | None = None,
) -> None:
    """A subcommand that calls the agent's control command ``name`` and prints ``render(result)``.

    With ``json_help`` it takes ``--json``, which prints the result as indented JSON instead.
    """
    parser = subparsers.add_parser(name, help=help, description=description)
    if json_help is not None:
        parser.add_argument("--json", action="store_true", help=json_help)
    add_state_dir_argument(parser)
    parser.set_defaults(func=lambda args: _run_query(args, name, render))


def _run_query(args: argparse.Namespace, name: str, render: Callable[[Any], str]) -> int:
    result = call_agent(state_dir_of(args), name)
    if getattr(args, "json", False):
        print(json.dumps(result, indent=2, sort_keys=True))
    else:
        print(render(result))
    return 0


def call_agent(state_dir: Path, cmd: str, **args: Any) -> Any:
    """CLI helper: call the agent of ``state_dir``.

    No agent is :class:`AgentUnavailable` (exit 1); a refusal is a :class:`UsageError` (exit 2).
    """
    try:
        return ControlClient(socket_path(state_dir)).call(cmd, **args)
    except ControlError as exc:
        raise UsageError(f"{cmd}: {exc}") from None


__all__ = [
    "ControlClient",
    "add_query_command",
    "add_state_dir_argument",
    "state_dir_of",
    "ControlError",
    "ControlServer",
    "Handler",
    "call_agent",
    "socket_path",
]
