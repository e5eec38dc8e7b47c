"""Traffic: bytes on the wire, CPU and RSS of N real agents started at once on loopback.

How it works. ``--nodes`` real ``python -m edgeagent run`` processes (:mod:`testbed.loopback`:
each its own process and ``127.A.B.N`` address, one shared cluster key, the first three as
seeds, no mDNS) are all started before any is waited for, as after a site-wide power cut.
The clock starts when the first process is spawned; ``converged_s`` is when every agent sees
every agent alive (each agent's view is polled over its control socket until it has once seen
all alive). From that moment the benchmark takes two windows:

- startup: the first ``--startup-window`` seconds (default 20) after convergence;
- settled: ``--window`` seconds (default 60) starting ``--settle`` seconds (default 60) after
  convergence.

``startup_bytes_per_node_s`` / ``settled_bytes_per_node_s`` are the bytes of every packet the
agents send in the window, IP/UDP/TCP headers included, divided by nodes and seconds (on
loopback each packet is sent once and received once; it is counted once).
``settled_cpu_percent`` is the median over agents of the utime + stime delta from
``/proc/PID/stat`` over the settled window, in percent of one core (``settled_cpu_max_percent``
the largest); ``rss_mb`` is the median and max ``VmRSS`` at the end of the settled window.

Counting (``method`` in the result):

- ``nftables`` (root): the agents run inside a fresh network namespace (its own ``lo``, up, and
  nothing else), and an nftables table in that namespace's output hook counts packets and bytes
  of every packet (IP length: headers included, no link-layer header) by protocol, TCP to and
  from the gossip port, and TCP connection attempts (one per push-pull). A wiretap process in
  the namespace (this module run with ``--tap``) reads every outgoing packet on ``lo`` from an
  ``AF_PACKET`` socket, opens the sealed datagrams and push-pull frames with the cluster key and
  attributes each packet's bytes to message kinds (``bytes_by_kind``, ``timeline``); its total
  is checked against the nftables counters (``tap_coverage``).
- ``metrics`` (not root, or ``--no-netns``): the agents' own Prometheus counters
  (``edgeagent_sent_bytes_total`` / ``edgeagent_packets_sent_total`` by transport), which count
  sealed payloads only, plus a stated header estimate: 28 bytes per datagram (IPv4 20 + UDP 8)
  and :data:`TCP_STREAM_OVERHEAD` per push-pull (handshake, ACKs, teardown, length prefixes).

Kinds the tap separates (per message, by the message's own encoded size; the rest of a datagram
is ``udp:overhead``: IP/UDP headers, sealing, the datagram's array header): ``udp:probe:<type>``
(Ping, Ack, Nack, PingReq), ``udp:piggyback:<type>`` (membership and state messages riding in
a datagram that carries a probe message), ``udp:gossip:<type>`` (in a datagram without one:
the gossip round), where ``<type>`` is ``alive``, ``suspect``, ``dead``, ``user`` or
``state:<key>`` (``state:ipam`` address claims, ``state:keys`` key fingerprints);
``tcp:push_pull:join`` / ``request`` / ``reply`` (whole sealed bodies with their stream
headers), ``tcp:stream_header`` (the server's challenges) and ``tcp:headers`` (every TCP/IP header, handshake and ACK). What the wire cannot say is *why* a
message was sent (a re-broadcast after a push-pull merge looks like any other Alive):
``redundancy`` gives, per broadcast type, how many times each distinct update was sent, and
for replicated state how many distinct (owner, value) pairs those versions carried.

Baselines (issue 13, LAN preset, same loopback harness): startup 3,519 B/node/s at N=20 and
6,033 at N=50 (memberlist 296 and 329); settled 406 B/node/s and 0.29 % CPU at N=20
(memberlist 249 and 0.15 %). Targets: startup <= 2x settled, settled <= 300 B/node/s at N=20
and <= 350 at N=50, settled CPU <= 0.2 %.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

from testbed.bench import UsageError
from testbed.bench.procs import cpu_seconds, stop_process

CLUSTER = "bench-traffic"
STREAM_CHALLENGE_BYTES = 16  # edgeagent.streams.CHALLENGE_SIZE (imported lazily by the tap)
STREAM_HEADER_BYTES = 82  # edgeagent.streams.HEADER_SIZE
NFT_TABLE = "ea_traffic"
NFT_PREFIX = "n_"  # "udp" and "tcp" are nft keywords, not counter names
POLL = 0.5  # seconds between convergence polls (each poll is one control call per agent)
TAP_READY_TIMEOUT = 20.0
UDP_HEADER_BYTES = 20 + 8  # IPv4 without options + UDP (RFC 791, RFC 768)
# Measured in a namespace (tcp_header_bytes_per_push_pull, N=5 and N=20): ten segments per
# push-pull, SYN and SYN-ACK of 60 bytes (20 IP + 40 TCP with options) and eight of 52 (20 IP +
# 20 TCP + 12 timestamps): connect, request, reply, their ACKs, FIN both ways; plus what the
# agents' byte counters leave out (edgeagent.streams): the challenge (16 bytes, in one more
# segment, not re-measured since the header was added) and the two 66-byte sealed headers.
TCP_STREAM_OVERHEAD = 2 * 60 + 9 * 52 + STREAM_CHALLENGE_BYTES + 2 * STREAM_HEADER_BYTES
METRIC_BYTES = "edgeagent_sent_bytes_total{{transport=\"{}\"}}"
METRIC_PACKETS = "edgeagent_packets_sent_total{{transport=\"{}\"}}"
# AF_PACKET (packet(7)): sll_pkttype of a packet this host sends; lo shows each packet twice.
PACKET_OUTGOING = 4
ETH_P_ALL = 0x0003
ETH_HEADER_BYTES = 14  # lo has an Ethernet-style header (zeros)
SO_RCVBUFFORCE = 33  # socket(7): root may exceed rmem_max
TAP_BUFFER_BYTES = 32 * 1024 * 1024
TAP_TICKS_PER_S = 10  # the tap's buckets are 0.1 s, so windows start within 0.1 s of their mark
TCP_FIN, TCP_SYN, TCP_RST = 0x01, 0x02, 0x04  # RFC 9293 3.1 control bits


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nodes", type=int, default=20, help="agents, one process each (default 20)")
    parser.add_argument("--preset", choices=("lan", "wan", "local"), default="lan", help="gossip preset (default lan)")
    parser.add_argument("--startup-window", type=float, default=20.0,
                        help="seconds measured right after convergence (default 20)")
    parser.add_argument("--settle", type=float, default=60.0,
                        help="seconds from convergence to the settled window (default 60)")
    parser.add_argument("--window", type=float, default=60.0, help="settled window, seconds (default 60)")
    parser.add_argument("--timeline", type=float, default=60.0,
                        help="seconds of per-second traffic reported from the start (default 60)")
    parser.add_argument("--converge-timeout", type=float, default=180.0,
                        help="seconds for every agent to see every agent alive (default 180)")
    parser.add_argument("--no-netns", action="store_true",
                        help="count with the agents' metrics even when root")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Start the agents at once, measure both windows, stop everything (also on error)."""
    from testbed.netns import is_root

    if not 2 <= args.nodes <= 250:
        raise UsageError("traffic: --nodes must be 2..250")
    for name in ("startup_window", "settle", "window"):
        if getattr(args, name) <= 0:
            raise UsageError(f"traffic: --{name.replace('_', '-')} must be positive")
    method = "nftables" if is_root() and not args.no_netns else "metrics"
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        with _counting(method) as counter:
            return _measure(args, method, counter)
    except KeyboardInterrupt:
        raise SystemExit("traffic: interrupted (agents stopped, namespace removed)") from None
    finally:
        signal.signal(signal.SIGTERM, previous)


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # unwind through every cleanup block, as Ctrl-C does


