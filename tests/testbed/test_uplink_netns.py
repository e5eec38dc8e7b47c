"""The MQTT uplink across network namespaces (issue 11): the only route to the cloud, and a
partition with a holder on each side.

Real agents, each in its own namespace host on one bridge (``netns.scoped_network``), every
one with the same ``[uplink]`` config; a real mosquitto as the "cloud"; the MQTT clients
(a QoS 1 publisher, the cloud's subscriber) are small scripts run inside the namespaces.

- **Only route**: the cloud lives in a namespace of its own joined by a veth to h1 only, so
  h2 and h3 have no route to it (connects fail with "network unreachable"). The uplink site
  is picked so that h1 has the *lowest* rendezvous score and h3 the highest: without the
  reachability levels (``overlay.uplink_select.Reach``) h3 holds the uplink for ever and
  nothing reaches the cloud. A client on h3 publishes QoS 1; every message must reach the
  cloud through h1's uplink.
- **Partition**: the cloud is a fourth namespace host on the bridge that no partition rule
  touches, so both sides reach it. Agents {h1, h2} | {h3}: each side holds one uplink, both
  sides publish QoS 1 during the partition, then the heal: every message reaches the cloud
  (duplicates allowed, QoS 1 is at-least-once) and exactly one holder remains.

Needs root, ``ip``, ``nft`` and mosquitto; skipped with the reason otherwise. Every process
and namespace is removed by PID / name afterwards.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from edgeagent.agent_process import AgentProcess, agent_env
from edgeagent.errors import AgentUnavailable
from edgeagent.onboarding import new_ca, provision_member
from overlay.uplink_select import score
from testbed import netns
from testbed.bench.uplink import MOSQUITTO
from tests.host_tools import needs_netns

pytestmark = [
    needs_netns("ip", "nft"),
    pytest.mark.skipif(MOSQUITTO is None, reason="needs mosquitto (Debian package mosquitto)"),
    pytest.mark.root,
    pytest.mark.slow,
]

ROOT = Path(__file__).resolve().parents[2]
PORT = 7946
MQTT_PORT = 1883
CLOUD_PORT = 1883
TIMEOUT = 40.0

SUBSCRIBER = """
import asyncio, sys
import aiomqtt

async def main(host, port):
    async with aiomqtt.Client(host, int(port), identifier="cloud-sub") as sub:
        await sub.subscribe("cloud/#", qos=1)
        print("ready", flush=True)
        async for msg in sub.messages:
            print(msg.payload.decode(), flush=True)

asyncio.run(main(*sys.argv[1:3]))
"""

PUBLISHER = """
import asyncio, sys
import aiomqtt

async def main(host, port, prefix, count):
    async with aiomqtt.Client(host, int(port)) as pub:
        for i in range(int(count)):
            # 30 s: a PUBACK is held until every destination agent has the message, and one
            # cut off by the partition answers only when it is declared dead (detection + a
            # channel timeout); the publisher must wait that out, not give up
            await pub.publish("s/x", f"{prefix}-{i:04d}".encode(), qos=1, timeout=30)
            await asyncio.sleep(0.01)
    print("acked", count, flush=True)

