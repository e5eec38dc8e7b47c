"""Running under systemd: sd_notify READY / WATCHDOG / STOPPING, and SIGHUP.

The service manager is played by the test: it binds a Unix datagram socket and hands its path
to a real agent process as ``NOTIFY_SOCKET``, exactly as systemd does for ``Type=notify``.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgeagent import systemd
from edgeagent.localmesh import LocalMesh

WATCHDOG_USEC = 1_000_000  # pings every 0.5 s
STALL_S = 3.0
TIMEOUT = 60.0


class FakeManager:
    """A bound notify socket; a thread records each datagram with the time it arrived."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            self.messages.append((time.monotonic(), data.decode()))

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()

    def wait_for(self, line: str, timeout: float = TIMEOUT) -> float:
        """When the first message holding ``line`` arrived."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for at, text in list(self.messages):
                if line in text.split("\n"):
                    return at
            time.sleep(0.05)
        raise AssertionError(f"no {line} in {self.messages}")

    def times_of(self, line: str) -> list[float]:
        return [at for at, text in list(self.messages) if line in text.split("\n")]


@pytest.fixture
def short_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="ea-sd-"))  # a Unix socket path must fit in 108 bytes
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_notify_sends_one_datagram_to_a_path_socket(short_dir: Path) -> None:
    manager = FakeManager(str(short_dir / "notify"))
    try:
        env = {"NOTIFY_SOCKET": str(short_dir / "notify")}
        assert systemd.notify("READY=1", "STATUS=up", environ=env)
        assert manager.wait_for("READY=1", 5) and manager.messages[0][1] == "READY=1\nSTATUS=up"
    finally:
        manager.close()


def test_notify_reaches_an_abstract_socket_named_with_at() -> None:
    name = f"edgeagent-test-{os.getpid()}-{time.monotonic_ns()}"
    manager = FakeManager("\0" + name)
    try:
        assert systemd.notify("WATCHDOG=1", environ={"NOTIFY_SOCKET": "@" + name})
        manager.wait_for("WATCHDOG=1", 5)
    finally:
        manager.close()


def test_without_a_usable_notify_socket_nothing_is_sent(short_dir: Path) -> None:
    assert not systemd.notify("READY=1", environ={})
    assert not systemd.notify("READY=1", environ={"NOTIFY_SOCKET": "vsock:2:1234"})
    assert not systemd.notify("READY=1", environ={"NOTIFY_SOCKET": str(short_dir / "absent")})


@pytest.mark.parametrize(
    ("env", "interval"),
    [
        ({"WATCHDOG_USEC": "20000000"}, 10.0),
        ({"WATCHDOG_USEC": "20000000", "WATCHDOG_PID": "1"}, None),  # meant for another process
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval_is_half_of_watchdog_usec_for_this_pid(
    env: dict[str, str], interval: float | None
) -> None:
    assert systemd.watchdog_interval({"NOTIFY_SOCKET": "/run/x", **env}) == interval
    assert systemd.watchdog_interval(env) is None  # no socket, no watchdog


@pytest.mark.slow
def test_real_agent_notifies_ready_watchdog_and_stopping_and_survives_sighup(
    short_dir: Path,
) -> None:
    config = short_dir / "agent.toml"
    config.write_text('log_level = "info"\n')
    manager = FakeManager(str(short_dir / "notify"))
    mesh: LocalMesh = LocalMesh(1, debug_commands=True, extra_args=["--config", str(config)])
    agent = mesh.agents[0]
    agent.env.update(NOTIFY_SOCKET=str(short_dir / "notify"), WATCHDOG_USEC=str(WATCHDOG_USEC))
    try:
        agent.start(wait=False)
        manager.wait_for("READY=1")
        assert agent.status()["name"] == agent.name  # ready means serving
        ready_text = next(t for _, t in manager.messages if "READY=1" in t)
        assert f"STATUS=serving as {agent.name}" in ready_text

        # Pings every half WATCHDOG_USEC from the main loop, so a stalled loop stops them.
        time.sleep(2.0)
        assert len(manager.times_of("WATCHDOG=1")) >= 3
        agent.call("debug-block", seconds=STALL_S, timeout=STALL_S + 30)
        time.sleep(1.0)
        pings = manager.times_of("WATCHDOG=1")
        assert max(b - a for a, b in zip(pings, pings[1:], strict=False)) >= STALL_S - 0.5

        # SIGHUP re-reads the log settings and does not exit; a broken file is only a warning.
        config.write_text('log_level = "debug"\n')
        agent.send_signal(signal.SIGHUP)
        _wait_log(agent.log_path, "SIGHUP: log settings re-read")
        assert "level=debug" in _line_with(agent.log_path, "SIGHUP: log settings re-read")
        config.write_text("log_level = \n")
        agent.send_signal(signal.SIGHUP)
        _wait_log(agent.log_path, "SIGHUP: log settings not re-read")
        assert agent.running and agent.status()["name"] == agent.name

        assert agent.terminate() == 0
        manager.wait_for("STOPPING=1", 5)
        assert manager.times_of("STOPPING=1")[0] > manager.times_of("READY=1")[0]
    finally:
        mesh.stop()
        manager.close()


def _line_with(path: Path, text: str) -> str:
    return next((line for line in path.read_text().splitlines() if text in line), "")


def _wait_log(path: Path, text: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not _line_with(path, text):
        assert time.monotonic() < deadline, f"no {text!r} in the agent's log"
        time.sleep(0.1)
