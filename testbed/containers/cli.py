"""``python -m testbed containers``: the container testbed from a shell (docker, root).

    python -m testbed containers build [--force]      # images, cached (no registry)
    python -m testbed containers up --nodes 5 [--broker] [--token-mode address]
    python -m testbed containers status               # nodes, health, faults, member counts
    python -m testbed containers members h2
    python -m testbed containers exec h1 CMD...
    python -m testbed containers logs h3
    python -m testbed containers kill h3 | stop h3 | start h3 | restart h3 | isolate h5
    python -m testbed containers partition h1,h2/h3,h4,h5 [--oneway]
    python -m testbed containers loss h4 20           # 20 % each way (0 clears)
    python -m testbed containers heal
    python -m testbed containers cloud stop | cloud start   # the broker (up --broker): an outage
    python -m testbed containers up --policy-key B64 [--policy-interval 5]  # HTTPS policy endpoint
    python -m testbed containers policy publish bundle.signed | policy stop | policy start
    python -m testbed containers down [--all] [--images]

With one container testbed up, commands find it on their own; with several, pass ``--id``.
Errors are one line on stderr, exit code 2.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from . import image as images
from .backend import ContainerBackend, ContainerError, default_root, list_ids
from .compose import policy_config

PROG = "python -m testbed containers"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument("--id", help="which testbed (needed only when several are up)")
    common.add_argument("--root", type=Path,
                        help=f"run dir parent (default: ${{EDGEAGENT_CONTAINERS_DIR}} or {default_root()})")
    parser = _Parser(prog=PROG, description="Multi-host testbed on docker containers (no registry).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)
    p = sub.add_parser("build", help="build the base and node images (cached; no registry)")
    p.add_argument("--force", action="store_true", help="rebuild the node image even if current")
    p = sub.add_parser("up", parents=[common], help="start N agents in containers")
    p.add_argument("--nodes", type=int, default=5, help="number of agents (default 5)")
    p.add_argument("--broker", action="store_true", help="also run a mosquitto 'cloud' broker")
    p.add_argument("--token-mode", choices=("mdns", "address"), default="mdns",
                   help="join token without the issuer's address (mdns, default) or with it")
    p.add_argument("--policy-key", action="append", default=[], metavar="B64",
                   help="run the HTTPS policy endpoint; every agent trusts this base64 Ed25519 "
                        "key and polls the endpoint (repeatable)")
    p.add_argument("--policy-interval", type=float, default=5.0, help="seconds between polls (5)")
    p.add_argument("--no-build", action="store_true", help="use the images as they are")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("status", parents=[common], help="nodes, health, faults, member counts")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("members", parents=[common], help="one node's membership table")
    p.add_argument("node")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("exec", parents=[common], help="run a command inside a node's container")
    p.add_argument("node")
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="the command and its arguments")
    for name, text in (
        ("kill", "SIGKILL a node's container (crash)"),
        ("stop", "SIGTERM a node's agent (graceful leave)"),
        ("start", "start a stopped node and wait until it answers"),
        ("restart", "kill a node if running, then start it"),
        ("isolate", "drop all of a node's traffic until heal"),
        ("logs", "print a node's agent log (the container's output)"),
    ):
        p = sub.add_parser(name, parents=[common], help=text)
        p.add_argument("node")
    p = sub.add_parser("partition", parents=[common], help="cut the network between groups: h1,h2/h3")
    p.add_argument("groups", help="groups of nodes separated by '/', nodes by ','")
    p.add_argument("--oneway", action="store_true", help="drop only traffic into the first group")
    sub.add_parser("heal", parents=[common], help="remove the partition and isolation")
    p = sub.add_parser("cloud", parents=[common], help="stop or start the cloud broker (a cloud outage)")
    p.add_argument("op", choices=("stop", "start"))
    p = sub.add_parser("policy", parents=[common], help="the policy endpoint (up --policy-key)")
    p.add_argument("op", choices=("publish", "stop", "start"))
    p.add_argument("file", nargs="?", type=Path, help="publish: a signed envelope to serve")
    p = sub.add_parser("loss", parents=[common], help="packet loss on a node, each direction")
    p.add_argument("node")
    p.add_argument("percent", type=int, help="0..100 (0 removes it)")
    p = sub.add_parser("down", parents=[common], help="remove the containers, network and run dir")
    p.add_argument("--all", action="store_true", help="every container testbed under the root")
    p.add_argument("--images", action="store_true", help="also remove the base and node images")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return _dispatch(args)
    except (ContainerError, images.ImageError, ValueError, OSError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "build":
        result = images.ensure_images(force=args.force)
        print(f"{result.tag}: {result.size_bytes / 1e6:.0f} MB"
              f" (base {'built' if result.built_base else 'cached'},"
              f" node {'built' if result.built_node else 'cached'})")
        return 0
    if args.command == "up":
        return _up(args)
    if args.command == "down":
        ids = list_ids(args.root) if args.all else [ContainerBackend.load(args.id, root=args.root).id]
        for tid in ids:
            ContainerBackend.load(tid, root=args.root).down()
            print(f"container testbed {tid} down")
        if args.images:
            removed = images.remove_images()
            print(f"images removed: {', '.join(removed) or 'none'}")
        return 0
    tb = ContainerBackend.load(args.id, root=args.root)
    if args.command == "status":
        return _status(tb, args.json)
    if args.command == "members":
        members = tb.members(args.node)
        if args.json:
            print(json.dumps(members))
        else:
            for m in sorted(members, key=lambda m: m["name"]):
                print(f"{m['name']:<8} {m['address']!s:<22} {m['state']:<8} inc {m['incarnation']}")
        return 0
    if args.command == "exec":
        if not args.cmd:
            raise ContainerError("exec needs a command")
        return subprocess.call(tb.exec_argv(args.node, args.cmd))
    if args.command == "logs":
        sys.stdout.write(tb.logs(args.node))
        return 0
    if args.command == "partition":
        groups = [[n for n in g.split(",") if n] for g in args.groups.split("/")]
        tb.partition(groups, oneway=args.oneway)
        return 0
    if args.command == "loss":
        tb.loss(args.node, args.percent)
        return 0
    if args.command == "heal":
        tb.heal()
        return 0
    if args.command == "cloud":
        (tb.cloud_stop if args.op == "stop" else tb.cloud_start)()
        return 0
    if args.command == "policy":
        return _policy(tb, args.op, args.file)
    actions = {"kill": tb.kill, "stop": tb.stop, "start": tb.start, "restart": tb.restart,
               "isolate": tb.isolate}
    actions[args.command](args.node)
    return 0


def _policy(tb: ContainerBackend, op: str, file: Path | None) -> int:
    if op != "publish":
        (tb.policy_stop if op == "stop" else tb.policy_start)()
        return 0
    if file is None:
        raise ContainerError("policy publish needs the signed envelope's file")
    data = file.read_bytes()
    print(f"serving {file} ({len(data)} bytes) at {tb.policy_publish(data).name}")
    return 0


def _up(args: argparse.Namespace) -> int:
    if not 0.1 <= args.policy_interval <= 3600:
        raise ContainerError(f"--policy-interval must be 0.1..3600 s, not {args.policy_interval:g}")
    config = (policy_config(args.policy_key, poll=True, interval=args.policy_interval)
              if args.policy_key else "")  # fmt: skip
    tb = ContainerBackend(args.nodes, root=args.root, token_mode=args.token_mode,
                          broker=args.broker, build=not args.no_build, config=config,
                          policy=bool(args.policy_key),
                          log=lambda line: print(line, file=sys.stderr))
    try:
        tb.up()
    except BaseException:
        tb.down()
        raise
    nodes = {n: {"ip": tb.ip(n), "container": tb.container(n)} for n in tb.names()}
    if args.json:
        print(json.dumps({"id": tb.id, "project": tb.project, "subnet": tb.subnet,
                          "workdir": str(tb.workdir), "nodes": nodes}))
    else:
        print(f"container testbed {tb.id} up: {len(nodes)} nodes on {tb.subnet}, "
              f"project {tb.project}, run dir {tb.workdir}")
        for name, n in nodes.items():
            print(f"  {name:<4} {n['ip']:<15} {n['container']}")
    return 0


def _status(tb: ContainerBackend, as_json: bool) -> int:
    status = tb.status()
    if as_json:
        print(json.dumps(status))
        return 0
    print(f"container testbed {status['id']}: {status['subnet']}, project {status['project']}, "
          f"image {status['image']}")
    for name, n in status["nodes"].items():
        seen = " ".join(f"{k}={v}" for k, v in sorted(n["members"].items())) or "-"
        faults = [f"loss {n['loss_percent']}%"] if n["loss_percent"] else []
        faults += ["partitioned"] if n["partitioned"] else []
        faults += ["isolated"] if n["isolated"] else []
        state = f"{n['state']}/{n['health'] or '-'}"
        print(f"  {name:<4} {n['ip']:<15} {state:<18} sees {seen:<28} {' '.join(faults)}")
    if "broker" in status:
        print(f"  cloud {status['broker']['address']:<15} {status['broker']['state']}")
    if "policy" in status:
        print(f"  policy {status['policy']['address']:<15} {status['policy']['state']} {status['policy']['url']}")
    return 0
