"""Hostile: what unauthenticated TCP streams, held connections and undecryptable datagrams cost
one live agent.

How it works. One real ``python -m edgeagent run --no-mdns`` process (:class:`LoopbackAgent`)
listens on ``127.A.B.1`` with its own state dir and cluster key; the attackers are sockets in
this process on ``127.A.B.10`` and up, the joiner an in-process ``gossip.core.Membership`` with
the cluster key on ``127.A.B.2``. Three phases, each bounded, then the agent is stopped by PID:

- ``rss_growth_mb``: ``--streams`` (24) connections at once, each a 4-byte length prefix and an
  8 MiB body of random bytes with no key (the old frame format, so the same bytes attack any
  version), from 4 source addresses. ``VmRSS`` is sampled every 50 ms until every sender is done;
  the growth is the peak minus the RSS before. Target <= 10 MB.
- ``joiner_delay_s``: ``--hold`` (64) idle connections from 16 source addresses are opened and
  re-opened as soon as the agent closes one, so every connection slot the agent has stays
  taken; then the joiner's push-pull join (the real sealed request from its core) is attempted
  every 0.1 s until a reply that its core accepts arrives. The delay is from the first attempt
  to that reply (``--deadline`` 30 s if it never comes). Target <= 2 s.
- ``undecryptable_pps_cpu_percent``: ``--pps`` (2,000) random 300-byte datagrams per second for
  ``--seconds`` (5), paced, from one socket; the agent's utime + stime delta from
  ``/proc/PID/stat`` over that wall time, in percent of one core (``idle_cpu_percent`` is the
  same window with no traffic, for comparison). Reported, no target.

``members_unchanged``: the agent's member list (name, address, state, incarnation) before the
attacks equals the list after, leaving out the joiner (whose join adds it, as it should).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import select
import shutil
import socket
import struct
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from edgeagent import streams
from edgeagent.agent_process import agent_env
from edgeagent.localmesh import free_port
from edgeagent.persist import save_keyring
from gossip.config import MAX_STREAM_BYTES, preset
from gossip.core import Membership
from gossip.keyring import Keyring
from testbed.bench.procs import cpu_seconds
from testbed.loopback import LoopbackAgent

CLUSTER = "bench-hostile"
BODY_BYTES = 8 * 1024 * 1024  # the 8 MiB body of one unauthenticated stream (issue 8)
STREAM_SOURCES = 4  # source addresses the 8 MiB streams come from
HOLD_SOURCES = 16  # source addresses the idle connections come from
SEND_TIMEOUT = 30.0  # one 8 MiB sender gives up after this
RSS_SAMPLE = 0.05  # seconds between VmRSS samples during the stream attack
SETTLE = 2.0  # seconds after start-up before the baseline RSS is taken
JOIN_RETRY = 0.1  # seconds between the joiner's attempts
JOIN_TIMEOUT = 10.0  # one push-pull attempt's deadline: the driver's STREAM_TIMEOUT
DATAGRAM_BYTES = 300
JOINER = "hostile-joiner"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--streams", type=int, default=24, help="unauthenticated 8 MiB streams (default 24)")
    parser.add_argument("--hold", type=int, default=64, help="idle connections held open (default 64)")
    parser.add_argument("--deadline", type=float, default=30.0, help="joiner gives up after (default 30 s)")
    parser.add_argument("--pps", type=int, default=2000, help="undecryptable datagrams per second")
    parser.add_argument("--seconds", type=float, default=5.0, help="datagram flood length (default 5 s)")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Start the agent, run the three attacks, stop the agent; return the numbers."""
    rng = random.Random()
    net = f"127.{rng.randrange(100, 255)}.{rng.randrange(1, 255)}."
    host = net + "1"
    base = Path(tempfile.mkdtemp(prefix="ea-hostile-"))
    key = Keyring.generate_key()
    agent = _agent(base, host, free_port([host]), key)
    try:
        agent.start()
        target = (host, agent.port)
        time.sleep(SETTLE)
        before = _members(agent)
        rss_growth, rss_after = _stream_attack(agent, target, net, args.streams)
        delay = _hold_and_join(target, net, key, args.hold, args.deadline)
        idle_cpu = _cpu_percent(agent, args.seconds, None)
        flood_cpu = _cpu_percent(agent, args.seconds, lambda end: _datagram_flood(target, args.pps, end))
        after = [m for m in _members(agent) if m[0] != JOINER]
        return {
            "rss_growth_mb": round(rss_growth, 1),
            "rss_after_mb": round(rss_after, 1),
            "joiner_delay_s": round(delay, 3),
            "undecryptable_pps": args.pps,
            "undecryptable_pps_cpu_percent": round(flood_cpu, 1),
            "idle_cpu_percent": round(idle_cpu, 1),
            "members_unchanged": after == before,
            "agent_running": agent.running,
            "targets": {"rss_growth_mb": 10, "joiner_delay_s": 2},
        }
    finally:
        agent.terminate()
        shutil.rmtree(base, ignore_errors=True)


def provision(state_dir: Path, key: bytes) -> None:
    """Give the agent's state dir its cluster material (today: the keyring file)."""
    save_keyring(state_dir / "keyring", [key])


def _agent(base: Path, host: str, port: int, key: bytes) -> LoopbackAgent:
    state_dir = base / "target"
    state_dir.mkdir(mode=0o700)
    provision(state_dir, key)
    argv = [
        sys.executable, "-m", "edgeagent", "run", "--name", "target",
        "--bind", f"{host}:{port}", "--state-dir", str(state_dir), "--cluster", CLUSTER,
        "--preset", "local", "--metrics", "off", "--no-mdns",
        "--coap", f"{host}:0", "--mqtt", f"{host}:0",  # never the wildcard defaults
    ]  # fmt: skip
    return LoopbackAgent("target", host, port, state_dir, argv, agent_env())


