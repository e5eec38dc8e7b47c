"""Verification of members we heard *of* but never heard *from*.

Why: any key holder can announce members that do not exist (an Alive costs
one datagram). Taken on trust, 50,000 forged names filled the member table,
were probed one per second (each checked once per ~10,000 s) and kept 24 h
once dead; real joiners were refused.

How it works. A member is *verified* once we hear from it directly: a ping,
ping-req, ack or nack it sends from its own address, an Alive about itself
from its own address, or a push-pull with it (``members.Node.verified``; the
core marks it). Members learned only from third parties start unverified:

- the core keeps at most ``max_members // 2`` unverified members; beyond
  that, new unverified ones are refused (counted), and a new *verified* one
  (a real joiner, which push-pulls with us) evicts the oldest unverified one
  when the table is full;
- an unverified live member that is still unverified ``VERIFY_GRACE`` after
  we learned of it gets a verification ping (a plain Ping; its ack, from its
  address, verifies it). At most ``VERIFY_PINGS_PER_TICK`` go out per probe
  tick, re-pings first. Still unverified after ``VERIFY_ATTEMPTS`` pings
  ``VERIFY_TIMEOUT_PROBES`` probe intervals apart, it has failed. Under
  pressure (more than ``max_members // UNVERIFIED_PRESSURE_DIVISOR``
  unverified members: a flood) it is dropped (forgotten, not remembered as
  reaped: if it is real, gossip brings it back); otherwise we suspect it like
  any member whose probe failed, so a real member that crashed before we heard
  from it still goes DEAD (MemberFailed, and its address stays quarantined);
- a name dropped so is not taken back from third parties for
  ``FAILED_VERIFY_MEMORY`` (other members that have not yet dropped it would
  gossip it straight back); it is at once if the member speaks to us itself;
- an unverified member that is DEAD or LEFT is reaped after
  ``UNVERIFIED_GONE_TTL`` instead of ``dead_member_ttl``.

Flood mode. Verifying at the calm pace (20 s grace, three pings 3 s apart,
64 a second) clears 5,000 phantoms in ~4 minutes, while a flood refills the
table as fast as it empties. So from the moment unverified members exceed the
pressure mark until ``FLOOD_HOLD`` after they last did, the verifier runs
faster: ``FLOOD_GRACE`` before the first ping, ``FLOOD_ATTEMPTS`` pings one
probe interval apart (an honest member answers within the probe timeout),
``FLOOD_PINGS_PER_TICK`` a tick, the pings carry no piggybacked broadcasts
(their retransmissions are not spent on forged addresses), and a member our
own probe round fails while it is still unverified is dropped like one that
failed verification instead of suspected, and so is an unverified member that
news from others makes DEAD or LEFT (a phantom would otherwise sit DEAD for
``UNVERIFIED_GONE_TTL``; the price: in a flood, a real member that died before
we heard from it is forgotten at once, its replicated state with it). 5,000 phantoms are gone ~45 s after a flood
ends. A real member dropped so is back as soon as it speaks to us. And a
*verified* member that news from others makes DEAD or LEFT is re-checked at
once by a ping carrying that news (``may_recheck``, budgeted; its ack carries
the refutation): in a table full of phantoms
the reconnect tick would almost never pick it, so a forged leave would stick.

Most honest members verify themselves for free within the grace period (they
probe us, answer our probes, or push-pull with us), so verification pings are
rare in a healthy cluster and cost nothing in a steady one.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from .members import SUSPECT, Node

# Time a member may stay unverified before we ping it: our own probe round,
# its probes of us and push-pulls verify most members well within it.
VERIFY_GRACE = 20.0
# Pings before an unverified member is dropped, and the wait between them in
# probe intervals: three round trips all lost is ~1e-3 at 5% loss each way.
VERIFY_ATTEMPTS = 3
VERIFY_TIMEOUT_PROBES = 3
# Verification pings per probe tick: ~64 small datagrams a second at most, so
# a forged flood of addresses cannot make us a traffic reflector, and 5,000
# phantoms are cleared in ~4 minutes.
VERIFY_PINGS_PER_TICK = 64
# Unverified members beyond max_members // this mean a flood: failed ones are
# then dropped at once rather than suspected (1,000 of the default 10,000; an
# honest cluster has that many unverified members only while one joins a
# cluster of over 1,000).
UNVERIFIED_PRESSURE_DIVISOR = 10
# How long a name that failed verification is refused from third parties: long
# enough for every member to have run its own verification of it.
FAILED_VERIFY_MEMORY = 600.0
# Unverified DEAD / LEFT members are forgotten after this (verified ones after
# dead_member_ttl, 24 h). Longer than the overlay's 10-minute address
# quarantine (overlay.ipam DEFAULT_QUARANTINE_S), so a joiner that heard of a
# dead owner only in a push-pull still honours its block until it is free.
UNVERIFIED_GONE_TTL = 900.0
# Flood mode (see the module docstring): on while unverified members exceed the
# pressure mark and for FLOOD_HOLD after, so the last phantoms of a flood are
# also cleared fast. 256 pings of ~100 bytes a tick is ~25 KB/s; two pings one
# probe interval apart each, 128 phantoms a second: 5,000 in ~40 s.
FLOOD_HOLD = 60.0
FLOOD_GRACE = 5.0
FLOOD_ATTEMPTS = 2
FLOOD_PINGS_PER_TICK = 256
# In flood mode a verified member that third-party news makes DEAD or LEFT is
# re-checked at once: a ping carrying the news (a live one refutes on its ack; a
# forged leave otherwise sticks until a reconnect tick picks it, which with
# thousands of phantoms in the table is almost never): at most once per member per
# RECHECK_MIN_INTERVAL, at most RECHECK_BURST at once, RECHECK_RATE a second.
RECHECK_MIN_INTERVAL = 2.0
RECHECK_BURST = 8
RECHECK_RATE = 2.0


def _pending(node: Node) -> bool:
    """Still worth verifying: in the table, unverified, not dead or left."""
    return node.index >= 0 and not node.verified and node.state <= SUSPECT


class Verifier:
    """The verification queue for one core. See the module docstring."""

    __slots__ = (
        "_interval",
        "_timeout",
        "_waiting",
        "_pinged",
        "_failed",
        "_max_failed",
        "_flood_until",
        "_rechecked",
        "_recheck_tokens",
        "_recheck_later",
    )

    def __init__(self, probe_interval: float, max_failed: int) -> None:
        self._interval = probe_interval
        self._timeout = VERIFY_TIMEOUT_PROBES * probe_interval
        self._flood_until = float("-inf")
        self._rechecked: dict[str, float] = {}  # name -> when, oldest first
        self._recheck_tokens = (float(RECHECK_BURST), float("-inf"))  # (tokens, at)
        self._recheck_later: dict[str, Node] = {}  # refused for now: re-checked on a later tick
        self._waiting: deque[tuple[float, Node]] = deque()  # (learned at, node), oldest first
        self._pinged: deque[tuple[float, Node, int]] = deque()  # (answer due, node, attempt)
        self._failed: dict[str, float] = {}  # name -> refused until, oldest first
        self._max_failed = max_failed

    def pressure(self, unverified: int, mark: int, now: float) -> bool:
        """Note the unverified count against the pressure ``mark``; whether we are in flood mode."""
        if unverified > mark:
            self._flood_until = now + FLOOD_HOLD
        return self.flooded(now)

    def flooded(self, now: float) -> bool:
        """In flood mode: faster verification, failures dropped (see the module docstring)."""
        return now < self._flood_until

    def may_recheck(self, node: Node, now: float) -> bool:
        """Whether to re-check ``node`` (gone by third-party news) now: flood mode, within budget.

        One refused for now (outside flood mode too) is kept and offered again by
        :meth:`due_rechecks`, so the last forged leave of a flood, and one forged just
        before the flood was noticed, are re-checked too.
        """
        if not self.flooded(now):
            self._later(node)  # a leave forged just before the flood was noticed, too
            return False
        last = self._rechecked.get(node.name)
        tokens, at = self._recheck_tokens
        tokens = min(float(RECHECK_BURST), tokens + max(0.0, now - at) * RECHECK_RATE)
        self._recheck_tokens = (tokens, now)
        if (last is not None and now - last < RECHECK_MIN_INTERVAL) or tokens < 1.0:
            self._later(node)
            return False
        self._recheck_tokens = (tokens - 1.0, now)
        self._recheck_later.pop(node.name, None)
        self._rechecked.pop(node.name, None)
        self._rechecked[node.name] = now
        while len(self._rechecked) > self._max_failed:
            del self._rechecked[next(iter(self._rechecked))]
        return True

    def _later(self, node: Node) -> None:
        if node.name in self._recheck_later or len(self._recheck_later) < RECHECK_BURST * 8:
            self._recheck_later[node.name] = node

    def due_rechecks(self, now: float) -> list[Node]:
        """Members whose re-check was put off and may run now (still gone and in the table)."""
        due = []
        for name, node in list(self._recheck_later.items()):
            if node.index < 0 or node.state <= SUSPECT:
                del self._recheck_later[name]
            elif self.may_recheck(node, now):
                due.append(node)
        return due

    def refused(self, name: str, now: float) -> bool:
        """Whether third-party news of ``name`` is refused (it failed verification lately)."""
        until = self._failed.get(name)
        if until is None:
            return False
        if until <= now:
            del self._failed[name]
            return False
        return True

    def dropped(self, name: str, now: float) -> None:
        """``name`` failed verification and was dropped: refuse it from third parties a while."""
        failed = self._failed
        failed.pop(name, None)
        failed[name] = now + FAILED_VERIFY_MEMORY
        while len(failed) > self._max_failed:
            del failed[next(iter(failed))]

    def __len__(self) -> int:
        return len(self._waiting) + len(self._pinged)

    def learned(self, node: Node, now: float) -> None:
        """An unverified live member: verify it after the grace period."""
        self._waiting.append((now, node))

    def on_tick(self, now: float, ping: Callable[[Node], None], failed: Callable[[Node], None]) -> None:
        """Ping what is due, re-ping what did not answer, report what failed (``failed``)."""
        flood = self.flooded(now)
        budget = FLOOD_PINGS_PER_TICK if flood else VERIFY_PINGS_PER_TICK
        attempts = FLOOD_ATTEMPTS if flood else VERIFY_ATTEMPTS
        timeout = self._interval if flood else self._timeout
        grace = FLOOD_GRACE if flood else VERIFY_GRACE
        pinged = self._pinged
        for _ in range(len(pinged)):
            due, node, attempt = pinged[0]
            if due > now or budget <= 0:
                break
            pinged.popleft()
            if not _pending(node):
                continue
            if attempt >= attempts:
                failed(node)
                continue
            ping(node)
            budget -= 1
            pinged.append((now + timeout, node, attempt + 1))
        waiting = self._waiting
        while waiting and budget > 0 and waiting[0][0] + grace <= now:
            _, node = waiting.popleft()
            if not _pending(node):
                continue
            ping(node)
            budget -= 1
            pinged.append((now + timeout, node, 1))
