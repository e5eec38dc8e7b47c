"""The control socket: JSON-lines protocol, permissions, registration and the blocking client."""

from __future__ import annotations

import asyncio
import os
import stat
import warnings
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from edgeagent.control import ControlClient, ControlError, ControlServer, socket_path
from edgeagent.errors import AgentUnavailable, UsageError


@pytest.fixture
async def server(state_dir: Path) -> AsyncIterator[ControlServer]:
    srv = ControlServer(socket_path(state_dir))
    srv.register("echo", lambda req: req.get("value"))

    async def slow(req: dict[str, Any]) -> str:
        await asyncio.sleep(0.01)
        return "done"

    def refuse(req: dict[str, Any]) -> None:
        raise ControlError("not today")

    def broken(req: dict[str, Any]) -> None:
        raise KeyError("bug")

    srv.register("slow", slow)
    srv.register("refuse", refuse)
    srv.register("broken", broken)
    await srv.start()
    yield srv
    await srv.close()


async def call(path: Path, cmd: str, **args: Any) -> Any:
    return await asyncio.to_thread(ControlClient(path).call, cmd, **args)


async def test_registered_handler_answers_through_the_client(server: ControlServer) -> None:
    assert await call(server.path, "echo", value=[1, "two"]) == [1, "two"]
    assert await call(server.path, "slow") == "done"


async def test_socket_is_private_to_the_owner(server: ControlServer) -> None:
    assert stat.S_IMODE(os.stat(server.path).st_mode) == 0o600


async def test_refusal_and_unknown_command_come_back_as_errors(server: ControlServer) -> None:
    with pytest.raises(ControlError, match="not today"):
        await call(server.path, "refuse")
    with pytest.raises(ControlError, match="unknown command 'nope'"):
        await call(server.path, "nope")
    with pytest.raises(ControlError, match="internal error"):
        await call(server.path, "broken")
    assert await call(server.path, "echo", value=1) == 1


async def test_malformed_request_lines_get_an_error_reply(server: ControlServer) -> None:
    assert (await server.dispatch(b"{not json"))["ok"] is False
    assert (await server.dispatch(b"[1, 2]"))["ok"] is False
    assert (await server.dispatch(b'{"cmd": 5}'))["ok"] is False
    reader, writer = await asyncio.open_unix_connection(str(server.path))
    writer.write(b"x" * 100_000 + b"\n")
    line = await asyncio.wait_for(reader.readline(), 10)
    writer.close()
    assert b'"ok": false' in line


async def test_second_server_on_a_live_socket_is_refused(server: ControlServer) -> None:
    with pytest.raises(UsageError, match="already running"):
        await ControlServer(server.path).start()


async def test_stale_socket_file_is_replaced(state_dir: Path) -> None:
    first = ControlServer(socket_path(state_dir))
    await first.start()
    first._server.close()  # simulate a crash: the file stays, nobody listens
    second = ControlServer(socket_path(state_dir))
    second.register("echo", lambda req: "fresh")
    await second.start()
    try:
        assert await call(second.path, "echo") == "fresh"
    finally:
        await second.close()


def test_client_without_agent_reports_the_socket_path(state_dir: Path) -> None:
    path = socket_path(state_dir)
    with pytest.raises(AgentUnavailable, match=f"no agent running at {path}"):
        ControlClient(path).call("members")


NOBODY = 65534  # Debian's "nobody" / "nogroup": a user who is not the agent's


def _connect_as(uid: int, path: Path) -> str:
    """The one-line error a client running as ``uid`` gets (a forked child drops to it)."""
    read, write = os.pipe()
    with warnings.catch_warnings():  # 3.12+ warns on fork with threads; the child only connects
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        try:
            os.close(read)
            os.setgid(uid)
            os.setuid(uid)
            ControlClient(path, timeout=2).call("echo")
            message = "connected"
        except AgentUnavailable as exc:
            message = str(exc)
        finally:
            os.write(write, message.encode())
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        message = pipe.read().decode()
    os.waitpid(pid, 0)
    return message


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: drops to another uid")
async def test_client_as_another_user_says_permission_denied(server: ControlServer) -> None:
    server.path.parent.chmod(0o755)  # the socket's own 0600 mode is what refuses
    message = _connect_as(NOBODY, server.path)  # fails at connect: the loop need not run
    assert message.startswith(f"permission denied: {server.path}")
    assert "run as the agent's user or root" in message and "no agent running" not in message


@pytest.mark.skipif(os.geteuid() == 0, reason="root may open any socket")
async def test_client_without_access_to_the_socket_says_permission_denied(
    server: ControlServer,
) -> None:
    server.path.chmod(0)
    with pytest.raises(AgentUnavailable) as exc:
        await asyncio.to_thread(ControlClient(server.path).call, "echo")
    assert str(exc.value).startswith(f"permission denied: {server.path}")
    assert "run as the agent's user or root" in str(exc.value)


def test_duplicate_registration_is_a_bug(state_dir: Path) -> None:
    srv = ControlServer(socket_path(state_dir))
    srv.register("members", lambda req: [])
    with pytest.raises(ValueError):
        srv.register("members", lambda req: [])


async def test_unusable_socket_path_is_a_one_line_usage_error(state_dir: Path) -> None:
    deep = state_dir / ("d" * 120)
    deep.mkdir()
    with pytest.raises(UsageError, match="cannot listen on the control socket"):
        await ControlServer(socket_path(deep)).start()