# -- the run ----------------------------------------------------------------------------------


def _measure(args: argparse.Namespace, method: str, counter: Counter) -> dict[str, Any]:
    from testbed.loopback import LoopbackCluster

    cluster = LoopbackCluster(
        args.nodes, preset=args.preset, cluster=CLUSTER, metrics=method == "metrics",
        wrapper=counter.wrapper,
    )
    try:
        counter.attach(cluster)
        before = counter.read()
        start_wall = time.time()
        start = time.monotonic()
        marks = {"start": (start, before, start_wall)}
        cluster.start()
        converged = _wait_converged(cluster, args.converge_timeout) - start
        _take(marks, "startup_begin", counter)
        boundaries = sorted([
            ("startup_end", converged + args.startup_window),
            ("settled_begin", converged + args.settle),
            ("settled_end", converged + args.settle + args.window),
        ], key=lambda b: b[1])
        cpu: dict[str, list[float]] = {}
        for name, at in boundaries:
            _sleep_until(start + at, cluster)
            if name == "settled_begin":
                cpu["begin"] = _cpu_seconds(cluster)
            _take(marks, name, counter)
            if name == "settled_end":
                cpu["end"] = _cpu_seconds(cluster)
        rss = [r / 1024 for a in cluster.agents if (r := a.rss_kb()) is not None]
        alive_views = sum(1 for a in cluster.running() if _sees_all(a, cluster))
        kinds = counter.finish()
    finally:
        cluster.stop()
    return _result(args, method, converged, marks, cpu, rss, alive_views, kinds, start_wall)


