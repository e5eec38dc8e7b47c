"""CoAP through the mesh refuses channel peers whose certificate is not of the mesh CA.

Three real agents on loopback (separate state dirs). node2 runs with ``--coap off``, so its
channel port (gossip + 2) is free, and an impostor takes it: an agent channel whose node
certificate names node2 but is issued by *another* mesh CA. node2 publishes ``lonely``, a
plain CoAP server on its own address, as its only instance.

- Outbound: a client asking node1 for ``lonely`` gets 5.02; node1 refused the impostor's
  certificate (``channel_stats.refused_peers`` in ``edgeagent status``), and nothing reached
  the impostor's handler or node2's server (its own ``/hits`` counter, read directly).
- Inbound: a TLS client that trusts the mesh CA but presents a foreign certificate (or none)
  opens node1's channel and sends a well-formed CoAP envelope for node1's own instance: no
  reply, ``inbound_refused`` counted, node1's server untouched.
- Meanwhile node1 -> node3 (honest, same CA) keeps answering.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import aiocoap
import pytest

from edgeagent import channel, mtls, onboarding
from edgeagent.config.schema import CHANNEL_PORT_OFFSET
from overlay import channel as mux
from overlay import coap_route as cr
from overlay.pki import CertIdentity
from testbed.loopback import LoopbackCluster, free_port
from tests.edgeagent.test_coap import start_server

TIMEOUT = 30.0


class Impostor:
    """A channel at node2's channel address with a node2 certificate from another CA."""

    def __init__(self, state_dir: Path) -> None:
        onboarding.provision_member(onboarding.new_ca("loopback"), state_dir, "node2")
        self.state_dir = state_dir
        tls = mtls.load_channel_tls(state_dir, dt.datetime.now(dt.UTC))
        self.seen: list[bytes] = []
        self.channel = channel.Channel(tls, self.handle)

    async def handle(self, peer: CertIdentity, request: bytes) -> bytes:
        self.seen.append(request)
        return cr.encode_reply(cr.ReplyStatus.ANSWERED, cr.Message(cr.code(2, 5), (), b"fake"))


class Scene:
    def __init__(
        self,
        cluster: LoopbackCluster,
        port: int,
        servers: list[subprocess.Popen[str]],
        ingress: str,
    ) -> None:
        self.cluster, self.port, self.servers, self.ingress = cluster, port, servers, ingress
        self.node1, self.node2, self.node3 = cluster.agents


@pytest.fixture(scope="module")
def scene() -> Iterator[Scene]:
    cluster = LoopbackCluster(3, coap=True)
    coap_port = free_port([a.host for a in cluster.agents])  # not 5683: others' agents hold *:5683
    for agent in cluster.agents:
        i = agent.argv.index("--coap")
        agent.argv[i + 1] = "off" if agent.name == "node2" else f"{agent.host}:{coap_port}"
    with cluster:
        cluster.wait_converged(TIMEOUT)
        hosts = [a.host for a in cluster.agents]
        port = free_port(hosts)
        servers = [
            start_server(h, port, a.name) for h, a in zip(hosts, cluster.agents, strict=True)
        ]
        try:
            for agent, name in zip(
                cluster.agents, ("local1", "lonely", "temperature"), strict=True
            ):
                agent.call("service", op="register", name=name, uri=f"coap://{agent.host}:{port}")
            cluster.wait_for(
                lambda: (
                    {r["name"] for r in cluster.agents[0].call("coap")["instances"]}
                    == {"local1", "lonely", "temperature"}
                ),
                TIMEOUT,
                "node1 sees the three services",
            )
            yield Scene(cluster, port, servers, f"{cluster.agents[0].host}:{coap_port}")
        finally:
            for proc in servers:
                proc.kill()
                proc.wait()


async def coap(uri: str) -> aiocoap.Message:
    ctx = await aiocoap.Context.create_client_context(transports=["udp6"])
    try:
        async with asyncio.timeout(15):
            return await ctx.request(aiocoap.Message(code=aiocoap.GET, uri=uri)).response
    finally:
        await ctx.shutdown()


async def hits(host: str, port: int) -> int:
    return int((await coap(f"coap://{host}:{port}/hits")).payload)


