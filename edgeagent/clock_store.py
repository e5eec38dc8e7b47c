"""The agent's hybrid clock, saved in the state dir so it never goes back across a restart.

How it works. One :class:`overlay.hlc.HybridClock` per agent, on the main loop: the address
allocator stamps its claims with it, the name-conflict rule takes the start time (``since``)
from it, and it is pulled forward by what gossip shows (claims, through the allocator, and
every member's ``since`` in its meta, here), bounded as ``overlay/hlc.py`` says.

Its reading is saved to ``<state_dir>/clock.json`` (``{"v": 1, "hlc": [wall_ms, counter]}``,
atomic, mode 0600) at start, every :data:`SAVE_INTERVAL_S` and at shutdown: no fsync loop,
and a ``kill -9`` loses at most one interval. At the next start the saved reading is
restored as trusted, so a Raspberry Pi without RTC that boots at 1970 starts where it left
off, not in 1970. ``edgeagent join`` saves the issuer's wall time the same way
(:func:`advance_saved`), so a fresh node whose clock is behind starts at the time it enrolled.

A missing or unreadable file is a fresh start (logged once when it is not absent): the clock
is a safety net, never a reason not to start.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gossip import events as ev
from overlay.hlc import HybridClock, Timestamp

from .name_conflict import claimant
from .persist import save_json
from .saver import StateSaver

if TYPE_CHECKING:
    from .host import FeatureHost

log = logging.getLogger("edgeagent.clock")

CLOCK_FILE = "clock.json"
CLOCK_VERSION = 1
SAVE_INTERVAL_S = 60.0  # a kill -9 sets the clock back at most this much
MAX_CLOCK_FILE_BYTES = 4096


def load_saved(state_dir: str | os.PathLike[str]) -> Timestamp | None:
    """The saved reading, or None (absent, or unreadable: logged)."""
    path = Path(state_dir) / CLOCK_FILE
    try:
        with path.open("rb") as f:
            data = f.read(MAX_CLOCK_FILE_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("saved clock not read: %s: %s", path, exc.strerror or exc)
        return None
    try:
        doc = json.loads(data) if len(data) <= MAX_CLOCK_FILE_BYTES else None
        if not isinstance(doc, dict) or doc.get("v") != CLOCK_VERSION:
            raise ValueError("not a clock file")
        return Timestamp.from_value(doc.get("hlc"))
    except (ValueError, UnicodeDecodeError) as exc:
        log.warning("saved clock ignored: %s: %s", path, exc)
        return None


def save(state_dir: str | os.PathLike[str], reading: Timestamp) -> None:
    """Write ``reading`` atomically (one fsync per call: call it rarely)."""
    save_json(Path(state_dir) / CLOCK_FILE, {"v": CLOCK_VERSION, "hlc": reading.to_value()})


def advance_saved(state_dir: str | os.PathLike[str], wall_s: float) -> None:
    """Move the saved clock forward to ``wall_s`` (the issuer's time at enrollment)."""
    clock = HybridClock()
    saved = load_saved(state_dir)
    if saved is not None:
        clock.restore(saved, 0.0)
    clock.restore(Timestamp(max(0, int(wall_s * 1000)), 0), 0.0)
    save(state_dir, clock.last)


class AgentClock:
    """The agent's clock: restored at construction, saved on a timer and at :meth:`stop`."""

    def __init__(
        self, state_dir: str | os.PathLike[str], wall: Callable[[], float] = time.time
    ) -> None:
        self.state_dir = Path(state_dir)
        self.wall = wall
        self.clock = HybridClock()
        saved = load_saved(self.state_dir)
        if saved is not None:
            self.clock.restore(saved, wall())
        self._timer: asyncio.TimerHandle | None = None
        self._saver: StateSaver | None = None

    def since_ms(self) -> int:
        """A start time for the member meta: never before the saved clock."""
        return self.clock.tick(self.wall()).wall_ms

    def start(self, loop: asyncio.AbstractEventLoop, saver: StateSaver | None = None) -> None:
        """Save now, then every :data:`SAVE_INTERVAL_S` on ``loop`` through ``saver``.

        The first save is synchronous (at start, before anything is stamped); later ones go
        through the state writer when one is given, so no fsync runs on the main loop.
        """
        self.save()
        self._saver = saver
        self._timer = loop.call_later(SAVE_INTERVAL_S, self._periodic, loop)

    def _periodic(self, loop: asyncio.AbstractEventLoop) -> None:
        self.save()
        self._timer = loop.call_later(SAVE_INTERVAL_S, self._periodic, loop)

    def save(self) -> None:
        """Save the current reading; a failure is logged (or retried by the writer), never raised."""
        reading = self.clock.read(self.wall())
        if self._saver is not None:
            doc = {"v": CLOCK_VERSION, "hlc": reading.to_value()}
            self._saver.save_json(self.state_dir / CLOCK_FILE, doc)
            return
        try:
            save(self.state_dir, reading)
        except OSError as exc:
            log.warning("clock not saved: %s", exc.strerror or exc)

    def stop(self) -> None:
        """Cancel the timer and save once more."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            self.save()

    def attach(self, host: FeatureHost) -> None:
        """Listen to gossip events and add the ``edgeagent status`` fields."""
        host.add_listener(self.on_update)
        host.add_status(self.status_fields)

    def on_update(self, events: tuple[ev.Event, ...], view: Any) -> None:
        """Pull the clock forward from the ``since`` other members carry in their meta."""
        for event in events:
            if isinstance(event, ev.MemberJoined | ev.MemberUpdated):
                member = event.member
                since = claimant(member.meta, member.addr).since_ms
                if since > 0 and member.name != view.local.name:
                    self.clock.observe(Timestamp(since, 0), self.wall(), member.name)

    def status_fields(self) -> dict[str, Any]:
        """``edgeagent status`` fields: the clock's reading and what was refused."""
        return {
            "clock_ms": self.clock.read(self.wall()).wall_ms,
            "clock_offset_ms": self.clock.offset_ms,
            "clock_capped": self.clock.stats["capped"],
            "clock_jumps": self.clock.stats["jumps"],
        }