def _take(marks: dict[str, Any], name: str, counter: Counter) -> None:
    """Record (monotonic time, counters, wall time) at a window boundary."""
    marks[name] = (time.monotonic(), counter.read(), time.time())


def _sleep_until(deadline: float, cluster: Any) -> None:
    while (left := deadline - time.monotonic()) > 0:
        if len(cluster.running()) < len(cluster.agents):
            dead = [a.name for a in cluster.agents if not a.running]
            raise SystemExit(f"traffic: agents exited during the run: {dead}")
        time.sleep(min(left, 1.0))


def _sees_all(agent: Any, cluster: Any) -> bool:
    from edgeagent.errors import AgentUnavailable

    try:
        states = agent.states()
    except AgentUnavailable:
        return False
    return all(states.get(a.name) == "alive" for a in cluster.agents)


def _wait_converged(cluster: Any, timeout: float) -> float:
    """Monotonic time at which the last agent had seen every agent alive."""
    pending = list(cluster.agents)
    deadline = time.monotonic() + timeout
    while pending:
        if time.monotonic() > deadline:
            names = [a.name for a in pending]
            raise SystemExit(f"traffic: not converged within {timeout:g} s; still waiting on {names}")
        for agent in list(pending):
            if not agent.running:
                raise SystemExit(f"traffic: {agent.name} exited:\n{agent.log_tail()}")
            if _sees_all(agent, cluster):
                pending.remove(agent)
        if pending:
            time.sleep(POLL)
    return time.monotonic()


def _cpu_seconds(cluster: Any) -> list[float]:
    return [cpu_seconds(agent.pid) for agent in cluster.agents]


# -- the result -------------------------------------------------------------------------------


def _rate(marks: dict[str, Any], begin: str, end: str, nodes: int) -> dict[str, float]:
    (t0, c0, _), (t1, c1, _) = marks[begin], marks[end]
    seconds = max(t1 - t0, 1e-9)
    return {k: round((c1.get(k, 0) - c0.get(k, 0)) / nodes / seconds, 1) for k in sorted(c1)}


