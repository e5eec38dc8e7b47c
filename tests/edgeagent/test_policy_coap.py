"""Intentions at the destination agent: a channel CoAP request (or observe registration) from
a peer the active policy denies is answered 4.03 before any instance is looked up."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from edgeagent.coap_observe import Observations
from edgeagent.coap_proxy import FORBIDDEN, Router, Upstream
from edgeagent.features.policy import Policy
from overlay import coap_observe as co
from overlay import coap_route as cr
from overlay import policy as pol
from overlay.balancer import Balancer
from overlay.catalog import Catalog, encode_instances, make_instance
from overlay.pki import CertIdentity

BUNDLE = b"""
version = 1
issued = 1
[intentions]
default = "deny"
rules = [{source = "service:web", destination = "t", action = "allow"},
         {source = "node:ops", destination = "*", action = "allow"}]
"""


class _Directory:
    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self.balancer = Balancer(catalog, random.Random(1))


class _Host:
    def __init__(self, directory: _Directory) -> None:
        self.directory = directory

    def feature(self, name: str) -> Any:
        assert name == "services"
        return self.directory


def _setup() -> tuple[Router, Policy]:
    catalog = Catalog("me")
    catalog.on_state("me", encode_instances([make_instance("t", "coap://127.0.0.1:9")]))
    catalog.on_state("webnode", encode_instances([make_instance("web", "coap://127.0.0.2:9")]))
    directory = _Directory(catalog)
    router = Router(directory, "me", lambda name: None, Upstream())
    policy = Policy()
    policy._host = _Host(directory)  # type: ignore[assignment]
    policy.active = pol.parse_bundle(BUNDLE)
    router.authorize = policy.allows_peer
    return router, policy


def _identity(name: str) -> CertIdentity:
    ident = CertIdentity.__new__(CertIdentity)
    object.__setattr__(ident, "name", name)
    return ident


def test_denied_peer_gets_403_and_allowed_peers_pass_the_check() -> None:
    router, policy = _setup()
    # An endpoint that is not ours: past the policy check the answer is 4.04 (REFUSED).
    get = cr.Message(1, ((cr.URI_PATH, b"x"),))
    request = cr.encode_request(cr.MeshRequest("t", "coap://127.0.0.1:10", 1000, get))

    def serve(peer: str) -> tuple[cr.ReplyStatus, cr.Message]:
        return cr.decode_reply(asyncio.run(router.serve_channel(_identity(peer), request)))

    status, msg = serve("stranger")
    assert (status, msg.code) == (cr.ReplyStatus.ANSWERED, FORBIDDEN)
    assert router.stats["channel_forbidden"] == 1 and policy.denied == 1
    assert serve("webnode")[1].code == cr.NOT_FOUND  # runs service web: allowed
    assert serve("ops")[1].code == cr.NOT_FOUND  # node rule
    assert router.stats["channel_forbidden"] == 1
    policy.active = None  # no bundle: everyone, as before policy existed
    assert serve("stranger")[1].code == cr.NOT_FOUND


def test_denied_peer_cannot_register_an_observation() -> None:
    router, policy = _setup()
    observations = Observations(router)
    get = cr.Message(1, ((cr.OBSERVE, b""), (cr.URI_PATH, b"x")))  # Observe: 0 (register)
    data = co.encode_observe_request(cr.MeshRequest("t", "coap://127.0.0.1:9", 1000, get))

    async def frames() -> list[tuple[cr.ReplyStatus, cr.Message]]:
        reader = co.NotificationReader()
        out = []
        async for part in await observations.serve(_identity("stranger"), data):
            out += reader.feed(part)
        return out

    assert [(s, m.code) for s, m in asyncio.run(frames())] == [(cr.ReplyStatus.ANSWERED, FORBIDDEN)]
    assert policy.denied == 1


@contextlib.contextmanager
def _serving_pair(tmp_path: Path) -> Iterator[tuple[Any, Any, Callable[[int, str], str]]]:
    """Two agent processes trusting one policy key, node1 serving ``temperature`` and node2
    seeing it: (owner, ingress, signed) with ``signed(version, sections)`` an envelope path."""
    import base64

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from testbed.loopback import LoopbackCluster, free_port
    from tests.edgeagent.test_coap import start_server

    key = Ed25519PrivateKey.generate()
    conf = tmp_path / "agent.toml"
    raw = base64.b64encode(pol.raw_public_key(key.public_key())).decode()
    conf.write_text(f'[policy]\ntrusted_keys = ["{raw}"]\n')

    def signed(version: int, sections: str) -> str:
        path = tmp_path / f"v{version}.signed"
        path.write_bytes(pol.sign(f"version = {version}\nissued = 1\n{sections}".encode(), key))
        return str(path)

    with LoopbackCluster(
        2, coap=True, debug_commands=True, extra_args=["--config", str(conf)]
    ) as cluster:
        cluster.wait_converged(30.0)
        owner, ingress = cluster.agents
        port = free_port([owner.host])
        server = start_server(owner.host, port, owner.name)
        try:
            owner.call(
                "debug-coap-publish",
                instances=[{"name": "temperature", "uri": f"coap://{owner.host}:{port}"}],
            )
            cluster.wait_for(
                lambda: len(ingress.call("coap")["instances"]) == 1, 30.0, "node2 sees the instance"
            )
            yield owner, ingress, signed
        finally:
            server.kill()
            server.wait()


def _codes(host: str, n: int = 1) -> list[str]:
    """The response codes of ``n`` GETs of temperature through the agent at ``host``."""
    import aiocoap

    async def run() -> list[str]:
        ctx = await aiocoap.Context.create_client_context(transports=["udp6"])
        out = []
        try:
            for _ in range(n):
                msg = aiocoap.Message(code=aiocoap.GET, uri=f"coap://{host}/mesh/temperature/temp")
                async with asyncio.timeout(15):
                    out.append(str((await ctx.request(msg).response).code))
        finally:
            await ctx.shutdown()
        return out

    return asyncio.run(run())


def test_real_agents_deny_with_403_then_allow_after_a_new_bundle(tmp_path: Path) -> None:
    """node1 serves ``temperature``, clients ask node2. A bundle denying node2 makes node1
    answer 4.03 (counted on node1); the next version, applied without a restart, lets the
    request through."""
    deny = '[intentions]\nrules = [{source = "node:node2", destination = "temperature", action = "deny"}]\n'
    with _serving_pair(tmp_path) as (owner, ingress, signed):
        assert _codes(ingress.host) == ["2.05 Content"]  # no policy yet
        assert owner.call("policy-apply", path=signed(1, deny))["accepted"]
        assert _codes(ingress.host) == ["4.03 Forbidden"]
        assert owner.call("policy-status")["denied"] == 1
        assert owner.call("status")["coap_stats"]["channel_forbidden"] == 1
        assert owner.call("policy-apply", path=signed(2, ""))["accepted"]
        assert _codes(ingress.host) == ["2.05 Content"]


def test_real_agents_enforce_faults_and_rate_limits_without_a_restart(tmp_path: Path) -> None:
    """v1 injects an abort at the caller (node2's balancer): 5.03. v2, on both nodes, drops
    the fault and limits node2 to a burst of 2 at node1: 2.05, 2.05, then 4.29."""
    fault = '[faults.temperature]\nabort_percent = 100\nabort_code = "5.03"\n'
    limit = '[rate_limits."node:node2"]\nrate = 0.001\nburst = 2\n'
    with _serving_pair(tmp_path) as (owner, ingress, signed):
        assert ingress.call("policy-apply", path=signed(1, fault))["accepted"]
        assert _codes(ingress.host) == ["5.03 Service Unavailable"]
        for agent in (owner, ingress):
            assert agent.call("policy-apply", path=signed(2, limit))["accepted"]
        assert _codes(ingress.host, 3) == ["2.05 Content", "2.05 Content", "4.29 Too Many Requests"]
        assert owner.call("policy-status")["rate_limited"] == 1
        assert owner.call("status")["coap_stats"]["rate_limited"] == 1
