"""Persistent MQTT sessions as bytes, so they survive an agent restart (sans-IO).

What is kept, per session that outlives its connection (session expiry > 0; at level 4
clean session false): the client id and protocol level, the expiry interval and, for a
session already offline, the seconds it had left; its subscriptions (with subscription
identifiers); and its undelivered QoS 1 and 2 messages in order: first those sent and not yet
acknowledged (they are sent again after the restart, as a new delivery, not a DUP), then the
queue. Not kept: QoS 0 messages (no promise), a deferred will, QoS 2 messages in the PUBREL
stage (the client has them) and the QoS 2 ids received from the client. A message's age is
kept, so its message expiry interval still counts (the time the agent was down is not).

`dump(broker, now)` is the snapshot; `load(broker, data, now)` restores it into a broker that
has no such sessions yet. `load` is total on hostile or damaged bytes: only
`PersistDecodeError` escapes, and the sessions restored before a bad one are kept. Bounds
are the broker's (`max_sessions`, the queue bounds, subscriptions per session) and
:data:`MAX_STATE_BYTES`; `dump` keeps the messages' bytes under :data:`MAX_SAVED_BYTES`
(sessions in the broker's order, later messages beyond it are not saved, and counted), so
what it writes `load` always reads.
"""

from __future__ import annotations

from typing import Any

import msgpack

from overlay.mqtt.broker import Broker
from overlay.mqtt.mesh import MeshDecodeError, _props_in, _props_out
from overlay.mqtt.packets import Subscription
from overlay.mqtt.session import Delivery, InflightState, Message, Session
from overlay.mqtt.topics import valid_topic_name

FORMAT = 1
MAX_STATE_BYTES = 256 << 20  # a damaged or foreign file beyond this is refused unread
MAX_SAVED_BYTES = 128 << 20  # messages' topic and payload bytes in one snapshot
ROW_OVERHEAD = 64  # bytes charged per saved message besides topic and payload
MAX_TOPIC_LEVELS = 128


class PersistDecodeError(ValueError):
    """The saved sessions cannot be read (what is wrong is the message)."""


class _Budget:
    def __init__(self, limit: int) -> None:
        self.left, self.skipped = limit, 0

    def take(self, topic: str, payload: bytes) -> bool:
        cost = ROW_OVERHEAD + len(topic) * 4 + len(payload)
        if cost > self.left:
            self.skipped += 1
            return False
        self.left -= cost
        return True


def _messages(s: Session, now: float, budget: _Budget) -> list[list[Any]]:
    rows: list[list[Any]] = []
    for entry in s.inflight.values():
        if entry.state is InflightState.AWAIT_PUBCOMP:
            continue
        p = entry.publish
        if not budget.take(p.topic, p.payload):
            continue
        props = _props_out(p.properties)
        rows.append([p.topic, p.payload, p.qos, p.retain, props, 0.0, None, []])
    for d in s.queue:
        if d.qos == 0:
            continue
        m = d.message
        if not budget.take(m.topic, m.payload):
            continue
        rows.append([m.topic, m.payload, d.qos, d.retain, _props_out(m.properties),
                     max(0.0, now - m.created), m.sender, list(d.subscription_ids)])  # fmt: skip
    return rows


def dump(broker: Broker, now: float, limit: int = MAX_SAVED_BYTES) -> tuple[bytes, int]:
    """Every persistent session of ``broker`` and how many messages did not fit ``limit``."""
    budget = _Budget(limit)
    sessions = []
    for s in broker.persistent_sessions():
        remaining = -1.0 if s.conn is not None else max(0.0, s.expires_at - now)
        subs = [
            [text, o.subscription.qos, o.subscription.no_local,
             o.subscription.retain_as_published, o.subscription.retain_handling, o.identifier]
            for text, o in s.subscriptions.items()
        ]  # fmt: skip
        sessions.append([s.client_id, s.protocol_level, s.expiry_interval, remaining, subs,
                         _messages(s, now, budget)])  # fmt: skip
    data: bytes = msgpack.packb([FORMAT, sessions], use_bin_type=True)
    return data, budget.skipped


def _need(ok: bool, what: str) -> None:
    if not ok:
        raise PersistDecodeError(what)


def _subscription(row: object) -> tuple[Subscription, int | None]:
    _need(isinstance(row, list) and len(row) == 6, "subscription")
    assert isinstance(row, list)
    text, qos, no_local, rap, rh, ident = row
    _need(isinstance(text, str) and 0 < len(text) <= 65535, "subscription filter")
    _need(type(qos) is int and qos in (0, 1, 2) and type(rh) is int and rh in (0, 1, 2), "qos")
    _need(isinstance(no_local, bool) and isinstance(rap, bool), "subscription flags")
    _need(ident is None or (type(ident) is int and 0 < ident < 2**28), "subscription id")
    return Subscription(text, qos, no_local, rap, rh), ident


def _delivery(row: object, now: float) -> Delivery:
    _need(isinstance(row, list) and len(row) == 8, "message")
    assert isinstance(row, list)
    topic, payload, qos, retain, props, age, sender, ids = row
    _need(isinstance(topic, str) and valid_topic_name(topic, MAX_TOPIC_LEVELS), "topic")
    _need(isinstance(payload, bytes) and type(qos) is int and qos in (1, 2), "payload or qos")
    _need(isinstance(retain, bool) and isinstance(age, (int, float)) and age >= 0, "flags")
    _need(sender is None or (isinstance(sender, str) and len(sender) <= 65535), "sender")
    _need(isinstance(ids, list) and all(type(i) is int and 0 < i < 2**28 for i in ids), "ids")
    try:
        properties = _props_in(props)
    except MeshDecodeError as exc:
        raise PersistDecodeError(str(exc)) from None
    message = Message(topic, payload, qos, retain, properties, now - float(age), sender)
    return Delivery(message, qos, retain, tuple(ids))


def load(broker: Broker, data: bytes, now: float) -> int:
    """Restore saved sessions into ``broker``; how many. Only PersistDecodeError escapes."""
    _need(len(data) <= MAX_STATE_BYTES, "too long")
    try:
        doc = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises many kinds: all mean a damaged file
        raise PersistDecodeError(f"not msgpack: {type(exc).__name__}") from None
    _need(isinstance(doc, list) and len(doc) == 2 and doc[0] == FORMAT, "not a session file")
    _need(isinstance(doc[1], list), "sessions")
    restored = 0
    for row in doc[1]:
        _need(isinstance(row, list) and len(row) == 6, "session")
        client_id, level, expiry, remaining, subs, messages = row
        _need(isinstance(client_id, str) and 0 < len(client_id) <= 65535, "client id")
        _need(type(level) is int and level in (4, 5), "protocol level")
        _need(isinstance(expiry, (int, float)) and isinstance(remaining, (int, float)), "expiry")
        _need(isinstance(subs, list) and isinstance(messages, list), "session lists")
        parsed_subs = [_subscription(r) for r in subs]
        deliveries = [_delivery(r, now) for r in messages]
        left = float(expiry) if remaining < 0 else float(remaining)
        if broker.restore_session(client_id, level, float(expiry), left, parsed_subs,
                                  deliveries, now):  # fmt: skip
            restored += 1
    return restored
