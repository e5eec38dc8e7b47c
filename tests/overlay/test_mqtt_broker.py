"""The MQTT broker core on virtual time: sessions, QoS, retained, wills, $share, bounds."""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Hashable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from overlay.mqtt.broker import Broker, BrokerConfig, Close, Output, RouteOut, Send
from overlay.mqtt.packets import (
    MQTT5,
    MQTT311,
    Connack,
    Connect,
    Disconnect,
    Packet,
    PacketType,
    Pingreq,
    Pingresp,
    Properties,
    Puback,
    Publish,
    Reason,
    Suback,
    Subscribe,
    Subscription,
    Unsuback,
    Unsubscribe,
    Will,
)
from overlay.mqtt.retained import RetainedStore
from overlay.mqtt.topics import (
    SubscriptionTrie,
    filter_matches,
    parse_filter,
    valid_filter,
    valid_topic_name,
)


class Net:
    """A broker and the packets it sent to each connection, on a virtual clock."""

    def __init__(self, config: BrokerConfig | None = None) -> None:
        self.broker = Broker(config or BrokerConfig(), random.Random(7))
        self.now = 0.0
        self.inbox: dict[Hashable, list[Packet]] = {}
        self.closed: dict[Hashable, int] = {}
        self.routed: list[RouteOut] = []

    def feed(self, outs: list[Output]) -> None:
        for out in outs:
            if isinstance(out, Send):
                assert out.conn not in self.closed, "sent after close"
                self.inbox.setdefault(out.conn, []).append(out.packet)
            elif isinstance(out, Close):
                self.closed[out.conn] = out.reason
            else:
                self.routed.append(out)

    def open(self, conn: Hashable, connect: Connect) -> Connack:
        self.closed.pop(conn, None)
        self.feed(self.broker.connect(conn, self.now))
        self.feed(self.broker.receive(conn, connect, self.now))
        first = self.inbox[conn].pop(0)
        assert isinstance(first, Connack)
        return first

    def send(self, conn: Hashable, packet: Packet) -> None:
        self.feed(self.broker.receive(conn, packet, self.now))

    def lose(self, conn: Hashable) -> None:
        self.feed(self.broker.connection_lost(conn, self.now))
        self.closed.setdefault(conn, -1)

    def advance(self, dt: float) -> None:
        target = self.now + dt
        while (deadline := self.broker.next_deadline()) is not None and deadline <= target:
            self.now = max(self.now, deadline)
            self.feed(self.broker.handle_timeout(self.now))
        self.now = target

    def take(self, conn: Hashable) -> list[Packet]:
        return self.inbox.pop(conn, [])

    def publishes(self, conn: Hashable) -> list[Publish]:
        return [p for p in self.take(conn) if isinstance(p, Publish)]

    def subscribe(self, conn: Hashable, *subs: Subscription, sub_id: int | None = None) -> Suback:
        props = Properties(subscription_identifiers=(sub_id,)) if sub_id else Properties()
        self.send(conn, Subscribe(1, subs, props))
        packets = self.take(conn)
        assert isinstance(packets[0], Suback)
        self.inbox[conn] = packets[1:]
        return packets[0]


def c4(
    client_id: str, clean: bool = True, keep_alive: int = 60, will: Will | None = None
) -> Connect:
    return Connect(client_id, MQTT311, clean, keep_alive, will=will)


def c5(
    client_id: str,
    clean: bool = True,
    expiry: int | None = None,
    keep_alive: int = 60,
    will: Will | None = None,
    receive_maximum: int | None = None,
) -> Connect:
    props = Properties(session_expiry_interval=expiry, receive_maximum=receive_maximum)
    return Connect(client_id, MQTT5, clean, keep_alive, will=will, properties=props)


def payloads(pubs: list[Publish]) -> list[bytes]:
    return [p.payload for p in pubs]


# ----------------------------------------------------------------------------- CONNECT


def test_first_packet_must_be_connect() -> None:
    net = Net()
    net.feed(net.broker.connect("a", 0.0))
    net.send("a", Pingreq())
    assert net.closed["a"] == Reason.PROTOCOL_ERROR
    assert net.broker.connection_count == 0
    net.send("a", c4("x"))  # ignored: the connection is gone
    assert net.broker.stats.packets_after_close == 1


def test_second_connect_is_a_protocol_error() -> None:
    net = Net()
    net.open("a", c5("x"))
    net.send("a", c5("x"))
    assert net.take("a") == [Disconnect(Reason.PROTOCOL_ERROR)]
    assert net.closed["a"] == Reason.PROTOCOL_ERROR


def test_connect_timeout_closes_silent_transport() -> None:
    net = Net(BrokerConfig(connect_timeout=5.0))
    net.feed(net.broker.connect("a", 0.0))
    net.advance(4.9)
    assert "a" not in net.closed
    net.advance(0.2)
    assert "a" in net.closed and net.broker.connection_count == 0


def test_empty_client_id_is_assigned_at_level5_and_refused_for_level4_persistent() -> None:
    net = Net()
    ack = net.open("a", c5(""))
    assigned = ack.properties.assigned_client_identifier
    assert assigned and assigned.startswith("auto-")
    assert net.broker.session(assigned) is not None
    assert net.open("b", c4("", clean=True)).reason == Reason.SUCCESS
    assert net.open("c", c4("", clean=False)).reason == Reason.CLIENT_ID_NOT_VALID
    assert "c" in net.closed


def test_client_id_too_long_is_refused() -> None:
    net = Net(BrokerConfig(max_client_id_len=23))
    assert net.open("a", c4("x" * 24)).reason == Reason.CLIENT_ID_NOT_VALID
    assert net.open("b", c4("x" * 23)).reason == Reason.SUCCESS


