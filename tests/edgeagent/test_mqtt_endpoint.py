"""The agent as the local MQTT broker: real agents, real clients (aiomqtt, mosquitto_pub/sub).

Everything here is one agent on loopback; the mesh routing between agents has its own tests.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
from pathlib import Path

import aiomqtt
import pytest

from edgeagent.errors import ConfigError
from overlay.mqtt.codec import Decoder, encode
from overlay.mqtt.packets import MQTT5, MQTT311, Connack, Connect, Limits, Publish, Will
from tests.edgeagent.inprocess import TIMEOUT, Running, call, make_agent, start, stop

MOSQUITTO_CLIENTS = shutil.which("mosquitto_pub") and shutil.which("mosquitto_sub")
needs_clients = pytest.mark.skipif(
    not MOSQUITTO_CLIENTS, reason="mosquitto_pub/mosquitto_sub not installed (Debian mosquitto-clients)"
)


async def _agent(tmp_path: Path, *flags: str) -> tuple[Running, int]:
    running = await start(tmp_path / "a", "a", ["--mqtt", "127.0.0.1:0", *flags])
    status = await call(running.state_dir, "status")
    return running, int(status["mqtt"].rsplit(":", 1)[1])


async def _stats(running: Running) -> dict[str, int]:
    return (await call(running.state_dir, "status"))["mqtt_stats"]  # type: ignore[no-any-return]


@pytest.mark.parametrize("version", [aiomqtt.ProtocolVersion.V311, aiomqtt.ProtocolVersion.V5])
async def test_aiomqtt_publish_subscribe_and_retained(tmp_path: Path, version: object) -> None:
    running, port = await _agent(tmp_path)
    try:
        kw = {"hostname": "127.0.0.1", "port": port, "protocol": version}
        async with aiomqtt.Client(identifier="sub", **kw) as sub, aiomqtt.Client(**kw) as pub:
            await sub.subscribe("sensors/+/temp", qos=1)
            await pub.publish("sensors/hall/temp", b"21.5", qos=1)
            await pub.publish("sensors/hall/humidity", b"40", qos=1)  # matches nothing
            await pub.publish("state/door", b"open", qos=1, retain=True)
            got = await asyncio.wait_for(anext(sub.messages), 10)
            assert (str(got.topic), got.payload, got.qos) == ("sensors/hall/temp", b"21.5", 1)
        async with aiomqtt.Client(**kw) as late:
            await late.subscribe("state/#")
            got = await asyncio.wait_for(anext(late.messages), 10)
            assert (str(got.topic), got.payload, got.retain) == ("state/door", b"open", True)
        stats = await _stats(running)
        assert stats["publishes_received"] >= 3 and stats["retained_set"] == 1
    finally:
        await stop(running)


def _sub(port: int, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        ["mosquitto_sub", "-h", "127.0.0.1", "-p", str(port), "-W", "20", *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


async def _pub(port: int, *args: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        "mosquitto_pub", "-h", "127.0.0.1", "-p", str(port), *args,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await proc.communicate()
    assert proc.returncode == 0, out.decode()


async def _subscribed(running: Running, count: int) -> None:
    for _ in range(200):
        if (await _stats(running))["connections"] >= count:
            await asyncio.sleep(0.3)  # SUBSCRIBE follows CONNECT
            return
        await asyncio.sleep(0.05)
    raise AssertionError("subscribers did not connect")


@needs_clients
@pytest.mark.parametrize("version", ["mqttv311", "mqttv5"])
async def test_mosquitto_clients_qos_0_1_2(tmp_path: Path, version: str) -> None:
    running, port = await _agent(tmp_path)
    try:
        sub = _sub(port, "-V", version, "-t", "t/#", "-q", "2", "-v", "-C", "3")
        await _subscribed(running, 1)
        for qos in ("0", "1", "2"):
            await _pub(port, "-V", version, "-t", f"t/{qos}", "-m", f"q{qos}", "-q", qos)
        out, _ = await asyncio.to_thread(sub.communicate, timeout=20)
        assert sub.returncode == 0, out
        assert out.split("\n")[:3] == ["t/0 q0", "t/1 q1", "t/2 q2"]
    finally:
        await stop(running)


@needs_clients
async def test_share_group_gets_each_message_once(tmp_path: Path) -> None:
    running, port = await _agent(tmp_path)
    try:
        members = [
            _sub(port, "-V", v, "-t", "$share/g/jobs/#", "-q", "1", "-C", "10")
            for v in ("mqttv311", "mqttv5")
        ]
        await _subscribed(running, 2)
        for i in range(20):
            await _pub(port, "-t", "jobs/x", "-m", f"j{i}", "-q", "1")
        outs = [(await asyncio.to_thread(m.communicate, timeout=20))[0].split() for m in members]
        assert sorted(outs[0] + outs[1], key=lambda s: int(s[1:])) == [f"j{i}" for i in range(20)]
        assert outs[0] and outs[1]  # round-robin: both members got some
    finally:
        await stop(running)


def _raw(port: int, data: bytes) -> bytes:
    """Send ``data`` on a new connection and read until the agent closes it."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(4096):
            chunks.append(chunk)
        return b"".join(chunks)


