"""Footprint: RSS and CPU of ONE real agent process in a cluster of ``--members`` members.

How it works. The measured process is a real ``python -m edgeagent run --no-mdns`` on
127.77.0.1. The other members are lightweight but real: one helper process (this module run as
``python -m testbed.bench.footprint --peers ...``) holds ``members - 1`` ``gossip.core.Membership``
instances, each with its own UDP and TCP socket on 127.77.1.N, all driven by one asyncio loop
with the agent's wire formats (sealed datagrams; push-pull streams through the driver's own
:mod:`edgeagent.streams`).
Every peer and the agent join peer 1, so the cluster forms by push-pull and gossip alone.

Once the agent sees every member alive, the benchmark waits ``--warmup`` seconds and then
samples the agent over ``--seconds``: CPU is the utime + stime delta from ``/proc/PID/stat``
divided by the wall time (percent of one core); RSS is ``VmRSS`` from ``/proc/PID/status``,
read every second (``rss_mb`` is the largest sample, ``rss_mb_mean`` the mean).

Targets (issue 3): RSS <= 38 MB, CPU <= 1 % of one core at 100 members.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from edgeagent import streams
from edgeagent.onboarding import ClusterCA, new_ca, provision_member
from testbed.bench import UsageError
from testbed.bench.procs import cpu_seconds, stop_process

AGENT_IP = "127.77.0.1"
PEER_NET = "127.77.1."  # peer N (1-based) listens on 127.77.1.N; up to 254 peers
PORT = 7946  # every member has its own address, so all share edgeagent's default port
CLUSTER = "bench-footprint"
CONVERGE_TIMEOUT = 180.0  # seconds for the agent to see every member alive
READY_TIMEOUT = 60.0  # the peer process binds every socket within this
STREAM_TIMEOUT = 10.0  # push-pull connect / frame deadline, as edgeagent.driver.STREAM_TIMEOUT

log = logging.getLogger("footprint")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--members", type=int, default=100, help="cluster size, agent included (default 100)")
    parser.add_argument("--seconds", type=float, default=60.0, help="measurement window (default 60)")
    parser.add_argument("--warmup", type=float, default=15.0, help="seconds after convergence before measuring")
    parser.add_argument("--preset", choices=("lan", "wan", "local"), default="lan", help="gossip preset (default lan)")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Start the peers and the agent, measure the agent, stop everything."""
    if not 2 <= args.members <= 255:
        raise UsageError("footprint: --members must be 2..255")
    ca = new_ca(CLUSTER)  # the measured agent is a provisioned member; peers share its key
    key = ca.keys[0]
    workdir = Path(tempfile.mkdtemp(prefix="edgeagent-footprint-"))
    peers: subprocess.Popen[str] | None = None
    agent: subprocess.Popen[bytes] | None = None
    try:
        peers = _start_peers(args.members - 1, key, args.preset)
        agent = _start_agent(workdir, ca, args.preset)
        converged_after = _wait_converged(workdir / "state", args.members, agent)
        time.sleep(args.warmup)
        sample = _measure(agent.pid, args.seconds, peers.pid)
        alive = _alive_count(workdir / "state")
        return {
            "members": args.members,
            "members_alive_seen": alive,
            "preset": args.preset,
            "seconds": args.seconds,
            "converged_s": round(converged_after, 1),
            **sample,
        }
    finally:
        if agent is not None:
            stop_process(agent)
        if peers is not None:
            stop_process(peers)
        shutil.rmtree(workdir, ignore_errors=True)


# -- the measured agent ---------------------------------------------------------------------


def _start_agent(workdir: Path, ca: ClusterCA, preset: str) -> subprocess.Popen[bytes]:
    state = workdir / "state"
    provision_member(ca, state, "agent")
    argv = [
        sys.executable, "-m", "edgeagent", "run",
        "--name", "agent",
        "--bind", f"{AGENT_IP}:{PORT}",
        "--join", f"{PEER_NET}1:{PORT}",
        "--no-mdns",
        "--cluster", CLUSTER,
        "--preset", preset,
        "--state-dir", str(state),
    ]
    log_file = open(workdir / "agent.log", "wb")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT)
    log_file.close()
    return proc


def _members(state_dir: Path) -> list[dict[str, Any]]:
    from edgeagent.control import ControlClient, socket_path
    from edgeagent.errors import AgentUnavailable

    try:
        return list(ControlClient(socket_path(state_dir), timeout=5.0).call("members"))
    except AgentUnavailable:
        return []


def _alive_count(state_dir: Path) -> int:
    return sum(1 for m in _members(state_dir) if m["state"] == "alive")


def _wait_converged(state_dir: Path, members: int, agent: subprocess.Popen[bytes]) -> float:
    start = time.monotonic()
    while time.monotonic() - start < CONVERGE_TIMEOUT:
        if agent.poll() is not None:
            log_text = (state_dir.parent / "agent.log").read_text(errors="replace")
            raise SystemExit(f"footprint: the agent exited ({agent.returncode}):\n{log_text[-2000:]}")
        if _alive_count(state_dir) >= members:
            return time.monotonic() - start
        time.sleep(1.0)
    raise SystemExit(f"footprint: the agent did not see {members} members alive within {CONVERGE_TIMEOUT:g} s")


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"no VmRSS for {pid}")


