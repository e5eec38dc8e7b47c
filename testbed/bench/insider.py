"""Insider: one live agent fed validly sealed hostile messages by a fuzzer holding the cluster key.

How it works. One real ``python -m edgeagent run`` process (provisioned as a cluster member by
:func:`edgeagent.onboarding.provision_member`) listens on ``127.A.B.1``. In this process:

- the *observer*, a real member: a :class:`edgeagent.driver.GossipDriver` running a
  ``gossip.core.Membership`` on ``127.A.B.2`` that joins the agent by push-pull. It taps the
  datagrams it receives: a forged state entry *about the observer* arriving from the agent
  means the agent accepted and spread a rewrite of another member's own state;
- the *pinger* on ``127.A.B.3``: a sealed Ping to the agent every :data:`PING_EVERY` s during
  the flood, the Ack timed (a lost ping counts as :data:`PING_TIMEOUT`);
- the *fuzzer*: ``--messages`` (300,000) hostile messages, one per sealed datagram, paced at
  ``--rate`` (4,000) a second from ``--sources`` (8) addresses ``127.A.B.10`` and up (each
  source sends the whole mix, eight messages at a time), cycling through: forged Alives of phantom members on unbound loopback addresses (3 in 8), counters
  out of range (a Suspect at 2**64-1, a Dead at MAX_COUNTER), state bombs about the observer
  (a value of 1,000 empty lists; 4,000-byte strings), forged LEFT / Dead about the observer at
  its incarnation, malformed key-rotation broadcasts, forged state about the observer and
  about the agent itself.

Fields: ``rss_growth_mb`` (peak VmRSS during the flood and the wait after it, minus before;
target <= 30), ``phantoms_peak`` (the agent's member count minus the two real ones, sampled),
``phantoms_after_60s`` (phantom names still in the agent's table ``--after`` (60) s after the
flood; target 0), ``ping_p99_ms`` (target <= 200) with ``pings_lost``, and
``idle_ping_p99_ms`` (the same over :data:`IDLE_PINGS_S` before the flood: the machine's noise), ``own_state_rewrites``
(forged entries about the observer the agent spread to it; target 0, reached only once state
is owner-signed), ``observer_state_at_end`` and ``observer_back_after_s`` (when, after the flood, the agent first
held the real member alive again; None: not within ``--after``), ``flood_cpu_percent`` (the agent's CPU during the flood, percent of
one core), ``kernel_drops`` (datagrams the kernel dropped for the agent's full socket buffer
during the flood, ``/proc/net/udp``), ``key_warnings`` (warning lines about key
rotations in the agent's log), ``datagrams_limited`` (read from the agent's metrics: dropped
unread because their sender kept failing validation), ``crashed`` (the agent process died).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import random
import shutil
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import msgpack

from edgeagent.agent_process import agent_env
from edgeagent.driver import GossipDriver
from edgeagent.features.keys import KEY_OP_PREFIX
from edgeagent.localmesh import free_port
from edgeagent.onboarding import new_ca, provision_member
from edgeagent.streams import StreamAuth
from gossip.codec import (
    MAX_COUNTER,
    PROTOCOL_VERSION,
    DatagramHeader,
    decode_datagram,
    decode_frame,
    destination_tag,
    encode_datagram,
)
from gossip.config import preset
from gossip.core import Membership
from gossip.errors import RemoteError
from gossip.keyring import Keyring
from gossip.messages import Ack, Address, Ping, StateUpdate
from testbed.bench.procs import cpu_seconds
from testbed.loopback import LoopbackAgent

CLUSTER = "bench-insider"
TARGET = "target"
OBSERVER = "observer"
PING_EVERY = 0.02  # s between the pinger's pings
PING_TIMEOUT = 1.0  # s: a ping unanswered this long is lost (and counts as this long)
SAMPLE_EVERY = 1.0  # s between RSS and member-count samples
SETTLE = 3.0  # s after the observer joined before the baseline is taken
IDLE_PINGS_S = 5.0  # s of pings before the flood: the same measurement with no flood
KINDS = 8  # message kinds the fuzzer cycles through (see the module docstring)
PHANTOM_NET = "127.9."  # phantoms' addresses: loopback, nothing listens there


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--messages", type=int, default=300_000, help="hostile messages (default 300000)")
    parser.add_argument("--rate", type=float, default=4000.0, help="messages per second (default 4000)")
    parser.add_argument("--sources", type=int, default=8, help="fuzzer source addresses (default 8)")
    parser.add_argument("--after", type=float, default=60.0, help="s to wait after the flood (default 60)")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Start the agent, join the observer, flood, wait, measure, stop; return the numbers."""
    if args.messages < 0 or args.rate <= 0 or not 1 <= args.sources <= 200 or args.after < 0:
        print("insider: expected --messages >= 0, --rate > 0, --sources 1..200, --after >= 0", file=sys.stderr)
        raise SystemExit(2)
    rng = random.Random()
    net = f"127.{rng.randrange(100, 255)}.{rng.randrange(1, 255)}."
    host = net + "1"
    base = Path(tempfile.mkdtemp(prefix="ea-insider-"))
    ca = new_ca(CLUSTER)
    agent = _agent(base, host, free_port([host]), ca)
    try:
        agent.start()
        return asyncio.run(_measure(agent, net, ca.keys[0], args))
    finally:
        agent.terminate()
        shutil.rmtree(base, ignore_errors=True)


