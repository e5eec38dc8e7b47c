"""Metrics: exposition format 0.0.4 text and the /metrics HTTP endpoint on loopback."""

from __future__ import annotations

import asyncio
import math
import re
import threading

import pytest

from edgeagent.metrics import (
    CONTENT_TYPE,
    MAX_REQUEST_BYTES,
    Registry,
    agent_metrics,
    format_float,
    serve_metrics,
)

# One sample line of exposition format 0.0.4: name, optional {labels}, value.
SAMPLE_RE = re.compile(
    r'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{([a-zA-Z_][a-zA-Z0-9_]*="([^"\\\n]|\\.)*",?)*\})? '
    r"(-?[0-9.e+-]+|[+-]Inf|NaN)$"
)
TIMEOUT = 10.0


def parse_exposition(text: str) -> dict[str, float]:
    """Check every line's shape; return {"name{labels}": value}."""
    assert text.endswith("\n")
    samples: dict[str, float] = {}
    typed: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# HELP "):
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind in {"counter", "gauge", "histogram", "summary", "untyped"}
            typed.add(name)
            continue
        assert SAMPLE_RE.match(line), line
        key, value = line.rsplit(" ", 1)
        base = re.sub(r"(_bucket|_sum|_count)$", "", key.split("{")[0])
        assert base in typed or key.split("{")[0] in typed, f"no TYPE before {line}"
        samples[key] = float(value)
    return samples


def test_counter_and_gauge_render_with_help_type_and_labels() -> None:
    reg = Registry()
    drops = reg.counter("edgeagent_packets_dropped_total", "Dropped packets.", ["reason"])
    drops.labels(reason="decrypt").inc()
    drops.labels(reason="decrypt").inc(2)
    drops.labels(reason="decode").inc()
    health = reg.gauge("edgeagent_local_health_score", "Local health.\nSecond line.")
    health.set(3)
    health.dec()
    text = reg.render()
    assert "# HELP edgeagent_local_health_score Local health.\\nSecond line.\n" in text
    assert "# TYPE edgeagent_packets_dropped_total counter\n" in text
    samples = parse_exposition(text)
    assert samples['edgeagent_packets_dropped_total{reason="decrypt"}'] == 3
    assert samples['edgeagent_packets_dropped_total{reason="decode"}'] == 1
    assert samples["edgeagent_local_health_score"] == 2
    assert drops.value(reason="decrypt") == 3


def test_counter_of_follows_running_totals_and_never_goes_down() -> None:
    registry = Registry()
    totals = {"issued": 2, "forged": 0}
    counter = registry.counter_of("edgeagent_x_total", "things", "outcome", lambda: totals)
    registry.render()
    registry.render()  # the same totals again add nothing
    assert counter.value(outcome="issued") == 2 and counter.value(outcome="forged") == 0
    totals["forged"] = 3
    totals["issued"] = 1  # a source that went down (a restart of its owner) never lowers it
    text = registry.render()
    assert 'edgeagent_x_total{outcome="forged"} 3' in text
    assert counter.value(outcome="issued") == 2


def test_label_values_are_escaped() -> None:
    reg = Registry()
    g = reg.gauge("g", "x", ["node"])
    g.labels(node='a"b\\c\nd').set(1)
    line = reg.render().splitlines()[-1]
    assert line == 'g{node="a\\"b\\\\c\\nd"} 1'
    parse_exposition(reg.render())


def test_histogram_buckets_are_cumulative_with_sum_and_count() -> None:
    reg = Registry()
    h = reg.histogram("rtt_seconds", "RTT.", buckets=[0.01, 0.1])
    for v in (0.005, 0.05, 0.05, 3.0):
        h.observe(v)
    samples = parse_exposition(reg.render())
    assert samples['rtt_seconds_bucket{le="0.01"}'] == 1
    assert samples['rtt_seconds_bucket{le="0.1"}'] == 3
    assert samples['rtt_seconds_bucket{le="+Inf"}'] == 4
    assert samples["rtt_seconds_count"] == 4
    assert math.isclose(samples["rtt_seconds_sum"], 3.105)


def test_format_float_special_values() -> None:
    assert [format_float(v) for v in (3.0, 0.25, math.inf, -math.inf, math.nan)] == [
        "3",
        "0.25",
        "+Inf",
        "-Inf",
        "NaN",
    ]


def test_misuse_is_rejected() -> None:
    reg = Registry()
    c = reg.counter("c_total", "c", ["a"])
    with pytest.raises(ValueError):
        c.labels(b="x")
    with pytest.raises(ValueError):
        c.inc()  # labelled family needs .labels()
    with pytest.raises(ValueError):
        c.labels(a="x").inc(-1)
    with pytest.raises(ValueError):
        reg.counter("c_total", "again")
    with pytest.raises(ValueError):
        reg.gauge("bad name", "x")


