"""The broker core's hooks for the mesh: which share groups it serves, and mesh deliveries."""

from __future__ import annotations

from overlay.mqtt.broker import BrokerConfig
from overlay.mqtt.packets import Connect, Properties, Publish, Subscribe, Subscription, Unsubscribe
from tests.overlay.test_mqtt_broker import Net


def _net(share_here: object = None) -> Net:
    net = Net(BrokerConfig(share_here=share_here))  # type: ignore[arg-type]
    for conn, topic in (("p", "jobs/#"), ("g1", "$share/g/jobs/#"), ("h1", "$share/h/jobs/#")):
        net.open(conn, Connect(conn))
        net.send(conn, Subscribe(1, (Subscription(topic),)))
        net.inbox[conn].clear()  # the SUBACK
    return net


def _got(net: Net) -> dict[str, list[str]]:
    return {c: [p.payload.decode() for p in ps if isinstance(p, Publish)] for c, ps in net.inbox.items()}


def test_share_here_limits_local_publishes_to_the_groups_this_agent_serves() -> None:
    asked: list[str] = []

    def here(topic: str) -> set[str]:
        asked.append(topic)
        return {"h"}  # g is served by another agent for this message

    net = _net(here)
    net.send("p", Publish("jobs/1", b"m"))
    assert asked == ["jobs/1"]  # asked once per message
    assert _got(net) == {"p": ["m"], "g1": [], "h1": ["m"]}
    assert len(net.routed) == 1  # still routed out: the mesh layer sends g's copy


def test_publish_from_mesh_plain_and_groups() -> None:
    net = _net()
    net.feed(net.broker.publish_from_mesh(Publish("jobs/1", b"a"), "x", net.now, False, ("g",)))
    net.feed(net.broker.publish_from_mesh(Publish("jobs/2", b"b"), "x", net.now, True, ()))
    net.feed(net.broker.publish_from_mesh(Publish("jobs/3", b"c"), "x", net.now))
    assert _got(net) == {"p": ["b", "c"], "g1": ["a", "c"], "h1": ["c"]}
    assert net.routed == []  # nothing from the mesh is routed out again


def test_versions_say_when_filters_and_retained_values_changed() -> None:
    net = _net()
    subs, retained = net.broker.subscriptions_version, net.broker.retained.version
    net.send("p", Publish("jobs/1", b"m"))  # no subscription or retained change
    assert (net.broker.subscriptions_version, net.broker.retained.version) == (subs, retained)
    net.send("p", Unsubscribe(2, ("jobs/#",)))
    assert net.broker.subscriptions_version > subs
    net.send("p", Publish("state/x", b"v", retain=True))
    assert net.broker.retained.version == retained + 1
    assert not net.broker.set_retained_from_mesh("state/x", b"old", 0, Properties(), -1.0, net.now)
    assert net.broker.retained.version == retained + 1  # a stale write changes nothing
    net.lose("g1")  # a clean session ends: its subscription goes
    assert net.broker.subscriptions_version > subs + 1
