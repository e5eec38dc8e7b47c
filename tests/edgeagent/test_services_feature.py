"""The services feature in real agents inside the test's loop (real sockets on loopback):
registrations through the control API and the CLI, the catalog on another node, mesh DNS
for SERVICE.mesh, restarts, the config's [[service]] tables, refusals."""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import dns.asyncquery
import dns.message
import dns.rcode
import pytest

from edgeagent.cli import main as cli_main
from edgeagent.control import ControlError
from edgeagent.errors import ConfigError
from edgeagent.features.addresses import Addresses
from edgeagent.features.dns import Dns
from edgeagent.features.services import STATE_FILE, Services
from tests.edgeagent.inprocess import TIMEOUT, Running, call, make_agent, stop, wait_for
from tests.edgeagent.inprocess import start as start_agent

KEYS = {"name", "protocol", "node", "endpoint", "state", "weight", "tags"}


@pytest.fixture
def base_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="ea-svc-") as d:
        yield Path(d)


async def start(base: Path, name: str, join: str | None = None, *flags: str) -> Running:
    argv = [*flags, *(["--join", join] if join else [])]
    return await start_agent(base / name, name, argv, shared=base)


def services(r: Running) -> Services:
    feature = r.agent.feature("services")
    assert isinstance(feature, Services)
    return feature


def overlay_address(r: Running) -> str | None:
    feature = r.agent.feature("addresses")
    assert isinstance(feature, Addresses)
    address = feature.alloc.address
    return None if address is None else str(address)


def row_state(r: Running, name: str, node: str) -> str | None:
    for row in services(r).rows():
        if row["name"] == name and row["node"] == node:
            return str(row["state"])
    return None


async def dns_answers(r: Running, qname: str) -> tuple[int, list[str]]:
    feature = r.agent.feature("dns")
    assert isinstance(feature, Dns) and feature.address is not None
    host, port = feature.address
    reply = await dns.asyncquery.udp(
        dns.message.make_query(qname, "A"), host, port=port, timeout=TIMEOUT
    )
    return reply.rcode(), [rd.to_text() for rrset in reply.answer for rd in rrset]


