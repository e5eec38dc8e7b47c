"""Held QoS 1 PUBACKs (`BrokerConfig.hold_acks`): the endpoint sends each once what it waits
for is done, and a connection's PUBACKs in the order of its PUBLISHes (MQTT 4.6)."""

from __future__ import annotations

import asyncio
from typing import Any

from edgeagent.features.mqtt import Endpoint
from overlay.mqtt.broker import Broker, BrokerConfig, RouteOut
from overlay.mqtt.packets import MQTT311, Connect, Puback, Publish


class FakeClient:
    def __init__(self, conn: int) -> None:
        self.conn, self.transport, self.paused, self.connected = conn, None, False, False
        self.sent: list[Any] = []

    def write(self, packet: Any) -> None:
        self.sent.append(packet)

    def close(self) -> None:
        pass


def test_held_pubacks_go_out_in_publish_order_once_their_conditions_are_done() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        endpoint = Endpoint(Broker(BrokerConfig(hold_acks=True)))
        waits: list[asyncio.Future[bool]] = []

        def route_out(out: RouteOut) -> list[asyncio.Future[Any]]:
            future: asyncio.Future[bool] = loop.create_future()
            waits.append(future)
            return [future]

        endpoint.route_out = route_out
        client = FakeClient(1)
        endpoint.clients[1] = client  # type: ignore[assignment]
        endpoint.run(None, lambda now: endpoint.broker.connect(1, now))
        endpoint.run(
            None, lambda now: endpoint.broker.receive(1, Connect("p", MQTT311, True, 0), now)
        )
        for pid in (1, 2, 3):
            publish = Publish("t", b"x", qos=1, packet_id=pid)
            endpoint.run(None, lambda now, p=publish: endpoint.broker.receive(1, p, now))
        acks = lambda: [p.packet_id for p in client.sent if isinstance(p, Puback)]  # noqa: E731
        assert acks() == []  # nothing safe yet
        waits[1].set_result(True)
        await asyncio.sleep(0)
        assert acks() == []  # 2 is safe, but 1 must go first
        waits[0].set_result(False)  # lost: released anyway, counted
        await asyncio.sleep(0)
        assert acks() == [1, 2]
        waits[2].set_result(True)
        await asyncio.sleep(0)
        assert acks() == [1, 2, 3]
        assert endpoint.stats["acks_held"] == 3 and endpoint.stats["acks_unsafe"] == 1

    asyncio.run(scenario())
