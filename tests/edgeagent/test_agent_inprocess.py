"""The Agent in-process: the feature host a feature starts on, feature switches, a clean stop."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

from edgeagent.control import socket_path
from edgeagent.driver import View
from edgeagent.host import FeatureHost
from tests.edgeagent.inprocess import TIMEOUT, call, make_agent, wait_for


class Hello:
    """A feature using the host: a command, a listener, state, a DNS resolver, a status field."""

    def __init__(self) -> None:
        self.views: list[View] = []
        self.host: FeatureHost | None = None
        self.stopped = False

    async def start(self, host: FeatureHost) -> None:
        self.host = host
        host.register_command("hello", lambda request: f"hello {request.get('who')}")
        host.add_listener(lambda events, view: self.views.append(view))
        host.add_status(lambda: {"hello": True})
        host.add_service_resolver(lambda label: ["192.0.2.5"] if label == "web" else [])
        await host.call(lambda core, now: core.set_state("hello", "world", now))

    async def stop(self) -> None:
        self.stopped = True


async def test_a_feature_adds_commands_state_and_status_and_hears_updates(
    state_dir: Path,
) -> None:
    hello = Hello()
    agent = make_agent(state_dir, extra_features={"hello": hello})
    run = asyncio.create_task(agent.run())
    await wait_for(lambda: agent.started, "the agent to start its features")

    assert await call(state_dir, "hello", who="feature") == "hello feature"
    members = await call(state_dir, "members")
    assert [(m["name"], m["state"]) for m in members] == [("solo", "alive")]
    await wait_for(lambda: bool(hello.views), "an update to reach the listener")
    assert hello.views[-1].local.name == "solo"
    host = hello.host
    assert host is not None and agent.feature("hello") is hello
    assert await host.num_alive() == 1
    assert [(m.name, v) for m, v in await host.member_states("hello")] == [("solo", "world")]
    await asyncio.wrap_future(host.delete_state("hello"))
    assert [(m.name, v) for m, v in await host.member_states("hello")] == [("solo", None)]
    assert [m.name for m in await host.members()] == ["solo"]
    assert (await host.snapshot()).local.addr == host.address == agent.driver.address
    assert (await call(state_dir, "status"))["hello"] is True
    assert host.resolve_service("web") == ["192.0.2.5"] and host.resolve_service("x") == []
    assert host.state_dir == state_dir and host.metrics is None

    agent.request_stop()
    assert await asyncio.wait_for(run, TIMEOUT) == 0
    assert hello.stopped
    assert not socket_path(state_dir).exists()


# Run in a fresh interpreter: other tests in this process import these modules themselves.
_SWITCHED_OFF = """
import asyncio, json, socket, sys, time
from pathlib import Path
sys.path.insert(0, {root!r})
from tests.edgeagent.inprocess import make_agent

async def main():
    agent = make_agent(Path({state_dir!r}), "solo", "--dns", "off")
    run = asyncio.create_task(agent.run())
    while not agent.started:
        assert not run.done(), run.result()
        await asyncio.sleep(0.05)
    loaded = sorted(sys.modules)
    host, port = agent.driver.address
    try:  # the channel's port (gossip + 2): nobody listens there with --coap off --mqtt off
        socket.create_connection((host, port + 2), timeout=2).close()
        channel_bound = True
    except ConnectionRefusedError:
        channel_bound = False
    features = sorted(agent._features)
    agent.request_stop()
    assert await run == 0
    print(json.dumps(dict(loaded=loaded, channel_bound=channel_bound, features=features)))

asyncio.run(main())
"""


def test_switched_off_features_are_not_imported(state_dir: Path) -> None:
    root = str(Path(__file__).resolve().parents[2])
    code = _SWITCHED_OFF.format(root=root, state_dir=str(state_dir))
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=TIMEOUT
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    loaded = set(result["loaded"])
    assert not {"coap", "mqtt", "channel"} & set(result["features"])
    assert not result["channel_bound"]
    always = {"edgeagent.features.keys", "edgeagent.features.addresses", "edgeagent.features.services"}
    assert always <= loaded
    for module in ("edgeagent.features.mdns", "overlay.mdns", "zeroconf",
                   "edgeagent.features.services_mdns", "overlay.svc_mdns",
                   "edgeagent.features.dns", "overlay.dns", "dns",
                   "edgeagent.features.metrics", "edgeagent.metrics",
                   # --coap off --mqtt off (make_agent's defaults): no router, no aiocoap,
                   # no broker, no channel
                   "edgeagent.features.coap", "edgeagent.coap_proxy", "aiocoap",
                   "overlay.coap_route", "edgeagent.features.channel", "edgeagent.channel",
                   "overlay.channel", "edgeagent.mtls", "edgeagent.features.mqtt",
                   "edgeagent.mqtt_mesh", "overlay.mqtt.broker", "overlay.mqtt.codec",
                   "aiomqtt",
                   # no [policy] trusted_keys: no policy store, no bundle parser
                   "edgeagent.features.policy", "overlay.policy"):  # fmt: skip
        assert module not in loaded, f"{module} imported although switched off"