def test_authorize_hook_refuses_bad_password() -> None:
    def authorize(client_id: str, username: str | None, password: bytes | None) -> bool:
        return username == "u" and password == b"p"

    net = Net(BrokerConfig(authorize=authorize))
    bad = Connect("x", MQTT5, username="u", password=b"nope")
    assert net.open("a", bad).reason == Reason.BAD_USERNAME_OR_PASSWORD
    assert "a" in net.closed and net.broker.session_count == 0
    good = Connect("x", MQTT5, username="u", password=b"p")
    assert net.open("b", good).reason == Reason.SUCCESS


def test_takeover_closes_old_connection_and_publishes_its_will() -> None:
    net = Net()
    net.open("watch", c5("watch"))
    net.subscribe("watch", Subscription("wills/#"))
    net.open("old", c5("dev", will=Will("wills/dev", b"gone")))
    net.open("new", c5("dev", clean=False, expiry=60))
    assert net.take("old") == [Disconnect(Reason.SESSION_TAKEN_OVER)]
    assert net.closed["old"] == Reason.SESSION_TAKEN_OVER
    assert payloads(net.publishes("watch")) == [b"gone"]
    assert net.broker.stats.takeovers == 1
    net.lose("old")  # the adapter reporting the close it was told to do: a no-op
    assert net.broker.session("dev") is not None and net.broker.connection_count == 2


def test_takeover_keeps_persistent_session_subscriptions() -> None:
    net = Net()
    net.open("old", c4("dev", clean=False))
    net.subscribe("old", Subscription("t", 1))
    ack = net.open("new", c4("dev", clean=False))
    assert ack.session_present
    net.open("pub", c4("pub"))
    net.send("pub", Publish("t", b"1"))
    assert payloads(net.publishes("new")) == [b"1"]
    assert net.publishes("old") == []


def test_clean_start_discards_the_session() -> None:
    net = Net()
    net.open("a", c4("dev", clean=False))
    net.subscribe("a", Subscription("t", 1))
    net.lose("a")
    ack = net.open("b", c4("dev", clean=True))
    assert not ack.session_present
    net.open("pub", c4("pub"))
    net.send("pub", Publish("t", b"1", qos=1, packet_id=1))
    assert net.publishes("b") == []
    assert net.broker.filters() == set()


def test_session_expiry_v5() -> None:
    net = Net()
    net.open("a", c5("dev", expiry=30))
    net.subscribe("a", Subscription("t", 1))
    net.lose("a")
    net.advance(29.0)
    assert net.open("b", c5("dev", clean=False, expiry=30)).session_present
    net.lose("b")
    net.advance(30.5)
    assert net.broker.session("dev") is None
    assert net.broker.stats.sessions_expired == 1
    assert not net.open("c", c5("dev", clean=False)).session_present


def test_session_expiry_is_capped_and_level4_persistent_uses_the_cap() -> None:
    net = Net(BrokerConfig(max_session_expiry=100))
    ack = net.open("a", c5("v5", expiry=0xFFFFFFFF))
    assert ack.properties.session_expiry_interval == 100
    net.open("b", c4("v4", clean=False))
    net.lose("a")
    net.lose("b")
    net.advance(99.0)
    assert net.broker.session("v5") is not None and net.broker.session("v4") is not None
    net.advance(2.0)
    assert net.broker.session_count == 0


def test_level4_clean_session_ends_with_connection() -> None:
    net = Net()
    net.open("a", c4("dev", clean=True))
    net.lose("a")
    assert net.broker.session_count == 0


def test_disconnect_may_not_raise_zero_expiry() -> None:
    net = Net()
    net.open("a", c5("dev", expiry=0))
    net.send("a", Disconnect(properties=Properties(session_expiry_interval=10)))
    assert net.take("a") == [Disconnect(Reason.PROTOCOL_ERROR)]
    net.open("b", c5("dev2", expiry=10))
    net.send("b", Disconnect(properties=Properties(session_expiry_interval=0)))
    assert net.closed["b"] == Reason.SUCCESS
    assert net.broker.session("dev2") is None


# ----------------------------------------------------------------------------- keep alive, wills


def test_will_on_keepalive_timeout() -> None:
    net = Net()
    net.open("watch", c4("watch", keep_alive=0))
    net.subscribe("watch", Subscription("status/+", 1))
    net.open("dev", c5("dev", keep_alive=10, will=Will("status/dev", b"offline", qos=1)))
    net.advance(14.9)
    assert "dev" not in net.closed
    net.advance(0.2)
    assert net.take("dev") == [Disconnect(Reason.KEEP_ALIVE_TIMEOUT)]
    assert net.closed["dev"] == Reason.KEEP_ALIVE_TIMEOUT
    (will,) = net.publishes("watch")
    assert (will.topic, will.payload, will.qos) == ("status/dev", b"offline", 1)
    assert net.broker.stats.keepalive_timeouts == 1
    assert [r.publish.topic for r in net.routed] == ["status/dev"]


def test_traffic_keeps_connection_alive() -> None:
    net = Net()
    net.open("dev", c4("dev", keep_alive=10))
    for _ in range(5):
        net.advance(14.0)
        net.send("dev", Pingreq())
        assert net.take("dev") == [Pingresp()]
    assert "dev" not in net.closed
    net.advance(15.1)
    assert "dev" in net.closed


