"""``python -m testbed.bench mqtt-broker``: what the sans-IO MQTT broker core costs, on this machine.

No sockets and no codec: packet values straight into `overlay.mqtt.broker.Broker`. Each number
is the median of ``--rounds`` timed batches (µs per operation):

- ``publish_qos0_us`` / ``publish_qos1_us``: one client PUBLISH to a topic with one subscriber
  among ``--filters`` other subscriptions (exact and wildcard filters on other topics), QoS 1
  including the subscriber's PUBACK;
- ``fanout_per_subscriber_us``: one QoS 0 PUBLISH delivered to ``--subscribers`` sessions,
  divided by their number;
- ``shared_us``: one QoS 1 PUBLISH through a `$share` group of ``--subscribers`` members;
- ``subscribe_us``: SUBSCRIBE of a fresh filter while ``--filters`` are held;
- ``resume_per_message_us``: a persistent session resumed with ``--queued`` queued QoS 1
  messages, per message.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

from overlay.mqtt.broker import Broker, BrokerConfig, Send
from overlay.mqtt.packets import (
    MQTT5,
    Connect,
    Properties,
    Puback,
    Publish,
    Subscribe,
    Subscription,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ops", type=int, default=2000, help="operations per timed batch (default 2000)")
    parser.add_argument("--rounds", type=int, default=5, help="timed batches; the median is reported")
    parser.add_argument("--filters", type=int, default=1000, help="other subscriptions held (default 1000)")
    parser.add_argument("--subscribers", type=int, default=100, help="fan-out / share group size (default 100)")
    parser.add_argument("--queued", type=int, default=500, help="messages queued for the resume (default 500)")


def _per_op(rounds: int, count: int, fn: Callable[[int], object]) -> float:
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        for i in range(count):
            fn(i)
        samples.append((time.perf_counter() - start) / count * 1e6)
    return round(statistics.median(samples), 2)


def _client(b: Broker, name: str, **kw: Any) -> None:
    b.connect(name, 0.0)
    b.receive(name, Connect(name, MQTT5, keep_alive=0, **kw), 0.0)


def _broker(filters: int) -> Broker:
    b = Broker(BrokerConfig(max_subscriptions_per_session=10**9, max_inflight=65535))
    _client(b, "noise")
    subs = [Subscription(f"n/{i % 37}/+/{i}" if i % 3 else f"x/{i}/#") for i in range(filters)]
    for i in range(0, len(subs), 50):
        b.receive("noise", Subscribe(1, tuple(subs[i : i + 50])), 0.0)
    _client(b, "pub")
    return b


def _publish_cost(args: argparse.Namespace, qos: int) -> float:
    b = _broker(args.filters)
    _client(b, "sub")
    b.receive("sub", Subscribe(1, (Subscription("t/a", qos),)), 0.0)

    def one(i: int) -> None:
        for out in b.receive("pub", Publish("t/a", b"x" * 32, qos, packet_id=1 if qos else None), 0.0):
            if isinstance(out, Send) and out.conn == "sub" and isinstance(out.packet, Publish) and qos:
                b.receive("sub", Puback(out.packet.packet_id or 0), 0.0)

    return _per_op(args.rounds, args.ops, one)


def _fanout(args: argparse.Namespace, shared: bool) -> float:
    b = _broker(args.filters)
    topic_filter = "$share/g/f/+" if shared else "f/+"
    for i in range(args.subscribers):
        _client(b, f"s{i}")
        b.receive(f"s{i}", Subscribe(1, (Subscription(topic_filter, 1 if shared else 0),)), 0.0)

    def one(i: int) -> None:
        for out in b.receive("pub", Publish("f/x", b"y" * 32, 1 if shared else 0, packet_id=1 if shared else None), 0.0):
            if shared and isinstance(out, Send) and isinstance(out.packet, Publish):
                b.receive(out.conn, Puback(out.packet.packet_id or 0), 0.0)

    ops = max(1, args.ops // (1 if shared else args.subscribers))
    cost = _per_op(args.rounds, ops, one)
    return cost if shared else round(cost / args.subscribers, 3)


def _subscribe_cost(args: argparse.Namespace) -> float:
    b = _broker(args.filters)
    _client(b, "sub")
    counter = iter(range(10**9))
    return _per_op(args.rounds, args.ops, lambda i: b.receive("sub", Subscribe(1, (Subscription(f"s/{next(counter)}/+"),)), 0.0))


def _resume_cost(args: argparse.Namespace) -> float:
    samples = []
    for _ in range(args.rounds):
        b = Broker(BrokerConfig(max_queued_messages=args.queued, max_inflight=65535))
        expiry = Properties(session_expiry_interval=600)
        _client(b, "sub", properties=expiry)
        b.receive("sub", Subscribe(1, (Subscription("q", 1),)), 0.0)
        b.connection_lost("sub", 0.0)
        _client(b, "pub")
        for _ in range(args.queued):
            b.receive("pub", Publish("q", b"z" * 32, 1, packet_id=1), 0.0)
        start = time.perf_counter()
        b.connect("sub2", 1.0)
        outs = b.receive("sub2", Connect("sub", MQTT5, clean_start=False, keep_alive=0, properties=expiry), 1.0)
        samples.append((time.perf_counter() - start) / args.queued * 1e6)
        assert sum(isinstance(o, Send) and isinstance(o.packet, Publish) for o in outs) == args.queued
    return round(statistics.median(samples), 2)


def run(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "publish_qos0_us": _publish_cost(args, 0),
        "publish_qos1_us": _publish_cost(args, 1),
        "fanout_per_subscriber_us": _fanout(args, shared=False),
        "shared_us": _fanout(args, shared=True),
        "subscribe_us": _subscribe_cost(args),
        "resume_per_message_us": _resume_cost(args),
        "filters": args.filters,
        "subscribers": args.subscribers,
        "queued": args.queued,
    }