def _result(
    args: argparse.Namespace, method: str, converged: float, marks: dict[str, Any],
    cpu: dict[str, list[float]], rss: list[float], alive_views: int,
    tap: dict[str, Any] | None, start_wall: float,
) -> dict[str, Any]:
    n = args.nodes
    wall = marks["settled_end"][0] - marks["settled_begin"][0]
    cpu_pct = sorted(100 * (e - b) / wall for b, e in zip(cpu["begin"], cpu["end"], strict=True))
    windows = {
        "converge": _rate(marks, "start", "startup_begin", n),
        "startup": _rate(marks, "startup_begin", "startup_end", n),
        "settled": _rate(marks, "settled_begin", "settled_end", n),
    }
    result: dict[str, Any] = {
        "nodes": n,
        "method": method,
        "config": {
            "preset": args.preset, "startup_window_s": args.startup_window, "settle_s": args.settle,
            "window_s": args.window, "seeds": 3, "mdns": False, "cluster_key": "one shared",
        },
        "converged_s": round(converged, 2),
        "alive_views_at_end": alive_views,
        "startup_bytes_per_node_s": windows["startup"]["bytes"],
        "settled_bytes_per_node_s": windows["settled"]["bytes"],
        "converge_bytes_per_node_s": windows["converge"]["bytes"],
        "startup_to_settled_ratio": round(windows["startup"]["bytes"] / max(windows["settled"]["bytes"], 1e-9), 2),
        "settled_cpu_percent": round(statistics.median(cpu_pct), 3),
        "settled_cpu_max_percent": round(cpu_pct[-1], 3),
        "rss_mb": {"median": round(statistics.median(rss), 1), "max": round(max(rss), 1)},
        "wire": windows,
    }
    if method == "metrics":
        result["header_estimate"] = {"udp_bytes_per_datagram": UDP_HEADER_BYTES,
                                     "tcp_bytes_per_push_pull": TCP_STREAM_OVERHEAD}
        result["bytes_by_kind"] = {w: {k: v for k, v in r.items() if k in ("udp", "tcp")} for w, r in windows.items()}
    if tap is not None:
        result.update(_tap_result(tap, marks, n, args.timeline, start_wall))
    return result


def _tap_result(tap: dict[str, Any], marks: dict[str, Any], n: int, timeline: float,
                start_wall: float) -> dict[str, Any]:
    buckets = {int(s): kinds for s, kinds in tap["buckets"].items()}

    def window(begin: str, end: str) -> dict[str, float]:
        first, last = _tick(marks[begin][2]), _tick(marks[end][2])
        total: dict[str, float] = defaultdict(float)
        for tick in range(first, last):
            for kind, (_, nbytes) in buckets.get(tick, {}).items():
                total[kind] += nbytes
        seconds = max(last - first, 1) / TAP_TICKS_PER_S
        return {k: round(v / n / seconds, 1) for k, v in sorted(total.items(), key=lambda kv: -kv[1])}

    by_kind = {
        "converge": window("start", "startup_begin"),
        "startup": window("startup_begin", "startup_end"),
        "settled": window("settled_begin", "settled_end"),
    }
    tapped = sum(b for kinds in buckets.values() for _, b in kinds.values())
    first = _tick(start_wall)
    columns: dict[str, list[float]] = {c: [] for c in _TIMELINE}
    for sec in range(int(timeline)):
        ticks = range(first + sec * TAP_TICKS_PER_S, first + (sec + 1) * TAP_TICKS_PER_S)
        cells = [cell for t in ticks for cell in buckets.get(t, {}).items()]
        for column, (pick, field) in _TIMELINE.items():
            columns[column].append(sum(v[field] for k, v in cells if pick(k)))
    return {
        "bytes_by_kind": by_kind,
        "redundancy": tap["redundancy"],
        "push_pull": tap["push_pull"],
        "tap_coverage": round(tapped / max(tap["nft_bytes"], 1), 4),
        "tap_dropped_packets": tap["dropped"],
        "timeline": {"resolution_s": 1, "from": "start", **columns},
        "tcp_header_bytes_per_push_pull": round(
            sum(b for kinds in buckets.values() for k, (_, b) in kinds.items() if k == "tcp:headers")
            / max(tap["push_pull"].get("join_frames", 0) + tap["push_pull"].get("request_frames", 0), 1)),
    }


def _tick(wall: float) -> int:
    return int(wall * TAP_TICKS_PER_S)


def _is_udp(kind: str) -> bool:
    return kind.startswith("udp:")


