"""``edgeagent join TOKEN``: enroll this device in a cluster and save what it receives.

Parses the token (``-`` reads it from stdin), creates this node's identity and key, reaches the
issuing agent at the token's address(es) or, when the token names none or none answers, at one
announcing itself by mDNS (``_edgeagent-join._tcp``, browsed for a few seconds; ``--no-mdns``
or ``mdns = false`` turns that off), authenticates it by the CA pin in the token, proves
it holds the token and receives its node certificate, the CA certificate, the cluster keyring,
the cluster name and the issuer's gossip address(es), saved as seeds (see
:mod:`edgeagent.onboarding` for the files). Then ``edgeagent run`` joins without ``--join``.
A bad, expired, revoked or forged token, or an issuer that cannot be reached, is one line and
exit 2, and leaves no cluster material behind.
"""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "join",
        help="enroll this device in a cluster with a join token",
        description=(
            "Enroll this device with the join token printed by 'edgeagent init' or 'edgeagent "
            "token create' on an issuing node: receive this node's certificate, the cluster "
            "keyring and the issuer's address, then start with 'edgeagent run'."
        ),
    )
    add = parser.add_argument
    add("token", metavar="TOKEN", help="the join token (ea1....), or - to read it from stdin")
    add("-c", "--config", metavar="FILE", help="TOML config file, as for 'edgeagent run'")
    add("--name", help="node name, unique in the cluster (default: the hostname)")
    add("--state-dir", metavar="DIR", help="where the material is written (default: as 'run')")
    add(
        "--no-mdns",
        dest="mdns",
        action="store_false",
        default=None,
        help=(
            "do not look for the issuer by mDNS when the token names no address or none "
            "answers (default: look for a few seconds)"
        ),
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from edgeagent.config import load_config
    from edgeagent.netaddr import format_addr
    from edgeagent.onboarding import join_with_token, read_token_text

    token_text = read_token_text(args.token)
    config = load_config(args)
    joined = join_with_token(
        config.state_dir,
        config.name,
        token_text,
        default_name=config.name_is_default,
        mdns=config.mdns,
    )
    seeds = ", ".join(format_addr(s) for s in joined.seeds) or "none (use --join)"
    flags = "" if args.state_dir is None else f" --state-dir {config.state_dir}"
    print(
        f"joined cluster {joined.cluster!r} as {joined.identity.name!r} "
        f"(node id {joined.identity.node_id}) via {format_addr(joined.issuer)}; seeds: {seeds}"
    )
    print(f"start it: edgeagent run{flags}")
    return 0
