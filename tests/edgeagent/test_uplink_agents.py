"""The MQTT uplink wired into the agent (issue 11): ``[uplink]`` config, one holder chosen from
the membership, the data path both ways, failover on SIGKILL and store-and-forward.

Real agent processes on loopback (``testbed.loopback.LoopbackCluster``) and a real mosquitto
as the cloud, reached through a TCP gate the test can close (``testbed.bench.uplink``, the
same runs the benchmark makes). The cloud outage lasts ``EDGEAGENT_UPLINK_DOWN_S`` seconds
(default 10; issue 11 says 60: ``python -m testbed.bench uplink`` runs 60 by default).
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import os
import socket
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from edgeagent.config import add_agent_arguments, load_config
from edgeagent.config.schema import UplinkTopic
from edgeagent.errors import ConfigError
from edgeagent.features.uplink import to_local, to_remote
from edgeagent.localmesh import free_port
from testbed.bench import uplink as bench
from testbed.loopback import LoopbackCluster
from tests.edgeagent.inprocess import call, start, stop
from tests.edgeagent.test_cli_errors import assert_one_line_usage_error
from tests.edgeagent.test_cli_errors import edgeagent as run_cli
from tests.edgeagent.test_mqtt_tls_attach import _cert, _write

needs_mosquitto = pytest.mark.skipif(
    bench.MOSQUITTO is None, reason="needs the mosquitto broker (Debian package mosquitto)"
)
DOWN_S = float(os.environ.get("EDGEAGENT_UPLINK_DOWN_S", "10"))


def _load(tmp_path: Path, body: str, *flags: str) -> object:
    import argparse

    path = tmp_path / "agent.toml"
    path.write_text(body)
    parser = argparse.ArgumentParser()
    add_agent_arguments(parser)
    argv = ["--config", str(path), "--state-dir", str(tmp_path / "s"), "--name", "n1", *flags]
    return load_config(parser.parse_args(argv))


def test_config_reads_brokers_mappings_and_tls(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("x")
    config = _load(
        tmp_path,
        "[uplink]\n"
        'brokers = ["cloud-a:8883", "[::1]:1883"]\n'
        'topics = ["s/# out 1", "# both 2 site1/ plant/site1/", "cmd/# in 1 \\"\\" plant/"]\n'
        'ca_file = "ca.pem"\nusername = "u"\npassword = "p"\nstandby_s = 5\n',
    )
    up = config.uplink  # type: ignore[attr-defined]
    assert up.brokers == (("cloud-a", 8883), ("::1", 1883))
    assert up.tls and up.ca_file == tmp_path / "ca.pem" and up.username == "u"
    assert up.topics == (
        UplinkTopic("s/#", "out", 1),
        UplinkTopic("#", "both", 2, "site1/", "plant/site1/"),
        UplinkTopic("cmd/#", "in", 1, "", "plant/"),
    )
    assert up.standby_s == 5 and up.ttl_s == 86400


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ('topics = ["a out"]', "uplink.brokers: required"),
        ('brokers = ["h:1"]', "uplink.topics: required"),
        ('brokers = ["h"]\ntopics = ["a"]', "uplink.brokers: expected"),
        ('brokers = ["h:99999"]\ntopics = ["a"]', "uplink.brokers: expected"),
        ('brokers = ["h:1"]\ntopics = ["a sideways 1"]', "uplink.topics: expected each item"),
        ('brokers = ["h:1"]\ntopics = ["a out 3"]', "uplink.topics: expected each item"),
        ('brokers = ["h:1"]\ntopics = ["a out 1 x/"]', "uplink.topics: expected each item"),
        ('brokers = ["h:1"]\ntopics = ["a/#/b out 1"]', "uplink.topics: expected each item"),
        ('brokers = ["h:1"]\ntopics = ["$share/g/a out 1"]', "uplink.topics: expected each item"),
        ('brokers = ["h:1"]\ntopics = []', "uplink.topics: expected"),
        ('brokers = ["h:1"]\ntopics = ["a"]\ncert_file = "nope.pem"', "uplink.cert_file"),
        ('brokers = ["h:1"]\ntopics = ["a"]\npassword = "p"', "uplink.username: required"),
        ('brokers = ["h:1"]\ntopics = ["a"]\nttl_s = -1', "uplink.ttl_s: expected"),
        ('brokers = ["h:1"]\ntopics = ["a"]\nspool_max_bytes = 10', "uplink.spool_max_bytes"),
        ('brokers = ["h:1"]\ntopics = ["a"]\nbrokerz = 1', "uplink.brokerz: unknown key"),
    ],
)
def test_bad_uplink_config_names_the_key(tmp_path: Path, body: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle.replace("$", r"\$")) as info:
        _load(tmp_path, f"[uplink]\n{body}\n")
    assert "\n" not in str(info.value)


def test_uplink_needs_the_mqtt_feature(tmp_path: Path) -> None:
    body = '[uplink]\nbrokers = ["h:1"]\ntopics = ["a"]\n'
    with pytest.raises(ConfigError, match="uplink: needs the MQTT feature"):
        _load(tmp_path, body, "--mqtt", "off")


def test_bad_uplink_config_is_one_line_exit_2(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text('[uplink]\nbrokers = ["h:1"]\ntopics = ["a sideways"]\n')
    result = run_cli("run", "--config", str(path), "--state-dir", str(tmp_path / "s"))
    assert_one_line_usage_error(result, "uplink.topics")


def test_topic_mapping_swaps_prefixes() -> None:
    topics = (
        UplinkTopic("#", "out", 1, "site1/", "plant/site1/"),
        UplinkTopic("cmd/#", "in", 1, "", "plant/"),
        UplinkTopic("s/+", "both", 0),
    )
    assert to_remote(topics, "site1/a/b") == (topics[0], "plant/site1/a/b")
    assert to_remote(topics, "s/x") == (topics[2], "s/x")
    assert to_remote(topics, "cmd/x") is None  # in only
    assert to_local(topics, "plant/cmd/reboot") == (topics[1], "cmd/reboot")
    assert to_local(topics, "plant/site1/a") is None  # out only
    assert to_local(topics, "s/y") == (topics[2], "s/y")


def test_uplink_modules_are_not_imported_without_uplink(tmp_path: Path) -> None:
    """MQTT on, no [uplink]: neither the feature nor aiomqtt, the spool or the selector."""
    code = f"""