def _measure(pid: int, seconds: float, peers_pid: int) -> dict[str, float]:
    rss: list[float] = []
    cpu0, peers0, t0 = cpu_seconds(pid), cpu_seconds(peers_pid), time.monotonic()
    while time.monotonic() - t0 < seconds:
        rss.append(_rss_mb(pid))
        time.sleep(min(1.0, max(0.0, seconds - (time.monotonic() - t0))))
    cpu1, peers1, t1 = cpu_seconds(pid), cpu_seconds(peers_pid), time.monotonic()
    rss.append(_rss_mb(pid))
    wall = t1 - t0
    return {
        "rss_mb": round(max(rss), 1),
        "rss_mb_mean": round(sum(rss) / len(rss), 1),
        "cpu_percent": round(100 * (cpu1 - cpu0) / wall, 2),
        "peers_process_cpu_percent": round(100 * (peers1 - peers0) / wall, 1),
    }


# -- the lightweight peers ------------------------------------------------------------------


def _start_peers(count: int, key: bytes, preset: str) -> subprocess.Popen[str]:
    argv = [sys.executable, "-m", "testbed.bench.footprint", "--peers", str(count),
            "--key", key.hex(), "--preset", preset]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    deadline = time.monotonic() + READY_TIMEOUT
    line = proc.stdout.readline()
    if line.strip() != "ready" or time.monotonic() > deadline:
        stop_process(proc)
        raise SystemExit(f"footprint: the peer process failed to start ({line.strip() or proc.returncode})")
    return proc


class _Peer:
    """One membership core on its own UDP and TCP sockets, on the shared loop."""

    def __init__(self, core: Any, udp: Any, loop: asyncio.AbstractEventLoop, auth: streams.StreamAuth) -> None:
        self.core = core
        self.udp = udp
        self.loop = loop
        self.auth = auth
        self.settings = streams.StreamSettings(core.config.max_stream_bytes, STREAM_TIMEOUT)
        self.timer: asyncio.TimerHandle | None = None
        self.deadline: float | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    def guard(self, fn: Any) -> Any:
        from gossip.errors import RemoteError

        try:
            return fn()
        except RemoteError:
            return None
        except Exception:
            log.exception("peer %s: core failed", self.core.name)
            return None

    def on_readable(self) -> None:
        limit = self.core.config.max_datagram_bytes
        for _ in range(256):
            try:
                data, src = self.udp.recvfrom(limit + 1)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                continue
            if len(data) <= limit:
                now = self.loop.time()
                self.guard(lambda d=data, s=src[:2], n=now: self.core.receive(d, s, n))
        self.after_input()

    def on_timer(self) -> None:
        self.timer = self.deadline = None
        now = self.loop.time()
        self.guard(lambda: self.core.handle_timeout(now))
        self.after_input()

    def after_input(self) -> None:
        core = self.core
        for dst, data in core.datagrams_to_send():
            try:
                self.udp.sendto(data, dst)
            except OSError:
                pass
        for dst, data in core.streams_to_send():
            task = self.loop.create_task(self.push_pull(dst, data))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        while core.next_event() is not None:
            pass
        deadline = core.get_timer()
        if deadline != self.deadline or self.timer is None:
            if self.timer is not None:
                self.timer.cancel()
                self.timer = None
            self.deadline = deadline
            if deadline is not None:
                self.timer = self.loop.call_at(deadline, self.on_timer)

    async def serve_stream(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await streams.serve_stream(reader, writer, self.answer, self.auth, self.settings)

    def answer(self, frame: bytes, src: tuple[str, int]) -> bytes | None:
        reply: bytes | None = self.guard(lambda: self.core.handle_stream(frame, src, self.loop.time()))
        self.after_input()
        return reply

    async def push_pull(self, dst: tuple[str, int], data: bytes) -> None:
        local = (self.core.addr[0], 0)
        reply = await streams.exchange(dst, data, local, self.auth, self.settings)
        if reply is None:
            self.guard(lambda: self.core.stream_failed(dst, self.loop.time()))
        else:
            self.guard(lambda: self.core.receive_stream_reply(reply, dst, self.loop.time()))
        self.after_input()


async def _run_peers(count: int, key: bytes, preset: str) -> None:
    import socket

    from gossip.config import preset as gossip_preset
    from gossip.core import Membership
    from gossip.keyring import Keyring

    loop = asyncio.get_running_loop()
    config = gossip_preset(preset, cluster_name=CLUSTER)
    rng = random.Random()
    peers = []
    for n in range(1, count + 1):
        addr = (f"{PEER_NET}{n}", PORT)
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.setblocking(False)
        udp.bind(addr)
        keyring = Keyring([key])
        core = Membership(f"peer-{n}", addr, config, random.Random(rng.getrandbits(64)), loop.time(),
                          keyring=keyring)
        peer = _Peer(core, udp, loop, streams.StreamAuth(keyring, CLUSTER))
        await asyncio.start_server(peer.serve_stream, addr[0], PORT, reuse_address=True)
        loop.add_reader(udp.fileno(), peer.on_readable)
        peers.append(peer)
    seed = (f"{PEER_NET}1", PORT)
    for peer in peers[1:]:
        peer.core.join([seed], loop.time())
    for peer in peers:
        peer.after_input()
    print("ready", flush=True)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    await stop.wait()


def _peer_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m testbed.bench.footprint")
    parser.add_argument("--peers", type=int, required=True)
    parser.add_argument("--key", required=True, help="the cluster key, hex")
    parser.add_argument("--preset", default="lan")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="peers %(levelname)s %(message)s")
    asyncio.run(_run_peers(args.peers, bytes.fromhex(args.key), args.preset))
    return 0


if __name__ == "__main__":
    sys.exit(_peer_main(sys.argv[1:]))
