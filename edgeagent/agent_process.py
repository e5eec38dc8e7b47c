"""One ``edgeagent run`` process driven from outside: start, wait ready, control calls, signals.

How it works. :class:`AgentProcess` holds an agent's command line (``python -m edgeagent run
...``, possibly behind a wrapper such as ``ip netns exec NS``), its state dir (where the
control socket lives) and its log file. :meth:`AgentProcess.start` spawns the process in its
own session (it never gets the terminal's ^C), appending stdout and stderr to the log after a
``--- start HH:MM:SS ---`` line, and notes its PID with the kernel start time of that PID.
Ready means the agent answers ``status`` on its control socket, exactly as the CLI asks.

A process is known by PID *and* start time, so a PID the kernel has since reused is never
signalled. A process started by another harness instance (the namespace testbed's CLI starts
agents in one invocation and kills them in the next) is :meth:`adopt`\\ ed from those two
numbers; only a child of this instance has an exit code.

Used by :mod:`edgeagent.localmesh` (the demo), and by the loopback and namespace testbeds.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .control import ControlClient, socket_path
from .errors import AgentUnavailable

READY_TIMEOUT = 30.0  # seconds for a started agent to answer on its control socket
STOP_TIMEOUT = 10.0  # seconds a SIGTERMed agent gets to leave gracefully before SIGKILL
EXIT_TIMEOUT = 10.0  # a SIGKILLed process is gone well within this
POLL_INTERVAL = 0.1  # seconds between readiness checks
EXIT_POLL = 0.05  # seconds between checks that a process is gone
READY_CALL_TIMEOUT = 5.0  # one readiness probe on the control socket
CALL_TIMEOUT = 30.0  # default bound of one control call


class AgentProcessError(RuntimeError):
    """The agent process cannot do what was asked (exited at start-up, already running...)."""


def agent_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment, unbuffered output (so the log is current), plus ``extra``."""
    return {**os.environ, "PYTHONUNBUFFERED": "1", **(extra or {})}


def process_start_time(pid: int) -> int | None:
    """The kernel start time of a process (clock ticks since boot), None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 2 (comm) may contain spaces; the fields after its closing parenthesis are fixed.
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] == "Z":
        return None  # a zombie is as good as gone
    return int(fields[19])  # field 22 overall: starttime


class AgentProcess:
    """One agent process; it keeps its name, command line and state dir across restarts."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        state_dir: Path,
        log_path: Path,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.state_dir = Path(state_dir)
        self.log_path = Path(log_path)
        self.env = dict(env) if env is not None else agent_env()
        self.process: subprocess.Popen[bytes] | None = None  # set when this instance started it
        self.last_pid: int | None = None
        self.start_time: int | None = None

    @property
    def pid(self) -> int | None:
        """The PID while the process runs, else None."""
        return self.last_pid if self.running else None

    @property
    def running(self) -> bool:
        if self.last_pid is None:
            return False
        if self.process is not None and self.process.pid == self.last_pid:
            return self.process.poll() is None
        return process_start_time(self.last_pid) == self.start_time

    def adopt(self, pid: int, start_time: int) -> None:
        """Take over a process started elsewhere, known by its PID and kernel start time."""
        if self.process is not None and self.process.pid != pid:
            self.process = None
        self.last_pid, self.start_time = pid, start_time

    def start(self, wait: bool = True) -> int:
        """Start (or restart) the process; with ``wait``, until it answers. Returns the PID."""
        if self.running:
            raise AgentProcessError(f"{self.name} is already running")
        with self.log_path.open("ab") as log:
            log.write(f"--- start {time.strftime('%H:%M:%S')} ---\n".encode())
            log.flush()
            proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,
            )
        self.process, self.last_pid = proc, proc.pid
        self.start_time = process_start_time(proc.pid)
        if self.start_time is None:
            proc.wait()
            raise AgentProcessError(f"{self.name} exited at once:\n{self.log_tail()}")
        if wait:
            self.wait_ready()
        return proc.pid

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        """Wait until the control socket answers; AgentProcessError if the process exits,
        TimeoutError after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            if not self.running:
                raise AgentProcessError(f"{self.name} exited at start-up:\n{self.log_tail()}")
            try:
                self.call("status", timeout=READY_CALL_TIMEOUT)
                return
            except AgentUnavailable:
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"{self.name} not ready in {timeout:g} s:\n{self.log_tail()}"
                    ) from None
                time.sleep(POLL_INTERVAL)

    def send_signal(self, sig: signal.Signals) -> bool:
        """Send ``sig`` if the process runs; True if it was sent."""
        if not self.running or self.last_pid is None:
            return False
        try:
            os.kill(self.last_pid, sig)
        except ProcessLookupError:
            return False
        return True

    def kill(self) -> bool:
        """SIGKILL (a crash, no leave) and wait until gone. True if it was running."""
        if not self.send_signal(signal.SIGKILL):
            return False
        if not self._wait_gone(EXIT_TIMEOUT):
            raise AgentProcessError(f"{self.name}: PID {self.last_pid} survived SIGKILL")
        return True

    def terminate(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM (graceful leave); SIGKILL after ``timeout``. The exit code if a child."""
        if self.send_signal(signal.SIGTERM) and not self._wait_gone(timeout):
            self.kill()
        return self.process.returncode if self.process is not None else None

    def restart(self, wait: bool = True) -> int:
        """SIGKILL if running, then start again with the same state dir. Returns the PID."""
        self.kill()
        return self.start(wait=wait)

    def _wait_gone(self, timeout: float) -> bool:
        if self.process is not None and self.process.pid == self.last_pid:
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                return False
            return True
        deadline = time.monotonic() + timeout
        while self.running:
            if time.monotonic() > deadline:
                return False
            time.sleep(EXIT_POLL)
        return True

    # -- control API ---------------------------------------------------------------------------

    def call(self, cmd: str, timeout: float = CALL_TIMEOUT, **args: Any) -> Any:
        """One control-API request (see :mod:`edgeagent.control`); AgentUnavailable if down."""
        return ControlClient(socket_path(self.state_dir), timeout=timeout).call(cmd, **args)

    def members(self, timeout: float = CALL_TIMEOUT) -> list[dict[str, Any]]:
        return list(self.call("members", timeout=timeout))

    def states(self) -> dict[str, str]:
        """``{member name: state}`` as this agent sees it."""
        return {m["name"]: m["state"] for m in self.members()}

    def state_of(self, name: str) -> str | None:
        return self.states().get(name)

    def status(self) -> dict[str, Any]:
        return dict(self.call("status"))

    def log_tail(self, lines: int = 30) -> str:
        """The last ``lines`` of the agent's log, for an error message."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"