def _agent(base: Path, host: str, port: int, ca: Any) -> LoopbackAgent:
    state_dir = base / TARGET
    state_dir.mkdir(mode=0o700)
    provision_member(ca, state_dir, TARGET)
    argv = [
        sys.executable, "-m", "edgeagent", "run", "--name", TARGET,
        "--bind", f"{host}:{port}", "--state-dir", str(state_dir), "--cluster", CLUSTER,
        "--metrics", f"{host}:0", "--no-mdns",
        "--coap", f"{host}:0", "--mqtt", f"{host}:0",  # never the wildcard defaults
    ]  # fmt: skip
    return LoopbackAgent(TARGET, host, port, state_dir, argv, agent_env())


class _Tapped(Membership):
    """The observer's core: notes forged state about itself arriving (datagrams and push-pulls)."""

    forged_seen: set[str]
    tap_keyring: Keyring

    def receive(self, data: bytes, src: Address, now: float) -> None:
        try:
            self._note(decode_datagram(self.tap_keyring.decrypt(data, CLUSTER.encode()))[1])
        except RemoteError:
            pass
        super().receive(data, src, now)

    def handle_stream(self, data: bytes, src: Address, now: float) -> bytes | None:
        self._note_frame(data)
        return super().handle_stream(data, src, now)

    def receive_stream_reply(self, data: bytes, src: Address, now: float) -> None:
        self._note_frame(data)
        super().receive_stream_reply(data, src, now)

    def _note_frame(self, data: bytes) -> None:
        try:
            frame = decode_frame(self.tap_keyring.decrypt(data, CLUSTER.encode()), 1 << 30)
        except RemoteError:
            return
        self._note(
            StateUpdate(owner, e.version, e.key, e.value, e.deleted)
            for owner, entries in frame.states
            for e in entries
        )

    def _note(self, msgs: Any) -> None:
        for msg in msgs:
            if type(msg) is StateUpdate and msg.owner == OBSERVER and msg.key.startswith("forged"):
                self.forged_seen.add(f"{msg.key}@{msg.version}")


