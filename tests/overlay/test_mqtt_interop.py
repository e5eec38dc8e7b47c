"""The MQTT codec against real clients: mosquitto_pub and mosquitto_sub (libmosquitto)
connect to a tiny asyncio server on a random loopback port that records every byte,
decodes with `Decoder(None, ...)` and answers with packets from `encode` (CONNACK,
PUBACK / PUBREC / PUBCOMP, SUBACK, UNSUBACK, PINGRESP, and one PUBLISH to a subscriber).

Each test asserts what the client sent (MQTT 3.1.1 and 5, properties, wills, credentials),
that the client exited 0 (so it accepted our answers), and that the recorded bytes decode
to the same packets in 1-byte chunks and encode back to the very same bytes.
"""

from __future__ import annotations

import asyncio
import shutil
from dataclasses import dataclass, field

import pytest

from overlay.mqtt.codec import Decoder, MqttDecodeError, encode
from overlay.mqtt.packets import (
    MQTT5,
    MQTT311,
    Connack,
    Connect,
    Disconnect,
    Limits,
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

PUB = shutil.which("mosquitto_pub")
SUB = shutil.which("mosquitto_sub")
pytestmark = pytest.mark.skipif(
    PUB is None or SUB is None, reason="needs mosquitto_pub and mosquitto_sub (mosquitto-clients)"
)
CLIENT_TIMEOUT_S = 20.0
DELIVERED = b"from the test server"


@dataclass
class Session:
    """What one client connection sent and how the server judged it."""

    raw: bytearray = field(default_factory=bytearray)
    packets: list[Packet] = field(default_factory=list)
    level: int | None = None
    error: MqttDecodeError | None = None
    closed: asyncio.Event = field(default_factory=asyncio.Event)


def delivery(topic_filter: str) -> Publish:
    """The message a subscriber to `topic_filter` gets from the server."""
    topic = topic_filter.replace("+", "x").replace("#", "x")
    topic = topic.split("/", 2)[2] if topic.startswith("$share/") else topic
    return Publish(topic, DELIVERED)


def answers(packet: Packet) -> list[Packet]:
    """What a broker answers, enough for the clients to finish."""
    match packet:
        case Connect():
            return [Connack()]
        case Publish(qos=1, packet_id=packet_id) if packet_id is not None:
            return [Puback(packet_id)]
        case Publish(qos=2, packet_id=packet_id) if packet_id is not None:
            return [Puback(packet_id, PacketType.PUBREC)]
        case Puback(kind=PacketType.PUBREL, packet_id=packet_id):
            return [Puback(packet_id, PacketType.PUBCOMP)]
        case Subscribe(packet_id=packet_id, subscriptions=subs):
            return [Suback(packet_id, tuple(s.qos for s in subs))]
        case Unsubscribe(packet_id=packet_id, topic_filters=filters):
            return [Unsuback(packet_id, (Reason.SUCCESS,) * len(filters))]
        case Pingreq():
            return [Pingresp()]
    return []


class Recorder:
    """Records client connections. One PUBLISH goes to a subscriber after its last request
    (`deliver_after`): a client run with `-C 1` disconnects on it, and an answer arriving
    after that would reset the connection before the recorder reads the DISCONNECT."""

    def __init__(self, deliver_after: type = Subscribe) -> None:
        self.deliver_after = deliver_after
        self.sessions: list[Session] = []
        self.port = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> Recorder:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        session = Session()
        self.sessions.append(session)
        decoder = Decoder(None, Limits())
        subscribed = "#"
        try:
            while data := await reader.read(65536):
                session.raw += data
                try:
                    packets = decoder.feed(data)
                except MqttDecodeError as exc:
                    session.error = exc
                    if exc.reason == Reason.UNSUPPORTED_PROTOCOL_VERSION:
                        level = decoder.level or MQTT311  # None: answer as level 4 (3.1 too)
                        writer.write(encode(Connack(reason=exc.reason), level))
                    break
                session.level = decoder.level
                for packet in packets:
                    session.packets.append(packet)
                    assert decoder.level is not None
                    for answer in answers(packet):
                        writer.write(encode(answer, decoder.level))
                    if isinstance(packet, Subscribe):
                        subscribed = packet.subscriptions[0].topic_filter
                    if isinstance(packet, self.deliver_after):
                        writer.write(encode(delivery(subscribed), decoder.level))
                    if isinstance(packet, Disconnect):
                        break
                await writer.drain()
        finally:
            writer.close()
            session.closed.set()


async def run_client(*argv: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), CLIENT_TIMEOUT_S)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, (out + err).decode(errors="replace")


async def session_of(*argv: str, deliver_after: type = Subscribe) -> tuple[Session, int, str]:
    async with Recorder(deliver_after) as server:
        code, output = await run_client(
            argv[0], "-h", "127.0.0.1", "-p", str(server.port), *argv[1:]
        )
        [session] = server.sessions
        await asyncio.wait_for(session.closed.wait(), CLIENT_TIMEOUT_S)  # read to the end
    return session, code, output


