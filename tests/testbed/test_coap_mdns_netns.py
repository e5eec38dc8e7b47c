"""A LAN device found by mDNS on one host is reached by name from another, across namespaces.

Four namespace hosts on one bridge, each with its own state dir and agent. On h1 a plain
aiocoap server (``testbed.coap_server``), not registered with any agent, announces itself
with python-zeroconf as ``thermo._coap._udp.local.``; h1's agent imports it by mDNS
(``edgeagent/features/services_mdns.py``) as an instance of ``thermo`` it owns. h2..h4 run
with ``[services] mdns_import = false``, so h1 is the only importer (on one L2 segment every
agent would otherwise import the device for itself). A CoAP client run inside h4's namespace
asks h4's agent for ``thermo.mesh`` (Uri-Host, and Proxy-Uri), so the request crosses the
agent channel h4 -> h1 and the answer comes from the device. Every process and namespace is
removed by PID / name afterwards (``netns.scoped_network``).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgeagent.agent_process import AgentProcess, agent_env
from edgeagent.onboarding import new_ca, provision_member
from testbed import netns
from tests.host_tools import needs_netns

pytestmark = [needs_netns("ip"), pytest.mark.root, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
PORT = 7946
COAP_PORT = 5683
DEVICE_PORT = 5690
TIMEOUT = 40.0

CLIENT = """
import asyncio, sys
import aiocoap

async def main(agent):
    ctx = await aiocoap.Context.create_client_context(transports=["udp6"])
    reverse = aiocoap.Message(code=aiocoap.GET, uri=f"coap://{agent}/temp")
    reverse.opt.uri_host = "thermo.mesh"
    proxied = aiocoap.Message(code=aiocoap.GET, proxy_uri="coap://thermo.mesh/temp")
    proxied.unresolved_remote = agent
    for msg in (reverse, proxied):
        r = await asyncio.wait_for(ctx.request(msg).response, 15)
        print(r.code.dotted, r.payload.decode(errors="replace"))
    await ctx.shutdown()

asyncio.run(main(sys.argv[1]))
"""


def _thermo_rows(agent: AgentProcess) -> list[dict[str, object]]:
    try:
        rows: list[dict[str, object]] = agent.call("coap")["instances"]
    except Exception:  # not answering yet
        return []
    return [r for r in rows if r["name"] == "thermo"]


def _wait(predicate: object, what: str, agents: list[AgentProcess]) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            for agent in agents:
                print(f"===== {agent.name} =====\n{agent.log_tail(30)}")
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.5)


def test_an_mdns_device_on_h1_is_reached_by_name_from_h4(tmp_path: Path) -> None:
    ca = new_ca("nscoap")
    env = agent_env({"PYTHONPATH": str(ROOT)})
    no_import = tmp_path / "no-import.toml"
    no_import.write_text("[services]\nmdns_import = false\n")
    agents: list[AgentProcess] = []
    device: subprocess.Popen[str] | None = None
    with netns.scoped_network(4) as net:
        h1, h4 = net.hosts[0], net.hosts[3]
        try:
            for host in net.hosts:
                state = tmp_path / host.name
                provision_member(ca, state, host.name)
                argv = [sys.executable, "-m", "edgeagent", "run", "--name", host.name,
                        "--bind", f"{host.ip}:{PORT}", "--state-dir", str(state),
                        "--preset", "local", "--coap", f"{host.ip}:{COAP_PORT}"]  # fmt: skip
                if host is not h1:
                    argv += ["--config", str(no_import), "--join", f"{h1.ip}:{PORT}"]
                agent = AgentProcess(host.name, net.exec_argv(host, argv), state,
                                     tmp_path / f"{host.name}.log", env)  # fmt: skip
                agents.append(agent)
                agent.start(wait=False)
            for agent in agents:
                agent.wait_ready()
            device = subprocess.Popen(
                net.exec_argv(h1, [sys.executable, "-m", "testbed.coap_server", h1.ip,
                                   str(DEVICE_PORT), "thermo", "--mdns", "thermo"]),
                stdout=subprocess.PIPE, text=True, cwd=ROOT, env=env,
            )  # fmt: skip
            assert device.stdout is not None and device.stdout.readline().strip() == "ready"
            _wait(
                lambda: (
                    [(r["node"], r["state"]) for r in _thermo_rows(agents[3])]
                    == [("h1", "healthy")]
                ),
                "h4 to see thermo, imported by h1 only",
                agents,
            )
            row = _thermo_rows(agents[0])[0]
            assert row["endpoint"] == f"coap://{h1.ip}:{DEVICE_PORT}", row
            assert row["tags"], row  # the import tag
            out = subprocess.run(
                net.exec_argv(h4, [sys.executable, "-c", CLIENT, f"{h4.ip}:{COAP_PORT}"]),
                capture_output=True, text=True, timeout=60, env=env,
            )  # fmt: skip
            assert out.stdout.splitlines() == ["2.05 thermo", "2.05 thermo"], (
                out.stdout,
                out.stderr,
            )
            stats = agents[3].status()["coap_stats"]
            assert stats.get("remote_tries", 0) >= 2 and not stats.get("local_tries"), stats
            assert agents[0].status()["coap_stats"].get("channel_requests", 0) >= 2
        except BaseException:
            for agent in agents:
                print(f"===== {agent.name} =====\n{agent.log_tail(30)}")
            raise
        finally:
            for agent in agents:
                agent.kill()
            if device is not None:
                device.kill()
                device.wait()