def test_collect_hook_refreshes_gauges_at_render() -> None:
    reg = Registry()
    members = reg.gauge("members", "m", ["state"])
    view = {"alive": 3, "dead": 1}

    def refresh() -> None:
        for state, count in view.items():
            members.labels(state=state).set(count)

    reg.on_collect(refresh)
    assert parse_exposition(reg.render())['members{state="alive"}'] == 3
    view["alive"] = 5
    assert parse_exposition(reg.render())['members{state="alive"}'] == 5


def test_counts_from_another_thread_are_not_lost() -> None:
    reg = Registry()
    c = reg.counter("n_total", "n")

    def count() -> None:
        for _ in range(5000):
            c.inc()

    threads = [threading.Thread(target=count) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert c.value() == 20_000


def test_agent_metrics_registers_standard_names() -> None:
    reg = Registry()
    m = agent_metrics(reg)
    m.members.labels(state="alive").set(4)
    m.packets_dropped.labels(reason="decrypt").inc()
    m.probe_rtt.observe(0.002)
    samples = parse_exposition(reg.render())
    assert samples['edgeagent_members{state="alive"}'] == 4
    assert samples['edgeagent_packets_dropped_total{reason="decrypt"}'] == 1
    assert samples["edgeagent_probe_rtt_seconds_count"] == 1


async def http(port: int, request: bytes) -> tuple[str, dict[str, str], bytes]:
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), TIMEOUT)
    writer.write(request)
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), TIMEOUT)
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return lines[0], headers, body


async def test_http_endpoint_serves_metrics_on_port_zero() -> None:
    reg = Registry()
    reg.counter("hits_total", "Hits.").inc(7)
    server = await serve_metrics(reg, "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        status, headers, body = await http(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status == "HTTP/1.1 200 OK"
        assert headers["Content-Type"] == CONTENT_TYPE
        assert int(headers["Content-Length"]) == len(body)
        assert parse_exposition(body.decode())["hits_total"] == 7
    finally:
        server.close()
        await server.wait_closed()


async def test_http_endpoint_refuses_other_paths_methods_and_huge_requests() -> None:
    server = await serve_metrics(Registry(), "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        assert (await http(port, b"GET / HTTP/1.1\r\n\r\n"))[0] == "HTTP/1.1 404 Not Found"
        assert (await http(port, b"POST /metrics HTTP/1.1\r\n\r\n"))[
            0
        ] == "HTTP/1.1 405 Method Not Allowed"
        assert (await http(port, b"garbage\r\n\r\n"))[0] == "HTTP/1.1 400 Bad Request"
        # over the limit, but small enough that the server has read it all before it closes
        huge = b"GET /metrics HTTP/1.1\r\nX: " + b"a" * (MAX_REQUEST_BYTES + 1000) + b"\r\n\r\n"
        assert (await http(port, huge))[0] == "HTTP/1.1 431 Request Header Fields Too Large"
        status, _, body = await http(port, b"HEAD /metrics HTTP/1.1\r\n\r\n")
        assert status == "HTTP/1.1 200 OK" and body == b""
    finally:
        server.close()
        await server.wait_closed()


def test_feed_exports_per_kind_gossip_counters() -> None:
    import random

    from edgeagent.driver import DriverStats, take_view
    from edgeagent.features.metrics import MetricsFeed
    from gossip.config import lan
    from gossip.core import Membership
    from gossip.messages import Ping, StateUpdate
    from testbed.sim import make_keyring, seal

    core = Membership("a", ("10.0.0.1", 7946), lan(), random.Random(1), 0.0, keyring=make_keyring(random.Random(1)))
    core.receive(seal([Ping(1, "a", "b", ("10.0.0.2", 7946)), StateUpdate("b", 1, "k", "v")], to=core.name), ("10.0.0.2", 7946), 0.0)
    reg = Registry()
    feed = MetricsFeed(reg, agent_metrics(reg))
    feed.update(take_view(core, DriverStats(), 0.0))
    samples = parse_exposition(reg.render())
    received = 'direction="received",kind="{}"'
    assert samples["edgeagent_gossip_messages_total{" + received.format("ping") + "}"] == 1
    assert samples["edgeagent_gossip_message_bytes_total{" + received.format("state") + "}"] == (
        core.stats.kind_bytes_in["state"]) > 0
    sent = samples["edgeagent_gossip_message_bytes_total{" + 'direction="sent",kind="ack"' + "}"]
    assert sent == core.stats.kind_bytes_out["ack"] > 0  # the ack to the ping
