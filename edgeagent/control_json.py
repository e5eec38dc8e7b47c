"""How the control API writes the core's values as JSON (``members``, ``status``).

Member states are lower-case words (``alive``, ``suspect``, ``dead``, ``left``); addresses
are ``host:port`` (:func:`edgeagent.netaddr.format_addr`); node metadata is shown as our JSON
object when it is one, else as text, else as ``base64:...``.
"""

from __future__ import annotations

import base64
import json
from collections import Counter
from collections.abc import Iterable
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