def _is_tcp(kind: str) -> bool:
    return kind.startswith("tcp:")


# Column -> (which kinds, field 0 = messages/packets, 1 = bytes), summed per second.
_TIMELINE = {
    "udp_bytes": (_is_udp, 1),
    "udp_datagrams": (lambda k: k == "udp:overhead", 0),
    "tcp_bytes": (_is_tcp, 1),
    "push_pulls": (lambda k: k in ("tcp:push_pull:join", "tcp:push_pull:request"), 0),
    "state_udp_bytes": (lambda k: ":state:" in k and _is_udp(k), 1),
    "alive_udp_bytes": (lambda k: k.endswith(":alive") and _is_udp(k), 1),
}


# -- counting: nftables in a namespace, or the agents' metrics ----------------------------------


class Counter:
    """Reads cumulative byte and packet counters; ``wrapper`` runs an agent where they count."""

    wrapper: list[str] = []

    def attach(self, cluster: Any) -> None:
        self.cluster = cluster

    def read(self) -> dict[str, float]:
        raise NotImplementedError

    def finish(self) -> dict[str, Any] | None:
        return None


class _Nftables(Counter):
    """A fresh namespace with ``lo`` up, an nftables table counting its output, and the tap."""

    def __init__(self, ns: str, workdir: Path) -> None:
        self.ns = ns
        self.workdir = workdir
        self.wrapper = ["ip", "netns", "exec", ns]
        self.tap: subprocess.Popen[str] | None = None
        self.tap_out = workdir / "tap.json"

    def attach(self, cluster: Any) -> None:
        super().attach(cluster)
        port = cluster.port
        _nft(self.ns, _ruleset(port))
        argv = [*self.wrapper, sys.executable, "-m", "testbed.bench.traffic", "--tap",
                "--port", str(port), "--key", cluster.key.hex(), "--cluster", CLUSTER,
                "--out", str(self.tap_out)]
        self.tap = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
        assert self.tap.stdout is not None
        ready, _, _ = select.select([self.tap.stdout], [], [], TAP_READY_TIMEOUT)
        line = self.tap.stdout.readline() if ready else ""
        if line.strip() != "ready":
            raise SystemExit(f"traffic: the wiretap did not start ({line.strip() or self.tap.poll()})")

    def read(self) -> dict[str, float]:
        out = json.loads(_run(["ip", "netns", "exec", self.ns, "nft", "-j", "list", "counters",
                               "table", "inet", NFT_TABLE]))
        counts: dict[str, float] = {}
        for item in out["nftables"]:
            c = item.get("counter")
            if c is not None:
                name = c["name"].removeprefix(NFT_PREFIX)
                counts[name] = c["bytes"]
                counts[name + "_packets"] = c["packets"]
        counts["bytes"] = counts["udp"] + counts["tcp"] + counts["other"]
        return counts

    def finish(self) -> dict[str, Any] | None:
        if self.tap is None:
            return None
        stop_process(self.tap)
        self.tap = None
        tap = dict(json.loads(self.tap_out.read_text()))
        tap["nft_bytes"] = self.read()["bytes"]  # everything the tap saw, to check it saw all
        return tap

    def close(self) -> None:
        if self.tap is not None:
            stop_process(self.tap)
        for pid in _run(["ip", "netns", "pids", self.ns], check=False).split():
            os.kill(int(pid), signal.SIGKILL)  # only our agents and tap live in this namespace
        _run(["ip", "netns", "del", self.ns], check=False)


class _Metrics(Counter):
    """The agents' own counters (sealed payload bytes) plus the header estimate."""

    def read(self) -> dict[str, float]:
        totals = {"udp": 0.0, "tcp": 0.0, "udp_packets": 0.0, "tcp_packets": 0.0}
        for agent in self.cluster.agents:
            if not agent.running:
                continue  # not started yet: it has sent nothing
            samples = agent.scrape_metrics()
            for transport in ("udp", "tcp"):
                totals[transport] += samples.get(METRIC_BYTES.format(transport), 0.0)
                totals[transport + "_packets"] += samples.get(METRIC_PACKETS.format(transport), 0.0)
        totals["udp"] += UDP_HEADER_BYTES * totals["udp_packets"]
        totals["tcp"] += TCP_STREAM_OVERHEAD * totals["tcp_packets"]  # tcp packets = streams opened
        totals["bytes"] = totals["udp"] + totals["tcp"]
        return totals


