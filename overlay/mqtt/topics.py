"""MQTT topic names, topic filters and the subscription trie (MQTT 5 section 4.7, 4.8.2).

A topic name is one or more levels separated by ``/``; it never holds ``+`` or ``#``. A
filter may use ``+`` (exactly one level) and ``#`` (this level and every level below, so
``a/#`` also matches ``a``; only as the last level). A topic starting with ``$`` is not
matched by a filter whose first level is a wildcard (4.7.2): ``#`` does not see ``$SYS/x``.
``$share/GROUP/FILTER`` names a shared subscription (4.8.2): GROUP is one level without
wildcards, FILTER a valid filter.

`SubscriptionTrie` holds ``filter -> {key: value}`` one level per node, as mosquitto's
``subs.c`` does; `SubscriptionTrie.match` walks the levels of a topic once, following the
literal child, the ``+`` child and the ``#`` child, so matching costs the depth of the
topic times the wildcard branches, not the number of subscriptions. Empty nodes are pruned
on removal, so memory follows the live subscriptions.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Generic, TypeVar

SHARE_PREFIX = "$share/"
MAX_TOPIC_LEN = (
    65535  # MQTT 5 section 1.5.4: a string is at most 65,535 bytes (the codec checks bytes)
)

K = TypeVar("K")
V = TypeVar("V")


def _levels_ok(text: str, max_levels: int) -> bool:
    return 0 < len(text) <= MAX_TOPIC_LEN and "\0" not in text and text.count("/") < max_levels


def valid_topic_name(topic: str, max_levels: int) -> bool:
    """A publishable topic name: non-empty, no wildcard, no NUL, at most ``max_levels`` levels."""
    return _levels_ok(topic, max_levels) and "+" not in topic and "#" not in topic


def valid_filter(topic_filter: str, max_levels: int) -> bool:
    """A plain (not shared) filter: wildcards are whole levels, ``#`` only last."""
    if not _levels_ok(topic_filter, max_levels):
        return False
    levels = topic_filter.split("/")
    for i, level in enumerate(levels):
        if level == "#":
            if i != len(levels) - 1:
                return False
        elif level != "+" and ("+" in level or "#" in level):
            return False
    return True


@dataclass(frozen=True, slots=True)
class ParsedFilter:
    """A subscription filter split into its share group (None if not shared) and filter."""

    group: str | None
    topic_filter: str


def parse_filter(text: str, max_levels: int) -> ParsedFilter | None:
    """Split ``$share/GROUP/FILTER``; None when the text is not a valid (shared) filter."""
    if not text.startswith(SHARE_PREFIX):
        return ParsedFilter(None, text) if valid_filter(text, max_levels) else None
    group, sep, rest = text[len(SHARE_PREFIX) :].partition("/")
    if not sep or not group or "+" in group or "#" in group:
        return None
    if not valid_filter(rest, max_levels):
        return None
    return ParsedFilter(group, rest)


def filter_matches(topic_filter: str, topic: str) -> bool:
    """Whether a valid plain filter matches a valid topic name (the trie's rule, for one pair)."""
    f_levels = topic_filter.split("/")
    t_levels = topic.split("/")
    if topic.startswith("$") and f_levels[0] in ("+", "#"):
        return False
    for i, f in enumerate(f_levels):
        if f == "#":
            return True
        if i >= len(t_levels) or (f != "+" and f != t_levels[i]):
            return False
    return len(f_levels) == len(t_levels)


@dataclass(slots=True)
class _Node(Generic[K, V]):
    children: dict[str, _Node[K, V]] = field(default_factory=dict)
    subs: dict[K, V] = field(default_factory=dict)


class SubscriptionTrie(Generic[K, V]):
    """``filter -> {key: value}`` by levels; `match` yields every (filter, key, value) for a topic."""

    def __init__(self) -> None:
        self._root: _Node[K, V] = _Node()
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def insert(self, topic_filter: str, key: K, value: V) -> bool:
        """Add or replace; True when the (filter, key) pair is new."""
        node = self._root
        for level in topic_filter.split("/"):
            node = node.children.setdefault(level, _Node())
        new = key not in node.subs
        node.subs[key] = value
        self._count += new
        return new

    def remove(self, topic_filter: str, key: K) -> V | None:
        """Remove the pair and prune empty nodes; the value removed, or None."""
        path: list[tuple[_Node[K, V], str]] = []
        node = self._root
        for level in topic_filter.split("/"):
            child = node.children.get(level)
            if child is None:
                return None
            path.append((node, level))
            node = child
        value = node.subs.pop(key, None)
        if value is None:
            return None
        self._count -= 1
        for parent, level in reversed(path):
            child = parent.children[level]
            if child.subs or child.children:
                break
            del parent.children[level]
        return value

    def get(self, topic_filter: str) -> dict[K, V]:
        """The subscribers of exactly this filter (a copy)."""
        node = self._root
        for level in topic_filter.split("/"):
            child = node.children.get(level)
            if child is None:
                return {}
            node = child
        return dict(node.subs)

    def lookup(self, topic_filter: str, key: K) -> V | None:
        """The value of one (filter, key) pair, or None."""
        node = self._root
        for level in topic_filter.split("/"):
            child = node.children.get(level)
            if child is None:
                return None
            node = child
        return node.subs.get(key)

    def match_values(self, topic: str) -> list[tuple[K, V]]:
        """Every (key, value) whose filter matches ``topic``: `match` without building the
        filters' names (the broker's per-message path needs only the subscribers)."""
        found: list[tuple[K, V]] = []
        if not self._count:
            return found
        levels = topic.split("/")
        last = len(levels)
        wild_ok = not topic.startswith("$")
        stack: list[tuple[_Node[K, V], int]] = [(self._root, 0)]
        while stack:
            node, depth = stack.pop()
            children = node.children
            if children and (wild_ok or depth):
                hash_child = children.get("#")
                if hash_child is not None:
                    found.extend(hash_child.subs.items())
            if depth == last:
                found.extend(node.subs.items())
                continue
            if not children:
                continue
            literal = children.get(levels[depth])
            if literal is not None:
                stack.append((literal, depth + 1))
            if wild_ok or depth:
                plus = children.get("+")
                if plus is not None:
                    stack.append((plus, depth + 1))
        return found

    def match(self, topic: str) -> Iterator[tuple[str, K, V]]:
        """Every (filter, key, value) whose filter matches ``topic`` (a valid topic name)."""
        levels = topic.split("/")
        dollar = topic.startswith("$")
        stack: list[tuple[_Node[K, V], int, tuple[str, ...]]] = [(self._root, 0, ())]
        while stack:
            node, depth, path = stack.pop()
            wild_ok = not (dollar and depth == 0)
            hash_child = node.children.get("#") if wild_ok else None
            if hash_child is not None:
                name = "/".join((*path, "#"))
                for key, value in hash_child.subs.items():
                    yield name, key, value
            if depth == len(levels):
                for key, value in node.subs.items():
                    yield "/".join(path), key, value
                continue
            level = levels[depth]
            literal = node.children.get(level)
            if literal is not None:
                stack.append((literal, depth + 1, (*path, level)))
            plus = node.children.get("+") if wild_ok else None
            if plus is not None:
                stack.append((plus, depth + 1, (*path, "+")))
