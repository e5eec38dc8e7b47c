"""``python -m testbed``: the network-namespace testbed from a shell (root only).

    python -m testbed up --hosts 5            # namespaces, bridge, one agent per host
    python -m testbed status                  # who runs, faults, what each agent sees
    python -m testbed members h2              # h2's membership table
    python -m testbed exec h1 CMD...          # run a command inside h1's namespace
    python -m testbed kill h3 | stop h3 | start h3 | restart h3
    python -m testbed partition h1,h2/h3,h4,h5 [--oneway]
    python -m testbed loss h4 20              # 20 % loss each way on h4's link (0 clears)
    python -m testbed isolate h5              # h5's link down (heal brings it back)
    python -m testbed heal                    # remove partitions, links up
    python -m testbed down [--all]            # remove everything the testbed created
    python -m testbed containers ...          # the same on docker containers (--help)
    python -m testbed scenario FILE --backend sim|netns|containers [--report DIR]

Hosts are named ``h1``..``hN`` (a bare number works too). With one testbed up, commands find it
on their own; with several, pass ``--id``. Errors are one line on stderr, exit code 2. Without
root the loopback harness (``testbed.loopback``, used by ``edgeagent demo``) is the way.

``scenario`` runs a scenario file (``testbed/scenarios/``, see its README) end to end on a
backend of its own (``--backend sim`` needs no root) and writes a report folder; exit 0 only
when every expect clause holds (1 when one does not, 2 for a bad file or a backend that cannot
run here).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from . import scenario_run
from .cluster import Testbed, TestbedError, default_root, list_ids
from .netns import NetnsError, is_root


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument("--id", help="which testbed (needed only when several are up)")
    common.add_argument("--root", type=Path, help=f"work dir parent (default: ${{EDGEAGENT_TESTBED_DIR}} or {default_root()})")
    parser = _Parser(prog="python -m testbed", description="Multi-host testbed on Linux network namespaces (root).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)
    sub.add_parser("containers", help="the container testbed (docker): python -m testbed containers --help")

    p = sub.add_parser("up", parents=[common], help="create the hosts and start one agent on each")
    p.add_argument("--hosts", type=int, default=5, help="number of hosts (default 5)")
    p.add_argument("--preset", choices=("lan", "wan", "local"), default="lan", help="gossip timing (default lan)")
    p.add_argument("--no-mdns", action="store_true", help="agents do not use mDNS (implies --seeds)")
    p.add_argument("--seeds", action="store_true", help="agents also join h1 (h1 joins h2) by address")
    p.add_argument("--no-agents", action="store_true", help="build only the network")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("status", parents=[common], help="hosts, processes, faults and member counts")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("members", parents=[common], help="one host's membership table")
    p.add_argument("host")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("exec", parents=[common], help="run a command inside a host's namespace")
    p.add_argument("host")
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="the command and its arguments")
    for name, text in (
        ("kill", "SIGKILL a host's agent (crash)"),
        ("stop", "SIGTERM a host's agent (graceful leave)"),
        ("start", "start a host's agent"),
        ("restart", "SIGKILL a host's agent if running, then start it"),
        ("isolate", "take a host's link down until heal"),
        ("logs", "print a host's agent log"),
    ):
        p = sub.add_parser(name, parents=[common], help=text)
        p.add_argument("host")
    p = sub.add_parser("partition", parents=[common], help="cut the network between groups: h1,h2/h3,h4")
    p.add_argument("groups", help="groups of hosts separated by '/', hosts by ','")
    p.add_argument("--oneway", action="store_true", help="drop only traffic into the first group")
    sub.add_parser("heal", parents=[common], help="remove partitions and bring links up")
    p = sub.add_parser("loss", parents=[common], help="packet loss on a host's link, each direction")
    p.add_argument("host")
    p.add_argument("percent", type=int, help="0..100 (0 removes it)")
    p = sub.add_parser("down", parents=[common], help="remove everything the testbed created")
    p.add_argument("--all", action="store_true", help="every testbed under the root")
    p = sub.add_parser("scenario", help="run a scenario file end to end and write a report")
    scenario_run.add_arguments(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["containers"]:
        from .containers.cli import main as containers_main  # docker, not namespaces

        return containers_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "scenario":  # its own backends; only netns needs root, and says so
        try:
            return scenario_run.main(args, prog=f"{parser.prog} scenario")
        except KeyboardInterrupt:
            return 130
    if not is_root():
        print(f"{parser.prog}: error: needs root (network namespaces); without root use the "
              "loopback harness (testbed.loopback) or 'edgeagent demo'", file=sys.stderr)
        return 2
    try:
        return _dispatch(args)
    except (TestbedError, NetnsError, ValueError) as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    root = args.root
    if args.command == "up":
        tb = Testbed(
            args.hosts, preset=args.preset, mdns=not args.no_mdns, seeds=args.seeds or args.no_mdns,
            root=root, start_agents=not args.no_agents,
        )
        try:
            tb.up()
        except BaseException:
            tb.down()
            raise
        hosts = {h.name: {"ip": h.ip, "netns": h.netns, "pid": tb.pid(h.name)} for h in tb.hosts}
        if args.json:
            print(json.dumps({"id": tb.id, "workdir": str(tb.workdir), "hosts": hosts}))
        else:
            print(f"testbed {tb.id} up: {len(hosts)} hosts on {tb.subnet}, work dir {tb.workdir}")
            for name, h in hosts.items():
                print(f"  {name:<4} {h['ip']:<15} {h['netns']:<14} pid {h['pid']}")
        return 0
    if args.command == "down":
        ids = list_ids(root) if args.all else [Testbed.load(args.id, root=root).id]
        for tid in ids:
            Testbed.load(tid, root=root).down()
            print(f"testbed {tid} down")
        return 0

    tb = Testbed.load(args.id, root=root)
    if args.command == "status":
        status = tb.status()
        if args.json:
            print(json.dumps(status))
            return 0
        print(f"testbed {status['id']}: {status['subnet']}, work dir {status['workdir']}")
        for name, h in status["hosts"].items():
            seen = " ".join(f"{k}={v}" for k, v in sorted(h["members"].items())) or "-"
            faults = [f"loss {h['loss_percent']}%"] if h["loss_percent"] else []
            faults += ["partitioned"] if h["partitioned"] else []
            faults += [] if h["link_up"] else ["link down"]
            pid = f"pid {h['pid']}" if h["pid"] else "stopped"
            print(f"  {name:<4} {h['ip']:<15} {pid:<11} sees {seen:<28} {' '.join(faults)}")
        return 0
    if args.command == "members":
        members = tb.members(args.host)
        if args.json:
            print(json.dumps(members))
        else:
            for m in sorted(members, key=lambda m: m["name"]):
                print(f"{m['name']:<8} {m['address']!s:<22} {m['state']:<8} inc {m['incarnation']}")
        return 0
    if args.command == "exec":
        if not args.cmd:
            raise TestbedError("exec needs a command")
        return subprocess.call(tb.exec_argv(args.host, args.cmd))
    if args.command == "logs":
        sys.stdout.write(tb.log_path(args.host).read_text())
        return 0
    if args.command == "partition":
        groups = [[h for h in g.split(",") if h] for g in args.groups.split("/")]
        if len(groups) < 2 or not all(groups):
            raise TestbedError("partition needs two or more groups: h1,h2/h3,h4")
        tb.partition(groups, oneway=args.oneway)
        return 0
    if args.command == "loss":
        tb.loss(args.host, args.percent)
        return 0
    if args.command == "heal":
        tb.heal()
        return 0
    if args.command == "start":
        tb.start(args.host)
        tb.wait_ready(args.host)
        return 0
    actions = {"kill": tb.kill, "stop": tb.stop, "restart": tb.restart, "isolate": tb.isolate}
    actions[args.command](args.host)
    return 0


if __name__ == "__main__":
    sys.exit(main())
