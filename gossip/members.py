"""The member table, and the one rule for which news about a member wins.

Theory of operation
-------------------
We hold one record per member: a state (ALIVE, SUSPECT, DEAD, LEFT) at an
incarnation number that only the member itself raises. News about a member
arrives as a record of the same shape: an Alive, a Suspect, a Dead sent by
someone else (DEAD) or a Dead sent by the member itself (LEFT, a graceful
leave); a push-pull's member list is read as the same records (its DEAD as a
Suspect: a remote death is only a suspicion here, as in memberlist mergeState).
:func:`can_change` alone decides whether such a record replaces the one we
hold (foca's ``Member::can_change``; memberlist aliveNode / suspectNode /
deadNode):

==========  ========================================================
incoming    replaces the held record when
==========  ========================================================
ALIVE       its incarnation is newer, whatever the held state
            (a refutation, new metadata, or a restart / rejoin)
SUSPECT     held ALIVE at an incarnation not newer than the record;
            held SUSPECT at an *older* incarnation (the member refuted
            the suspicion we hold and we missed its Alive: a new one)
DEAD        held ALIVE or SUSPECT at an incarnation not newer
LEFT        held ALIVE, SUSPECT or DEAD at an incarnation not newer
            (a leave is recorded even over a death, never the reverse)
==========  ========================================================

No record replaces ours when its incarnation is more than
``codec.MAX_COUNTER_STEP`` ahead of the one we hold: honest incarnations move
by one per refutation, so such a jump is forged, and accepting it would let one
record spend the incarnation range (``codec.MAX_COUNTER``) that the member
needs to refute.

Nothing replaces a LEFT but an Alive at a newer incarnation. A SUSPECT
record at the incarnation of the suspicion we hold does not replace it: the
core counts it as a confirmation (``suspicion.py``). Records about ourselves
never replace ours: the core refutes them by raising its own incarnation.

The table keeps every member by name, the others (not us) in a list for O(1)
random picks, a count per state for the cluster-size estimate, and a count of
the members never heard from directly (``verify.py``).
"""

from __future__ import annotations

import random
from collections.abc import Callable

from .codec import MAX_COUNTER_STEP
from .events import Member
from .messages import Address, MemberState
from .suspicion import Suspicion

ALIVE = MemberState.ALIVE
SUSPECT = MemberState.SUSPECT
DEAD = MemberState.DEAD
LEFT = MemberState.LEFT


def can_change(held: MemberState, held_incarnation: int, incoming: MemberState, incarnation: int) -> bool:
    """Whether a record ``incoming`` at ``incarnation`` replaces ``held`` at ``held_incarnation``.

    See the module docstring for the rules.
    """
    if incarnation - held_incarnation > MAX_COUNTER_STEP:
        return False
    if incoming == ALIVE:
        return incarnation > held_incarnation
    if incarnation < held_incarnation:
        return False
    if incoming == SUSPECT:
        return held == ALIVE or (held == SUSPECT and incarnation > held_incarnation)
    if incoming == DEAD:
        return held in (ALIVE, SUSPECT)
    return held != LEFT


class Node:
    """Our mutable record of one member (``Member`` is its frozen snapshot)."""

    __slots__ = (
        "name", "addr", "incarnation", "state", "meta", "state_change", "suspicion", "index", "verified", "learned",
        "sig", "told",
    )

    def __init__(self, name: str, addr: Address, incarnation: int, state: MemberState, meta: bytes, now: float):
        self.name = name
        self.addr = addr
        self.incarnation = incarnation
        self.state = state
        self.meta = meta
        self.state_change = now
        self.suspicion: Suspicion | None = None
        self.index = -1  # position in MemberTable.others; -1 for ourselves or once removed
        self.verified = True  # heard from directly (verify.py); MemberTable.add decides for others
        self.learned = now  # when we first heard of it
        self.sig = b""  # the member's signature of its current Alive (signing.canonical_alive), if any
        self.told = float("-inf")  # when we last told a member that still suspects this one it is gone

    def snapshot(self) -> Member:
        return Member(self.name, self.addr, self.incarnation, self.state, self.meta, self.state_change)


class MemberTable:
    """Every member we know, ourselves included (``me``), dead and left ones until reaped."""

    __slots__ = ("me", "by_name", "others", "counts", "unverified")

    def __init__(self, me: Node) -> None:
        self.me = me
        self.by_name: dict[str, Node] = {me.name: me}
        self.others: list[Node] = []  # everyone but us, for random picks
        self.counts = [0, 0, 0, 0]  # others, by MemberState
        self.unverified = 0  # others never heard from directly

    def __len__(self) -> int:
        return len(self.by_name)

    def get(self, name: str) -> Node | None:
        return self.by_name.get(name)

    def n_estimate(self) -> int:
        """Cluster size as memberlist estimates it: members not dead or left, us included."""
        return 1 + self.counts[ALIVE] + self.counts[SUSPECT]

    def add(
        self, name: str, addr: Address, incarnation: int, meta: bytes, now: float, verified: bool = False
    ) -> Node:
        """Add another member, ALIVE."""
        node = Node(name, addr, incarnation, ALIVE, meta, now)
        node.verified = verified
        self.unverified += not verified
        self.by_name[name] = node
        node.index = len(self.others)
        self.others.append(node)
        self.counts[ALIVE] += 1
        return node

    def remove(self, node: Node) -> None:
        del self.by_name[node.name]
        last = self.others.pop()
        if last is not node:
            self.others[node.index] = last
            last.index = node.index
        node.index = -1
        self.counts[node.state] -= 1
        self.unverified -= not node.verified

    def verify(self, node: Node) -> None:
        """We heard from ``node`` directly."""
        if not node.verified:
            node.verified = True
            if node.index >= 0:
                self.unverified -= 1

    def oldest_unverified(self) -> Node | None:
        """The unverified member to evict first: gone before live, then the oldest learned."""
        candidates = [n for n in self.others if not n.verified]
        return min(candidates, key=lambda n: (n.state < DEAD, n.learned), default=None)

    def set_state(self, node: Node, state: MemberState, now: float) -> None:
        if node is not self.me:
            self.counts[node.state] -= 1
            self.counts[state] += 1
        node.state = state
        node.state_change = now

    def k_random(self, k: int, accept: Callable[[Node], bool], rng: random.Random) -> list[Node]:
        """Up to ``k`` distinct random others passing ``accept`` (memberlist kRandomNodes)."""
        nodes = self.others
        n = len(nodes)
        picked: list[Node] = []
        if n == 0 or k <= 0:
            return picked
        rand = rng.random
        for _ in range(3 * n):
            if len(picked) >= k:
                break
            node = nodes[int(rand() * n)]
            if node in picked or not accept(node):
                continue
            picked.append(node)
        return picked
