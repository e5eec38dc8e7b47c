"""Which agent of a site holds the MQTT uplink (sans-IO, pure).

Every agent that could reach the cloud (``[uplink]`` configured) publishes under
:data:`STATE_KEY` in its gossip-replicated state ``{"v": 1, "site": SITE}``. Every agent
computes the same holder from its own membership view with :func:`choose_holder`: among
the members that advertise the capability for that site and are *eligible* (ALIVE or
SUSPECT; the local node counts as ALIVE), the one with the highest rendezvous score
``sha256(site NUL name)`` wins.

Reachability levels (``"up"``, 0-2, see :class:`Reach`): an agent may be configured for the
uplink yet have no route to the cloud (issue 11: "any node may be the one with
connectivity"). Each agent advertises how well it reaches the cloud: 2 = reaching it now,
1 = reached it before in this run but failing now, 0 = never reached it (a value without
``"up"`` counts as 2). The holder is the eligible candidate with the highest *level*, the
rendezvous score breaking ties; so an agent that cannot reach the cloud holds only when no
candidate can, and in a total cloud outage the agents that did reach it (level 1) are
preferred to those that never did (the spool of the holder is then one the cloud can drain).

Why rendezvous hashing: the winner depends only on the set of eligible candidates, not on
join order or on anyone's clock, so views that agree give the same holder; a candidate that
joins or leaves moves the uplink only if it *is* (or beats) the holder, so the uplink is
stable while non-holders come and go. Different sites hash to different nodes.

Why SUSPECT stays eligible: a suspected node is often alive, and it sees itself alive, so
dropping it at suspicion would give two holders for the suspicion timeout. The uplink moves
when the holder is declared DEAD or LEFT, i.e. within the failure-detection time.

Partitions: each side sees the other side's members as DEAD, so each side picks one holder
(two uplinks to the cloud for the duration). After the heal the views merge and the higher
score wins again; the loser stops publishing and drains nothing more. Messages sent by both
are QoS 1 at-least-once: duplicates are possible, losses are not.

:func:`decode_capability` is total: a hostile value raises :class:`UplinkSelectError` only.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from gossip.messages import MemberState, StateValue

STATE_KEY = "uplink"
MAX_SITE_LEN = 63
ELIGIBLE = frozenset({MemberState.ALIVE, MemberState.SUSPECT})
LEVELS = (0, 1, 2)  # never reached the cloud, reached it before, reaching it now
UP = 2


class UplinkSelectError(ValueError):
    """A capability value that does not decode."""


def encode_capability(site: str, level: int = UP) -> StateValue:
    """The value an uplink-capable agent publishes under STATE_KEY."""
    check_site(site)
    if type(level) is not int or level not in LEVELS:
        raise UplinkSelectError(f"uplink level must be one of {LEVELS}")
    return {"v": 1, "site": site, "up": level}


def check_site(site: str) -> str:
    """A site name: 1-63 printable characters, no NUL."""
    if not isinstance(site, str) or not 0 < len(site) <= MAX_SITE_LEN:
        raise UplinkSelectError(f"uplink site must be 1-{MAX_SITE_LEN} characters")
    if not site.isprintable():
        raise UplinkSelectError("uplink site must be printable")
    return site


def decode_capability(value: object) -> str:
    """The site a peer's STATE_KEY value advertises; raises only UplinkSelectError."""
    if not isinstance(value, dict) or value.get("v") != 1:
        raise UplinkSelectError("uplink capability is not a version 1 object")
    site = value.get("site")
    if not isinstance(site, str):
        raise UplinkSelectError("uplink capability has no site")
    return check_site(site)


def decode_level(value: object) -> int:
    """The reachability level of a value :func:`decode_capability` accepted (absent: 2)."""
    level = value.get("up", UP) if isinstance(value, dict) else None
    if type(level) is not int or level not in LEVELS:  # not bool, not float
        raise UplinkSelectError(f"uplink capability level must be one of {LEVELS}")
    return level


def score(site: str, name: str) -> bytes:
    """The rendezvous score of ``name`` for ``site`` (compared as bytes, highest wins)."""
    return hashlib.sha256(site.encode() + b"\0" + name.encode()).digest()