asyncio.run(main(*sys.argv[1:5]))
"""


def _site_where(low: str, high: str, names: list[str]) -> str:
    """A site in which ``low`` has the lowest rendezvous score and ``high`` the highest."""
    for i in range(1000):
        site = f"site{i}"
        ranked = sorted(names, key=lambda n: score(site, n))
        if ranked[0] == low and ranked[-1] == high:
            return site
    raise AssertionError("no such site")


@contextlib.contextmanager
def cloud_behind(net: netns.Network, host: netns.HostNet) -> Iterator[tuple[str, str]]:
    """A namespace joined by a veth to ``host`` only; yields (its namespace, its address)."""
    cloud_ns = f"{net.bridge_ns.removesuffix('-br')}-cloud"
    octet = int(net.subnet.split(".")[2])
    x = netns.pick_subnet_octet((octet + 1) % 256, avoid={octet})
    near, far = f"{netns.SUBNET_BASE}.{x}.1", f"{netns.SUBNET_BASE}.{x}.2"
    netns.run(["ip", "netns", "add", cloud_ns])
    try:
        netns.run(["ip", "-n", host.netns, "link", "add", "cloud0", "type", "veth",
                   "peer", "name", "eth0", "netns", cloud_ns])  # fmt: skip
        for ns, iface, addr in ((host.netns, "cloud0", near), (cloud_ns, "eth0", far)):
            netns.run(["ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", iface])
            netns.run(["ip", "-n", ns, "link", "set", iface, "up"])
        netns.run(["ip", "-n", cloud_ns, "link", "set", "lo", "up"])
        yield cloud_ns, far
    finally:
        for pid in netns.netns_pids(cloud_ns):  # only processes inside our own namespace
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        netns.delete_netns(cloud_ns)


class Cloud:
    """mosquitto and a QoS 1 subscriber to ``cloud/#``, both inside one namespace."""

    def __init__(self, tmp: Path, ns: str, ip: str) -> None:
        assert MOSQUITTO is not None
        conf = tmp / "cloud.conf"
        conf.write_text(f"listener {CLOUD_PORT} {ip}\nallow_anonymous true\nuser root\n")
        self.ns, self.ip = ns, ip
        self.env = agent_env({"PYTHONPATH": str(ROOT)})
        self.broker = subprocess.Popen(["ip", "netns", "exec", ns, MOSQUITTO, "-c", str(conf)],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        self.out = tmp / "cloud.out"
        self.sub: subprocess.Popen[bytes] | None = None
        deadline = time.monotonic() + 15
        while not self.got_ready():
            assert self.broker.poll() is None, "mosquitto exited"
            assert time.monotonic() < deadline, "the cloud subscriber did not start"
            if self.sub is None or self.sub.poll() is not None:  # the broker may not listen yet
                with self.out.open("wb") as out:
                    self.sub = subprocess.Popen(
                        ["ip", "netns", "exec", ns, sys.executable, "-c", SUBSCRIBER, ip,
                         str(CLOUD_PORT)], stdout=out, stderr=subprocess.DEVNULL, env=self.env,
                    )  # fmt: skip
            time.sleep(0.2)

    def got_ready(self) -> bool:
        return self.out.exists() and self.out.read_text().startswith("ready")

    def got(self) -> list[str]:
        return self.out.read_text().splitlines()[1:]

    def stop(self) -> None:
        for proc in (self.sub, self.broker):
            if proc is not None:
                proc.kill()
                proc.wait(10)


def _agents(net: netns.Network, tmp: Path, hosts: list[netns.HostNet], config: Path) -> list[AgentProcess]:  # fmt: skip
    ca = new_ca("nsuplink")
    env = agent_env({"PYTHONPATH": str(ROOT)})
    agents = []
    for host in hosts:
        state = tmp / host.name
        provision_member(ca, state, host.name)
        argv = [sys.executable, "-m", "edgeagent", "run", "--name", host.name,
                "--bind", f"{host.ip}:{PORT}", "--state-dir", str(state), "--preset", "local",
                "--coap", "off", "--mqtt", f"{host.ip}:{MQTT_PORT}", "--no-mdns",
                "--config", str(config)]  # fmt: skip
        if host is not hosts[0]:
            argv += ["--join", f"{hosts[0].ip}:{PORT}"]
        agent = AgentProcess(host.name, net.exec_argv(host, argv), state, tmp / f"{host.name}.log", env)  # fmt: skip
        agents.append(agent)
        agent.start(wait=False)
    for agent in agents:
        agent.wait_ready()
    return agents


def _config(tmp: Path, cloud_ip: str, site: str) -> Path:
    path = tmp / "uplink.toml"
    path.write_text(
        f'[uplink]\nbrokers = ["{cloud_ip}:{CLOUD_PORT}"]\n'
        f'topics = [\'s/# out 1 "" cloud/\']\nsite = "{site}"\n'
    )
    return path


def _uplink(agent: AgentProcess) -> dict[str, Any]:
    try:
        return dict(agent.status().get("uplink") or {})
    except (AgentUnavailable, OSError):
        return {}


def _wait(cond: Callable[[], bool], what: str, agents: list[AgentProcess], timeout: float = TIMEOUT) -> float:  # fmt: skip
    start = time.monotonic()
    while not cond():
        if time.monotonic() - start > timeout:
            _dump(agents)
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.2)
    return time.monotonic() - start


def _dump(agents: list[AgentProcess]) -> None:
    for agent in agents:
        print(f"===== {agent.name} =====\n{_uplink(agent)}\n{agent.log_tail(30)}")


def _holds(agent: AgentProcess, observers: list[AgentProcess]) -> bool:
    """``agent`` holds with a live cloud connection and every observer names it."""
    mine = _uplink(agent)
    if mine.get("mode") != "hold" or not mine.get("connected_to"):
        return False
    return all(_uplink(o).get("holder") == agent.name for o in observers)


def _routes_to(agent: AgentProcess, others: int) -> bool:
    try:
        stats = agent.status()["mqtt_stats"]
    except (AgentUnavailable, OSError, KeyError):
        return False
    return int(stats.get("router_interest_nodes", 0)) >= others


