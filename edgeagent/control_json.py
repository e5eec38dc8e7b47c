"""How the control API writes the core's values as JSON (``members``, ``status``).

Member states are lower-case words (``alive``, ``suspect``, ``dead``, ``left``); addresses
are ``host:port`` (:func:`edgeagent.netaddr.format_addr`); node metadata is shown as our JSON
object when it is one, else as text, else as ``base64:...``.
"""

from __future__ import annotations

import base64
import json
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

from gossip.events import Member
from gossip.messages import MemberState

from .netaddr import format_addr


def decode_meta(meta: bytes) -> Any:
    """Node metadata for people: our JSON object, else text, else base64."""
    try:
        return json.loads(meta) if meta else {}
    except (UnicodeDecodeError, json.JSONDecodeError):
        pass
    try:
        return meta.decode()
    except UnicodeDecodeError:
        return "base64:" + base64.b64encode(meta).decode()


def member_json(member: Member) -> dict[str, Any]:
    """The control API's view of one member (``members --json``)."""
    return {
        "name": member.name,
        "address": format_addr(member.addr),
        "state": member.state.name.lower(),
        "incarnation": member.incarnation,
        "meta": decode_meta(member.meta),
    }


def count_states(members: Iterable[Member]) -> dict[str, int]:
    """How many members are in each state, every state listed (``status``)."""
    counts = Counter(m.state.name.lower() for m in members)
    return {state.name.lower(): counts.get(state.name.lower(), 0) for state in MemberState}


MEMBERS_PAGE = 1000  # members per control reply the CLI asks for (~250 KB of JSON)
MAX_MEMBERS_PAGE = 10_000  # the most one request may ask for


def members_page_args(request: Mapping[str, Any]) -> tuple[str | None, int | None]:
    """``after`` (a member name) and ``limit`` of a ``members`` request; ValueError if malformed.

    Without ``limit`` the whole table is returned, as before paging existed.
    """
    after, limit = request.get("after"), request.get("limit")
    if after is not None and not isinstance(after, str):
        raise ValueError("after: expected a member name (a string)")
    if limit is not None and (
        isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_MEMBERS_PAGE
    ):
        raise ValueError(f"limit: expected an integer in 1..{MAX_MEMBERS_PAGE}")
    return after, limit


def members_page(members: Iterable[Member], after: str | None, limit: int | None) -> list[dict[str, Any]]:
    """Members sorted by name, those after ``after`` only, at most ``limit`` of them.

    Paging by name, not by offset, so a member joining or leaving between two pages never
    makes the next page repeat or skip another one.
    """
    chosen = sorted((m for m in members if after is None or m.name > after), key=lambda m: m.name)
    if limit is not None:
        chosen = chosen[:limit]
    return [member_json(m) for m in chosen]