def test_no_will_on_clean_disconnect_but_v5_disconnect_with_will_publishes() -> None:
    net = Net()
    net.open("watch", c4("watch"))
    net.subscribe("watch", Subscription("w/#"))
    net.open("a", c4("a", will=Will("w/a", b"a")))
    net.send("a", Disconnect())
    net.open("b", c5("b", will=Will("w/b", b"b")))
    net.send("b", Disconnect(Reason.DISCONNECT_WITH_WILL))
    net.open("c", c4("c", will=Will("w/c", b"c")))
    net.lose("c")
    assert payloads(net.publishes("watch")) == [b"b", b"c"]


def test_will_delay_is_cancelled_by_reconnect_and_published_after_delay() -> None:
    net = Net()
    net.open("watch", c4("watch", keep_alive=0))
    net.subscribe("watch", Subscription("w/#"))
    will = Will("w/dev", b"late", properties=Properties(will_delay_interval=10))
    net.open("a", c5("dev", expiry=100, will=will))
    net.lose("a")
    net.advance(9.0)
    net.open("b", c5("dev", clean=False, expiry=100, will=will))
    net.advance(5.0)
    assert net.publishes("watch") == []  # cancelled by the reconnect
    net.lose("b")
    net.advance(9.9)
    assert net.publishes("watch") == []
    net.advance(0.2)
    (late,) = net.publishes("watch")
    assert late.payload == b"late" and late.properties.will_delay_interval is None


def test_will_delay_longer_than_session_expiry_fires_at_session_end() -> None:
    net = Net()
    net.open("watch", c4("watch", keep_alive=0))
    net.subscribe("watch", Subscription("w"))
    will = Will("w", b"x", properties=Properties(will_delay_interval=100))
    net.open("a", c5("dev", expiry=5, will=will))
    net.lose("a")
    net.advance(4.9)
    assert net.publishes("watch") == []
    net.advance(0.2)
    assert payloads(net.publishes("watch")) == [b"x"]


# ----------------------------------------------------------------------------- QoS


def test_qos1_unacked_is_resent_with_dup_only_on_session_resume() -> None:
    net = Net()
    net.open("sub", c4("sub", clean=False, keep_alive=0))
    net.subscribe("sub", Subscription("t", 1))
    net.open("pub", c4("pub", keep_alive=0))
    net.send("pub", Publish("t", b"m", qos=1, packet_id=9))
    assert net.take("pub") == [Puback(9)]
    (first,) = net.publishes("sub")
    assert first.qos == 1 and not first.dup
    net.advance(3600.0)
    assert net.publishes("sub") == []  # never resent on a live connection
    net.lose("sub")
    assert net.open("sub2", c4("sub", clean=False)).session_present
    (again,) = net.publishes("sub2")
    assert again.dup and again.packet_id == first.packet_id and again.payload == b"m"
    net.send("sub2", Puback(again.packet_id or 0))
    net.lose("sub2")
    net.open("sub3", c4("sub", clean=False))
    assert net.publishes("sub3") == []
    assert net.broker.stats.resent == 1


def test_hold_acks_puts_the_qos1_puback_in_the_route_out_not_on_the_wire() -> None:
    net = Net(BrokerConfig(hold_acks=True))
    net.open("keep", c5("keep", expiry=300))
    net.subscribe("keep", Subscription("p/#", 1))
    net.open("live", c4("live"))
    net.subscribe("live", Subscription("c/#", 1))
    net.open("pub", c4("pub", keep_alive=0))
    net.send("pub", Publish("p/x", b"1", qos=1, packet_id=3))
    net.send("pub", Publish("c/x", b"2", qos=1, packet_id=4))
    net.send("pub", Publish("c/x", b"3", qos=0))
    net.send("pub", Publish("c/x", b"4", qos=2, packet_id=5))
    assert net.take("pub") == [Puback(5, PacketType.PUBREC)]  # QoS 2 is not held
    acks = [(r.ack, r.persisted) for r in net.routed]
    assert acks == [
        (Send("pub", Puback(3)), True),  # a persistent session took it: save first
        (Send("pub", Puback(4)), False),
        (None, False),
        (None, False),
    ]


def test_session_resume_delivers_queued_messages_in_order() -> None:
    net = Net()
    net.open("sub", c5("sub", expiry=300))
    net.subscribe("sub", Subscription("t/#", 1))
    net.lose("sub")
    net.open("pub", c4("pub"))
    for i in range(5):
        net.send("pub", Publish("t/x", b"%d" % i, qos=i % 2, packet_id=i + 1 if i % 2 else None))
    net.advance(60.0)
    assert net.open("sub2", c5("sub", clean=False, expiry=300)).session_present
    pubs = net.publishes("sub2")
    assert payloads(pubs) == [b"0", b"1", b"2", b"3", b"4"]
    assert [p.qos for p in pubs] == [0, 1, 0, 1, 0]
    assert all(p.packet_id is not None for p in pubs if p.qos)
    assert net.broker.stats.queued == 5


def test_inflight_window_follows_receive_maximum() -> None:
    net = Net()
    net.open("sub", c5("sub", receive_maximum=2))
    net.subscribe("sub", Subscription("t", 1))
    net.open("pub", c4("pub"))
    for i in range(5):
        net.send("pub", Publish("t", b"%d" % i, qos=1, packet_id=i + 1))
    sent = net.publishes("sub")
    assert payloads(sent) == [b"0", b"1"]
    net.send("sub", Puback(sent[0].packet_id or 0))
    more = net.publishes("sub")
    assert payloads(more) == [b"2"]
    net.send("sub", Puback(sent[1].packet_id or 0))
    net.send("sub", Puback(more[0].packet_id or 0))
    assert payloads(net.publishes("sub")) == [b"3", b"4"]
    assert len(net.broker.session("sub").inflight) == 2  # type: ignore[union-attr]


