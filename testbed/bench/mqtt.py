"""MQTT through the mesh against one mosquitto and two mosquittos joined by a bridge (issue 10).

How it works. The same load client (:mod:`testbed.mqtt_load`: paho-mqtt, one publisher and one
subscriber process, 64-byte payloads) runs against, in one run:

- (a) ``mosquitto``: publisher and subscriber on one mosquitto;
- (b) ``bridge``: publisher on mosquitto A, subscriber on mosquitto B, B bridging ``bench/#``
  both ways to A (mosquitto's own bridge, ``cleansession true``);
- (c) ``mesh``: publisher on agent node1, subscriber on agent node2 (two agents on loopback,
  :mod:`testbed.loopback`, each the broker on its own 127.x address).

Per path: ``*_mps`` at QoS 0 and ``*_qos1_mps`` at QoS 1 (``--count`` messages as fast as the
publisher goes, 20 QoS 1 in flight), and ``*_p50_ms`` / ``*_p99_ms`` publish-to-receipt at a
paced ``--rate`` (default 200/s, QoS 1), so latency is not queueing in the client.
``mesh_vs_bridge`` = mesh_mps / bridge_mps; ``cpu_us_per_message_node1`` / ``_node2`` the
agents' CPU during (c) QoS 0 per message.

Then on the mesh: ``share_duplicates`` and ``share_lost`` for a ``$share`` group with one member
on each agent and ``--count`` QoS 1 messages published on node1; ``qos1_lost``: a persistent
(clean session false) QoS 1 subscriber on node2, node2 SIGKILLed, 100 messages published on
node1 while it is down, node2 restarted, the subscriber reconnects: how many of the 100 it never
gets; ``agent_rss_mb_100_clients``: node1's RSS with 100 connected clients, each subscribed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from testbed.bench import UsageError
from testbed.bench.procs import cpu_seconds, stop_process
from testbed.loopback import LoopbackCluster, free_port


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--count", type=int, default=5000, help="messages per throughput run")
    parser.add_argument("--rate", type=float, default=200.0, help="paced latency run, msgs/s")


def _load(pub: str, sub: str, *extra: str) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "testbed.mqtt_load", "--pub", pub, "--sub", sub, *extra],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    if out.returncode != 0:
        raise RuntimeError(f"mqtt_load failed: {out.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def _path(name: str, pub: str, sub: str, args: argparse.Namespace) -> dict[str, Any]:
    n = str(args.count)
    q0 = _load(pub, sub, "--count", n, "--qos", "0")
    q1 = _load(pub, sub, "--count", n, "--qos", "1")
    paced = _load(pub, sub, "--count", str(int(args.rate * 5)), "--qos", "1", "--rate", str(args.rate))
    return {
        f"{name}_mps": q0["mps"],
        f"{name}_lost_qos0": q0["lost"],
        f"{name}_qos1_mps": q1["mps"],
        f"{name}_qos1_lost": q1["lost"],
        f"{name}_p50_ms": paced["p50_ms"],
        f"{name}_p99_ms": paced["p99_ms"],
    }


def _mosquitto(workdir: Path, name: str, port: int, bridge_to: int | None = None) -> subprocess.Popen[str]:
    conf = workdir / f"{name}.conf"
    lines = [f"listener {port} 127.0.0.1", "allow_anonymous true", "persistence false",
             "max_queued_messages 100000"]  # as the agent: a slow reader is not a loss here
    if bridge_to is not None:
        lines += [f"connection {name}-bridge", f"address 127.0.0.1:{bridge_to}",
                  "topic bench/# both 1", "cleansession true", "try_private true"]  # fmt: skip
    conf.write_text("\n".join(lines) + "\n")
    proc = subprocess.Popen(["mosquitto", "-c", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, text=True)  # fmt: skip
    time.sleep(0.5)
    return proc


def _share(cluster: LoopbackCluster, args: argparse.Namespace) -> dict[str, Any]:
    a, b = (f"{x.host}:{cluster.mqtt_port}" for x in cluster.agents[:2])
    r = _load(a, f"{a},{b}", "--count", str(args.count), "--qos", "1", "--share", "bench", "--settle", "2")
    return {"share_duplicates": r["duplicates"], "share_lost": r["lost"]}


def _qos1_across_restart(cluster: LoopbackCluster) -> dict[str, Any]:
    import paho.mqtt.client as mqtt

    a, b = cluster.agents[0].host, cluster.agents[1].host
    got: set[int] = set()
    lock = threading.Lock()

    def subscriber() -> mqtt.Client:
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="persistent-sub", clean_session=False)
        c.on_message = lambda cl, u, m: (lock.acquire(), got.add(int(m.payload)), lock.release())
        c.connect(b, cluster.mqtt_port)
        c.subscribe("durable/#", qos=1)
        c.loop_start()
        return c

    sub = subscriber()
    time.sleep(2.0)  # interest spreads
    sub.loop_stop()
    sub.disconnect()  # offline, session kept on node2
    cluster.agents[1].kill()
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="durable-pub")
    pub.connect(a, cluster.mqtt_port)
    pub.loop_start()
    infos = [pub.publish("durable/x", str(i).encode(), qos=1) for i in range(100)]
    for info in infos:
        info.wait_for_publish(10)
    cluster.agents[1].start()
    cluster.wait_converged(60)
    sub = subscriber()
    time.sleep(5.0)
    for c in (pub, sub):
        c.loop_stop()
        c.disconnect()
    return {"qos1_lost": 100 - len(got)}


def _rss_100_clients(cluster: LoopbackCluster) -> dict[str, Any]:
    import paho.mqtt.client as mqtt

    host = cluster.agents[0].host
    clients = []
    try:
        for i in range(100):
            c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"dev{i}")
            c.connect(host, cluster.mqtt_port)
            c.subscribe(f"devices/{i}/cmd", qos=1)
            c.loop_start()
            clients.append(c)
        time.sleep(3.0)
        connected = cluster.agents[0].status()["mqtt_stats"]["connections"]
        return {"agent_rss_mb_100_clients": round((cluster.agents[0].rss_kb() or 0) / 1024, 1),
                "clients_connected": connected}  # fmt: skip
    finally:
        for c in clients:
            c.loop_stop()
            c.disconnect()


def run(args: argparse.Namespace) -> dict[str, Any]:
    if not 100 <= args.count <= 10**6:
        raise UsageError("mqtt: --count 100..1000000")
    result: dict[str, Any] = {"count": args.count, "rate": args.rate}
    with tempfile.TemporaryDirectory(prefix="ea-mqtt-bench-") as tmp:
        workdir = Path(tmp)
        p1 = free_port(["127.0.0.1"])
        m1 = _mosquitto(workdir, "m1", p1)
        try:
            result |= _path("mosquitto", f"127.0.0.1:{p1}", f"127.0.0.1:{p1}", args)
            p2 = free_port(["127.0.0.1"])
            m2 = _mosquitto(workdir, "m2", p2, bridge_to=p1)
            try:
                time.sleep(1.0)
                result |= _path("bridge", f"127.0.0.1:{p1}", f"127.0.0.1:{p2}", args)
            finally:
                stop_process(m2)
        finally:
            stop_process(m1)
    with LoopbackCluster(2, mqtt=True) as cluster:
        cluster.wait_converged(60)
        a, b = (f"{x.host}:{cluster.mqtt_port}" for x in cluster.agents)
        pids = [x.pid for x in cluster.agents]
        cpu0 = [cpu_seconds(p) for p in pids if p]
        q0 = _load(a, b, "--count", str(args.count), "--qos", "0")
        cpu1 = [cpu_seconds(p) for p in pids if p]
        result |= {f"cpu_us_per_message_node{i + 1}": round((cpu1[i] - cpu0[i]) * 1e6 / max(q0["received"], 1), 1)
                   for i in range(2)}  # fmt: skip
        result |= _path("mesh", a, b, args)
        result |= _share(cluster, args)
        result |= _rss_100_clients(cluster)
        result |= _qos1_across_restart(cluster)
    result["mesh_vs_bridge"] = round(result["mesh_mps"] / result["bridge_mps"], 3) if result["bridge_mps"] else None
    result["mesh_qos1_vs_bridge"] = (
        round(result["mesh_qos1_mps"] / result["bridge_qos1_mps"], 3) if result["bridge_qos1_mps"] else None
    )
    return result