@contextmanager
def _counting(method: str) -> Iterator[Counter]:
    if method == "metrics":
        yield _Metrics()
        return
    ns = f"ea-traffic-{os.getpid()}"
    workdir = Path(tempfile.mkdtemp(prefix="ea-traffic-"))
    counter = _Nftables(ns, workdir)
    try:
        _run(["ip", "netns", "add", ns])
        _run(["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"])
        yield counter
    finally:
        counter.close()
        for path in workdir.iterdir():
            path.unlink()
        workdir.rmdir()


def _ruleset(port: int) -> str:
    counters = ("udp", "tcp", "other", "tcp_to_port", "tcp_from_port", "tcp_connects")
    return "\n".join([
        f"table inet {NFT_TABLE} {{",
        *(f"  counter {NFT_PREFIX}{c} {{ }}" for c in counters),
        "  chain out {",
        "    type filter hook output priority 0; policy accept;",
        f"    meta l4proto udp counter name {NFT_PREFIX}udp",
        f"    meta l4proto tcp counter name {NFT_PREFIX}tcp",
        f"    meta l4proto != {{ udp, tcp }} counter name {NFT_PREFIX}other",
        f"    tcp dport {port} counter name {NFT_PREFIX}tcp_to_port",
        f"    tcp sport {port} counter name {NFT_PREFIX}tcp_from_port",
        f"    tcp dport {port} tcp flags & (syn | ack) == syn counter name {NFT_PREFIX}tcp_connects",
        "  }",
        "}",
        "",
    ])


def _nft(ns: str, ruleset: str) -> None:
    _run(["ip", "netns", "exec", ns, "nft", "-f", "-"], stdin=ruleset)


def _run(argv: list[str], *, stdin: str | None = None, check: bool = True) -> str:
    proc = subprocess.run(argv, input=stdin, capture_output=True, text=True, check=False, timeout=30)
    if check and proc.returncode != 0:
        raise SystemExit(f"traffic: {' '.join(argv)}: {proc.stderr.strip() or proc.returncode}")
    return proc.stdout


# -- the wiretap (runs inside the namespace) ----------------------------------------------------


