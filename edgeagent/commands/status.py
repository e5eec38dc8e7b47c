"""``edgeagent status``: who this agent is and how its cluster looks."""

from __future__ import annotations

from typing import Any

from edgeagent.control import add_query_command
from edgeagent.table import format_pairs


def register(subparsers: Any) -> None:
    add_query_command(
        subparsers,
        "status",
        render,
        help="show this agent's identity and cluster health",
        description="Show the local agent: name, node id, address, incarnation, cluster, "
        "profile, members by state, local health score (0 is healthy), uptime, input that "
        "failed to decrypt, push-pull streams dropped by reason, and state files not yet "
        "saved (a full or failing disk).",
        json_help="print one JSON object",
    )


def render(status: dict[str, Any]) -> str:
    members = status.get("members", {})
    overlay = (
        f"{status.get('overlay_address') or 'none yet'} "
        f"(block {status.get('overlay_block') or 'none yet'})"
    )
    return format_pairs(
        [
            ("name", status["name"]),
            ("node id", status["node_id"]),
            ("address", status["address"]),
            ("overlay", overlay),
            ("incarnation", status["incarnation"]),
            ("cluster", status["cluster"]),
            ("profile", f"{status['profile']} (gossip preset {status.get('preset')})"),
            ("members", ", ".join(f"{n} {s}" for s, n in members.items())),
            ("health score", status["health_score"]),
            ("uptime", f"{status['uptime_s']:.0f} s"),
            ("state dir", status["state_dir"]),
            ("mdns", "on" if status.get("mdns") else "off"),
            ("metrics", status.get("metrics") or "off"),
            ("coap", status.get("coap") or "off"),
            ("channel", status.get("channel") or "off"),
            ("enrollment", _enroll_text(status.get("enroll"))),
            ("undecrypted", _undecryptable_text(status)),
            ("stream drops", _counts_text(status.get("stream_drops"))),
            ("state saves", _saves_text(status)),
        ]
    )


def _undecryptable_text(status: dict[str, Any]) -> str:
    """``N datagrams, M streams`` and the last source, from the undecryptable_* fields."""
    text = (
        f"{status.get('undecryptable_datagrams', 0)} datagrams, "
        f"{status.get('undecryptable_streams', 0)} streams"
    )
    source = status.get("undecryptable_last_source")
    if source:
        text += f" (last from {source}, {status.get('undecryptable_last_s_ago')} s ago)"
    return text


def _counts_text(counts: dict[str, int] | None) -> str:
    """``reason N, ...`` for the non-zero counts (``none``), e.g. the stream drops."""
    shown = [f"{k.replace('_', ' ')} {v}" for k, v in (counts or {}).items() if v]
    return ", ".join(shown) or "none"


def _saves_text(status: dict[str, Any]) -> str:
    """``ok``, or how many state files wait and which fail with what."""
    failing: dict[str, str] = status.get("saves_failing") or {}
    pending = status.get("saves_pending", 0)
    if not failing and not pending:
        return "ok"
    text = f"{pending} pending"
    if failing:
        text += "; failing: " + ", ".join(f"{path} ({error})" for path, error in failing.items())
    return text


def _enroll_text(enroll: dict[str, Any] | None) -> str:
    """``off`` on a node without the CA key, else where it listens and what it did."""
    if not enroll:
        return "off (no mesh CA key here)"
    outcomes = ", ".join(f"{k} {v}" for k, v in sorted(enroll.items()) if isinstance(v, int)
                         and k != "tokens_usable")  # fmt: skip
    return (
        f"{enroll['address']}, {enroll['tokens_usable']} usable tokens"
        + (f", {outcomes}" if outcomes else "")
    )
