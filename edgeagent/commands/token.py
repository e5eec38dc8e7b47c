"""``edgeagent token create|list|revoke``: join tokens, issued by the running agent.

Only the node holding the mesh CA key (the one that ran ``edgeagent init``) issues tokens; the
commands go through its control socket (``token-create``, ``token-list``, ``token-revoke``,
served by :mod:`edgeagent.features.enroll`), so the token names the address and enrollment
port the agent actually listens on (``--no-address``: none, joiners find the issuer by mDNS).
``create`` prints the token as its only stdout line.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from typing import Any

from edgeagent.control import add_state_dir_argument, call_agent, state_dir_of
from edgeagent.errors import UsageError

DURATION_HELP = "a number with s, m, h or d, e.g. 30m, 24h, 7d (default: 24h)"
_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION_RE = re.compile(r"^(?:(\d+(?:\.\d+)?)([smhd]))+$")
_PART_RE = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
NOT_ISSUER = (
    "this agent does not hold the mesh CA key: create tokens on the node that ran 'edgeagent init'"
)


def parse_duration(text: str, option: str) -> float:
    """Seconds in ``text`` (``90s``, ``30m``, ``24h``, ``7d``, ``1h30m``); UsageError if not one."""
    cleaned = text.strip().lower()
    if not _DURATION_RE.match(cleaned):
        raise UsageError(f"{option}: expected {DURATION_HELP.split(' (')[0]}, got {text!r}")
    seconds = sum(float(n) * _UNITS[unit] for n, unit in _PART_RE.findall(cleaned))
    if seconds <= 0:
        raise UsageError(f"{option}: expected a positive duration, got {text!r}")
    return seconds


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "token",
        help="create, list or revoke join tokens (on the node holding the mesh CA key)",
        description=(
            "Join tokens let new devices enroll ('edgeagent join TOKEN'). They are issued by the "
            "running agent that holds the mesh CA key and carry its address."
        ),
    )
    ops = parser.add_subparsers(dest="op", metavar="OP", required=True)
    p = ops.add_parser("create", help="print a new join token (its only line of output)")
    p.add_argument("--ttl", metavar="DURATION", default="24h", help=f"lifetime; {DURATION_HELP}")
    p.add_argument("--uses", metavar="N", type=int, help="number of uses (default: unlimited)")
    p.add_argument(
        "--no-address",
        dest="addresses",
        action="store_false",
        help=(
            "name no issuer address in the token: joiners find this issuer by mDNS on the LAN "
            "(shorter token; survives a change of address)"
        ),
    )
    add_state_dir_argument(p)
    p = ops.add_parser("list", help="tokens issued here, with their state")
    p.add_argument("--json", action="store_true", help="print a JSON list")
    add_state_dir_argument(p)
    p = ops.add_parser("revoke", help="refuse a token from now on")
    p.add_argument("id", metavar="ID", help="the token id (first column of 'token list')")
    add_state_dir_argument(p)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    state_dir = state_dir_of(args)
    if args.op == "create":
        ttl_s = parse_duration(args.ttl, "--ttl")
        if args.uses is not None and args.uses < 1:
            raise UsageError("--uses: expected a positive number")
        result = _call(
            state_dir, "token-create", ttl_s=ttl_s, uses=args.uses, addresses=args.addresses
        )
        print(result["token"])
    elif args.op == "list":
        _print_list(_call(state_dir, "token-list"), args.json)
    else:
        _call(state_dir, "token-revoke", id=args.id)
        print(f"revoked token {args.id}")
    return 0


def _call(state_dir: Any, cmd: str, **request: Any) -> Any:
    try:
        return call_agent(state_dir, cmd, **request)
    except UsageError as exc:
        if "unknown command" in str(exc):
            raise UsageError(f"token: {NOT_ISSUER}") from None
        raise UsageError(str(exc).replace(f"{cmd}: ", "token: ", 1)) from None


def _print_list(tokens: list[dict[str, Any]], as_json: bool) -> None:
    if as_json:
        print(json.dumps(tokens, indent=2, sort_keys=True))
        return
    from edgeagent.table import format_table

    now = time.time()
    rows = [
        (
            t["id"],
            t["state"],
            _left(t["expires"] - now),
            str(t["used"]),
            "unlimited" if t["uses_left"] is None else str(t["uses_left"]),
        )
        for t in tokens
    ]
    print(format_table(("id", "state", "expires in", "used", "uses left"), rows))


def _left(seconds: float) -> str:
    if seconds <= 0:
        return "expired"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"