async def _measure(agent: LoopbackAgent, net: str, key: bytes, args: argparse.Namespace) -> dict[str, Any]:
    target = (agent.host, agent.port)
    keyring = Keyring([key])
    observer, driver = await _start_observer(net + "2", keyring, target)
    try:
        await _wait(lambda: _state_of(agent, OBSERVER) == "alive", 30.0)
        await asyncio.sleep(SETTLE)
        pid = agent.pid
        assert pid is not None
        before = _rss_mb(pid)
        incarnation = [await driver.acall(lambda core, now: core.incarnation)]
        stop = threading.Event()
        # The machine's own noise, no flood. Its own sender name: with one name for both, the
        # flood pinger's counters restarted at 1 and its first ~250 pings were dropped as replays.
        idle = _Pinger(net + "4", target, keyring, "idle-pinger")
        idle.start()
        await asyncio.sleep(IDLE_PINGS_S)
        idle.stop()
        pinger = _Pinger(net + "3", target, keyring, "pinger")
        fuzz = threading.Thread(
            target=_fuzz, args=(target, [f"{net}{10 + i}" for i in range(args.sources)], keyring, args, incarnation, stop)
        )
        sampler = _Sampler(agent, pid)
        sampler.start()
        pinger.start()
        cpu0, wall0, drops0 = cpu_seconds(pid), time.monotonic(), _socket_drops(target)
        fuzz.start()
        while fuzz.is_alive():
            incarnation[0] = await driver.acall(lambda core, now: core.incarnation)
            await asyncio.sleep(0.5)
        flood_cpu = 100 * (cpu_seconds(pid) - cpu0) / max(1e-3, time.monotonic() - wall0)
        kernel_drops = _socket_drops(target) - drops0
        pinger.stop()
        back = await _observer_back(agent, args.after)
        crashed = not agent.running
        members = [] if crashed else agent.members()
        phantoms = [m["state"] for m in members if m["name"].startswith("ph")]
        sampler.stop()
        limited = 0.0 if crashed else _metric(agent, 'reason="sender_limited"')
        return {
            "messages": args.messages,
            "rate": args.rate,
            "sources": args.sources,
            "rss_growth_mb": round(max(sampler.peak_rss, before) - before, 1),
            "phantoms_peak": sampler.peak_members - 2,
            "phantoms_after_60s": len(phantoms),
            "phantoms_after_by_state": {state: phantoms.count(state) for state in sorted(set(phantoms))},
            "after_s": args.after,
            "ping_p99_ms": pinger.p99_ms(),
            "idle_ping_p99_ms": idle.p99_ms(),
            "pings": len(pinger.rtts),
            "pings_lost": pinger.lost,
            "own_state_rewrites": len(observer.forged_seen),
            "observer_state_at_end": None if crashed else _state_of(agent, OBSERVER),
            "observer_back_after_s": back,
            "flood_cpu_percent": round(flood_cpu, 1),
            "kernel_drops": kernel_drops,
            "key_warnings": _count_lines(agent.log_path, "keyring operation"),
            "datagrams_limited": int(limited),
            "crashed": crashed,
            "targets": {"rss_growth_mb": 30, "phantoms_after_60s": 0, "ping_p99_ms": 200, "own_state_rewrites": 0},
        }
    finally:
        driver.stop()


async def _start_observer(host: str, keyring: Keyring, target: Address) -> tuple[_Tapped, GossipDriver[_Tapped]]:
    made: list[_Tapped] = []

    def make_core(addr: Address, now: float) -> _Tapped:
        core = _Tapped(OBSERVER, addr, preset("lan", cluster_name=CLUSTER), random.Random(), now, keyring=keyring)
        core.forged_seen, core.tap_keyring = set(), keyring
        made.append(core)
        return core

    driver = GossipDriver(
        make_core,
        (host, 0),
        main_loop=asyncio.get_running_loop(),
        on_update=lambda events, view: None,
        stream_auth=StreamAuth(keyring, CLUSTER),
    )
    driver.start()
    await driver.acall(lambda core, now: core.join([target], now))
    return made[0], driver


async def _observer_back(agent: LoopbackAgent, wait: float) -> float | None:
    """Wait ``wait`` s; when (s after the flood) the agent first held the observer alive again."""
    start = time.monotonic()
    back = None
    while (elapsed := time.monotonic() - start) < wait:
        if back is None and await asyncio.to_thread(_state_of, agent, OBSERVER) == "alive":
            back = round(elapsed, 1)
        await asyncio.sleep(1.0)
    return back


