"""CoAP through the mesh against a plain aiocoap proxy and no proxy at all (issue 9).

How it works. Three agents on loopback (:mod:`testbed.loopback`, CoAP on each agent's own
``127.A.B.N`` at one free port); a plain aiocoap server (:mod:`testbed.coap_server`) beside
node2 and one beside node3; an aiocoap ``ForwardProxy`` in its own process. One load client
process (:mod:`testbed.coap_load`: aiocoap, ``--concurrency`` in flight, default 50, one
client context per worker) measures ``--requests`` GETs of ``/temp`` on each path:

- (a) ``direct``: client -> server beside node2;
- (b) ``proxy``: client -> ForwardProxy -> that server (one plain hop);
- (c) ``mesh``: client -> node1 (``/mesh/temperature/temp``) -> TLS channel -> node2 ->
  server (the service published on node2 only for this part).

The three paths are measured ``--repeat`` times (default 3) in turn, and every number is the
median of its runs (the machine is usually shared: one run is noise). Every measured run
meets a freshly started server beside node2, so that no path pays for the requests of the
runs before it: aiocoap's server keeps every message it received for ~247 s (for
deduplication), and its generation-2 garbage collections stop the process longer as they
grow (35 ms, then 60, 100, 120 and 180 ms, over 20,000 requests: gc callbacks in the server,
every in-flight request waiting each time), which had made the later paths' p99 mostly the
server's own pauses.
``*_rps``, ``*_p50_ms``, ``*_p99_ms`` per path; ``mesh_vs_proxy`` = mesh_rps / proxy_rps;
``mesh_added_p50_ms`` = mesh p50 - direct p50 at that concurrency (the same client process
kind, concurrency and server; by Little's law it is mostly ``concurrency / rps``, i.e. a
throughput number once the CPUs are busy), with its runs in ``mesh_added_p50_ms_runs``;
``idle_*_p50_ms`` the same paths with one request in flight and ``mesh_added_p50_ms_idle``
(the latency the two agents add, without queueing; the idle runs come after the loaded ones,
direct right before mesh, so that the load other programs put on a shared machine changes
as little as possible between the two numbers of the difference); ``rated_*_p50_ms`` and
``mesh_added_p50_ms_at_rate`` the same for direct and mesh paced at ``--soak-rate``
(``rate_rps``, 200/s) for 5 s with up to ``--concurrency`` in flight: the added latency under
a load both paths can carry, with the concurrency allowed. ``cpu_ms_per_request_ingress`` /
``_egress``: node1's / node2's CPU during (c) per request (``_idle``: with one in flight);
``cpu_ms_per_request_proxy``: the ForwardProxy's during (b);
``client_cpu_ms_per_request_*``: the load client's own, per path (does the client limit?).
Each agent serves CoAP on a port free on all their addresses (not 5683, which another
program on the machine may hold on the wildcard address).

Soak: ``--soak-s`` seconds (default 300, as the issue asks) at ``--soak-rate`` (200/s) through
the mesh after a 10 s warm-up at the same rate; ``agent_rss_growth_mb`` is the larger growth of
node1's and node2's RSS over the soak, ``agent_rss_mb`` their RSS at its end.

Failover: the service is then published on node3 too; a stream of GETs at 100/s runs for 8 s
and node2 (agent and server) is SIGKILLed after 2 s. ``failover_success_ratio`` is the share
of GETs answered 2.xx; ``failover_moved_s`` the time from the kill until every later GET is
answered by node3.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from typing import Any

from testbed.bench import UsageError
from testbed.bench.procs import cpu_seconds, stop_process
from testbed.loopback import LoopbackCluster, free_port

PROXY_SOURCE = """
import asyncio, sys, aiocoap
from aiocoap.proxy.server import ForwardProxyWithPooledObservations
async def main():
    outgoing = await aiocoap.Context.create_client_context(transports=["udp6"])
    site = ForwardProxyWithPooledObservations(outgoing)
    await aiocoap.Context.create_server_context(site, bind=(sys.argv[1], int(sys.argv[2])), transports=["udp6"])
    print("ready", flush=True)
    await asyncio.get_running_loop().create_future()
asyncio.run(main())
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--requests", type=int, default=3000, help="GETs per path (default 3000)")
    parser.add_argument("--concurrency", type=int, default=50, help="in flight (default 50)")
    parser.add_argument(
        "--soak-s", type=float, default=300.0, help="soak seconds (default 300; 0: skip)"
    )
    parser.add_argument("--soak-rate", type=float, default=200.0, help="soak GETs/s (default 200)")
    parser.add_argument(
        "--repeat", type=int, default=3, help="runs of each path, medians reported (default 3)"
    )


def _spawn(argv: list[str]) -> subprocess.Popen[str]:
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != "ready":
        stop_process(proc)
        raise RuntimeError(f"{argv[:4]} did not start")
    return proc


