"""Persistent MQTT sessions to bytes and back (overlay/mqtt/persist.py): what a restart keeps."""

from __future__ import annotations

import random

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from overlay.mqtt import persist
from overlay.mqtt.packets import Properties, Puback, Publish, Subscription
from tests.overlay.test_mqtt_broker import Net, c4, c5, payloads


def offline_with_messages() -> Net:
    net = Net()
    net.open("s", c4("dev", clean=False))
    net.subscribe("s", Subscription("t/#", 1), Subscription("$share/g/x", 1))
    net.lose("s")
    net.open("p", c4("pub"))
    for i in range(3):
        net.send("p", Publish(f"t/{i}", b"m%d" % i, 1, packet_id=i + 1))
    net.send("p", Publish("t/q0", b"zero", 0))
    net.take("p")
    return net


def test_offline_session_keeps_subscriptions_and_qos1_queue_across_restart() -> None:
    data = persist.dump(offline_with_messages().broker, 0.0)[0]
    again = Net()
    assert persist.load(again.broker, data, 0.0) == 1
    assert again.broker.filters() == {"t/#", "$share/g/x"}
    ack = again.open("s", c4("dev", clean=False))
    assert ack.session_present
    assert payloads(again.publishes("s")) == [b"m0", b"m1", b"m2"]  # QoS 0 is not kept


def test_unacknowledged_inflight_is_sent_again_and_acked_ones_are_not() -> None:
    net = Net()
    net.open("s", c5("dev", clean=False, expiry=600))
    net.subscribe("s", Subscription("t", 1))
    net.open("p", c4("pub"))
    net.send("p", Publish("t", b"a", 1, packet_id=1, properties=Properties(content_type="x")))
    net.send("p", Publish("t", b"b", 1, packet_id=2))
    got = net.publishes("s")
    net.send("s", Puback(got[0].packet_id or 0))  # "a" delivered, "b" not acknowledged
    data = persist.dump(net.broker, net.now)[0]
    again = Net()
    assert persist.load(again.broker, data, 0.0) == 1
    again.open("s", c5("dev", clean=False, expiry=600))
    assert payloads(again.publishes("s")) == [b"b"]


def test_clean_sessions_and_expired_ones_are_not_kept() -> None:
    net = Net()
    net.open("c", c4("clean"))
    net.subscribe("c", Subscription("t", 1))
    net.open("e", c5("short", clean=False, expiry=5))
    net.subscribe("e", Subscription("u", 1))
    net.lose("e")
    data = persist.dump(net.broker, net.now + 10)[0]  # "short" has no time left
    again = Net()
    assert persist.load(again.broker, data, 0.0) == 0
    assert again.broker.filters() == set()


def test_restored_session_expires_with_the_time_it_had_left() -> None:
    net = Net()
    net.open("s", c5("dev", clean=False, expiry=100))
    net.subscribe("s", Subscription("t", 1))
    net.lose("s")
    data = persist.dump(net.broker, 60.0)[0]  # 40 s left
    again = Net()
    persist.load(again.broker, data, 0.0)
    again.advance(39)
    assert again.broker.session("dev") is not None
    again.advance(2)
    assert again.broker.session("dev") is None


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_load_is_total_on_garbage(data: bytes) -> None:
    try:
        persist.load(Net().broker, data, 0.0)
    except persist.PersistDecodeError:
        pass


def test_load_refuses_a_mangled_saved_file() -> None:
    doc = msgpack.unpackb(persist.dump(offline_with_messages().broker, 0.0)[0])
    rng = random.Random(3)
    refused = 0
    for _ in range(200):
        bad = msgpack.unpackb(msgpack.packb(doc))
        session = bad[1][0]
        i = rng.randrange(6)
        session[i] = rng.choice([None, -1, "x" * 3, [1], {"a": 1}, 2.5])
        try:
            persist.load(Net().broker, msgpack.packb(bad), 0.0)
        except persist.PersistDecodeError:
            refused += 1
    assert refused > 100
    with pytest.raises(persist.PersistDecodeError):
        persist.load(Net().broker, msgpack.packb([2, []]), 0.0)


def test_dump_keeps_messages_under_its_byte_limit_and_counts_the_rest() -> None:
    net = offline_with_messages()
    data, skipped = persist.dump(
        net.broker, 0.0, limit=2 * (persist.ROW_OVERHEAD + 3 * 4 + 2)
    )  # two of three
    assert skipped == 1
    again = Net()
    persist.load(again.broker, data, 0.0)
    again.open("s", c4("dev", clean=False))
    assert payloads(again.publishes("s")) == [b"m0", b"m1"]