def channel_stats(agent: object) -> dict[str, int]:
    stats: dict[str, int] = agent.status()["channel_stats"]  # type: ignore[attr-defined]
    return stats


def test_an_instance_behind_a_foreign_certificate_is_not_reached(
    scene: Scene, tmp_path: Path
) -> None:
    async def run() -> None:
        impostor = Impostor(tmp_path / "impostor")
        node2 = scene.node2
        await impostor.channel.serve(node2.host, node2.port + CHANNEL_PORT_OFFSET)
        try:
            before = channel_stats(scene.node1).get("refused_peers", 0)
            response = await coap(f"coap://{scene.ingress}/mesh/lonely/temp")
            assert response.code == aiocoap.BAD_GATEWAY, response
            assert channel_stats(scene.node1).get("refused_peers", 0) > before
            assert impostor.seen == []
            assert await hits(node2.host, scene.port) == 0
            honest = await coap(f"coap://{scene.ingress}/mesh/temperature/temp")
            assert (honest.code, honest.payload) == (aiocoap.CONTENT, b"node3")
        finally:
            await impostor.channel.close()

    asyncio.run(run())


def _client_context(ca_file: Path, cert_dir: Path | None) -> ssl.SSLContext:
    """Trusts the mesh CA (so our side of the handshake completes); presents cert_dir's."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.load_verify_locations(ca_file)
    if cert_dir is not None:
        ctx.load_cert_chain(
            cert_dir / onboarding.NODE_CERT_FILE, cert_dir / onboarding.NODE_KEY_FILE
        )
    return ctx


async def _send_envelope(
    host: str, port: int, ctx: ssl.SSLContext, envelope: bytes
) -> list[object]:
    """HELLO + OPEN(envelope, END) on a raw TLS connection; the mux events read back."""
    conn = mux.Connection(client=True, now=0.0)
    conn.open_stream(envelope, end=True)
    events: list[object] = []
    try:
        reader, writer = await asyncio.open_connection(host, port, ssl=ctx, server_hostname="")
    except (OSError, ssl.SSLError):
        return events  # refused during the handshake already
    try:
        writer.write(conn.data_to_send())
        async with asyncio.timeout(5):
            while data := await reader.read(65536):
                events += conn.receive_data(data, 0.0)
    except (OSError, ssl.SSLError):
        pass
    finally:
        writer.close()
    return events


def test_a_client_with_a_foreign_certificate_or_none_is_refused_at_the_channel(
    scene: Scene, tmp_path: Path
) -> None:
    node1 = scene.node1
    ca_file = node1.state_dir / onboarding.CA_CERT_FILE
    foreign = tmp_path / "foreign"
    onboarding.provision_member(onboarding.new_ca("loopback"), foreign, "node2")
    msg = cr.Message(cr.code(0, 1), ((cr.URI_PATH, b"temp"), (cr.HOP_LIMIT, b"\x05")), b"", cr.NON)
    envelope = cr.encode_request(
        cr.MeshRequest("local1", f"coap://{node1.host}:{scene.port}", 2000, msg)
    )

    async def run() -> None:
        before = channel_stats(node1).get("inbound_refused", 0)
        for cert_dir in (foreign, None):
            events = await _send_envelope(
                node1.host,
                node1.port + CHANNEL_PORT_OFFSET,
                _client_context(ca_file, cert_dir),
                envelope,
            )
            replies = [e for e in events if isinstance(e, (mux.StreamOpened, mux.DataReceived))]
            assert replies == [], cert_dir
        deadline = asyncio.get_running_loop().time() + TIMEOUT
        while channel_stats(node1).get("inbound_refused", 0) < before + 2:
            assert asyncio.get_running_loop().time() < deadline, channel_stats(node1)
            await asyncio.sleep(0.1)
        assert node1.status()["coap_stats"].get("channel_requests", 0) == 0
        assert await hits(node1.host, scene.port) == 0
        honest = await coap(f"coap://{scene.ingress}/mesh/local1/temp")
        assert (honest.code, honest.payload) == (aiocoap.CONTENT, b"node1")

    asyncio.run(run())
