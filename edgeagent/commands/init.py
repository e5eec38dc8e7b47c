"""``edgeagent init``: create a new cluster on the first device and print a join token.

Writes the cluster material into the state dir (:mod:`edgeagent.onboarding`): the gossip
keyring, a mesh CA whose private key stays on this device (``ca.key``, 0600), this node's key
and certificate, the cluster name, and the token store holding the first join token. The token
names where this node will listen for enrollments once ``edgeagent run`` starts it: the
advertised host (``--advertise``, else the ``--bind`` host, else the address of the default
route) and the enrollment port (``--enroll-port``, default the gossip port + 1). Give ``run``
the same ``--bind``/``--advertise``/``--enroll-port`` (or the same ``-c FILE``).

The token is the last line of stdout, so ``TOKEN=$(edgeagent init | tail -n 1)`` works.
A state dir that already holds cluster material is refused (one line, exit 2).
"""

from __future__ import annotations

import argparse
from typing import Any

from .token import DURATION_HELP, parse_duration


def register(subparsers: Any) -> None:
    from edgeagent.config import DEFAULT_CLUSTER, add_enroll_port_argument

    parser = subparsers.add_parser(
        "init",
        help="create a new cluster on this (first) device and print a join token",
        description=(
            "Create a new cluster in the state dir: the gossip keyring, a mesh CA (its key stays "
            "on this device), this node's certificate and a first join token, printed as the "
            "last line. Then start the agent with 'edgeagent run' and on each new device run "
            "'edgeagent join TOKEN'."
        ),
    )
    add = parser.add_argument
    add("-c", "--config", metavar="FILE", help="TOML config file, as for 'edgeagent run'")
    add("--name", help="node name, unique in the cluster (default: the hostname)")
    add("--cluster", metavar="NAME", help=f"cluster name (default: {DEFAULT_CLUSTER})")
    add("--state-dir", metavar="DIR", help="where the material is written (default: as 'run')")
    add(
        "--bind", metavar="HOST:PORT", help="the gossip address 'run' will bind (default: as 'run')"
    )
    add("--advertise", metavar="HOST:PORT", help="the address peers dial (default: from --bind)")
    add_enroll_port_argument(parser)
    add("--ttl", metavar="DURATION", default="24h", help=f"first token's lifetime; {DURATION_HELP}")
    add("--uses", metavar="N", type=int, help="first token's number of uses (default: unlimited)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import time

    from edgeagent.config import load_config
    from edgeagent.errors import UsageError
    from edgeagent.onboarding import (
        create_cluster,
        enroll_addresses,
        new_ca,
        refuse_existing,
        remove_stale_tokens,
    )
    from edgeagent.persist import ensure_state_dir
    from edgeagent.token_store import TokenStore
    from overlay import pki

    ttl_s = parse_duration(args.ttl, "--ttl")
    config = load_config(args)
    state_dir = config.state_dir
    refuse_existing(state_dir, "init")
    addresses = enroll_addresses(config)
    try:
        ca = new_ca(config.cluster)
    except pki.PkiError as exc:
        raise UsageError(f"init: {exc}") from None
    ensure_state_dir(state_dir)
    remove_stale_tokens(state_dir)
    token = TokenStore(state_dir).create(
        pki.ca_pin(ca.cert), addresses, time.time(), ttl_s, args.uses
    )
    create_cluster(
        state_dir, config.name, config.cluster, ca=ca, default_name=config.name_is_default
    )  # the keyring last: committed
    flags = "" if args.state_dir is None else f" --state-dir {state_dir}"
    print(
        f"created cluster {config.cluster!r} in {state_dir}: mesh CA (its key stays here, "
        f"ca.key), node {config.name!r}, keyring"
    )
    print(f"start it:        edgeagent run{flags} (with the same --bind/--advertise/-c)")
    print(
        f"on a new device: edgeagent join TOKEN   (token {token.token_id}, valid {args.ttl}; "
        "more with 'edgeagent token create')"
    )
    print(token.text())
    return 0