import argparse, sys
from edgeagent.agent import build_features
from edgeagent.config import add_agent_arguments, load_config
p = argparse.ArgumentParser()
add_agent_arguments(p)
config = load_config(p.parse_args(["--name", "n1", "--state-dir", {str(tmp_path)!r},
                                   "--mqtt", "127.0.0.1:0", "--no-mdns"]))
assert "mqtt" in build_features(config)
print(sorted({{"edgeagent.features.uplink", "edgeagent.uplink", "edgeagent.spool",
              "overlay.uplink_select", "overlay.spool_format", "aiomqtt"}} & set(sys.modules)))
"""
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         cwd=root, env={**os.environ, "PYTHONPATH": str(root)})  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout


@needs_mosquitto
def test_cloud_messages_on_in_mappings_reach_the_mesh_once(tmp_path: Path) -> None:
    asyncio.run(_down_path(tmp_path))


async def _down_path(tmp_path: Path) -> None:
    import aiomqtt

    cloud = bench.Cloud(tmp_path)
    cloud.start()
    config = bench.write_config(tmp_path, cloud.port, topics=['cmd/# both 1 "" cloud/'])
    cluster = LoopbackCluster(2, mqtt=True, extra_args=["--config", str(config)])
    try:
        await asyncio.to_thread(cluster.start)
        await asyncio.to_thread(cluster.wait_converged, bench.TIMEOUT)
        await bench.poll(lambda: bench.holder_of(cluster) is not None, "one connected holder")
        holder = bench.holder_of(cluster)
        other = next(a for a in cluster.agents if a is not holder)
        got: list[tuple[str, bytes]] = []
        async with (
            aiomqtt.Client(other.host, cluster.mqtt_port) as sub,
            aiomqtt.Client("127.0.0.1", cloud.port) as pub,
        ):
            await sub.subscribe("cmd/#", qos=1)

            async def read() -> None:
                async for msg in sub.messages:
                    assert isinstance(msg.payload, bytes)
                    got.append((str(msg.topic), msg.payload))

            reader = asyncio.create_task(read())
            for i in range(100):  # until the holder's cloud subscription and our interest are in
                await pub.publish("cloud/cmd/reboot", b"now-%d" % i, qos=1)
                await pub.publish("cloud/other/x", b"unmapped", qos=1)
                if got:
                    break
                await asyncio.sleep(0.2)
            await pub.publish("cloud/cmd/reboot", b"last", qos=1)
            await bench.poll(lambda: ("cmd/reboot", b"last") in got, "the last command", 30)
            reader.cancel()
        assert all(t == "cmd/reboot" for t, _ in got)
        assert len(got) == len(set(got)), got  # each once
        # Nothing that came down went back up: the holder's bridge does not get its own
        # publishes (no_local), the other candidate's drops them by the marker.
        assert bench.uplink_status(holder)["sent"] == 0
        assert bench.uplink_status(other)["loops_dropped"] >= 1
    finally:
        await asyncio.to_thread(cluster.stop)
        cloud.stop()


@needs_mosquitto
def test_sigkill_holder_while_publishing_qos1_none_lost() -> None:
    result = asyncio.run(bench.failover(n=3, count=400, rate=100.0, kill_at=150))
    assert result["published"] == 400
    assert result["holder_after"] not in (None, result["holder_before"])
    assert result["qos1_lost"] == 0, result


@needs_mosquitto
def test_cloud_down_then_back_spool_drains_in_order_none_lost() -> None:
    result = asyncio.run(bench.outage(n=2, down_s=DOWN_S, rate=20.0))
    assert result["spool_max_pending"] >= result["outage_published"] // 2, result
    assert result["outage_lost"] == 0, result
    assert result["spool_drained_in_order"], result


@needs_mosquitto
def test_spool_survives_kill_9_during_an_outage() -> None:
    result = asyncio.run(bench.outage(n=1, down_s=DOWN_S, rate=20.0, kill=True))
    assert result["outage_lost"] == 0, result
    assert result["spool_drained_in_order"], result


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    """tmp/pki: ca.crt, server.crt/.key (IP 127.0.0.1), client.crt/.key."""
    from cryptography.hazmat.primitives.asymmetric import ec

    d = tmp_path / "pki"
    d.mkdir()
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("cloud ca", ca_key, None, ca=True)
    _write(d / "ca", ca, ca_key)
    for name, ip in (("server", "127.0.0.1"), ("client", None)):
        key = ec.generate_private_key(ec.SECP256R1())
        _write(d / name, _cert(name, key, (ca.subject, ca_key), ip=ip), key)
    return d


@needs_mosquitto
async def test_tls_client_certificate_and_password_to_the_cloud(tmp_path: Path, pki: Path) -> None:
    """mosquitto with TLS, required client certificates and a password file: the agent's
    uplink gets through with the right ones (a local QoS 1 publish reaches the cloud
    subscriber), and a wrong password keeps it out."""
    import aiomqtt

    port = free_port(["127.0.0.1"])
    passwords = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(passwords), "site1", "s3cret"], check=True,
                   capture_output=True)  # fmt: skip
    conf = tmp_path / "cloud.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\ncafile {pki / 'ca.crt'}\ncertfile {pki / 'server.crt'}\n"
        f"keyfile {pki / 'server.key'}\nrequire_certificate true\npassword_file {passwords}\n"
        f"allow_anonymous false\nuser {getpass.getuser()}\n"  # as root: read our 0700 tmp dir
    )
    assert bench.MOSQUITTO is not None
    cloud = subprocess.Popen([bench.MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)  # fmt: skip
    await bench.poll(lambda: _listening(port) or cloud.poll() is not None, "mosquitto", 10)
    assert cloud.poll() is None, "mosquitto did not start"
    ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    ctx.load_cert_chain(str(pki / "client.crt"), str(pki / "client.key"))
    try:
        for password, reaches in (("wrong", False), ("s3cret", True)):
            config = tmp_path / f"agent-{password}.toml"
            config.write_text(
                f'[uplink]\nbrokers = ["127.0.0.1:{port}"]\ntopics = [\'s/# out 1 "" cloud/\']\n'
                f'ca_file = "{pki / "ca.crt"}"\ncert_file = "{pki / "client.crt"}"\n'
                f'key_file = "{pki / "client.key"}"\nusername = "site1"\npassword = "{password}"\n'
            )
            state = tmp_path / f"s-{password}"
            agent = await start(state, "n1", ["--config", str(config), "--mqtt", "127.0.0.1:0"])
            try:
                await _tls_round(state, port, ctx, reaches, aiomqtt)
            finally:
                await stop(agent)
    finally:
        cloud.terminate()
        cloud.wait(10)


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


async def _uplink_until(state: Path, key: str, what: str) -> None:
    deadline = asyncio.get_running_loop().time() + 60
    while not (await call(state, "uplink")).get(key):
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


async def _tls_round(
    state: Path, port: int, ctx: ssl.SSLContext, reaches: bool, aiomqtt: Any
) -> None:
    if not reaches:
        await _uplink_until(state, "connect_failures", "refused connects")
        assert not (await call(state, "uplink"))["connected_to"]
        return
    await _uplink_until(state, "connected_to", "the uplink connected")
    status = await call(state, "status")
    mqtt_port = int(status["mqtt"].rsplit(":", 1)[1])
    async with aiomqtt.Client("127.0.0.1", port, username="site1", password="s3cret",
                              tls_context=ctx) as sub:  # fmt: skip
        await sub.subscribe("cloud/#", qos=1)
        async with aiomqtt.Client("127.0.0.1", mqtt_port) as local:
            await local.publish("s/temp", b"21.5", qos=1)
        msg = await asyncio.wait_for(anext(aiter(sub.messages)), 30)
        assert (str(msg.topic), msg.payload) == ("cloud/s/temp", b"21.5")


@needs_mosquitto
def test_a_former_holder_drains_its_spool_after_a_takeover() -> None:
    """The holder spools while the cloud is away; a higher-scoring candidate joins and takes
    the uplink; the former holder keeps a connection only to drain (mode drain, then off):
    nothing it spooled is stranded."""
    asyncio.run(_handover())


async def _handover() -> None:
    import tempfile

    from overlay.uplink_select import score

    with tempfile.TemporaryDirectory(prefix="ea-uplink-") as tmp:
        cloud = bench.Cloud(Path(tmp))
        cloud.start()
        gate = bench.Gate(cloud.port)  # closed until the end: the cloud is away
        collector = bench.Collector(cloud.port)
        cluster = LoopbackCluster(
            2, mqtt=True, extra_args=["--config", str(bench.write_config(Path(tmp), gate.port))]
        )
        lo, hi = sorted(cluster.agents, key=lambda a: score("default", a.name))
        try:
            await collector.start()
            await asyncio.to_thread(lo.start)
            await bench.poll(lambda: bench.uplink_status(lo).get("mode") == "hold", "lo holds")
            first = [b"first-%03d" % i for i in range(50)]
            await bench.publish(lo.host, cluster.mqtt_port, first, 200.0)
            await bench.poll(
                lambda: bench.uplink_status(lo)["spool"]["pending"] == 50, "lo spooled"
            )
            await asyncio.to_thread(hi.start)
            await bench.poll(lambda: bench.uplink_status(hi).get("mode") == "hold", "hi takes over")
            await bench.poll(lambda: bench.uplink_status(lo).get("mode") == "drain", "lo drains")
            await bench.interest_everywhere(cluster)
            second = [b"second-%03d" % i for i in range(50)]
            await bench.publish(lo.host, cluster.mqtt_port, second, 200.0)
            await gate.open()
            want = set(first + second)
            await bench.poll(lambda: want <= set(collector.got), "everything in the cloud")
            await bench.poll(lambda: bench.uplink_status(lo).get("mode") == "off", "lo done")
            assert bench.uplink_status(lo)["spool"]["pending"] == 0
        finally:
            await collector.stop()
            await asyncio.to_thread(cluster.stop)
            await gate.close()
            cloud.stop()


@needs_mosquitto
def test_policy_uplink_mappings_apply_without_a_restart(tmp_path: Path) -> None:
    """A bundle's ``mqtt.uplink`` mappings join the config's: after the apply, a local
    publish on ``site/...`` reaches the cloud as ``tenants/acme/site/...`` and a cloud
    message on ``tenants/acme/cmd/...`` reaches a local subscriber as ``cmd/...``; the
    next bundle, without mappings, stops both."""
    asyncio.run(_policy_mappings(tmp_path))


async def _policy_mappings(tmp_path: Path) -> None:
    import base64

    import aiomqtt
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from overlay import policy as pol

    key = Ed25519PrivateKey.generate()
    raw = base64.b64encode(pol.raw_public_key(key.public_key())).decode()
    cloud = bench.Cloud(tmp_path)
    cloud.start()
    config = bench.write_config(tmp_path, cloud.port, topics=["other/# out 1"])
    config.write_text(config.read_text() + f'[policy]\ntrusted_keys = ["{raw}"]\n')

    def bundle(version: int, mappings: str) -> str:
        path = tmp_path / f"v{version}.signed"
        path.write_bytes(pol.sign(f"version = {version}\nissued = 1\n{mappings}".encode(), key))
        return str(path)

    maps = (
        '[[mqtt.uplink]]\nlocal = "site/#"\nremote = "tenants/acme/"\ndirection = "up"\n'
        '[[mqtt.uplink]]\nlocal = "cmd/#"\nremote = "tenants/acme/"\ndirection = "down"\n'
    )
    state = tmp_path / "s"
    agent = await start(state, "n1", ["--config", str(config), "--mqtt", "127.0.0.1:0"])
    try:
        await _uplink_until(state, "connected_to", "the uplink connected")
        port = int((await call(state, "status"))["mqtt"].rsplit(":", 1)[1])
        assert (await call(state, "policy-apply", path=bundle(1, maps)))["accepted"]
        async with (
            aiomqtt.Client("127.0.0.1", cloud.port) as remote,
            aiomqtt.Client("127.0.0.1", port) as local,
        ):
            await remote.subscribe("tenants/acme/site/#", qos=1)  # not its own cmd/ ones
            await remote.subscribe("other/#", qos=1)
            await local.subscribe("cmd/#", qos=1)
            await local.publish("site/temp", b"21.5", qos=1)
            msg = await asyncio.wait_for(anext(aiter(remote.messages)), 30)
            assert (str(msg.topic), msg.payload) == ("tenants/acme/site/temp", b"21.5")
            got = None
            for _ in range(100):  # until the holder's cloud subscription is in
                await remote.publish("tenants/acme/cmd/reboot", b"now", qos=1)
                with contextlib.suppress(TimeoutError):
                    got = await asyncio.wait_for(anext(aiter(local.messages)), 0.3)
                    break
            assert got is not None and (str(got.topic), got.payload) == ("cmd/reboot", b"now")
            assert (await call(state, "policy-apply", path=bundle(2, "")))["accepted"]
            await local.publish("site/temp", b"22.0", qos=1)
            await local.publish("other/x", b"config", qos=1)  # the config's mapping stays
            msg = await asyncio.wait_for(anext(aiter(remote.messages)), 30)
            assert (str(msg.topic), msg.payload) == ("other/x", b"config")
    finally:
        await stop(agent)
        cloud.stop()
def test_a_total_cloud_outage_does_not_move_the_uplink() -> None:
    """The cloud goes away for every agent: the holder's level drops to 1 and the other
    candidate's stale level 2 would make it the holder, but it probes first, fails, drops to
    1 too, and never holds: the uplink (and the backlog in its spool) stays where it was."""
    asyncio.run(_total_outage())


async def _total_outage() -> None:
    import tempfile

    with tempfile.TemporaryDirectory(prefix="ea-uplink-") as tmp:
        cloud = bench.Cloud(Path(tmp))
        cloud.start()
        gate = bench.Gate(cloud.port)
        await gate.open()
        cluster = LoopbackCluster(
            2, mqtt=True, extra_args=["--config", str(bench.write_config(Path(tmp), gate.port))]
        )
        try:
            await asyncio.to_thread(cluster.start)
            await asyncio.to_thread(cluster.wait_converged, bench.TIMEOUT)
            await bench.poll(lambda: bench.holder_of(cluster) is not None, "one connected holder")
            holder = bench.holder_of(cluster)
            other = next(a for a in cluster.agents if a is not holder)
            assert holder is not None
            await bench.poll(lambda: bench.uplink_status(other).get("level") == 2, "other up")
            before = bench.uplink_status(other)["takeovers"]
            await gate.close()
            pair = (holder, other)
            await bench.poll(
                lambda: [bench.uplink_status(a).get("level") for a in pair] == [1, 1],
                "both at level 1",
                30,
            )

            def still_held() -> bool:
                ours = [bench.uplink_status(a) for a in (holder, other)]
                return ours[0].get("mode") == "hold" and {s.get("holder") for s in ours} == {
                    holder.name
                }

            await bench.poll(still_held, "the holder holding on", 10)
            status = bench.uplink_status(other)
            assert status["takeovers"] == before and status["mode"] == "off", status
            assert status["probe_failures"] >= 1, status
        finally:
            await asyncio.to_thread(cluster.stop)
            await gate.close()
            cloud.stop()
