"""Shared subscription groups (MQTT 5 section 4.8.2): one member of a group gets each message.

The trie holds one `ShareGroup` per (filter, group name), so a message costs one trie match
per group, not one per member. Members take turns in the order they first subscribed (a
re-subscription keeps its place); `ShareGroup.pick` starts at the member whose turn it is
and skips members that are not connected; when none is, the member whose turn it is gets the
message anyway (its session is persistent and queues it: a clean session ends with its
connection and leaves the group). The turn moves past the member chosen.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from overlay.mqtt.session import SubOptions


@dataclass(slots=True)
class ShareGroup:
    """The members of one share group on one filter, and whose turn it is."""

    members: dict[str, SubOptions] = field(default_factory=dict)
    turns: list[str] = field(default_factory=list)
    next: int = 0

    def __len__(self) -> int:
        return len(self.turns)

    def add(self, client_id: str, opts: SubOptions) -> None:
        if client_id not in self.members:
            self.turns.append(client_id)
        self.members[client_id] = opts

    def remove(self, client_id: str) -> None:
        if self.members.pop(client_id, None) is None:
            return
        i = self.turns.index(client_id)
        del self.turns[i]
        if i < self.next:
            self.next -= 1
        if self.turns:
            self.next %= len(self.turns)
        else:
            self.next = 0

    def pick(self, connected: Callable[[str], bool]) -> tuple[str, SubOptions]:
        """The member to deliver to, and move the turn past it (the group is never empty)."""
        n = len(self.turns)
        chosen = self.next % n
        for k in range(n):
            i = (self.next + k) % n
            if connected(self.turns[i]):
                chosen = i
                break
        self.next = (chosen + 1) % n
        client_id = self.turns[chosen]
        return client_id, self.members[client_id]