def test_level4_window_is_the_configured_default() -> None:
    net = Net(BrokerConfig(level4_inflight=3))
    net.open("sub", c4("sub"))
    net.subscribe("sub", Subscription("t", 2))
    net.open("pub", c4("pub"))
    for i in range(6):
        net.send("pub", Publish("t", b"x", qos=1, packet_id=i + 1))
    assert len(net.publishes("sub")) == 3


def test_qos2_inbound_is_delivered_once() -> None:
    net = Net()
    net.open("sub", c4("sub"))
    net.subscribe("sub", Subscription("t", 2))
    net.open("pub", c5("pub"))
    net.send("pub", Publish("t", b"once", qos=2, packet_id=5))
    assert net.take("pub") == [Puback(5, PacketType.PUBREC)]
    net.send("pub", Publish("t", b"once", qos=2, packet_id=5, dup=True))
    assert net.take("pub") == [Puback(5, PacketType.PUBREC)]
    assert payloads(net.publishes("sub")) == [b"once"]
    net.send("pub", Puback(5, PacketType.PUBREL))
    assert net.take("pub") == [Puback(5, PacketType.PUBCOMP)]
    net.send("pub", Puback(5, PacketType.PUBREL))
    assert net.take("pub") == [Puback(5, PacketType.PUBCOMP, Reason.PACKET_ID_NOT_FOUND)]
    net.send("pub", Publish("t", b"next", qos=2, packet_id=5))  # the id is free again
    assert payloads(net.publishes("sub")) == [b"next"]
    assert net.broker.stats.qos2_duplicates == 1


def test_qos2_outbound_flow_and_pubrel_resent_on_resume() -> None:
    net = Net()
    net.open("sub", c4("sub", clean=False))
    net.subscribe("sub", Subscription("t", 2))
    net.open("pub", c4("pub"))
    net.send("pub", Publish("t", b"a", qos=2, packet_id=1))
    net.send("pub", Publish("t", b"b", qos=2, packet_id=2))
    a, b = net.publishes("sub")
    net.send("sub", Puback(a.packet_id or 0, PacketType.PUBREC))
    assert net.take("sub") == [Puback(a.packet_id or 0, PacketType.PUBREL)]
    net.lose("sub")
    net.open("sub2", c4("sub", clean=False))
    resent = net.take("sub2")
    assert resent == [Puback(a.packet_id or 0, PacketType.PUBREL), replace_dup(b)]
    net.send("sub2", Puback(a.packet_id or 0, PacketType.PUBCOMP))
    net.send("sub2", Puback(b.packet_id or 0, PacketType.PUBREC))
    net.send("sub2", Puback(b.packet_id or 0, PacketType.PUBCOMP))
    assert not net.broker.session("sub").inflight  # type: ignore[union-attr]


def replace_dup(p: Publish) -> Publish:
    return Publish(p.topic, p.payload, p.qos, p.retain, True, p.packet_id, p.properties)


def test_qos_is_downgraded_to_the_granted_qos_and_max_qos() -> None:
    net = Net(BrokerConfig(max_qos=1))
    net.open("sub", c4("sub"))
    assert net.subscribe("sub", Subscription("t", 2)).reasons == (1,)
    net.open("pub", c5("pub"))
    net.send("pub", Publish("t", b"x", qos=1, packet_id=1))
    assert [p.qos for p in net.publishes("sub")] == [1]
    net.send("pub", Publish("t", b"x", qos=2, packet_id=2))
    assert net.closed["pub"] == Reason.QOS_NOT_SUPPORTED


def test_packet_ids_skip_ids_in_flight_and_wrap() -> None:
    net = Net()
    net.open("sub", c5("sub", receive_maximum=3))
    net.subscribe("sub", Subscription("t", 1))
    net.open("pub", c4("pub"))
    ids: list[int] = []
    for i in range(70000):
        net.send("pub", Publish("t", b"", qos=1, packet_id=1))
        for p in net.publishes("sub"):
            assert p.packet_id is not None
            ids.append(p.packet_id)
            if i % 3:  # leave some unacked for a while
                net.send("sub", Puback(p.packet_id))
        net.take("pub")
        if len(net.broker.session("sub").inflight) == 3:  # type: ignore[union-attr]
            for pid in list(net.broker.session("sub").inflight):  # type: ignore[union-attr]
                net.send("sub", Puback(pid))
                ids.extend(p.packet_id or 0 for p in net.publishes("sub"))
    assert 1 <= min(ids) and max(ids) == 65535
    assert net.broker.stats.queue_dropped_new == 0


# ----------------------------------------------------------------------------- queue bounds


def test_offline_queue_drops_oldest_qos0_first_then_new() -> None:
    net = Net(BrokerConfig(max_queued_messages=3))
    net.open("sub", c4("sub", clean=False))
    net.subscribe("sub", Subscription("t", 1))
    net.lose("sub")
    net.open("pub", c4("pub"))
    net.send("pub", Publish("t", b"q0-a"))
    net.send("pub", Publish("t", b"q1-a", qos=1, packet_id=1))
    net.send("pub", Publish("t", b"q0-b"))
    net.send("pub", Publish("t", b"q1-b", qos=1, packet_id=2))  # drops q0-a
    net.send("pub", Publish("t", b"q1-c", qos=1, packet_id=3))  # drops q0-b
    net.send("pub", Publish("t", b"q1-d", qos=1, packet_id=4))  # no QoS 0 left: dropped
    stats = net.broker.stats
    assert (stats.queue_dropped_qos0, stats.queue_dropped_new) == (2, 1)
    net.open("sub2", c4("sub", clean=False))
    assert payloads(net.publishes("sub2")) == [b"q1-a", b"q1-b", b"q1-c"]


