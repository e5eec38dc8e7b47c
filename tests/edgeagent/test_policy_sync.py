"""Policy sync and spread (issue 11): bundles fetched from peers over the agent channel, from a
cloud HTTPS endpoint (ETag, 304, outage, bad certificate), and the reported state sent up.

Peers: three in-process agents of one cluster on 127.0.0.x (one gossip port each, the
channel at gossip port + 2). The HTTPS endpoint is a stdlib ``http.server`` with ``ssl`` on
127.0.0.1, its certificate from a CA the test makes with ``cryptography``.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import ipaddress
import json
import logging
import random
import tempfile
import threading
import time
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import NameOID

from edgeagent.features.policy import Policy
from edgeagent.localmesh import free_port
from edgeagent.policy_sync import CloudPoll, Reporter
from overlay import policy as pol
from testbed.containers.policy_server import REPORT_PATH, State, make_server
from tests.edgeagent import inprocess
from tests.edgeagent.inprocess import Running, call, wait_for

HOSTS = ("127.0.0.21", "127.0.0.22", "127.0.0.23")


@pytest.fixture
def base() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="ea-pol-") as d:  # short: control socket paths
        yield Path(d)


def envelope(key: Ed25519PrivateKey, version: int, deny: str = "node:x") -> bytes:
    text = (
        f"version = {version}\nissued = {int(time.time()) - 60}\n[intentions]\n"
        f'rules = [{{source = "{deny}", destination = "db", action = "deny"}}]\n'
    )
    return pol.sign(text.encode(), key)


def write_config(base: Path, key: Ed25519PrivateKey, extra: str = "") -> Path:
    raw = base64.b64encode(pol.raw_public_key(key.public_key())).decode()
    path = base / "agent.toml"
    path.write_text(f'[policy]\ntrusted_keys = ["{raw}"]\n{extra}')
    return path


def policy_of(running: Running) -> Policy:
    feature = running.agent.feature("policy")
    assert isinstance(feature, Policy)
    return feature


class Mesh:
    """Agents a, b, c on their own loopback addresses, one port (channel at port + 2)."""

    def __init__(self, base: Path, conf: Path) -> None:
        self.base, self.conf = base, conf
        self.port = free_port([*HOSTS])
        while not all(_tcp_free(h, self.port + 2) for h in HOSTS):
            self.port = free_port([*HOSTS])
        self.agents: dict[str, Running] = {}

    async def start(self, name: str, join: str | None = None) -> Running:
        host = HOSTS["abc".index(name)]
        flags = ["--bind", f"{host}:{self.port}", "--config", str(self.conf)]
        if join is not None:
            flags += ["--join", f"{HOSTS['abc'.index(join)]}:{self.port}"]
        running = await inprocess.start(self.base / name, name, flags, shared=self.base)
        self.agents[name] = running
        return running

    async def apply(self, name: str, data: bytes, version: int) -> dict[str, Any]:
        path = self.base / f"v{version}.signed"
        path.write_bytes(data)
        return dict(await call(self.agents[name].state_dir, "policy-apply", path=str(path)))

    async def stop_all(self) -> None:
        for running in list(self.agents.values()):
            if not running.task.done():
                await inprocess.stop(running)


def _tcp_free(host: str, port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


async def enforcing(mesh: Mesh, names: str, version: int) -> None:
    await wait_for(
        lambda: all(policy_of(mesh.agents[n]).version == version for n in names),
        f"{names} to enforce version {version}",
    )


async def test_peers_spread_a_bundle_and_an_offline_node_catches_up(base: Path) -> None:
    key = Ed25519PrivateKey.generate()
    mesh = Mesh(base, write_config(base, key))
    try:
        await mesh.start("a")
        await mesh.start("b", join="a")
        await mesh.start("c", join="a")
        await wait_for(lambda: len(mesh.agents["c"].agent.host.view.members) == 3, "3 members")
        assert (await mesh.apply("a", envelope(key, 1), 1))["accepted"]
        await enforcing(mesh, "abc", 1)
        status = await call(mesh.agents["b"].state_dir, "policy-status")
        assert status["source"] == "peer:a" and status["high_water"] == 1
        assert not policy_of(mesh.agents["c"]).allows("x", [], "db")  # c enforces v1's rule

        await inprocess.stop(mesh.agents["c"])  # c is offline during three updates
        for version in (2, 3, 4):
            assert (await mesh.apply("a", envelope(key, version), version))["accepted"]
            await enforcing(mesh, "ab", version)
        await mesh.start("c", join="b")
        await enforcing(mesh, "abc", 4)
        status = await call(mesh.agents["c"].state_dir, "policy-status")
        assert status["source"] in ("peer:a", "peer:b") and status["high_water"] == 4
        assert status["refusals"] == dict.fromkeys(pol.REASONS, 0)
    finally:
        await mesh.stop_all()


async def test_forged_or_rolled_back_bundles_from_a_peer_are_refused(base: Path) -> None:
    """b claims a newer version in its replicated state but serves a tampered envelope, then
    an old one, then one signed by a key c does not trust: c refuses each (counted), keeps
    its version, and does not hammer b (backoff per version)."""
    key, rogue = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    mesh = Mesh(base, write_config(base, key))
    try:
        await mesh.start("b")
        await mesh.start("c", join="b")
        await wait_for(lambda: len(mesh.agents["c"].agent.host.view.members) == 2, "2 members")
        assert (await mesh.apply("b", envelope(key, 2), 2))["accepted"]
        await enforcing(mesh, "bc", 2)
        b, c = policy_of(mesh.agents["b"]), policy_of(mesh.agents["c"])
        good = envelope(key, 9)
        doc = json.loads(good)
        doc["bundle"] = base64.b64encode(
            pol.parse_envelope(envelope(key, 9, deny="node:c")).bundle
        ).decode()
        served = [json.dumps(doc).encode(), envelope(key, 1), envelope(rogue, 9)]
        reasons = ["bad_signature", "rollback", "unknown_key"]
        for bad, reason in zip(served, reasons, strict=True):
            b.envelope = bad
            version = 10 + reasons.index(reason)
            await asyncio.wrap_future(b.host.set_state("pv", version))  # b lies about its version
            await wait_for(lambda r=reason: c.refusals[r] >= 1, f"c to refuse with {reason}")  # type: ignore[misc]
        assert c.version == 2 and c.high_water == 2 and c.source == "peer:b"
        assert c.peers is not None and c.peers.stats["fetched"] == 1  # only the honest v2
        status = await call(mesh.agents["c"].state_dir, "policy-status")
        assert status["last_refusal"].startswith("unknown_key")
        assert status["refusals"]["bad_signature"] == c.refusals["bad_signature"] >= 1
        assert c.peers.backoff_of(12)[0] >= 1  # version 12 is backed off, not fetched in a loop
    finally:
        await mesh.stop_all()


# -- the cloud endpoint ----------------------------------------------------------------------


def _name(text: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, text)])


def make_ca(tmp: Path, label: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(_name(label)).issuer_name(_name(label))
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    path = tmp / f"{label}.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key, cert, path


def server_cert(
    tmp: Path, ca_key: ec.EllipticCurvePrivateKey, ca: x509.Certificate
) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(_name("policy-endpoint")).issuer_name(ca.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    cert_path, key_path = tmp / "server.pem", tmp / "server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


class Endpoint:
    """The cloud: the container testbed's HTTPS endpoint (``policy_server``: GET /policy with
    an ETag, 304 on a match; POST /report keeps each report) on loopback. Stop and start
    again on the same port to simulate an outage; what it counted survives that."""

    def __init__(self, tmp: Path) -> None:
        ca_key, ca_cert, self.ca = make_ca(tmp, "cloud-ca")
        self.cert, self.key = server_cert(tmp, ca_key, ca_cert)
        self.www = tmp / "www"
        self.www.mkdir()
        self.state = State()
        self.port = 0
        self.server: ThreadingHTTPServer | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}/policy"

    @property
    def report_url(self) -> str:
        return f"https://127.0.0.1:{self.port}{REPORT_PATH}"

    @property
    def envelope(self) -> bytes:
        path = self.www / "policy"
        return path.read_bytes() if path.exists() else b""

    @envelope.setter
    def envelope(self, data: bytes) -> None:
        tmp = self.www / ".policy.tmp"
        tmp.write_bytes(data)
        tmp.replace(self.www / "policy")  # atomically, as the testbed publishes

    @property
    def answers(self) -> list[int]:
        """The status of each GET."""
        return list(self.state.answers)

    @property
    def reports(self) -> list[dict[str, Any]]:
        return list(self.state.recent)

    def start(self) -> None:
        server = make_server(self.www, self.cert, self.key, "127.0.0.1", self.port)
        server.RequestHandlerClass.state = self.state  # type: ignore[attr-defined]
        server.RequestHandlerClass.log_message = lambda *args: None  # type: ignore[assignment]
        server.handle_error = lambda request, address: None  # type: ignore[method-assign]
        self.port = server.server_address[1]
        self.server = server
        threading.Thread(target=server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None


@pytest.fixture
def cloud(tmp_path: Path) -> Iterator[Endpoint]:
    endpoint = Endpoint(tmp_path)
    yield endpoint
    endpoint.stop()


class FakePolicy:
    """The accept rule without an agent: :func:`overlay.policy.decide` and a mark."""

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self.trusted = pol.trusted_keys([key.public_key()])
        self.high_water = 0
        self.envelope: bytes | None = None
        self.outcomes: list[tuple[str, str | None]] = []

    async def offer(self, data: bytes, source: str) -> dict[str, Any]:
        decision = pol.decide(data, self.trusted, self.high_water, time.time())
        if decision.accepted:
            assert decision.bundle is not None
            self.high_water, self.envelope = decision.bundle.version, data
        self.outcomes.append((source, decision.reason))
        return {"accepted": decision.accepted, "reason": decision.reason}


async def test_poll_takes_updates_uses_the_etag_and_refuses_a_tampered_bundle(
    cloud: Endpoint,
) -> None:
    key = Ed25519PrivateKey.generate()
    policy = FakePolicy(key)
    poll = CloudPoll(policy, cloud.url, cloud.ca, interval=30.0)
    cloud.envelope = envelope(key, 1)
    assert await poll.poll_once() == 30.0
    assert policy.high_water == 1 and policy.outcomes == [("cloud", None)]
    await poll.poll_once()  # unchanged: 304, nothing offered
    assert (
        cloud.answers == [200, 304]
        and poll.stats["not_modified"] == 1
        and len(policy.outcomes) == 1
    )
    doc = json.loads(envelope(key, 2))
    doc["bundle"] = base64.b64encode(pol.parse_envelope(envelope(key, 3)).bundle).decode()
    cloud.envelope = json.dumps(doc).encode()
    await poll.poll_once()
    await poll.poll_once()  # the refused one is not offered again while its ETag holds
    assert policy.outcomes[1:] == [("cloud", "bad_signature")] and cloud.answers[-1] == 304
    cloud.envelope = envelope(key, 1)  # a replayed old bundle
    await poll.poll_once()
    cloud.envelope = envelope(key, 2)
    await poll.poll_once()
    assert [r for _, r in policy.outcomes[2:]] == ["rollback", None] and policy.high_water == 2
    assert poll.status()["reachable"] and poll.status()["etag"]


async def test_poll_outage_backs_off_logs_once_and_recovers(
    cloud: Endpoint, caplog: pytest.LogCaptureFixture
) -> None:
    key = Ed25519PrivateKey.generate()
    policy = FakePolicy(key)
    poll = CloudPoll(policy, cloud.url, cloud.ca, interval=20.0, rng=random.Random(7))
    cloud.stop()
    caplog.set_level(logging.INFO, logger="edgeagent.policy")
    delays = [await poll.poll_once() for _ in range(8)]
    assert poll.stats["failures"] == 8 and not poll.status()["reachable"]
    assert all(a <= b * 2 for a, b in zip(delays, delays[1:], strict=False))  # growing
    assert max(delays) <= 20.0 and delays[0] <= 1.0 and len(set(delays)) == len(delays)  # jitter
    assert "Connection" in (poll.status()["last_error"] or "")
    cloud.envelope = envelope(key, 5)
    cloud.start()
    assert await poll.poll_once() == 20.0 and policy.high_water == 5
    lines = [r.getMessage() for r in caplog.records if r.name == "edgeagent.policy"]
    assert lines == ["policy endpoint unreachable", "policy endpoint reachable again"]


async def test_poll_refuses_an_endpoint_certificate_of_another_ca(
    cloud: Endpoint, tmp_path: Path
) -> None:
    key = Ed25519PrivateKey.generate()
    policy = FakePolicy(key)
    _, _, other = make_ca(tmp_path, "other-ca")
    cloud.envelope = envelope(key, 1)
    poll = CloudPoll(policy, cloud.url, other, interval=5.0)
    await poll.poll_once()
    assert policy.outcomes == [] and "CERTIFICATE_VERIFY_FAILED" in (
        poll.status()["last_error"] or ""
    )
    assert cloud.answers == []  # no request got through


async def test_report_is_sent_when_it_changes_and_rate_limited(cloud: Endpoint) -> None:
    state = {"node": "a", "version": 1, "refusals": {"rollback": 0}}
    reporter = Reporter(cloud.report_url, cloud.ca, interval=7.0, reported=lambda: dict(state))
    assert await reporter.report_once() == 7.0  # sent; the next not before 7 s
    assert await reporter.report_once() == 0.0  # unchanged: nothing sent
    state["version"] = 2
    assert await reporter.report_once() == 7.0
    assert [r["version"] for r in cloud.reports] == [1, 2] and "reported_at" in cloud.reports[0]
    cloud.stop()
    state["version"] = 3
    assert 0 < await reporter.report_once() <= 7.0 and reporter.stats["failures"] == 1
    assert reporter.sent is not None and reporter.sent["version"] == 2  # retried, not dropped


async def test_agent_polls_the_cloud_spreads_to_a_peer_and_reports(
    base: Path, cloud: Endpoint
) -> None:
    """a polls the endpoint; b (no url) gets the bundle from a; a reports its state up."""
    key = Ed25519PrivateKey.generate()
    cloud.envelope = envelope(key, 3)
    extra = f'url = "{cloud.url}"\nca = "{cloud.ca}"\ninterval = 0.3\nreport_url = "{cloud.report_url}"\n'
    mesh = Mesh(base, write_config(base, key, extra))
    try:
        await mesh.start("a")
        await enforcing(mesh, "a", 3)
        mesh.conf = write_config(base, key)  # b has no cloud connection
        await mesh.start("b", join="a")
        await enforcing(mesh, "ab", 3)
        status = await call(mesh.agents["a"].state_dir, "policy-status")
        assert status["source"] == "cloud" and status["cloud"]["reachable"]
        assert (await call(mesh.agents["b"].state_dir, "policy-status"))["source"] == "peer:a"
        cloud.envelope = envelope(key, 4)
        await enforcing(mesh, "ab", 4)
        await wait_for(lambda: any(r.get("version") == 4 for r in cloud.reports), "a report of v4")
        report = next(r for r in cloud.reports if r.get("version") == 4)
        assert report["node"] == "a" and report["source"] == "cloud"
        assert report["health"]["members_alive"] == 2 and "rollback" in report["refusals"]
        await wait_for(lambda: 304 in cloud.answers, "a conditional poll answered 304")
    finally:
        await mesh.stop_all()


def test_config_sync_keys_and_their_errors(tmp_path: Path) -> None:
    import argparse

    from edgeagent.commands.policy import render_status
    from edgeagent.config import add_agent_arguments, load_config
    from edgeagent.errors import ConfigError

    key = Ed25519PrivateKey.generate()
    parser = argparse.ArgumentParser()
    add_agent_arguments(parser)

    def load(extra: str) -> Any:
        conf = write_config(tmp_path, key, extra)
        return load_config(parser.parse_args(["--config", str(conf), "--state-dir", str(tmp_path)]))

    config = load('url = "https://cloud.example:8443/p?site=1"\nca = "ca.pem"\ninterval = 5\n')
    assert (
        config.policy_url == "https://cloud.example:8443/p?site=1"
        and config.policy_interval_s == 5.0
    )
    assert config.policy_ca == tmp_path / "ca.pem" and config.policy_report_url == ""
    for bad, where in (('url = "http://cloud/p"', "policy.url"), ("interval = 0", "policy.interval"),
                       ('report_url = "https://:99999/"', "policy.report_url")):  # fmt: skip
        with pytest.raises(ConfigError, match=where):
            load(bad + "\n")
    text = render_status(
        {
            "version": 2,
            "cloud": {"url": "https://c/p", "reachable": False, "last_error": "HTTP 503"},
        }
    )
    assert "cloud: https://c/p unreachable (HTTP 503)" in text


def test_an_unreadable_endpoint_ca_is_one_config_error(tmp_path: Path) -> None:
    from edgeagent.errors import ConfigError
    from edgeagent.policy_sync import tls_context

    (tmp_path / "junk.pem").write_text("not a certificate")
    for path in (tmp_path / "missing.pem", tmp_path / "junk.pem"):
        with pytest.raises(ConfigError, match=r"policy.ca: .*cannot load the endpoint's CA"):
            tls_context(path)


async def test_peer_fetch_runs_one_round_at_a_time_and_backs_off_a_version() -> None:
    """Unit: three peers advertise versions above ours; one request at a time; junk from every
    peer ends the round and backs the version off; a malformed request is answered empty."""
    from edgeagent.policy_sync import PEER_SERVICE, PeerFetch

    key = Ed25519PrivateKey.generate()
    policy = FakePolicy(key)
    gate = asyncio.Event()
    asked: list[str] = []
    in_flight = [0, 0]  # now, most ever

    async def request(peer: str, data: bytes, timeout: float) -> bytes:
        assert data == bytes([PEER_SERVICE])
        asked.append(peer)
        in_flight[0] += 1
        in_flight[1] = max(in_flight)
        await gate.wait()
        in_flight[0] -= 1
        return b'{"v": 1, "bundle": "x"}'  # malformed

    fetch = PeerFetch(policy, request, lambda: {"p1", "p2", "p3"}, rng=random.Random(1))
    for peer in ("p1", "p2", "p3"):
        fetch.seen(peer, 7)
    fetch.seen("p4", "seven")  # not a version: ignored
    for _ in range(5):
        await asyncio.sleep(0)
    assert asked and in_flight[1] == 1 and fetch.wanted() == 7
    gate.set()
    while fetch.backoff_of(7)[0] == 0:
        await asyncio.sleep(0.01)
    assert sorted(asked) == ["p1", "p2", "p3"] and in_flight[1] == 1
    assert [r for _, r in policy.outcomes] == ["malformed"] * 3
    for _ in range(5):
        await asyncio.sleep(0)
    assert len(asked) == 3  # backed off: no new round yet
    assert fetch.backoff_of(7)[1] > asyncio.get_running_loop().time()
    assert await fetch.serve(None, b"P?") == b"" and fetch.stats["bad_requests"] == 1  # type: ignore[arg-type]
    await fetch.stop()