class _Server:
    """The server beside node2: started afresh before each measured run (see the docstring)."""

    def __init__(self, argv: list[str]) -> None:
        self.argv = argv
        self.proc = _spawn(argv)

    def fresh(self) -> None:
        stop_process(self.proc)
        self.proc = _spawn(self.argv)  # the same port: UDP has no TIME_WAIT to wait out


def _load(target: str, uri: str, *extra: str) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "testbed.coap_load", target, uri, *extra],
        capture_output=True, text=True, timeout=3700, check=True,
    )  # fmt: skip
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def _measure(
    target: str, uri: str, extra: list[str], pids: list[int], server: _Server, *load: str
) -> dict[str, Any]:
    """One load run on a fresh server; the agents' CPU per answered request during it."""
    server.fresh()
    cpu0 = [cpu_seconds(p) for p in pids]
    r = _load(target, uri, *load, *extra)
    cpu1 = [cpu_seconds(p) for p in pids]
    ok = max(1, r["ok"])
    r["agent_cpu_ms"] = [round((b - a) * 1000 / ok, 3) for a, b in zip(cpu0, cpu1, strict=True)]
    return r


def _one_round(
    args: argparse.Namespace,
    runs: dict[str, tuple[str, str, list[str]]],
    pids: list[int],
    server: _Server,
) -> dict[str, float]:
    n, c = str(args.requests), str(args.concurrency)
    res: dict[str, float] = {}
    for name, (target, uri, extra) in runs.items():
        r = _measure(target, uri, extra, pids, server, "--requests", n, "--concurrency", c)
        res |= {
            f"{name}_rps": r["rps"],
            f"{name}_p50_ms": r["p50_ms"],
            f"{name}_p99_ms": r["p99_ms"],
            f"{name}_failed": r["failed"],
            f"client_cpu_ms_per_request_{name}": r["cpu_ms_per_request"],
        }
        ingress, egress, proxy = r["agent_cpu_ms"]
        if name == "mesh":
            res["cpu_ms_per_request_ingress"], res["cpu_ms_per_request_egress"] = ingress, egress
        if name == "proxy":
            res["cpu_ms_per_request_proxy"] = proxy
    for name in ("direct", "mesh", "proxy"):  # back to back: the two of the difference
        target, uri, extra = runs[name]
        idle = _measure(target, uri, extra, pids, server, "--requests", "300", "--concurrency", "1")
        res[f"idle_{name}_p50_ms"] = idle["p50_ms"]
        res[f"idle_{name}_p99_ms"] = idle["p99_ms"]
        if name == "mesh":
            ingress, egress, _ = idle["agent_cpu_ms"]
            res["cpu_ms_per_request_ingress_idle"] = ingress
            res["cpu_ms_per_request_egress_idle"] = egress
    rated = ("--requests", str(int(args.soak_rate * 5)), "--rate", str(args.soak_rate), "--concurrency", c)
    for name in ("direct", "mesh"):  # paced below both paths' capacity, up to c in flight
        target, uri, extra = runs[name]
        res[f"rated_{name}_p50_ms"] = _measure(target, uri, extra, pids, server, *rated)["p50_ms"]
    res["mesh_added_p50_ms"] = round(res["mesh_p50_ms"] - res["direct_p50_ms"], 3)
    res["mesh_added_p50_ms_idle"] = round(res["idle_mesh_p50_ms"] - res["idle_direct_p50_ms"], 3)
    res["mesh_added_p50_ms_at_rate"] = round(res["rated_mesh_p50_ms"] - res["rated_direct_p50_ms"], 3)
    return res


def _throughput(
    args: argparse.Namespace,
    direct: str,
    proxy: str,
    ingress: str,
    cluster: LoopbackCluster,
    proxy_pid: int,
    server: _Server,
) -> dict[str, Any]:
    runs = {
        "direct": (direct, f"coap://{direct}/temp", []),
        "proxy": (proxy, f"coap://{direct}/temp", ["--proxy"]),
        "mesh": (ingress, f"coap://{ingress}/mesh/temperature/temp", []),
    }
    pids = [cluster.agents[0].pid or 0, cluster.agents[1].pid or 0, proxy_pid]
    rounds = [_one_round(args, runs, pids, server) for _ in range(args.repeat)]
    res: dict[str, Any] = {
        key: round(statistics.median(r[key] for r in rounds), 3) for key in rounds[0]
    }
    res["mesh_added_p50_ms_runs"] = [r["mesh_added_p50_ms"] for r in rounds]
    res["mesh_added_p50_ms_idle_runs"] = [r["mesh_added_p50_ms_idle"] for r in rounds]
    res["mesh_added_p50_ms_at_rate_runs"] = [r["mesh_added_p50_ms_at_rate"] for r in rounds]
    res["rate_rps"] = args.soak_rate
    res["mesh_vs_proxy"] = (
        round(res["mesh_rps"] / res["proxy_rps"], 3) if res["proxy_rps"] else None
    )
    return res