def test_offline_queue_is_bounded_in_bytes() -> None:
    net = Net(BrokerConfig(max_queued_bytes=1000))
    net.open("sub", c4("sub", clean=False))
    net.subscribe("sub", Subscription("t", 1))
    net.lose("sub")
    net.open("pub", c4("pub"))
    for i in range(10):
        net.send("pub", Publish("t", b"x" * 300, qos=1, packet_id=i + 1))
    s = net.broker.session("sub")
    assert s is not None and s.queued_bytes <= 1000 and len(s.queue) == 2
    assert net.broker.stats.queue_dropped_new == 8


def test_expired_messages_are_dropped_from_the_queue() -> None:
    net = Net()
    net.open("sub", c5("sub", expiry=1000))
    net.subscribe("sub", Subscription("t", 1))
    net.lose("sub")
    net.open("pub", c5("pub", keep_alive=0))
    short = Properties(message_expiry_interval=10)
    long = Properties(message_expiry_interval=100)
    net.send("pub", Publish("t", b"short", qos=1, packet_id=1, properties=short))
    net.send("pub", Publish("t", b"long", qos=1, packet_id=2, properties=long))
    net.advance(30.0)
    net.open("sub2", c5("sub", clean=False, expiry=1000))
    (msg,) = net.publishes("sub2")
    assert msg.payload == b"long" and msg.properties.message_expiry_interval == 70
    assert net.broker.stats.expired == 1


# ----------------------------------------------------------------------------- subscriptions


def test_overlapping_subscriptions_deliver_once_at_max_qos_with_every_id() -> None:
    net = Net()
    net.open("sub", c5("sub"))
    net.subscribe("sub", Subscription("a/+", 0), sub_id=1)
    net.subscribe("sub", Subscription("a/#", 1), sub_id=2)
    net.subscribe("sub", Subscription("a/b", 0))
    net.open("pub", c4("pub"))
    net.send("pub", Publish("a/b", b"x", qos=1, packet_id=1))
    (p,) = net.publishes("sub")
    assert p.qos == 1 and p.properties.subscription_identifiers == (1, 2)


def test_no_local_skips_own_messages() -> None:
    net = Net()
    net.open("me", c5("me"))
    net.subscribe("me", Subscription("chat", 0, no_local=True))
    net.send("me", Publish("chat", b"mine"))
    assert net.publishes("me") == []
    net.open("other", c5("other"))
    net.send("other", Publish("chat", b"theirs"))
    assert payloads(net.publishes("me")) == [b"theirs"]


def test_unsubscribe_reasons_and_effect() -> None:
    net = Net()
    net.open("sub", c5("sub"))
    net.subscribe("sub", Subscription("t"))
    net.send("sub", Unsubscribe(2, ("t", "nope")))
    assert net.take("sub") == [Unsuback(2, (Reason.SUCCESS, Reason.NO_SUBSCRIPTION_EXISTED))]
    net.send("sub", Publish("t", b"x"))
    assert net.publishes("sub") == []


def test_dollar_topics_are_not_matched_by_first_level_wildcards() -> None:
    net = Net()
    net.open("all", c4("all"))
    net.subscribe("all", Subscription("#"), Subscription("+/info"))
    net.open("sys", c4("sys"))
    net.subscribe("sys", Subscription("$SYS/#"))
    net.open("pub", c4("pub"))
    net.send("pub", Publish("$SYS/info", b"s"))
    net.send("pub", Publish("x/info", b"x"))
    assert payloads(net.publishes("all")) == [b"x"]
    assert payloads(net.publishes("sys")) == [b"s"]


def test_invalid_filters_are_refused_in_suback() -> None:
    net = Net(BrokerConfig(max_topic_levels=4))
    net.open("sub", c5("sub"))
    ack = net.subscribe(
        "sub",
        Subscription("a/#/b"),
        Subscription("a+"),
        Subscription("a/b/c/d/e"),
        Subscription("$share//t"),
        Subscription("a/b/c/d", 1),
    )
    assert ack.reasons == (Reason.TOPIC_FILTER_INVALID,) * 4 + (1,)


def test_subscriptions_per_session_bound() -> None:
    net = Net(BrokerConfig(max_subscriptions_per_session=2))
    net.open("sub", c5("sub"))
    ack = net.subscribe("sub", Subscription("a"), Subscription("b"), Subscription("c"))
    assert ack.reasons == (0, 0, Reason.QUOTA_EXCEEDED)
    assert net.subscribe("sub", Subscription("a", 1)).reasons == (1,)  # a replacement fits
    assert net.broker.stats.subscriptions_refused == 1


def test_publish_topic_validation_closes_the_connection() -> None:
    net = Net(BrokerConfig(max_topic_levels=3))
    net.open("a", c5("a"))
    net.send("a", Publish("a/b/c/d", b""))
    assert net.take("a") == [Disconnect(Reason.TOPIC_NAME_INVALID)]
    net.open("b", c4("b"))
    net.send("b", Publish("a/+", b""))
    assert net.take("b") == [] and "b" in net.closed
    net.open("c", c5("c"))
    net.send("c", Publish("t", b"", properties=Properties(topic_alias=1)))
    assert net.closed["c"] == Reason.TOPIC_ALIAS_INVALID


# ----------------------------------------------------------------------------- retained