class _Tap:
    """Attributes every outgoing packet on ``lo`` to message kinds, per wall-clock tick."""

    def __init__(self, port: int, key: bytes, cluster: str) -> None:
        from edgeagent.streams import StreamAuth
        from gossip.keyring import Keyring

        self.port = port
        self.keyring = Keyring([key])
        self.aad = cluster.encode()
        # tick -> kind -> [messages or packets, bytes]
        self.buckets: dict[int, dict[str, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
        self.flows: dict[tuple[bytes, int, bytes, int], bytearray] = {}
        self.challenges: set[tuple[bytes, int, bytes, int]] = set()  # flows before their challenge
        self.auth = StreamAuth(self.keyring, cluster)
        self.sent: dict[str, dict[Any, int]] = defaultdict(lambda: defaultdict(int))
        self.values: dict[str, set[tuple[str, str]]] = defaultdict(set)  # state kind -> (owner, value)
        self.push_pull: dict[str, int] = defaultdict(int)
        self.undecodable = 0

    def add(self, sec: int, kind: str, count: int, nbytes: int) -> None:
        cell = self.buckets[sec][kind]
        cell[0] += count
        cell[1] += nbytes

    def packet(self, frame: bytes, sec: int) -> None:
        ip = frame[ETH_HEADER_BYTES:]
        if len(ip) < 20 or ip[0] >> 4 != 4:
            self.add(sec, "other", 1, len(ip))
            return
        ihl = (ip[0] & 0x0F) * 4
        total = struct.unpack_from(">H", ip, 2)[0]
        proto = ip[9]
        body = ip[ihl:total]
        if proto == socket.IPPROTO_UDP and len(body) >= 8:
            self.datagram(body[8:], total, sec)
        elif proto == socket.IPPROTO_TCP and len(body) >= 20:
            self.segment(ip[12:16], ip[16:20], body, total, sec)
        else:
            self.add(sec, "other", 1, total)

    def datagram(self, payload: bytes, total: int, sec: int) -> None:
        from gossip.codec import decode_datagram, encoded_size

        try:
            _, msgs = decode_datagram(self.keyring.decrypt(payload, self.aad))
        except Exception:  # noqa: BLE001 - anything we cannot open is just counted
            self.undecodable += 1
            self.add(sec, "udp:undecodable", 1, total)
            return
        kinds = [_kind(m) for m in msgs]
        # A broadcast rides a probe datagram (piggyback) or fills a gossip-round datagram.
        carrier = "piggyback" if any(k in _PROBE_KINDS for k in kinds) else "gossip"
        used = 0
        for msg, kind in zip(msgs, kinds, strict=True):
            size = encoded_size(msg)
            used += size
            if kind in _PROBE_KINDS:
                self.add(sec, f"udp:probe:{kind}", 1, size)
            else:
                self.add(sec, f"udp:{carrier}:{kind}", 1, size)
                self.sent[kind][_update_id(msg)] += 1
                if type(msg).__name__ == "StateUpdate":
                    self.values[kind].add((msg.owner, _value_text(msg.value)))
        self.add(sec, "udp:overhead", 1, total - used)

    def segment(self, src: bytes, dst: bytes, tcp: bytes, total: int, sec: int) -> None:
        sport, dport = struct.unpack_from(">HH", tcp, 0)
        offset = (tcp[12] >> 4) * 4
        flags = tcp[13]
        payload = tcp[offset:]
        self.add(sec, "tcp:headers", 1, total - len(payload))
        key = (src, sport, dst, dport)
        if flags & TCP_SYN:
            self.flows[key] = bytearray()
            if sport == self.port:  # the server's side opens with its challenge
                self.challenges.add(key)
        buf = self.flows.get(key)
        if buf is not None and payload:
            buf += payload
            if key in self.challenges and len(buf) >= STREAM_CHALLENGE_BYTES:
                self.challenges.discard(key)
                del buf[:STREAM_CHALLENGE_BYTES]
                self.add(sec, "tcp:stream_header", 0, STREAM_CHALLENGE_BYTES)
            if key not in self.challenges:
                self.frames(buf, dport == self.port, sec)
        if flags & (TCP_FIN | TCP_RST):
            self.challenges.discard(key)
            leftover = self.flows.pop(key, bytearray())
            if leftover:
                self.add(sec, "tcp:partial_frame", 0, len(leftover))

    def frames(self, buf: bytearray, request: bool, sec: int) -> None:
        from edgeagent.streams import HEADER_SIZE, HeaderError
        from gossip.codec import decode_frame

        while len(buf) >= HEADER_SIZE:
            try:
                length = self.auth.open(bytes(buf[:HEADER_SIZE])).length
            except HeaderError:
                self.add(sec, "tcp:undecodable", 1, len(buf))
                buf.clear()
                return
            if len(buf) < HEADER_SIZE + length:
                return
            sealed = bytes(buf[HEADER_SIZE:HEADER_SIZE + length])
            del buf[:HEADER_SIZE + length]
            try:
                pp = decode_frame(self.keyring.decrypt(sealed, self.aad), 1 << 30)
            except Exception:  # noqa: BLE001 - anything we cannot open is just counted
                self.add(sec, "tcp:undecodable", 1, HEADER_SIZE + length)
                continue
            kind = "reply" if pp.reply else "join" if pp.join else "request"
            self.add(sec, f"tcp:push_pull:{kind}", 1, HEADER_SIZE + length)
            self.push_pull[f"{kind}_frames"] += 1
            self.push_pull[f"{kind}_members"] += len(pp.members)
            self.push_pull[f"{kind}_state_entries"] += sum(len(entries) for _, entries in pp.states)
            self.push_pull[f"{kind}_state_bytes"] += _states_size(pp.states)
            self.push_pull[f"{kind}_member_bytes"] += _members_size(pp.members)
            if pp.summary is not None or pp.want is not None:  # a digest exchange (gossip/digest.py)
                self.push_pull[f"{kind}_digest_frames"] += 1
                if pp.want is not None:
                    self.push_pull[f"{kind}_want_frames"] += 1

    def dump(self, dropped: int) -> dict[str, Any]:
        redundancy: dict[str, dict[str, float]] = {
            kind: {"distinct": len(ids), "sent": sum(ids.values()),
                   "sends_per_update": round(sum(ids.values()) / max(len(ids), 1), 1)}
            for kind, ids in sorted(self.sent.items())
        }
        for kind, values in self.values.items():
            # Fewer values than versions: an owner re-published a value it had already sent.
            redundancy[kind]["distinct_values"] = len(values)
        return {
            "buckets": {str(s): dict(k) for s, k in sorted(self.buckets.items())},
            "redundancy": redundancy,
            "push_pull": dict(sorted(self.push_pull.items())),
            "dropped": dropped,
            "undecodable": self.undecodable,
        }


_PROBE_KINDS = frozenset({"ping", "ack", "nack", "ping_req"})


def _kind(msg: Any) -> str:
    name = type(msg).__name__
    if name == "StateUpdate":
        return f"state:{msg.key}"
    return {"PingReq": "ping_req", "UserBroadcast": "user"}.get(name, name.lower())


def _update_id(msg: Any) -> Any:
    """What makes two broadcasts the same update (so a second send is a re-send)."""
    name = type(msg).__name__
    if name == "StateUpdate":
        return (msg.owner, msg.key, msg.version)
    if name == "UserBroadcast":
        return (msg.origin, msg.seq)
    return (name, msg.name, msg.incarnation)


def _states_size(states: Any) -> int:
    """Encoded size of a push-pull's replicated maps (the codec's documented wire layout)."""
    import msgpack

    wire = [[owner, [[e.key, e.version, e.value, e.deleted] for e in entries]] for owner, entries in states]
    return len(msgpack.packb(wire, use_bin_type=True))


def _members_size(members: Any) -> int:
    """Encoded size of a push-pull's member records (the codec's documented wire layout)."""
    import msgpack

    wire = [[m.name, list(m.addr), m.incarnation, int(m.state), m.meta] for m in members]
    return len(msgpack.packb(wire, use_bin_type=True))


def _tap_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m testbed.bench.traffic")
    parser.add_argument("--tap", action="store_true", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--key", required=True, help="the cluster key, hex")
    parser.add_argument("--cluster", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    tap = _Tap(args.port, bytes.fromhex(args.key), args.cluster)
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, TAP_BUFFER_BYTES)
    sock.bind(("lo", 0))
    sock.settimeout(0.5)
    stopping = False

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print("ready", flush=True)
    while not stopping:
        try:
            frame, where = sock.recvfrom(1 << 17)
        except TimeoutError:
            continue
        except InterruptedError:
            continue
        if where[2] == PACKET_OUTGOING:
            tap.packet(frame, _tick(time.time()))
    # PACKET_STATISTICS (packet(7), SOL_PACKET 263, option 6): tp_packets, tp_drops since open.
    _, drops = struct.unpack("II", sock.getsockopt(263, 6, 8))
    Path(args.out).write_text(json.dumps(tap.dump(drops)))
    return 0


def _value_text(value: object) -> str:
    """A state value as text, to count distinct values (``_cert`` values are bytes)."""
    return json.dumps(value, sort_keys=True, default=lambda v: v.hex() if isinstance(v, bytes) else str(v))


if __name__ == "__main__":
    sys.exit(_tap_main(sys.argv[1:]))