def _members(agent: LoopbackAgent) -> list[tuple[str, str, str, int]]:
    return sorted((m["name"], m["address"], m["state"], m["incarnation"]) for m in agent.members())


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _stream_attack(agent: LoopbackAgent, target: tuple[str, int], net: str, count: int) -> tuple[float, float]:
    """Send ``count`` unauthenticated 8 MiB streams at once; return (peak growth, RSS after)."""
    pid = agent.pid
    assert pid is not None
    body = struct.pack(">I", BODY_BYTES) + os.urandom(BODY_BYTES)
    baseline = peak = _rss_mb(pid)
    senders = [
        threading.Thread(target=_send_stream, args=(target, f"{net}{10 + i % STREAM_SOURCES}", body))
        for i in range(count)
    ]
    for sender in senders:
        sender.start()
    while any(s.is_alive() for s in senders):
        peak = max(peak, _rss_mb(pid))
        time.sleep(RSS_SAMPLE)
    for sender in senders:
        sender.join()
    time.sleep(SETTLE)
    after = _rss_mb(pid)
    return max(peak, after) - baseline, after


def _send_stream(target: tuple[str, int], source: str, data: bytes) -> None:
    try:
        with socket.create_connection(target, timeout=SEND_TIMEOUT, source_address=(source, 0)) as sock:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            while sock.recv(65536):
                pass
    except OSError:
        pass  # the agent closed on us: that is the point


class _Holder:
    """Keeps ``count`` idle connections to ``target`` open, re-opening any the agent closes."""

    def __init__(self, target: tuple[str, int], net: str, count: int) -> None:
        self.target = target
        self.sources = [f"{net}{30 + i % HOLD_SOURCES}" for i in range(count)]
        self.socks: dict[int, socket.socket] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> _Holder:
        for i in range(len(self.sources)):
            self._open(i)
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()
        for sock in self.socks.values():
            sock.close()

    def _open(self, i: int) -> None:
        try:
            self.socks[i] = socket.create_connection(self.target, timeout=5, source_address=(self.sources[i], 0))
        except OSError:
            self.socks.pop(i, None)

    def _run(self) -> None:
        while not self.stop.is_set():
            for i in range(len(self.sources)):
                if i not in self.socks:
                    self._open(i)
            by_fd = {s.fileno(): i for i, s in self.socks.items()}
            readable, _, _ = select.select(list(by_fd), [], [], 0.05)
            for fd in readable:
                i = by_fd[fd]
                try:
                    data = self.socks[i].recv(4096)
                except OSError:
                    data = b""
                if not data:  # closed by the agent: take the slot again at once
                    self.socks.pop(i).close()
                    self._open(i)


def _hold_and_join(target: tuple[str, int], net: str, key: bytes, hold: int, deadline: float) -> float:
    """Seconds the joiner's push-pull join takes while ``hold`` idle connections are held."""
    with _Holder(target, net, hold):
        time.sleep(0.5)  # every held connection accepted
        return asyncio.run(_join(target, net + "2", key, deadline))


async def _join(target: tuple[str, int], host: str, key: bytes, deadline: float) -> float:
    loop = asyncio.get_running_loop()
    config = preset("local", cluster_name=CLUSTER)
    core_keyring = Keyring([key])
    core = Membership(JOINER, (host, target[1]), config, random.Random(), loop.time(), keyring=core_keyring)
    started = time.monotonic()
    while time.monotonic() - started < deadline:
        core.join([target], loop.time())
        for dst, data in core.streams_to_send():
            reply = await _push_pull(dst, data, host, streams.StreamAuth(core_keyring, CLUSTER))
            if reply is None:
                core.stream_failed(dst, loop.time())
                continue
            core.receive_stream_reply(reply, dst, loop.time())
            if any(m.name == "target" for m in core.members()):
                return time.monotonic() - started
        await asyncio.sleep(JOIN_RETRY)
    return deadline


async def _push_pull(dst: tuple[str, int], data: bytes, host: str, auth: streams.StreamAuth) -> bytes | None:
    settings = streams.StreamSettings(MAX_STREAM_BYTES, JOIN_TIMEOUT)
    return await streams.exchange(dst, data, (host, 0), auth, settings)


def _cpu_percent(agent: LoopbackAgent, seconds: float, load: Any) -> float:
    """The agent's CPU (percent of one core) over ``seconds``, with ``load(end)`` running meanwhile."""
    pid = agent.pid
    assert pid is not None
    cpu0, wall0 = cpu_seconds(pid), time.monotonic()
    end = wall0 + seconds
    if load is not None:
        load(end)
    time.sleep(max(0.0, end - time.monotonic()))
    return 100 * (cpu_seconds(pid) - cpu0) / (time.monotonic() - wall0)


def _datagram_flood(target: tuple[str, int], pps: int, end: float) -> None:
    """Send random (undecryptable) datagrams at ``pps`` until ``end``, paced every 10 ms."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sent, start = 0, time.monotonic()
        while (now := time.monotonic()) < end:
            due = int((now - start) * pps)
            for _ in range(due - sent):
                try:
                    sock.sendto(os.urandom(DATAGRAM_BYTES), target)
                except OSError:
                    pass
            sent = max(sent, due)
            time.sleep(0.01)