async def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = await asyncio.to_thread(cli_main, list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


async def test_registered_service_is_healthy_on_another_node_and_answers_mesh_dns(
    base_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a = await start(base_dir, "a")
    seed = f"127.0.0.1:{a.agent.driver.address[1]}"
    b = await start(base_dir, "b", seed, "--dns", "127.0.0.1:0")
    try:
        assert b.agent.host.feature("services") is services(b)  # what the CoAP router uses
        rc, out, err = await cli(
            capsys, "service", "register", "Temperature", "coap://127.0.0.1:5684/sensors",
            "--weight", "3", "--tag", "site=hall", "--tag", "version=1.2",
            "--state-dir", str(base_dir / "a"),
        )  # fmt: skip
        assert (rc, err) == (0, "") and "registered" in out
        await wait_for(lambda: row_state(b, "temperature", "a") == "healthy", "a's instance on b")
        rows = await call(base_dir / "b", "services")
        assert rows == [
            {
                "name": "temperature", "protocol": "coap", "node": "a",
                "endpoint": "coap://127.0.0.1:5684/sensors", "state": "healthy", "weight": 3,
                "tags": {"site": "hall", "version": "1.2"},
            }
        ]  # fmt: skip
        assert [i.node for i in services(b).healthy("TEMPERATURE")] == ["a"]

        rc, out, _ = await cli(capsys, "services", "--json", "--state-dir", str(base_dir / "b"))
        assert rc == 0 and [set(r) for r in json.loads(out)] == [KEYS]
        rc, out, _ = await cli(capsys, "services", "--state-dir", str(base_dir / "b"))
        assert rc == 0 and "temperature" in out and "healthy" in out and "site=hall" in out

        await wait_for(lambda: overlay_address(a) is not None, "a's overlay address")
        await wait_for(
            lambda: services(b).resolve_service("temperature") == [overlay_address(a)],
            "a's overlay address known on b",
        )
        assert await dns_answers(b, "temperature.mesh.") == (
            dns.rcode.NOERROR,
            [overlay_address(a)],
        )
        rcode, answers = await dns_answers(b, "humidity.mesh.")
        assert rcode == dns.rcode.NXDOMAIN and answers == []

        rc, out, _ = await cli(
            capsys, "service", "deregister", "temperature", "coap://127.0.0.1:5684/sensors",
            "--state-dir", str(base_dir / "a"),
        )  # fmt: skip
        assert rc == 0 and "deregistered" in out
        await wait_for(lambda: services(b).rows() == [], "the instance withdrawn on b")
        assert (await dns_answers(b, "temperature.mesh."))[0] == dns.rcode.NXDOMAIN

        await call(base_dir / "a", "service", op="register", name="t2", uri="coap://127.0.0.1")
        await wait_for(lambda: row_state(b, "t2", "a") == "healthy", "t2 on b")
        await stop(a)  # a graceful leave: a is LEFT on b, its instances are down
        await wait_for(lambda: row_state(b, "t2", "a") == "down", "a's instance down on b")
        assert services(b).healthy("t2") == []
        assert services(b).resolve_service("t2") == []
    finally:
        if not a.task.done():
            await stop(a)
        await stop(b)


async def test_registrations_survive_a_restart_and_are_saved_atomically(base_dir: Path) -> None:
    a = await start(base_dir, "r")
    await call(base_dir / "r", "service", op="register", name="cam", uri="coap://10.0.0.7/img",
               weight=2, tags={"zone": "z1"})  # fmt: skip
    saved = json.loads((base_dir / "r" / STATE_FILE).read_text())
    assert saved["registered"] == [
        {"name": "cam", "uri": "coap://10.0.0.7:5683/img", "weight": 2, "tags": {"zone": "z1"}}
    ]
    assert not [p for p in (base_dir / "r").iterdir() if ".tmp-" in p.name]
    again = await call(base_dir / "r", "service", op="register", name="cam",
                       uri="coap://10.0.0.7:5683/img", weight=5)  # fmt: skip
    assert again["replaced"] is True
    await stop(a)
    a = await start(base_dir, "r")
    try:
        rows = await call(base_dir / "r", "services")
        assert [(r["name"], r["node"], r["weight"], r["state"]) for r in rows] == [
            ("cam", "r", 5, "healthy")
        ]
    finally:
        await stop(a)


async def test_config_services_are_published_and_not_deregistered_by_the_cli(
    base_dir: Path,
) -> None:
    config = base_dir / "agent.toml"
    config.write_text(
        '[[service]]\nname = "temperature"\nuri = "coap://127.0.0.1:5684/s"\n'
        'tags = { site = "hall" }\n'
        '[[service]]\nname = "pressure"\nuri = "coap://127.0.0.1:5685"\n'
        '[services]\nsite = "roof"\n'
    )
    a = await start(base_dir, "c", None, "-c", str(config))
    try:
        rows = await call(base_dir / "c", "services")
        assert [(r["name"], r["node"], r["tags"]) for r in rows] == [
            ("pressure", "c", {"site": "roof"}),  # the node's site, as it had none
            ("temperature", "c", {"site": "hall"}),
        ]
        assert services(a).balancer.site == "roof"
        with pytest.raises(ControlError, match="defined in the config file"):
            await call(base_dir / "c", "service", op="deregister", name="temperature",
                       uri="coap://127.0.0.1:5684/s")  # fmt: skip
        with pytest.raises(ControlError, match="defined in the config file"):
            await call(base_dir / "c", "service", op="register", name="temperature",
                       uri="coap://127.0.0.1:5684/s", weight=4)  # fmt: skip
        with pytest.raises(ControlError, match="not registered"):
            await call(base_dir / "c", "service", op="deregister", name="other",
                       uri="coap://127.0.0.1")  # fmt: skip
    finally:
        await stop(a)


@pytest.mark.parametrize(
    ("request_args", "message"),
    [
        ({"name": "node", "uri": "coap://h"}, "reserved"),
        ({"name": "ok", "uri": "coap://h:99999"}, "port"),
        ({"name": "ok", "uri": "coap://h", "weight": 0}, "weight"),
        ({"name": "ok", "uri": "coap://h", "tags": {"Bad Key": "v"}}, "tag key"),
        ({"name": "ok", "uri": "coap://h", "tags": ["x"]}, "tags"),
        ({"name": 7, "uri": "coap://h"}, "strings"),
    ],
)
async def test_bad_registrations_are_refused_in_one_line(
    base_dir: Path, request_args: dict[str, object], message: str
) -> None:
    a = await start(base_dir, "e")
    try:
        with pytest.raises(ControlError, match=message) as caught:
            await call(base_dir / "e", "service", op="register", **request_args)
        assert "\n" not in str(caught.value)
        assert await call(base_dir / "e", "services") == []
    finally:
        await stop(a)


async def test_too_many_registrations_are_refused_and_nothing_is_saved(base_dir: Path) -> None:
    a = await start(base_dir, "m")
    try:
        accepted = 0
        with pytest.raises(ControlError, match="at most|bytes|published"):
            for i in range(40):  # bounded: the per-node budget is 32 instances
                await call(base_dir / "m", "service", op="register", name=f"s{i}",
                           uri=f"coap://10.1.2.3:{5000 + i}/a/long/path/for/size")  # fmt: skip
                accepted += 1
        assert 0 < accepted < 40
        saved = json.loads((base_dir / "m" / STATE_FILE).read_text())["registered"]
        assert len(saved) == accepted == len(await call(base_dir / "m", "services"))
    finally:
        await stop(a)


async def test_a_corrupt_services_file_is_one_config_error(base_dir: Path) -> None:
    state = base_dir / "x"
    state.mkdir()
    (state / STATE_FILE).write_text('{"v": 1, "registered": [{"name": "bad name"}]}')
    agent = make_agent(state, "x", shared=base_dir)
    with pytest.raises(ConfigError, match=f"{STATE_FILE}: corrupt entry"):
        await asyncio.wait_for(agent.run(), TIMEOUT)


def test_services_feature_is_on_by_default_and_zeroconf_stays_unimported_without_mdns() -> None:
    import subprocess

    code = (
        "import sys, argparse, edgeagent.agent as a; from edgeagent.config import *;"
        "p = argparse.ArgumentParser(); add_agent_arguments(p);"
        "c = load_config(p.parse_args(['--name', 'n', '--no-mdns']));"
        "f = a.build_features(c); print('services' in f, 'zeroconf' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "False"]