def _soak(args: argparse.Namespace, ingress: str, cluster: LoopbackCluster) -> dict[str, Any]:
    if args.soak_s <= 0:
        return {}
    uri, rate = f"coap://{ingress}/mesh/temperature/temp", str(args.soak_rate)
    _load(ingress, uri, "--seconds", "10", "--rate", rate, "--concurrency", "20")
    before = [a.rss_kb() or 0 for a in cluster.agents[:2]]
    r = _load(ingress, uri, "--seconds", str(args.soak_s), "--rate", rate, "--concurrency", "20")
    after = [a.rss_kb() or 0 for a in cluster.agents[:2]]
    return {
        "soak_s": args.soak_s,
        "soak_rps": r["rps"],
        "soak_failed": r["failed"],
        "agent_rss_mb": [round(kb / 1024, 1) for kb in after],
        "agent_rss_growth_mb": round(
            max(b - a for a, b in zip(before, after, strict=True)) / 1024, 2
        ),
    }


def _failover(ingress: str, cluster: LoopbackCluster, server2: _Server) -> dict[str, Any]:
    uri = f"coap://{ingress}/mesh/temperature/temp"
    proc = subprocess.Popen(
        [sys.executable, "-m", "testbed.coap_load", ingress, uri, "--seconds", "8", "--rate", "100",
         "--concurrency", "10", "--records"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stderr is not None
    proc.stderr.readline()  # "started"
    start = time.monotonic()
    time.sleep(2.0)
    cluster.agents[1].kill()
    server2.proc.kill()
    killed_at = time.monotonic() - start
    out, _ = proc.communicate(timeout=60)
    r = json.loads(out)
    records = r["records"]
    bad_after = [
        t for t, ok, payload, *_ in records if t >= killed_at - 0.1 and (not ok or payload != "node3")
    ]
    total = r["ok"] + r["failed"]
    return {
        "failover_requests": total,
        "failover_failed": r["failed"],
        "failover_success_ratio": round(r["ok"] / total, 5) if total else None,
        "failover_moved_s": round(max(0.0, max(bad_after, default=killed_at) - killed_at), 3),
    }


def _healthy(cluster: LoopbackCluster, n: int) -> bool:
    rows = cluster.agents[0].call("coap")["instances"]
    return sum(r["state"] == "healthy" for r in rows) == n


def run(args: argparse.Namespace) -> dict[str, Any]:
    if not 1 <= args.concurrency <= 200 or not 1 <= args.requests <= 10**6:
        raise UsageError("coap: --concurrency 1..200, --requests 1..1000000")
    if not 1 <= args.repeat <= 20:
        raise UsageError("coap: --repeat 1..20")
    procs: list[subprocess.Popen[str]] = []
    server2: _Server | None = None
    with LoopbackCluster(3, coap=True, coap_port=None, debug_commands=True) as cluster:
        try:
            cluster.wait_converged(60)
            hosts = [a.host for a in cluster.agents]
            port = free_port(hosts)
            server2 = _Server(
                [sys.executable, "-m", "testbed.coap_server", hosts[1], str(port), "node2"]
            )
            server3 = _spawn(
                [sys.executable, "-m", "testbed.coap_server", hosts[2], str(port), "node3"]
            )
            proxy = _spawn([sys.executable, "-c", PROXY_SOURCE, hosts[0], str(port)])
            procs += [server3, proxy]
            cluster.agents[1].call(
                "debug-coap-publish",
                instances=[{"name": "temperature", "uri": f"coap://{hosts[1]}:{port}"}],
            )
            cluster.wait_for(lambda: _healthy(cluster, 1), 30, "node1 sees node2's instance")
            ingress = f"{hosts[0]}:{cluster.coap_port}"
            result = _throughput(
                args, f"{hosts[1]}:{port}", f"{hosts[0]}:{port}", ingress, cluster, proxy.pid,
                server2,
            )  # fmt: skip
            result |= _soak(args, ingress, cluster)
            cluster.agents[2].call(
                "debug-coap-publish",
                instances=[{"name": "temperature", "uri": f"coap://{hosts[2]}:{port}"}],
            )
            cluster.wait_for(lambda: _healthy(cluster, 2), 30, "node1 sees both instances")
            result |= _failover(ingress, cluster, server2)
            result |= {
                "concurrency": args.concurrency,
                "requests": args.requests,
                "repeat": args.repeat,
            }
            return result
        finally:
            for proc in procs + ([server2.proc] if server2 else []):
                stop_process(proc)