def test_retained_set_replace_clear() -> None:
    net = Net()
    net.open("pub", c4("pub"))
    net.send("pub", Publish("r/t", b"one", retain=True))
    net.send("pub", Publish("r/t", b"two", qos=1, packet_id=1, retain=True))
    net.open("s1", c4("s1"))
    net.subscribe("s1", Subscription("r/#", 1))
    (p,) = net.publishes("s1")
    assert (p.payload, p.retain, p.qos) == (b"two", True, 1)
    net.send("pub", Publish("r/t", b"", retain=True))
    assert [x.payload for x in net.publishes("s1")] == [b""]  # the clear is delivered live
    net.open("s2", c4("s2"))
    net.subscribe("s2", Subscription("r/#", 1))
    assert net.publishes("s2") == []
    assert len(net.broker.retained) == 0
    stats = net.broker.stats
    assert (stats.retained_set, stats.retained_cleared) == (2, 1)


def test_live_delivery_clears_retain_unless_retain_as_published() -> None:
    net = Net()
    net.open("plain", c5("plain"))
    net.subscribe("plain", Subscription("t"))
    net.open("rap", c5("rap"))
    net.subscribe("rap", Subscription("t", retain_as_published=True))
    net.open("pub", c5("pub"))
    net.send("pub", Publish("t", b"x", retain=True))
    assert [p.retain for p in net.publishes("plain")] == [False]
    assert [p.retain for p in net.publishes("rap")] == [True]


@pytest.mark.parametrize(("handling", "first", "again"), [(0, 1, 1), (1, 1, 0), (2, 0, 0)])
def test_retain_handling(handling: int, first: int, again: int) -> None:
    net = Net()
    net.open("pub", c5("pub"))
    net.send("pub", Publish("t", b"kept", retain=True))
    net.open("sub", c5("sub"))
    net.subscribe("sub", Subscription("t", retain_handling=handling))
    assert len(net.publishes("sub")) == first
    net.subscribe("sub", Subscription("t", retain_handling=handling))
    assert len(net.publishes("sub")) == again


def test_retained_store_bounds_refuse_and_count() -> None:
    net = Net(BrokerConfig(max_retained_messages=2, max_retained_bytes=10_000))
    net.open("pub", c4("pub"))
    for topic in ("a", "b", "c"):
        net.send("pub", Publish(topic, b"v", retain=True))
    net.send("pub", Publish("a", b"w", retain=True))  # replacing fits
    net.send("pub", Publish("big", b"x" * 20_000, retain=True))
    assert sorted(i.topic for i in net.broker.retained_items()) == ["a", "b"]
    assert net.broker.retained.get("a").payload == b"w"  # type: ignore[union-attr]
    assert net.broker.stats.retained_refused == 2


def test_retained_from_mesh_is_last_writer_wins_with_tombstones() -> None:
    net = Net()
    b = net.broker
    props = Properties()
    assert b.set_retained_from_mesh("t", b"v2", 0, props, (2, "n1"), 0.0)
    assert not b.set_retained_from_mesh("t", b"v1", 0, props, (1, "n9"), 0.0)
    assert not b.set_retained_from_mesh("t", b"v2", 0, props, (2, "n1"), 0.0)
    assert b.set_retained_from_mesh("t", b"", 0, props, (3, "n2"), 0.0)
    assert not b.set_retained_from_mesh("t", b"old", 0, props, (2, "n5"), 0.0)
    assert b.retained.get("t") is None
    items = list(b.retained_items())
    assert [(i.topic, i.payload, i.stamp) for i in items] == [("t", b"", (3, "n2"))]
    assert b.stats.retained_stale == 3


def test_retained_store_tombstones_are_bounded() -> None:
    store = RetainedStore(10, 10_000, max_tombstones=2)
    for i in range(5):
        store.put(f"t{i}", b"", 0, float(i), 0.0)
    assert [i.topic for i in store.items()] == ["t3", "t4"]


def test_retained_message_expiry() -> None:
    net = Net()
    net.open("pub", c5("pub", keep_alive=0))
    net.send(
        "pub", Publish("t", b"x", retain=True, properties=Properties(message_expiry_interval=5))
    )
    net.advance(6.0)
    net.open("sub", c5("sub"))
    net.subscribe("sub", Subscription("t"))
    assert net.publishes("sub") == [] and len(net.broker.retained) == 0


# ----------------------------------------------------------------------------- $share


def test_share_rotation_delivers_each_message_exactly_once() -> None:
    net = Net()
    members = [f"m{i}" for i in range(4)]
    for m in members:
        net.open(m, c5(m))
        net.subscribe(m, Subscription("$share/g/jobs/+", 1))
    net.open("pub", c4("pub"))
    for i in range(40):
        net.send("pub", Publish(f"jobs/{i % 3}", b"%d" % i, qos=1, packet_id=i + 1))
    got: Counter[bytes] = Counter()
    per_member = {}
    for m in members:
        pubs = net.publishes(m)
        per_member[m] = len(pubs)
        got.update(payloads(pubs))
    assert got == Counter(b"%d" % i for i in range(40))
    assert set(per_member.values()) == {10}


def test_share_skips_offline_member_and_two_groups_each_get_a_copy() -> None:
    net = Net()
    for m in ("a", "b", "c"):
        net.open(m, c4(m, clean=False))
        net.subscribe(m, Subscription("$share/g/t", 0))
    net.open("other", c4("other"))
    net.subscribe("other", Subscription("$share/h/t", 0))
    net.lose("b")
    net.open("pub", c4("pub"))
    for i in range(6):
        net.send("pub", Publish("t", b"%d" % i))
    a, c = net.publishes("a"), net.publishes("c")
    assert len(a) == 3 and len(c) == 3
    assert sorted(payloads(a) + payloads(c)) == [b"%d" % i for i in range(6)]
    assert len(net.publishes("other")) == 6
    s = net.broker.session("b")
    assert s is not None and not s.queue  # connected members took every message


