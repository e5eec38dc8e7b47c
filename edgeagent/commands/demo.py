"""``edgeagent demo``: five real agents on loopback tell the membership story, then clean up.

How it works. :class:`edgeagent.localmesh.LocalMesh` starts ``--nodes`` real
``edgeagent run`` processes on 127.A.B.x (no root, no mDNS, no outside service; seeds join
them). The demo polls every agent's control socket a few times a second and prints a compact
table - one row each time something changed - where each cell says how the *other* running
agents see that member: ``alive``, or ``suspect 2/4`` when 2 of the 4 observers suspect it.
The story: the agents converge; one is SIGKILLed and is seen suspected, then dead; it restarts
from its state dir and rejoins with a higher incarnation; finally every agent gets SIGTERM,
leaves gracefully (one at a time, each recorded as LEFT - not dead - by the rest) and exits 0,
and the temp dirs are removed.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edgeagent.localmesh import LocalMesh, MeshAgent

POLL = 0.2  # seconds between looks at the agents' views
# Hang bounds (seconds) for the LOCAL and LAN presets; WAN timing is about 5x slower.
CONVERGE_TIMEOUT = 60.0
DETECT_TIMEOUT = 60.0
REJOIN_TIMEOUT = 60.0
LEAVE_TIMEOUT = 30.0
SLOWER = {"local": 1.0, "lan": 1.0, "wan": 5.0}
COLUMN = 13  # characters per member column
# When observers disagree, the cell shows the most telling state (a crash shows as soon as one
# observer notices it); "-" is a member an observer does not know yet.
SEVERITY = {"dead": 4, "left": 3, "suspect": 2, "alive": 1, "-": 0}


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="run agents on loopback and show join, crash, detection, rejoin and leave",
        description=(
            "Start agents on loopback (no root, no outside service), show the membership table "
            "converging, SIGKILL one and show it suspected then dead, restart it and show it "
            "rejoin with a higher incarnation, then shut every agent down gracefully."
        ),
    )
    parser.add_argument("--nodes", type=int, default=5, help="number of agents (3..20, default 5)")
    parser.add_argument("--preset", choices=("local", "lan", "wan"), default="local",
                        help="gossip timing (default local: fast, for one machine)")
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from edgeagent.errors import UsageError

    if not 3 <= args.nodes <= 20:
        raise UsageError(f"--nodes must be 3..20, not {args.nodes}")
    from edgeagent.localmesh import LocalMesh

    cluster: LocalMesh[MeshAgent] = LocalMesh(args.nodes, preset=args.preset, cluster="demo")
    story = _Story(cluster, SLOWER[args.preset])
    print(f"edgeagent demo: {args.nodes} agents on loopback ({cluster.agents[0].host[:-2]}.x), "
          f"{args.preset.upper()} timing, no root, no mDNS.")
    print("Each cell: how the other running agents see that member "
          "('suspect 2/4' = 2 of 4 observers).")
    try:
        return story.tell(args.nodes)
    except TimeoutError as exc:
        print(f"edgeagent: error: demo: {exc}", file=sys.stderr)
        return 1
    finally:
        cluster.stop()  # idempotent: SIGTERMs whatever still runs, removes the temp dir


class _Story:
    """Drives the cluster through the story and prints the table as it changes."""

    def __init__(self, cluster: LocalMesh[MeshAgent], slower: float) -> None:
        self.cluster = cluster
        self.slower = slower
        self.names = [a.name for a in cluster.agents]
        self.started = time.monotonic()
        self.last_row: list[str] = []

    def tell(self, nodes: int) -> int:
        cluster = self.cluster
        self.say(f"starting {self.names[0]}..{self.names[-1]}")
        begun = time.monotonic()
        cluster.start()
        self.header()
        self.watch(lambda v: self.all_see_running_alive(v), CONVERGE_TIMEOUT, "convergence")
        took = time.monotonic() - begun
        self.say(f"converged {took:.1f} s after start: every agent sees all {nodes} members alive")

        victim = cluster.agents[nodes // 2]
        before = self.incarnation_seen(victim.name)
        self.say(f"SIGKILL {victim.name} (pid {victim.pid}): a crash, no goodbye")
        victim.kill()
        suspected: list[float] = []

        def dead_everywhere(views: dict[str, dict[str, Any]]) -> bool:
            if not suspected and any(v.get(victim.name, {}).get("state") == "suspect" for v in views.values()):
                suspected.append(time.monotonic())
                self.say(f"{victim.name} suspected (no ack to probes)")
            return all(v.get(victim.name, {}).get("state") == "dead" for v in views.values())

        kill_time = time.monotonic()
        took = self.watch(dead_everywhere, DETECT_TIMEOUT, f"{victim.name} to be declared dead")
        if not suspected:
            self.say(f"{victim.name} went dead without a suspicion being seen (polled too slowly)")
        self.say(f"{victim.name} dead in every view, {took:.1f} s after the kill")

        self.say(f"restarting {victim.name} from its state dir (same identity)")
        victim.start()
        self.watch(lambda v: self.all_see_running_alive(v), REJOIN_TIMEOUT, f"{victim.name} to rejoin")
        after = self.incarnation_seen(victim.name)
        self.say(f"{victim.name} rejoined: alive everywhere with incarnation {after} (was {before}), "
                 f"{time.monotonic() - kill_time:.1f} s after the kill")

        keeper, others = cluster.agents[0], cluster.agents[:0:-1]
        codes = []
        for agent in others:
            self.say(f"SIGTERM {agent.name}: graceful leave")
            codes += self.terminate([agent])
            self.watch(
                lambda v, name=agent.name: all(view.get(name, {}).get("state") == "left" for view in v.values()),
                LEAVE_TIMEOUT, f"{agent.name}'s leave to be recorded",
            )
        self.say(f"{', '.join(a.name for a in others)} recorded as left (not dead) by {keeper.name}")
        self.say(f"SIGTERM {keeper.name}")
        codes += self.terminate([keeper])
        base = cluster.base_dir
        cluster.stop()
        if any(code != 0 for code in codes):
            self.say(f"some agents exited with an error: exit codes {codes}")
            return 1
        gone = "removed" if not base.exists() else "could not remove"
        self.say(f"all {nodes} agents exited with code 0; {gone} {base}")
        return 0

    # -- observing ---------------------------------------------------------------------------

    def views(self) -> dict[str, dict[str, Any]]:
        """{observer: {member: {"state", "incarnation", ...}}} for every running agent that answers."""
        from edgeagent.errors import AgentUnavailable

        result = {}
        for agent in self.cluster.running():
            try:
                result[agent.name] = {m["name"]: m for m in agent.members()}
            except AgentUnavailable:
                continue
        return result

    def all_see_running_alive(self, views: dict[str, dict[str, Any]]) -> bool:
        running = [a.name for a in self.cluster.running()]
        return len(views) == len(running) and all(
            v.get(name, {}).get("state") == "alive" for v in views.values() for name in running
        )

    def incarnation_seen(self, name: str) -> int:
        """The highest incarnation of ``name`` any other running agent holds."""
        return max(
            (v[name]["incarnation"] for o, v in self.views().items() if o != name and name in v),
            default=0,
        )

    def watch(
        self, done: Any, timeout: float, what: str, observers: list[MeshAgent] | None = None
    ) -> float:
        """Print table rows as views change until ``done(views)``; return the seconds taken.

        ``done`` sees the views of ``observers`` (default: every running agent).
        """
        start = time.monotonic()
        while True:
            views = self.views()
            self.row(views)
            if observers is not None:
                views = {a.name: views[a.name] for a in observers if a.name in views}
            if done(views):
                return time.monotonic() - start
            if time.monotonic() - start > timeout * self.slower:
                raise TimeoutError(f"timed out after {timeout * self.slower:g} s waiting for {what}")
            time.sleep(POLL)

    def terminate(self, agents: list[MeshAgent]) -> list[int]:
        """SIGTERM the agents and wait for them; their exit codes."""
        return [agent.terminate() or 0 for agent in agents]

    # -- printing ----------------------------------------------------------------------------

    def elapsed(self) -> str:
        return f"{time.monotonic() - self.started:6.1f}s"

    def say(self, text: str) -> None:
        print(f"{self.elapsed()}  ==> {text}", flush=True)

    def header(self) -> None:
        print(f"{'time':>7}  " + "".join(f"{n:<{COLUMN}}" for n in self.names), flush=True)

    def row(self, views: dict[str, dict[str, Any]]) -> None:
        cells = [self.cell(name, views) for name in self.names]
        if cells != self.last_row:
            self.last_row = cells
            print(f"{self.elapsed()}  " + "".join(f"{c:<{COLUMN}}" for c in cells).rstrip(), flush=True)

    def cell(self, name: str, views: dict[str, dict[str, Any]]) -> str:
        seen = [v.get(name, {}).get("state", "-") for o, v in views.items() if o != name]
        if not seen:  # no other observer: the member's own view of itself, if it runs
            return str(views.get(name, {}).get(name, {}).get("state", "-"))
        worst = max(seen, key=lambda s: SEVERITY.get(s, 0))
        count = seen.count(worst)
        return worst if count == len(seen) else f"{worst} {count}/{len(seen)}"