def assert_decodes_the_same_bytewise_and_reencodes(session: Session) -> None:
    """Fed a byte at a time the recording gives the same packets; encoded again, each is as
    long as the client's, byte for byte the same at level 4 (at level 5 the client may
    order properties otherwise: ours go by identifier)."""
    assert session.error is None and session.level is not None
    decoder = Decoder(None, Limits())
    got: list[Packet] = []
    for i in range(len(session.raw)):
        got += decoder.feed(bytes(session.raw[i : i + 1]))
    assert got == session.packets
    again = b"".join(encode(p, session.level) for p in got)
    assert len(again) == len(session.raw)
    if session.level == MQTT311:
        assert again == bytes(session.raw)


async def test_mosquitto_pub_v311_qos1_with_will_and_credentials() -> None:
    assert PUB is not None
    session, code, output = await session_of(
        PUB, *"-V mqttv311 -q 1 -r -t sensors/t1 -m 21.5 -i pub311 -u alice -P secret -k 30".split(),
        *"--will-topic dead/pub311 --will-payload gone --will-qos 1 --will-retain".split(),
    )  # fmt: skip
    assert code == 0, output
    connect, publish, disconnect = session.packets
    assert isinstance(connect, Connect) and connect.protocol_level == MQTT311
    assert (connect.client_id, connect.username, connect.password) == ("pub311", "alice", b"secret")
    assert connect.keep_alive == 30 and connect.clean_start
    assert connect.will == Will("dead/pub311", b"gone", 1, True)
    assert isinstance(publish, Publish) and publish.packet_id is not None
    assert publish == Publish("sensors/t1", b"21.5", 1, True, False, publish.packet_id)
    assert disconnect == Disconnect()
    assert_decodes_the_same_bytewise_and_reencodes(session)


async def test_mosquitto_pub_v5_qos2_with_properties() -> None:
    assert PUB is not None
    session, code, output = await session_of(
        PUB, *"-V mqttv5 -q 2 -t a/b -m hello -i pub5".split(),
        *"-D publish user-property a b -D publish content-type text/plain".split(),
        *"-D publish message-expiry-interval 30".split(),
        *"-D connect session-expiry-interval 60 -D connect receive-maximum 20".split(),
        *"-D will will-delay-interval 5 -D will user-property w v".split(),
        *"--will-topic dead/pub5 --will-payload bye".split(),
    )  # fmt: skip
    assert code == 0, output
    connect, publish, pubrel, disconnect = session.packets
    assert isinstance(connect, Connect) and connect.protocol_level == MQTT5
    assert connect.properties == Properties(session_expiry_interval=60, receive_maximum=20)
    assert connect.will == Will(
        "dead/pub5",
        b"bye",
        properties=Properties(will_delay_interval=5, user_properties=(("w", "v"),)),
    )
    assert isinstance(publish, Publish) and publish.qos == 2 and publish.payload == b"hello"
    assert publish.properties == Properties(
        message_expiry_interval=30, content_type="text/plain", user_properties=(("a", "b"),)
    )
    assert pubrel == Puback(publish.packet_id or 0, PacketType.PUBREL)
    assert disconnect == Disconnect()
    assert_decodes_the_same_bytewise_and_reencodes(session)


@pytest.mark.parametrize("version", ["mqttv311", "mqttv5"])
async def test_mosquitto_sub_subscribes_unsubscribes_and_receives_our_publish(
    version: str,
) -> None:
    assert SUB is not None
    session, code, output = await session_of(
        SUB, "-V", version, *"-q 1 -t a/+/c -t $share/g/b/# -U old/# -C 1 -W 15".split(),
        deliver_after=Unsubscribe,
    )  # fmt: skip
    assert code == 0, output
    assert DELIVERED.decode() in output
    connect, subscribe, unsubscribe, disconnect = session.packets
    assert isinstance(connect, Connect) and connect.protocol_level == session.level
    assert session.level == (MQTT5 if version == "mqttv5" else MQTT311)
    assert isinstance(subscribe, Subscribe)
    assert subscribe.subscriptions == (Subscription("a/+/c", 1), Subscription("$share/g/b/#", 1))
    assert isinstance(unsubscribe, Unsubscribe) and unsubscribe.topic_filters == ("old/#",)
    assert disconnect == Disconnect()
    assert_decodes_the_same_bytewise_and_reencodes(session)


async def test_mosquitto_sub_v5_subscription_identifier_and_user_property() -> None:
    assert SUB is not None
    session, code, output = await session_of(
        SUB, *"-V mqttv5 -t x/# -C 1 -W 15".split(),
        *"-D subscribe subscription-identifier 7 -D subscribe user-property s 1".split(),
    )  # fmt: skip
    assert code == 0, output
    [subscribe] = [p for p in session.packets if isinstance(p, Subscribe)]
    assert subscribe.properties == Properties(
        subscription_identifiers=(7,), user_properties=(("s", "1"),)
    )
    assert_decodes_the_same_bytewise_and_reencodes(session)


async def test_mosquitto_pub_mqtt31_is_refused_with_return_code_1() -> None:
    assert PUB is not None
    session, code, output = await session_of(PUB, *"-V mqttv31 -t a -m x".split())
    assert bytes(session.raw[2:10]) == b"\x00\x06MQIsdp"
    assert session.error is not None
    assert session.error.reason == Reason.UNSUPPORTED_PROTOCOL_VERSION
    assert code != 0
    assert "protocol version" in output.lower(), output