async def _wait(predicate: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError("the observer did not join the agent")
        await asyncio.sleep(0.2)


def _state_of(agent: LoopbackAgent, name: str) -> str | None:
    try:
        members = agent.members()
    except Exception:
        return None
    return next((m["state"] for m in members if m["name"] == name), None)


def _rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _metric(agent: LoopbackAgent, label: str) -> float:
    return sum(v for k, v in agent.scrape_metrics().items() if "packets_dropped" in k and label in k)


def _socket_drops(addr: Address) -> int:
    """Datagrams the kernel dropped for the UDP socket bound to ``addr`` (its receive buffer
    was full), from ``/proc/net/udp``; 0 if it cannot be read."""
    local = f"{socket.inet_aton(addr[0])[::-1].hex().upper()}:{addr[1]:04X}"
    try:
        for line in Path("/proc/net/udp").read_text().splitlines()[1:]:
            parts = line.split()
            if parts[1] == local:
                return int(parts[-1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _count_lines(path: Path, needle: str) -> int:
    try:
        return sum(needle in line for line in path.read_text(errors="replace").splitlines())
    except OSError:
        return 0


class _Sampler:
    """VmRSS and the agent's member count every :data:`SAMPLE_EVERY` s, on a thread."""

    def __init__(self, agent: LoopbackAgent, pid: int) -> None:
        self.agent, self.pid = agent, pid
        self.peak_rss, self.peak_members = 0.0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_EVERY):
            self.peak_rss = max(self.peak_rss, _rss_mb(self.pid))
            try:
                counts = self.agent.call("status", timeout=5.0)["members"]
            except Exception:
                continue
            self.peak_members = max(self.peak_members, sum(counts.values()))


class _Pinger:
    """Sealed pings to the agent every :data:`PING_EVERY` s; Ack round trips, on a thread."""

    def __init__(self, host: str, target: Address, keyring: Keyring, name: str) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.sock.settimeout(PING_EVERY)
        self.addr = (host, self.sock.getsockname()[1])
        self.target, self.keyring, self.name = target, keyring, name
        self.rtts: list[float] = []
        self.lost = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()

    def p99_ms(self) -> float | None:
        if not self.rtts:
            return None
        ordered = sorted(self.rtts)
        return round(1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 1)

    def _run(self) -> None:
        sent: dict[int, float] = {}
        seq, next_ping, aad = 0, time.monotonic(), CLUSTER.encode()
        while not self._stop.is_set():
            now = time.monotonic()
            if now >= next_ping:
                seq += 1
                ping = Ping(seq, TARGET, self.name, self.addr)
                header = DatagramHeader(self.name, 1, seq, destination_tag(TARGET))
                self.sock.sendto(self.keyring.encrypt(encode_datagram([ping], header), aad), self.target)
                sent[seq] = now
                next_ping += PING_EVERY
            for old in [s for s, at in sent.items() if now - at > PING_TIMEOUT]:
                del sent[old]
                self.lost += 1
                self.rtts.append(PING_TIMEOUT)
            try:
                data = self.sock.recv(65536)
            except OSError:
                continue
            arrived = time.monotonic()
            try:
                _, msgs = decode_datagram(self.keyring.decrypt(data, aad))
            except RemoteError:
                continue
            for msg in msgs:
                if type(msg) is Ack and msg.seq in sent:
                    self.rtts.append(arrived - sent.pop(msg.seq))


_FUZZ_COUNTER = itertools.count()  # every hostile datagram new to the anti-replay window


def _sealed(keyring: Keyring, message: list[Any]) -> bytes:
    """One raw wire message, sealed (bypassing the encoder's checks, as a fuzzer does), with a
    valid datagram header to the target (the fuzzer holds the key: it can make one)."""
    header = ["fuzzer", 1, next(_FUZZ_COUNTER), destination_tag(TARGET)]
    plain = bytes((PROTOCOL_VERSION,)) + msgpack.packb([*header, message], use_bin_type=True)
    return keyring.encrypt(plain, CLUSTER.encode())


def _hostile(i: int, incarnation: int) -> list[Any]:
    """The ``i``-th hostile message (see the module docstring for the mix)."""
    kind = i % KINDS
    if kind <= 2:
        return [5, f"ph{i}", 1, [f"{PHANTOM_NET}{i // 256 % 256}.{1 + i % 250}", 7946], b""]
    if kind == 3:
        return [6, TARGET, 2**64 - 1, "evil"] if i % 2 else [7, TARGET, MAX_COUNTER, "evil"]
    if kind == 4:
        value: Any = [[]] * 1000 if i % 2 else "x" * 4000
        return [8, OBSERVER, 1000 + i, f"bomb{i % 64}", value, False]
    if kind == 5:
        return [7, OBSERVER, incarnation, OBSERVER if i % 2 else "evil"]
    if kind == 6:
        return [9, "evil", i, KEY_OP_PREFIX + b'{"op": "install", "key": ' + str(i).encode()]
    owner = OBSERVER if i % 2 else TARGET
    return [8, owner, 1000 + i, f"forged{i % 32}", f"forged-{i}", False]


def _fuzz(
    target: Address, sources: list[str], keyring: Keyring, args: argparse.Namespace, incarnation: list[int], stop: threading.Event
) -> None:
    """Send ``args.messages`` hostile datagrams at ``args.rate``, paced every 5 ms (bounded)."""
    socks = []
    for source in sources:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((source, 0))
        socks.append(sock)
    try:
        sent, start = 0, time.monotonic()
        while sent < args.messages and not stop.is_set():
            due = min(args.messages, int((time.monotonic() - start) * args.rate))
            while sent < due:
                try:  # every source sends the whole mix, one kind after another
                    sock = socks[sent // KINDS % len(socks)]
                    sock.sendto(_sealed(keyring, _hostile(sent, incarnation[0])), target)
                except OSError:
                    pass
                sent += 1
            time.sleep(0.005)
    finally:
        for sock in socks:
            sock.close()
