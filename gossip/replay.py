"""Anti-replay for gossip datagrams: a boot epoch and a sliding window of counters per sender.

Every datagram carries, inside its sealed plaintext, the sender's name, its *boot epoch* and a
per-datagram *counter* (``codec.DatagramHeader``). The epoch is given to the core by its
caller and must be higher on every start of a node (the agent persists it in identity.json and
raises it before the first send; a wall clock is no use: a Raspberry Pi without a real-time
clock boots in 1970). The counter starts at 0 in every life and grows by one per datagram.

A receiver keeps, per sender, the highest epoch seen and a window over that epoch's counters:
the highest counter and a 64-bit bitmap of it and the 63 below (RFC 4303 3.4.3, the IPsec
anti-replay window; DTLS 1.2 uses the same). A datagram is fresh when

- its epoch is above the one held (the sender restarted: the window starts over), or
- its epoch is the one held and its counter is above the highest (the window slides), or
- its counter is inside the window and not yet marked (reordering, up to 63 behind).

Anything else (an older epoch, a counter already seen, or one left of the window) is a
replay: the core drops the datagram and counts it (``Stats.replayed``). The window is checked
only after the datagram opened and decoded, so only key holders can move it.

The table is bounded: at most ``capacity`` senders, least recently heard first out. The core
sizes it to hold every member and every reaped name it remembers, and forgets an entry when it
forgets the name (a reaped name that falls out of its memory, a never-verified phantom): an
entry lives exactly as long as the name means something, so a replay can revive neither a
member nor a reaped one. Push-pull frames carry their source's epoch too; streams are fresh,
so a receiver takes it as the source's current epoch (``ReplayGuard.sync``). A receiver that
restarts has an empty table; see docs/architecture.md ("Replays") for what that leaves open.
"""

from __future__ import annotations

from collections import OrderedDict

WINDOW_BITS = 64  # counters remembered below the highest (RFC 4303 recommends at least 32; 64 is its default)
_WINDOW_MASK = (1 << WINDOW_BITS) - 1


class Window:
    """One sender's epoch, highest counter and bitmap (bit ``i`` set: ``top - i`` was seen)."""

    __slots__ = ("bits", "epoch", "top")

    def __init__(self, epoch: int, counter: int) -> None:
        self.epoch = epoch
        self.top = counter
        self.bits = 1

    def accept(self, epoch: int, counter: int) -> bool:
        """True (and marked) if ``(epoch, counter)`` is fresh; False for a replay."""
        if epoch != self.epoch:
            if epoch < self.epoch:
                return False
            self.epoch, self.top, self.bits = epoch, counter, 1  # a new life of the sender
            return True
        if counter > self.top:
            shift = counter - self.top
            self.bits = ((self.bits << shift) | 1) & _WINDOW_MASK if shift < WINDOW_BITS else 1
            self.top = counter
            return True
        offset = self.top - counter
        if offset >= WINDOW_BITS or (self.bits >> offset) & 1:
            return False
        self.bits |= 1 << offset
        return True


class ReplayGuard:
    """Per-sender windows, at most ``capacity`` of them (least recently heard evicted first)."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self._windows: OrderedDict[str, Window] = OrderedDict()

    def __len__(self) -> int:
        return len(self._windows)

    def __contains__(self, sender: object) -> bool:
        return sender in self._windows

    def accept(self, sender: str, epoch: int, counter: int) -> bool:
        """True if the datagram ``(sender, epoch, counter)`` is fresh (and remember it)."""
        windows = self._windows
        window = windows.get(sender)
        if window is None:
            windows[sender] = Window(epoch, counter)
            if len(windows) > self.capacity:
                windows.popitem(last=False)
            return True
        windows.move_to_end(sender)
        return window.accept(epoch, counter)

    def sync(self, sender: str, epoch: int) -> None:
        """Take ``epoch`` as ``sender``'s current one, from a source known to be fresh (its own
        push-pull over a challenged stream): another epoch, higher *or lower*, starts a window
        with nothing seen.

        Higher: a receiver that restarted, or missed the restart, drops the sender's older
        captures from now on. Lower: the sender lost its saved epoch (a wiped state dir under
        the same name); without this its datagrams would be dropped for as long as we remember
        the name.
        """
        window = self._windows.get(sender)
        if window is not None:
            self._windows.move_to_end(sender)
            if window.epoch != epoch:
                window.epoch, window.top, window.bits = epoch, -1, 0
            return
        window = self._windows[sender] = Window(epoch, -1)
        window.bits = 0
        if len(self._windows) > self.capacity:
            self._windows.popitem(last=False)

    def epoch_of(self, sender: str) -> int | None:
        """The highest epoch heard from ``sender``, or None if it is not remembered."""
        window = self._windows.get(sender)
        return None if window is None else window.epoch

    def forget(self, sender: str) -> None:
        """Drop ``sender``'s window (the name is forgotten; its next datagram starts a new one)."""
        self._windows.pop(sender, None)