def test_share_queues_for_persistent_member_when_none_connected() -> None:
    net = Net()
    net.open("clean", c4("clean", clean=True))
    net.subscribe("clean", Subscription("$share/g/t", 1))
    net.open("keep", c4("keep", clean=False))
    net.subscribe("keep", Subscription("$share/g/t", 1))
    net.lose("keep")
    net.lose("clean")
    net.open("pub", c4("pub"))
    net.send("pub", Publish("t", b"x", qos=1, packet_id=1))
    net.open("keep2", c4("keep", clean=False))
    assert payloads(net.publishes("keep2")) == [b"x"]
    net.lose("keep2")
    net.open("keep3", c4("keep", clean=True))  # the last member's session ends
    net.lose("keep3")
    assert net.broker.filters() == set() and len(net.broker._shared) == 0


def test_share_subscribe_sends_no_retained() -> None:
    net = Net()
    net.open("pub", c4("pub"))
    net.send("pub", Publish("t", b"r", retain=True))
    net.open("m", c5("m"))
    net.subscribe("m", Subscription("$share/g/t"))
    assert net.publishes("m") == []
    net.send("m", Publish("t", b"live"))
    assert payloads(net.publishes("m")) == [b"live"]


def test_share_no_local_is_a_protocol_error() -> None:
    net = Net()
    net.open("m", c5("m", expiry=60))  # the session outlives the connection
    subs = (Subscription("ok"), Subscription("$share/g/t", no_local=True))
    net.send("m", Subscribe(1, subs))
    assert net.closed["m"] == Reason.PROTOCOL_ERROR
    assert net.broker.filters() == set()  # none of the packet applied


# ----------------------------------------------------------------------------- bounds


def test_max_connections_refuses_at_accept() -> None:
    net = Net(BrokerConfig(max_connections=2))
    net.open("a", c4("a"))
    net.open("b", c4("b"))
    net.feed(net.broker.connect("c", 0.0))
    assert net.closed["c"] == Reason.SERVER_BUSY
    assert net.broker.stats.connections_refused == 1
    net.lose("a")
    net.open("c", c4("c"))
    assert "c" not in net.closed


def test_max_sessions_evicts_offline_then_refuses() -> None:
    net = Net(BrokerConfig(max_sessions=2))
    net.open("a", c4("a", clean=False))
    net.lose("a")
    net.open("b", c4("b"))
    assert net.open("c", c4("c")).reason == Reason.SUCCESS  # evicted "a"
    assert net.broker.session("a") is None
    assert net.open("d", c4("d")).reason == Reason.SERVER_BUSY
    assert net.broker.stats.sessions_refused == 1


def test_inbound_qos2_ids_are_bounded_by_receive_maximum() -> None:
    net = Net(BrokerConfig(receive_maximum=2))
    ack = net.open("pub", c5("pub"))
    assert ack.properties.receive_maximum == 2
    for pid in (1, 2, 3):
        net.send("pub", Publish("t", b"", qos=2, packet_id=pid))
    assert net.closed["pub"] == Reason.RECEIVE_MAXIMUM_EXCEEDED


def test_timer_heap_stays_bounded_under_a_reconnect_loop() -> None:
    net = Net(BrokerConfig(max_session_expiry=10**6))
    for i in range(5000):
        net.open(i, c5("dev", clean=False, expiry=10**6, keep_alive=30))
        net.lose(i)
    assert len(net.broker._timers) < 200


def test_config_refuses_nonsense() -> None:
    with pytest.raises(ValueError, match="max_connections"):
        BrokerConfig(max_connections=0)
    with pytest.raises(ValueError, match="max_qos"):
        BrokerConfig(max_qos=3)


# ----------------------------------------------------------------------------- mesh hooks


def test_local_publish_is_routed_out_and_mesh_publish_is_delivered_not_routed() -> None:
    net = Net()
    net.open("sub", c4("sub"))
    net.subscribe("sub", Subscription("t/#", 1))
    net.open("pub", c4("pub"))
    net.send("pub", Publish("t/a", b"x", qos=1, packet_id=3, retain=True))
    (route,) = net.routed
    assert route.sender == "pub" and route.publish.packet_id is None
    assert route.publish.retain and route.retain_stamp == 0.0
    net.take("sub")
    net.feed(net.broker.publish_from_mesh(Publish("t/b", b"far", qos=1), "remote", net.now))
    assert payloads(net.publishes("sub")) == [b"far"]
    assert len(net.routed) == 1
    net.feed(net.broker.publish_from_mesh(Publish("t/#", b"bad"), None, net.now))
    assert net.broker.stats.mesh_publishes_refused == 1
    assert net.broker.filters() == {"t/#"}


# ----------------------------------------------------------------------------- matching


def naive_match(topic_filter: str, topic: str) -> bool:
    """The spec's rule by regular expression, independent of the trie."""
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False
    parts = []
    for level in topic_filter.split("/"):
        if level == "#":
            parts.append("#")
        elif level == "+":
            parts.append("[^/]*")
        else:
            parts.append(re.escape(level))
    pattern = "/".join(parts)
    if pattern == "#":
        pattern = ".*"
    elif pattern.endswith("/#"):
        pattern = pattern[:-2] + "(/.*)?"
    return re.fullmatch(pattern, topic) is not None


LEVEL = st.sampled_from(["a", "b", "", "$SYS", "$x", "c"])
TOPIC = st.lists(LEVEL, min_size=1, max_size=5).map("/".join).filter(lambda t: t != "")
FILTER_LEVEL = st.sampled_from(["a", "b", "", "+", "$SYS", "c"])
FILTER = (
    st.tuples(st.lists(FILTER_LEVEL, min_size=1, max_size=5), st.booleans())
    .map(lambda x: "/".join(x[0] + (["#"] if x[1] else [])))
    .filter(lambda f: f != "")
)


