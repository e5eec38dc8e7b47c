"""mqtt.permissions: the allow list (overlay.mqtt.permissions) and the broker core's hooks."""

from __future__ import annotations

import pytest

from overlay.mqtt.broker import BrokerConfig
from overlay.mqtt.packets import PacketType, Puback, Publish, Reason, Subscription
from overlay.mqtt.permissions import TopicPermissions, filter_covers
from overlay.policy import Permission
from tests.overlay.test_mqtt_broker import Net, c4, c5, payloads


@pytest.mark.parametrize(
    ("allowed", "requested", "covered"),
    [
        ("#", "a/b", True),
        ("#", "#", True),
        ("a/#", "a", True),
        ("a/#", "a/+/c", True),
        ("a/+", "a/b", True),
        ("a/+", "a/+", True),
        ("a/+", "a/#", False),  # a/# also matches a/b/c
        ("a/b", "a/+", False),
        ("a/+/c", "a/b/c", True),
        ("a/+/c", "a/b/c/d", False),
        ("a/b", "a/b/c", False),
        ("a/b/c", "a/b", False),
        ("+/x", "$SYS/x", False),  # a leading wildcard never matches $ topics
        ("$SYS/#", "$SYS/x", True),
    ],
)
def test_filter_covers(allowed: str, requested: str, covered: bool) -> None:
    assert filter_covers(allowed, requested) is covered


PERMS = TopicPermissions(
    (
        Permission("node:gw", publish=("site/+/telemetry",), subscribe=("site/#",)),
        Permission("service:cam", publish=("video/#",)),
        Permission("*", subscribe=("public/#",)),
    )
)


def test_entries_of_a_node_add_up_and_a_node_no_entry_names_may_only_what_star_allows() -> None:
    assert PERMS.may_publish("gw", [], "site/1/telemetry")
    assert not PERMS.may_publish("gw", [], "site/1/cmd")
    assert PERMS.may_publish("gw", ["cam"], "video/a")  # by the service it runs
    assert not PERMS.may_publish("other", [], "site/1/telemetry")
    assert PERMS.may_subscribe("gw", [], "site/1/#") and PERMS.may_subscribe("x", [], "public/a")
    assert not PERMS.may_subscribe("x", [], "site/1/telemetry")
    assert PERMS.may_subscribe("gw", [], "$share/g/site/+/telemetry")  # by its filter
    assert not PERMS.may_subscribe("x", [], "$share/g/site/#")
    nobody = TopicPermissions(())
    assert nobody.may_publish("x", [], "a") and nobody.may_subscribe("x", [], "#")


def _net() -> Net:
    return Net(
        BrokerConfig(may_publish=lambda t: t.startswith("ok/"), may_subscribe=lambda f: f != "#")
    )


def test_a_denied_publish_is_dropped_and_mqtt5_is_told_not_authorized() -> None:
    net = _net()
    net.open("sub", c4("sub"))
    net.subscribe("sub", Subscription("+/x", 1))
    net.open("p5", c5("p5"))
    net.send("p5", Publish("no/x", b"1", qos=1, packet_id=1))
    assert net.take("p5") == [Puback(1, reason=Reason.NOT_AUTHORIZED)]
    net.send("p5", Publish("no/x", b"2", qos=2, packet_id=2))
    assert net.take("p5") == [Puback(2, PacketType.PUBREC, Reason.NOT_AUTHORIZED)]
    net.open("p4", c4("p4"))
    net.send("p4", Publish("no/x", b"3", qos=1, packet_id=3))
    assert net.take("p4") == [Puback(3)]  # 3.1.1 cannot say why
    net.send("p4", Publish("ok/x", b"4", qos=1, packet_id=4))
    assert payloads(net.publishes("sub")) == [b"4"] and net.routed[-1].publish.topic == "ok/x"
    assert len(net.routed) == 1 and net.broker.stats.publishes_denied == 3


def test_a_denied_subscription_is_refused_and_the_rest_granted() -> None:
    net = _net()
    net.open("s5", c5("s5"))
    suback = net.subscribe("s5", Subscription("#", 1), Subscription("a/b", 1))
    assert suback.reasons == (Reason.NOT_AUTHORIZED, 1)
    assert net.broker.stats.subscriptions_denied == 1 and net.broker.filters() == {"a/b"}


def test_over_the_rate_limit_a_publish_is_dropped_and_mqtt5_hears_quota_exceeded() -> None:
    tokens = [True, False]
    net = Net(BrokerConfig(publish_quota=lambda: tokens.pop(0) if tokens else False))
    net.open("sub", c4("sub"))
    net.subscribe("sub", Subscription("t", 1))
    net.open("p5", c5("p5"))
    net.send("p5", Publish("t", b"1", qos=1, packet_id=1))
    net.send("p5", Publish("t", b"2", qos=1, packet_id=2))
    assert net.take("p5") == [Puback(1), Puback(2, reason=Reason.QUOTA_EXCEEDED)]
    assert payloads(net.publishes("sub")) == [b"1"] and net.broker.stats.publishes_limited == 1


def test_with_held_acks_a_denied_publishes_puback_waits_its_turn() -> None:
    """The refusal's PUBACK must not overtake an earlier PUBACK the adapter still holds."""
    from overlay.mqtt.broker import Owed

    net = Net(BrokerConfig(hold_acks=True, may_publish=lambda t: t != "no"))
    net.open("p5", c5("p5"))
    net.send("p5", Publish("ok", b"1", qos=1, packet_id=1))
    net.send("p5", Publish("no", b"2", qos=1, packet_id=2))
    assert net.take("p5") == []  # both owed through the adapter, none sent directly
    owed = [r for r in net.routed if isinstance(r, Owed)]
    assert [o.ack.packet for o in owed] == [Puback(2, reason=Reason.NOT_AUTHORIZED)]