def _publish(net: netns.Network, host: netns.HostNet, prefix: str, count: int) -> subprocess.Popen[str]:  # fmt: skip
    return subprocess.Popen(
        net.exec_argv(host, [sys.executable, "-c", PUBLISHER, host.ip, str(MQTT_PORT), prefix,
                             str(count)]),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=agent_env({"PYTHONPATH": str(ROOT)}),
    )  # fmt: skip


def _acked(proc: subprocess.Popen[str], count: int) -> None:
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and out.split() == ["acked", str(count)], (out, err)


def _kill_all(agents: list[AgentProcess]) -> None:
    for agent in agents:
        agent.kill()


def test_the_only_host_with_a_route_to_the_cloud_holds_the_uplink(tmp_path: Path) -> None:
    with netns.scoped_network(3) as net:
        h1, h2, h3 = net.hosts
        site = _site_where("h1", "h3", ["h1", "h2", "h3"])  # without levels h3 would hold
        with cloud_behind(net, h1) as (cloud_ns, cloud_ip):
            cloud = Cloud(tmp_path, cloud_ns, cloud_ip)
            agents: list[AgentProcess] = []
            try:
                agents = _agents(net, tmp_path, [h1, h2, h3], _config(tmp_path, cloud_ip, site))
                a1, a2, a3 = agents
                took = _wait(lambda: _holds(a1, agents), "h1 to hold the uplink", agents)
                assert [_uplink(a)["level"] for a in agents] == [2, 0, 0]
                _wait(lambda: _routes_to(a3, 2), "h3 to route to every candidate", agents)
                _acked(_publish(net, h3, "h3", 50), 50)
                want = {f"h3-{i:04d}" for i in range(50)}
                _wait(lambda: want <= set(cloud.got()), "h3's messages in the cloud", agents)
                assert _uplink(a1)["sent"] >= 50
                for other in (a2, a3):  # they never reached the cloud, and do not hold
                    status = _uplink(other)
                    assert status["connects"] == 0 and status["mode"] == "off", status
                    assert status["probe_failures"] >= 1, status
                print(f"h1 held the uplink {took:.1f} s after the agents were ready")
            except BaseException:
                _dump(agents)
                raise
            finally:
                _kill_all(agents)
                cloud.stop()


def test_partition_holds_one_uplink_each_side_and_one_after_the_heal(tmp_path: Path) -> None:
    with netns.scoped_network(4) as net:
        h1, h2, h3, h4 = net.hosts  # h4: the cloud, reached by both sides
        cloud = Cloud(tmp_path, h4.netns, h4.ip)
        agents: list[AgentProcess] = []
        try:
            agents = _agents(net, tmp_path, [h1, h2, h3], _config(tmp_path, h4.ip, "hall"))
            a1, a2, a3 = agents
            _wait(lambda: any(_holds(a, agents) for a in agents), "one holder", agents)
            for a in agents:
                _wait(lambda a=a: _routes_to(a, 2), f"{a.name} to route to all", agents)  # type: ignore[misc]
            net.partition([[h1, h2], [h3]])
            left = [a1, a2]
            _wait(lambda: _holds(a3, [a3]) and any(_holds(a, left) for a in left),
                  "a connected holder on each side", agents)  # fmt: skip
            pubs = [_publish(net, h2, "left", 100), _publish(net, h3, "right", 100)]
            for pub in pubs:
                _acked(pub, 100)
            net.heal_partitions()
            _wait(lambda: sum(_uplink(a).get("mode") == "hold" for a in agents) == 1
                  and any(_holds(a, agents) for a in agents)
                  and all(_uplink(a).get("mode") in ("hold", "off") for a in agents),
                  "exactly one holder after the heal, the other drained", agents)  # fmt: skip
            want = {f"{side}-{i:04d}" for side in ("left", "right") for i in range(100)}
            _wait(lambda: want <= set(cloud.got()), "every message in the cloud", agents)
            got = cloud.got()
            print(f"{len(got)} received, {len(got) - len(set(got))} duplicates")
            for a in agents:  # where the duplicates come from (see docs/architecture.md)
                st = _uplink(a)
                print(a.name, {k: st.get(k) for k in ("mode", "takeovers", "sent", "level")})
            assert set(got) == want  # nothing foreign, nothing lost
            assert sum(_uplink(a).get("mode") == "hold" for a in agents) == 1
        except BaseException:
            _dump(agents)
            raise
        finally:
            _kill_all(agents)
            cloud.stop()
