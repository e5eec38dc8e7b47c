"""One MQTT load run: a subscriber on one broker, a publisher on another, the same client code.

    python -m testbed.mqtt_load --pub HOST:PORT --sub HOST:PORT --count N --qos Q

The subscriber (paho-mqtt, threaded) connects to ``--sub`` and subscribes to ``TOPIC/#``;
after ``--settle`` seconds (interest spreading through a bridge or the mesh) the publisher
(paho-mqtt, ``--inflight`` QoS 1 publishes in flight, ``--rate`` per second or as fast as it
goes) sends ``--count`` messages to ``TOPIC/x`` on ``--pub``,
each carrying its sequence number and the sender's ``time.monotonic_ns()`` (one clock for
every process of the machine). Prints one JSON object: ``received``, ``duplicates``,
``lost``, ``mps`` (messages received per second, first publish to last receipt), ``p50_ms``,
``p99_ms`` (publish to receipt). Every loop is bounded by ``--timeout``: how long to wait for
the last messages once every one is published. With ``--records`` it prints ``started`` on
stderr when publishing starts and the JSON gains ``records``: ``[t, delivered, "",
latency_ms | None]`` per message, ``t`` the publish time in seconds since that start (the
shape of :mod:`testbed.coap_load`'s records, so the scenario report plots both).
"""

from __future__ import annotations

import argparse
import json
import statistics
import struct
import sys
import threading
import time

import paho.mqtt.client as mqtt  # aiomqtt's own dependency: a plain threaded client

HEADER = struct.Struct("!IQ")


def _addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def _client(name: str, address: str, inflight: int = 20) -> mqtt.Client:
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=name, clean_session=True)
    client.max_inflight_messages_set(inflight)
    client.max_queued_messages_set(0)
    host, port = _addr(address)
    connected = threading.Event()
    client.on_connect = lambda c, u, flags, rc, props=None: connected.set()
    client.connect(host, port, keepalive=30)
    client.loop_start()
    if not connected.wait(10):
        raise SystemExit(f"cannot connect to {address}")
    return client


def run(args: argparse.Namespace) -> dict[str, object]:
    got: dict[int, float] = {}
    dup: list[int] = []
    done = threading.Event()

    def on_message(c: object, u: object, message: mqtt.MQTTMessage) -> None:
        seq, sent_ns = HEADER.unpack_from(message.payload)
        if seq in got:
            dup.append(seq)
        else:
            got[seq] = (time.monotonic_ns() - sent_ns) / 1e6
        if len(got) >= args.count:
            done.set()

    lock = threading.Lock()

    def locked(c: object, u: object, message: mqtt.MQTTMessage) -> None:
        with lock:
            on_message(c, u, message)

    topic = f"$share/{args.share}/{args.topic}/#" if args.share else f"{args.topic}/#"
    subs = []
    for i, address in enumerate(args.sub.split(",")):
        sub = _client(f"bench-sub{i}-{time.monotonic_ns()}", address)
        sub.on_message = locked
        subscribed = threading.Event()
        sub.on_subscribe = lambda *a, e=subscribed: e.set()
        sub.subscribe(topic, qos=args.qos)
        subscribed.wait(10)
        subs.append(sub)
    time.sleep(args.settle)
    pub = _client(f"bench-pub-{time.monotonic_ns()}", args.pub, args.inflight)
    pad = b"x" * max(0, args.size - HEADER.size)
    if args.records:
        print("started", file=sys.stderr, flush=True)
    start = time.monotonic()
    infos = []
    sent: list[float] = []
    for seq in range(args.count):
        if args.rate:
            wait = start + seq / args.rate - time.monotonic()
            if wait > 0:
                time.sleep(wait)
        sent.append(time.monotonic() - start)
        infos.append(pub.publish(f"{args.topic}/x", HEADER.pack(seq, time.monotonic_ns()) + pad, qos=args.qos))
    done.wait(args.timeout)
    end = time.monotonic()
    time.sleep(0.5)  # late duplicates
    for client in (pub, *subs):
        client.loop_stop()
        client.disconnect()
    lat = sorted(got.values())
    out: dict[str, object] = {
        "received": len(got),
        "duplicates": len(dup),
        "lost": args.count - len(got),
        "mps": round(len(got) / max(end - start, 1e-9), 1),
        "p50_ms": round(statistics.median(lat), 3) if lat else None,
        "p99_ms": round(lat[min(len(lat) - 1, int(len(lat) * 0.99))], 3) if lat else None,
    }
    if args.records:
        with lock:
            out["records"] = [[round(t, 4), seq in got, "", round(got[seq], 3) if seq in got else None]
                              for seq, t in enumerate(sent)]  # fmt: skip
    return out


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m testbed.mqtt_load")
    p.add_argument("--pub", required=True, help="HOST:PORT the publisher connects to")
    p.add_argument("--sub", required=True, help="HOST:PORT the subscriber connects to; with --share, a comma-separated list, one group member each")
    p.add_argument("--share", default="", help="subscribe as members of this $share group")
    p.add_argument("--count", type=int, default=5000)
    p.add_argument("--qos", type=int, choices=(0, 1), default=0)
    p.add_argument("--inflight", type=int, default=20, help="QoS 1 publishes in flight")
    p.add_argument("--rate", type=float, default=0.0, help="messages/s (0: as fast as it goes)")
    p.add_argument("--size", type=int, default=64, help="payload bytes (default 64)")
    p.add_argument("--topic", default="bench")
    p.add_argument("--settle", type=float, default=1.0)
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--records", action="store_true", help="per-message records; 'started' on stderr")
    return p.parse_args(argv)


if __name__ == "__main__":
    print(json.dumps(run(parse())), flush=True)
