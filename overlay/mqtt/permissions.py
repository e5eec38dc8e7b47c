"""A policy bundle's ``mqtt.permissions``: who may publish and subscribe what, sans-IO.

No entry: every node may do everything, as before policy. With entries, an allow list: a node
may publish a topic that one of its entries' ``publish`` filters matches, and subscribe to a
filter that one of its ``subscribe`` filters covers (every topic the requested filter matches,
the allowed one matches too; ``$share/GROUP/FILTER`` is checked by its FILTER). A node's
entries are those whose ``who`` names it (``node:NAME``), a service it runs (``service:NAME``)
or everyone (``*``). A node no entry names may do nothing.

Checked where a message enters the mesh (the agent whose local client publishes or
subscribes: PUBACK / SUBACK "not authorized" for MQTT 5) and again at each destination agent
for a peer's messages, by the peer's mTLS identity, so an agent that skips the check cannot
reach the others' subscribers.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from .topics import SHARE_PREFIX, filter_matches

if TYPE_CHECKING:
    from ..policy import Permission


def filter_covers(allowed: str, requested: str) -> bool:
    """Whether every topic the valid filter ``requested`` matches, ``allowed`` matches."""
    a_levels, r_levels = allowed.split("/"), requested.split("/")
    if requested.startswith("$") and a_levels[0] in ("+", "#"):
        return False  # 4.7.2: a leading wildcard does not match $ topics
    for i, level in enumerate(a_levels):
        if level == "#":
            return True
        if i >= len(r_levels) or r_levels[i] == "#":
            return False
        if level != "+" and r_levels[i] != level:
            return False  # a literal against another literal, or against "+"
    return len(r_levels) == len(a_levels)


class TopicPermissions:
    """One bundle's ``mqtt.permissions``; see the module docstring."""

    def __init__(self, permissions: Iterable[Permission]) -> None:
        self.entries = tuple(permissions)

    def _filters(self, node: str, services: Iterable[str], publish: bool) -> list[str]:
        running = frozenset(services)
        out: list[str] = []
        for entry in self.entries:
            kind, _, name = entry.who.partition(":")
            if (
                entry.who == "*"
                or (kind == "node" and name == node)
                or (kind == "service" and name in running)
            ):
                out += entry.publish if publish else entry.subscribe
        return out

    def may_publish(self, node: str, services: Iterable[str], topic: str) -> bool:
        if not self.entries:
            return True
        return any(filter_matches(f, topic) for f in self._filters(node, services, True))

    def may_subscribe(self, node: str, services: Iterable[str], topic_filter: str) -> bool:
        if not self.entries:
            return True
        if topic_filter.startswith(SHARE_PREFIX):
            topic_filter = topic_filter[len(SHARE_PREFIX) :].partition("/")[2]
        return any(filter_covers(f, topic_filter) for f in self._filters(node, services, False))