@settings(max_examples=300, derandomize=True, deadline=None)  # no wall-clock limit: shared CPUs
@given(st.lists(FILTER, min_size=1, max_size=12, unique=True), st.lists(TOPIC, max_size=12))
def test_trie_matches_naive_matcher(filters: list[str], topics: list[str]) -> None:
    trie: SubscriptionTrie[str, int] = SubscriptionTrie()
    for i, f in enumerate(filters):
        assert valid_filter(f, 32)
        trie.insert(f, "k", i)
    for topic in topics:
        assert valid_topic_name(topic, 32)
        got = sorted(f for f, _, _ in trie.match(topic))
        want = sorted(f for f in filters if naive_match(f, topic))
        assert got == want
        assert trie.match_values(topic) == [(k, v) for _, k, v in trie.match(topic)]
        assert all(filter_matches(f, topic) == (f in want) for f in filters)
    for f in filters:
        assert trie.remove(f, "k") is not None
    assert len(trie) == 0 and not trie._root.children


@pytest.mark.parametrize(
    ("topic_filter", "topic", "matches"),
    [
        ("sport/#", "sport", True),
        ("sport/#", "sport/tennis/player1", True),
        ("sport/+", "sport", False),
        ("sport/+", "sport/", True),
        ("+/+", "/finance", True),
        ("/+", "/finance", True),
        ("+", "/finance", False),
        ("#", "$SYS/x", False),
        ("+/monitor", "$SYS/monitor", False),
        ("$SYS/#", "$SYS/monitor", True),
        ("$SYS/+", "$SYS/monitor", True),
    ],
)
def test_spec_matching_examples(topic_filter: str, topic: str, matches: bool) -> None:
    trie: SubscriptionTrie[str, int] = SubscriptionTrie()
    trie.insert(topic_filter, "k", 1)
    assert bool(list(trie.match(topic))) is matches
    assert filter_matches(topic_filter, topic) is matches


def test_parse_share_filter() -> None:
    assert parse_filter("$share/g/a/#", 32) == parse_filter("$share/g/a/#", 32)
    parsed = parse_filter("$share/g/a/#", 32)
    assert parsed is not None and (parsed.group, parsed.topic_filter) == ("g", "a/#")
    assert parse_filter("$share/g", 32) is None
    assert parse_filter("$share/g+/t", 32) is None
    assert parse_filter("$share/g/a/#/b", 32) is None


# ----------------------------------------------------------------------------- robustness


def random_packet(rng: random.Random) -> Packet:
    topics = ["t", "t/a", "$SYS/x", "a/+", "", "x" * 3]
    filters = ["t", "t/#", "+/a", "$share/g/t", "#", "a/#/b", "$share//x"]
    kind = rng.randrange(9)
    pid = rng.choice([None, 0, 1, 2, 65535])
    if kind == 0:
        qos = rng.randrange(4)
        return Publish(rng.choice(topics), b"p", qos, rng.random() < 0.3, False, pid)
    if kind in (1, 2):
        return Puback(rng.choice([1, 2, 3]), rng.choice(list(PacketType)[3:7]))
    if kind == 3:
        subs = tuple(
            Subscription(
                rng.choice(filters), rng.randrange(4), rng.random() < 0.2, True, rng.randrange(4)
            )
            for _ in range(rng.randrange(3))
        )
        return Subscribe(rng.randrange(1, 5), subs)
    if kind == 4:
        return Unsubscribe(1, tuple(rng.sample(filters, rng.randrange(3))))
    if kind == 5:
        return Disconnect(rng.choice([0, 4, 0x80]))
    if kind == 6:
        return c5(rng.choice(["a", "b", ""]), rng.random() < 0.5, rng.choice([None, 0, 5]))
    if kind == 7:
        return Connack()
    return Pingreq()


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_packet_sequences_never_raise_and_keep_bounds(seed: int) -> None:
    rng = random.Random(seed)
    cfg = BrokerConfig(max_queued_messages=5, max_inflight=3, level4_inflight=3)
    net = Net(cfg)
    conns = list(range(6))
    for _ in range(5000):
        conn = rng.choice(conns)
        action = rng.random()
        if action < 0.05:
            net.lose(conn)
        elif action < 0.1:
            net.advance(rng.uniform(0, 20))
        else:
            if conn in net.closed or conn not in net.broker._conns:
                net.closed.pop(conn, None)
                net.feed(net.broker.connect(conn, net.now))
            net.send(conn, random_packet(rng))
        net.inbox.clear()
    for s in list(net.broker._sessions.values()):
        assert len(s.inflight) <= 3 and len(s.queue) <= 5


def test_share_turns_survive_members_leaving_and_joining() -> None:
    net = Net()
    for m in ("a", "b", "c"):
        net.open(m, c4(m))
        net.subscribe(m, Subscription("$share/g/t"))
    net.open("pub", c4("pub"))
    order: list[str] = []

    def publish(n: int) -> None:
        for _ in range(n):
            net.send("pub", Publish("t", b"x"))
            (got,) = [m for m in ("a", "b", "c", "d") if net.publishes(m)]
            order.append(got)

    publish(2)  # a, b
    net.send("a", Unsubscribe(2, ("$share/g/t",)))
    net.take("a")
    publish(2)  # c, b (a left before its turn came back)
    net.open("d", c4("d"))
    net.subscribe("d", Subscription("$share/g/t"))
    publish(3)
    assert order == ["a", "b", "c", "b", "c", "d", "b"]