def choose_holder(
    site: str,
    capable: Mapping[str, str],
    states: Mapping[str, MemberState],
    levels: Mapping[str, int] | None = None,
) -> str | None:
    """The uplink holder of ``site``, or None if no eligible member can hold it.

    ``capable`` maps member name -> advertised site; ``states`` maps member name -> its state
    in this view (a name missing from ``states`` is not eligible); ``levels`` member name ->
    reachability level (missing: 2). The highest level wins, then the highest score.
    """
    best: tuple[int, bytes, str] | None = None
    for name, their_site in capable.items():
        if their_site != site or states.get(name) not in ELIGIBLE:
            continue
        key = ((levels or {}).get(name, UP), score(site, name), name)
        if best is None or key > best:
            best = key
    return None if best is None else best[2]


@dataclass
class UplinkSelector:
    """The local view fed by the member table and replicated state (as the Catalog is)."""

    local: str
    site: str | None = None  # our site if we are uplink-capable, else None
    _capable: dict[str, str] = field(default_factory=dict)
    _states: dict[str, MemberState] = field(default_factory=dict)
    _levels: dict[str, int] = field(default_factory=dict)
    stats: dict[str, int] = field(default_factory=lambda: {"bad_values": 0})

    def __post_init__(self) -> None:
        if self.site is not None:
            self._capable[self.local] = check_site(self.site)

    def on_member(self, name: str, state: MemberState) -> None:
        """The member table's state of ``name`` changed."""
        self._states[name] = state

    def on_reaped(self, name: str) -> None:
        """``name`` left the member table."""
        self._states.pop(name, None)
        if name != self.local:
            self._capable.pop(name, None)
            self._levels.pop(name, None)

    def set_local_level(self, level: int) -> None:
        """Our own reachability level (from :class:`Reach`, not from the wire)."""
        if level not in LEVELS:
            raise UplinkSelectError(f"uplink level must be one of {LEVELS}")
        self._levels[self.local] = level

    def level(self, name: str) -> int:
        """The reachability level ``name`` advertises in this view (default 2)."""
        return self._levels.get(name, UP)

    def on_state(self, owner: str, value: object) -> bool:
        """``owner``'s STATE_KEY changed (None: withdrawn). False if the value was dropped."""
        if owner == self.local:
            return True  # our own capability comes from config, not from the wire
        if value is None:
            self._capable.pop(owner, None)
            self._levels.pop(owner, None)
            return True
        try:
            site, level = decode_capability(value), decode_level(value)
        except UplinkSelectError:
            self.stats["bad_values"] += 1
            self._capable.pop(owner, None)
            self._levels.pop(owner, None)
            return False
        self._capable[owner], self._levels[owner] = site, level
        return True

    def holder(self, site: str | None = None) -> str | None:
        """The holder of ``site`` (default: ours) in this view."""
        site = site if site is not None else self.site
        if site is None:
            return None
        states = dict(self._states)
        states[self.local] = MemberState.ALIVE
        return choose_holder(site, self._capable, states, self._levels)

    def i_hold(self) -> bool:
        """True if this agent should hold the uplink now."""
        return self.site is not None and self.holder() == self.local

    def candidates(self) -> Iterable[str]:
        """Names advertising our site (for status output)."""
        return sorted(n for n, s in self._capable.items() if s == self.site)


@dataclass
class Reach:
    """One agent's own reachability level, with hysteresis (pure: fed the outcomes).

    ``success`` / ``failure`` are the outcomes of connect attempts to the cloud: the holder's
    client rounds (every broker tried once) and a non-holder's probes. The first success
    ever gives level 2 ("up"; at start-up every agent that reaches the cloud is up after its
    first probe, so no takeover follows a second one). Level 2 drops to 1 after
    ``down_after`` failures in a row, or at once on a *conclusive* failure (a probe just
    before taking the uplink over). Back from 1 to 2 needs ``up_after`` successes in a row
    unless the agent holds (its connected client is proof enough): after a cloud outage the
    holder, which kept the backlog in its spool, reconnects before a candidate's second
    probe can take the uplink from it. Level 1 never drops to 0 in a run, so during a total
    cloud outage the agents that reached the cloud keep priority over those that never did.
    """

    down_after: int = 3
    up_after: int = 2
    level: int = 0
    _ok: int = 0
    _fails: int = 0

    def success(self, holding: bool = False) -> int:
        self._ok, self._fails = self._ok + 1, 0
        if self.level == 0 or holding or self._ok >= self.up_after:
            self.level = UP
        return self.level

    def failure(self, conclusive: bool = False) -> int:
        self._ok, self._fails = 0, self._fails + 1
        if self.level == UP and (conclusive or self._fails >= self.down_after):
            self.level = 1
        return self.level