async def test_will_on_abrupt_end_and_bad_packets_close_only_that_client(tmp_path: Path) -> None:
    running, port = await _agent(tmp_path)
    try:
        kw = {"hostname": "127.0.0.1", "port": port}
        async with aiomqtt.Client(**kw) as watcher:
            await watcher.subscribe("wills/#")
            will = Will("wills/dev1", b"offline", qos=1)
            connect = encode(Connect("dev1", MQTT5, keep_alive=30, will=will), MQTT5)
            # a valid CONNECT, then a PUBLISH with QoS 3: malformed, the agent closes
            bad = bytes([0x36, 0x05, 0x00, 0x01, ord("x"), 0x00, 0x01])
            reply = await asyncio.to_thread(_raw, port, connect + bad)
            packets = Decoder(MQTT5, Limits()).feed(reply)
            assert isinstance(packets[0], Connack) and packets[0].reason == 0
            got = await asyncio.wait_for(anext(watcher.messages), 10)
            assert (str(got.topic), got.payload) == ("wills/dev1", b"offline")
            # garbage before CONNECT: refused, then closed, the agent still serves
            await asyncio.to_thread(_raw, port, b"GET / HTTP/1.1\r\n\r\n")
            await watcher.publish("after/bad", b"still up")
        stats = await _stats(running)
        assert stats["decode_errors"] == 2 and stats["wills_published"] == 1
        assert stats["internal_errors"] == 0
    finally:
        await stop(running)


async def test_level_4_connect_gets_level_4_connack(tmp_path: Path) -> None:
    running, port = await _agent(tmp_path)
    try:
        connect = encode(Connect("old", MQTT311, clean_start=True), MQTT311)
        disconnect = bytes([0xE0, 0x00])
        publish = encode(Publish("x/y", b"1"), MQTT311)
        reply = await asyncio.to_thread(_raw, port, connect + publish + disconnect)
        assert reply == bytes([0x20, 0x02, 0x00, 0x00])  # CONNACK, no session, accepted
    finally:
        await stop(running)


async def test_mqtt_off_and_a_named_port_in_use(tmp_path: Path) -> None:
    running = await start(tmp_path / "off", "off")  # the harness passes --mqtt off
    try:
        status = await call(running.state_dir, "status")
        assert "mqtt" not in status
    finally:
        await stop(running)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        state_dir = tmp_path / "b"
        state_dir.mkdir()
        agent = make_agent(state_dir, "b", "--mqtt", f"127.0.0.1:{taken}")
        message = f"mqtt 127.0.0.1:{taken}: cannot listen: Address already in use$"
        with pytest.raises(ConfigError, match=message):
            await asyncio.wait_for(agent.run(), TIMEOUT)
        assert not (state_dir / "control.sock").exists()  # everything started was stopped
