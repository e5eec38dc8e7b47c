"""Talking to systemd: readiness, watchdog and stopping notifications (``sd_notify``).

How it works. A ``Type=notify`` service gets ``NOTIFY_SOCKET`` in its environment: the path of
a Unix datagram socket, or an abstract-namespace name written with a leading ``@``. Each
notification is one datagram of newline-separated ``KEY=VALUE`` lines (sd_notify(3)):
``READY=1`` once the agent serves, ``WATCHDOG=1`` at least every ``WATCHDOG_USEC``
microseconds while it is healthy, ``STOPPING=1`` on the way out, ``STATUS=...`` free text for
``systemctl status``. That protocol is all this module speaks, so there is no dependency on
libsystemd. Outside systemd (no ``NOTIFY_SOCKET``) every call does nothing.

The watchdog pings come from a task on the agent's main loop, so a stalled main loop stops
them and systemd restarts the service (``Restart=on-failure``); the gossip thread keeps the
node alive for its peers meanwhile, but a node whose features stopped must not run on forever.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Mapping

from .logs import fields

log = logging.getLogger(__name__)

NOTIFY_SOCKET_ENV = "NOTIFY_SOCKET"
WATCHDOG_USEC_ENV = "WATCHDOG_USEC"  # the unit's WatchdogSec=, in microseconds
WATCHDOG_PID_ENV = "WATCHDOG_PID"  # set when the watchdog is meant for one PID only
# sd_watchdog_enabled(3): "send a keep-alive ping every half of the time returned here".
WATCHDOG_FRACTION = 0.5


def _address(environ: Mapping[str, str]) -> str | None:
    """The socket address to send to: a path, or ``\\0name`` for ``@name``; None if unusable."""
    path = environ.get(NOTIFY_SOCKET_ENV, "")
    if path.startswith("@"):
        return "\0" + path[1:]
    if path.startswith("/"):
        return path
    return None  # unset, or a form we do not speak (vsock:...): behave as outside systemd


def notify(*lines: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send ``lines`` (``"READY=1"``, ...) as one notification; True if it was sent.

    A failure is logged at debug and otherwise ignored: the agent must run the same whether or
    not a service manager listens.
    """
    address = _address(os.environ if environ is None else environ)
    if address is None or not lines:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall("\n".join(lines).encode())
    except OSError as exc:
        log.debug("sd_notify failed", extra=fields(error=str(exc)))
        return False
    return True


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """Seconds between watchdog pings (half of ``WATCHDOG_USEC``), or None if not asked for."""
    environ = os.environ if environ is None else environ
    if _address(environ) is None:
        return None
    try:
        usec = int(environ.get(WATCHDOG_USEC_ENV, ""))
        pid = int(environ.get(WATCHDOG_PID_ENV, str(os.getpid())))
    except ValueError:
        return None
    if usec <= 0 or pid != os.getpid():
        return None
    return usec / 1e6 * WATCHDOG_FRACTION


async def _ping(interval: float) -> None:
    while True:
        notify("WATCHDOG=1")
        await asyncio.sleep(interval)


def start_watchdog() -> asyncio.Task[None] | None:
    """Ping systemd's watchdog from the running loop until cancelled; None if not asked for."""
    interval = watchdog_interval()
    if interval is None:
        return None
    return asyncio.get_running_loop().create_task(_ping(interval), name="sd-watchdog")
