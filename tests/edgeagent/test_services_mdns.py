"""mDNS service import and export with a real agent in a private network namespace (root):
a CoAP device announced by zeroconf as ``_coap._udp`` appears in the catalog, owned by the
agent, and is withdrawn with its goodbye; a hostile name is refused and counted; a mesh
service is announced on the LAN as ``_coap._udp`` at the agent's CoAP port, and the agent does
not import its own export. The sans-IO rules are tested in tests/overlay/test_svc_mdns.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from testbed.loopback import LoopbackCluster
from tests.host_tools import needs_netns

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 60.0

ANNOUNCE = """
import asyncio, sys
from zeroconf import IPVersion
from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf
async def main():
    zc = AsyncZeroconf(interfaces=["127.0.0.1"], ip_version=IPVersion.V4Only)
    infos = []
    for label, port, props in [("Thermo Hall", 5699, {"path": "/t"}), ("node", 5698, {})]:
        info = AsyncServiceInfo("_coap._udp.local.", f"{label}._coap._udp.local.", port=port,
            properties=props, server="device-1.local.", parsed_addresses=["127.0.0.1"])
        await (await zc.async_register_service(info))
        infos.append(info)
    print("announced", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    for info in infos:
        await (await zc.async_unregister_service(info))
    await zc.async_close()
asyncio.run(main())
"""

BROWSE = """
import asyncio, json, sys
from zeroconf import IPVersion
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf
async def main():
    zc = AsyncZeroconf(interfaces=["127.0.0.1"], ip_version=IPVersion.V4Only)
    names = set()
    AsyncServiceBrowser(zc.zeroconf, "_coap._udp.local.",
                        handlers=[lambda zeroconf, service_type, name, state_change: names.add(name)])
    found = {}
    for _ in range(40):
        await asyncio.sleep(0.5)
        if any(n.startswith(sys.argv[1] + ".") for n in names):
            break
    for name in names:
        info = AsyncServiceInfo("_coap._udp.local.", name)
        if await info.async_request(zc.zeroconf, 3000):
            found[name] = {"port": info.port, "txt": {k.decode(): (v or b"").decode()
                           for k, v in (info.properties or {}).items()}}
    print(json.dumps(found))
    await zc.async_close()
asyncio.run(main())
"""


def in_netns(ns: str, code: str, *args: str, **kw: object) -> list[str]:
    return ["ip", "netns", "exec", ns, sys.executable, "-c", code, *args]


@needs_netns("ip")
def test_lan_coap_device_is_imported_and_mesh_services_exported(multicast_netns: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    wrapper = ["ip", "netns", "exec", multicast_netns]
    # CoAP on: a service is exported at the agent's CoAP port, so a router must answer there.
    with LoopbackCluster(1, seeds=False, mdns=True, coap=True, wrapper=wrapper) as cluster:
        (agent,) = cluster.agents
        device = subprocess.Popen(
            in_netns(multicast_netns, ANNOUNCE), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            text=True, env=env,
        )  # fmt: skip
        try:
            assert device.stdout is not None and device.stdout.readline().strip() == "announced"

            def imported() -> list[dict[str, object]]:
                return [r for r in agent.call("services") if r["name"] == "thermo-hall"]

            cluster.wait_for(lambda: bool(imported()), TIMEOUT, "the device imported")
            (row,) = imported()
            assert (row["node"], row["endpoint"], row["state"], row["tags"]) == (
                agent.name, "coap://127.0.0.1:5699/t", "healthy", {"src": "mdns"}
            )  # fmt: skip
            cluster.wait_for(
                lambda: agent.status()["services_mdns_refused"].get("bad_name", 0) >= 1,
                TIMEOUT, "the reserved name refused and counted",
            )  # fmt: skip
            assert all(r["name"] != "node" for r in agent.call("services"))

            agent.call("service", op="register", name="temperature", uri="coap://127.0.0.1:5684")
            browse = subprocess.run(
                in_netns(multicast_netns, BROWSE, "temperature"), capture_output=True, text=True,
                env=env, timeout=TIMEOUT, check=True,
            )  # fmt: skip
            found = json.loads(browse.stdout)
            exported = found.get("temperature._coap._udp.local.")
            assert exported == {"port": 5683, "txt": {"ea": "1", "path": "/mesh/temperature"}}
            assert "thermo-hall._coap._udp.local." not in found  # imports are not re-exported
            assert "temperature" in agent.status()["services_mdns_exported"]
            # The agent saw its own export and did not import it as a device.
            cluster.wait_for(
                lambda: agent.status()["services_mdns_refused"].get("mesh_export", 0) >= 1,
                TIMEOUT, "its own export seen and refused",
            )  # fmt: skip
            assert [r["node"] for r in agent.call("services") if r["name"] == "temperature"] == [
                agent.name
            ]
            assert all(r["tags"] != {"src": "mdns"} or r["name"] == "thermo-hall"
                       for r in agent.call("services"))  # fmt: skip
        finally:
            if device.poll() is None:
                device.communicate("", timeout=TIMEOUT)  # EOF: the goodbyes
        cluster.wait_for(lambda: not imported(), TIMEOUT, "the device withdrawn")
