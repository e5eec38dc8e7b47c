"""The container testbed's policy endpoint (issue 12): the ``policy`` compose service, the
agents' ``[policy]`` config, the TLS material made at ``up`` and the HTTPS server itself.

The first tests need no docker: the compose document, the config text through the agent's own
config loader, and ``policy_server.py`` served on loopback with a CA from ``policy_tls``,
fetched by the agent's own HTTPS client (``edgeagent.policy_sync.https``: name check, ETag,
304). The last runs ``testbed/scenarios/policy-cloud.toml`` on containers (skipped with the
reason without docker): n1 polls the endpoint, n2 and n3 get the bundle from peers.
"""

from __future__ import annotations

import argparse
import base64
import json
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgeagent.config import add_agent_arguments, load_config
from edgeagent.policy_sync import https, tls_context
from overlay import policy as pol
from testbed.containers.compose import (
    POLICY_CA,
    POLICY_REPORT_URL,
    POLICY_URL,
    Plan,
    compose_document,
    policy_config,
    write_compose,
)
from testbed.containers.policy_server import MAX_REPORT_BYTES, serve
from testbed.containers.policy_tls import write_tls
from testbed.scenario import ScenarioError, parse
from testbed.scenario_run import policy_endpoint


def _plan(**kw: object) -> Plan:
    return Plan(
        project="edgeagent-tb-test",
        image="edgeagent-node:0",
        subnet_prefix="172.29.9",
        nodes=3,
        cluster="tb-test",
        run_args=("--config", "/shared/agent.toml"),
        **kw,
    )  # type: ignore[arg-type]


def test_policy_service_serves_its_dir_read_only_at_a_fixed_address(tmp_path: Path) -> None:
    doc = compose_document(_plan(policy=True), tmp_path / "shared", tmp_path / "state")
    svc = doc["services"]["policy"]
    assert svc["networks"]["mesh"]["ipv4_address"] == "172.29.9.3"
    assert svc["volumes"] == [f"{tmp_path / 'policy'}:/policy:ro"]
    assert svc["entrypoint"][:2] == ["/opt/edgeagent/bin/python", "/policy/policy_server.py"]
    assert svc["labels"] == {"org.edgeagent.testbed": "edgeagent-tb-test"}
    assert "policy" not in compose_document(_plan(), tmp_path / "shared")["services"]


def test_node_args_give_one_node_its_own_config_after_the_common_flags(tmp_path: Path) -> None:
    plan = _plan(node_args=(("h1", ("--config", "/shared/agent-h1.toml")),))
    env = {
        n: s["environment"]["EA_RUN_ARGS"]
        for n, s in compose_document(plan, tmp_path)["services"].items()
    }
    assert env["h1"] == "--config /shared/agent.toml --config /shared/agent-h1.toml"
    assert env["h2"] == env["h3"] == "--config /shared/agent.toml"


def test_write_compose_copies_the_server_and_makes_the_served_dir(tmp_path: Path) -> None:
    write_compose(_plan(policy=True), tmp_path)
    assert (tmp_path / "policy" / "www").is_dir()
    assert "def make_server" in (tmp_path / "policy" / "policy_server.py").read_text()
    assert "policy:" in (tmp_path / "compose.yaml").read_text()


def test_policy_config_is_what_the_agent_reads(tmp_path: Path) -> None:
    key = base64.b64encode(pol.raw_public_key(Ed25519PrivateKey.generate().public_key())).decode()
    parser = argparse.ArgumentParser()
    add_agent_arguments(parser)
    for poll in (True, False):
        conf = tmp_path / f"agent-{poll}.toml"
        conf.write_text(policy_config([key], poll=poll, interval=1.5))
        cfg = load_config(parser.parse_args(["--config", str(conf), "--state-dir", str(tmp_path)]))
        assert len(cfg.policy_trusted_keys) == 1
        assert (cfg.policy_url, cfg.policy_interval_s) == (
            (POLICY_URL, 1.5) if poll else ("", 60.0)
        )
        assert cfg.policy_ca == (Path(POLICY_CA) if poll else None)
        assert cfg.policy_report_url == (POLICY_REPORT_URL if poll else "")


@pytest.fixture
def endpoint(tmp_path: Path) -> Iterator[tuple[str, ssl.SSLContext, Path]]:
    ca = write_tls(tmp_path / "tls", ("localhost",), ("127.0.0.1",))
    www = tmp_path / "www"
    www.mkdir()
    server = serve(www, tmp_path / "tls" / "server.pem", tmp_path / "tls" / "server.key")
    try:
        yield f"https://localhost:{server.server_address[1]}", tls_context(ca), www
    finally:
        server.shutdown()
        server.server_close()


def test_the_endpoint_answers_the_agents_client_with_an_etag_and_304(
    endpoint: tuple[str, ssl.SSLContext, Path],
) -> None:
    base, ctx, www = endpoint
    assert https(f"{base}/bundle.signed", ctx).status == 404
    (www / "bundle.signed").write_bytes(b"envelope-1")
    first = https(f"{base}/bundle.signed", ctx)
    assert (first.status, first.body) == (200, b"envelope-1") and first.etag
    assert https(f"{base}/bundle.signed", ctx, headers={"If-None-Match": first.etag}).status == 304
    (www / "bundle.signed").write_bytes(b"envelope-2")
    second = https(f"{base}/bundle.signed", ctx, headers={"If-None-Match": first.etag})
    assert (second.status, second.body) == (200, b"envelope-2") and second.etag != first.etag
    (www / ".hidden").write_bytes(b"x")
    for path in ("/.hidden", "/../tls/server.key", "/", "/nothing"):
        assert https(base + path, ctx).status == 404, path


def test_the_endpoint_keeps_each_nodes_newest_report_and_refuses_bad_ones(
    endpoint: tuple[str, ssl.SSLContext, Path],
) -> None:
    base, ctx, _ = endpoint
    post = {"method": "POST", "headers": {"Content-Type": "application/json"}}
    for version in (1, 2):
        doc = json.dumps({"node": "h1", "version": version}).encode()
        assert https(f"{base}/report", ctx, body=doc, **post).status == 204  # type: ignore[arg-type]
    too_big = json.dumps({"node": "h2", "pad": "x" * MAX_REPORT_BYTES}).encode()
    bad = [(b"not json", 400), (b'["node"]', 400), (b'{"node": 7}', 400), (too_big, 413)]
    for body, status in bad:
        assert https(f"{base}/report", ctx, body=body, **post).status == status  # type: ignore[arg-type]
    assert https(f"{base}/elsewhere", ctx, body=b"{}", **post).status == 405  # type: ignore[arg-type]
    kept = json.loads(https(f"{base}/reports", ctx).body)
    assert kept == {"h1": {"count": 2, "last": {"node": "h1", "version": 2}}}


def test_the_certificate_names_the_host_and_chains_only_to_its_own_ca(
    tmp_path: Path,
    endpoint: tuple[str, ssl.SSLContext, Path],
) -> None:
    base, ctx, _ = endpoint
    port = base.rsplit(":", 1)[1]
    assert https(f"https://127.0.0.1:{port}/x", ctx).status == 404  # the IP is in the SAN too
    other = write_tls(tmp_path / "other", ("localhost",))
    with pytest.raises(ssl.SSLCertVerificationError):
        https(f"{base}/x", tls_context(other))
    named = write_tls(tmp_path / "named", ("policy",))  # as in the testbed: not localhost
    server = serve(tmp_path, tmp_path / "named" / "server.pem", tmp_path / "named" / "server.key")
    try:
        with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
            https(f"https://localhost:{server.server_address[1]}/x", tls_context(named))
    finally:
        server.shutdown()
        server.server_close()


SCENARIO_HEAD = """
[scenario]
name = "p"
nodes = 3
{extra}
[[step]]
action = "publish-policy"
label = "v1"
via = "cloud"
[[step]]
action = "cloud-outage"
service = "{service}"
seconds = 1
[[expect]]
check = "policy-version"
step = "v1"
within = 5
"""


def test_scenario_keys_for_the_endpoint_and_their_one_line_errors() -> None:
    sc = parse(
        SCENARIO_HEAD.format(
            extra="policy-interval = 0.5\npolicy-pollers = [1, 2]", service="policy"
        )
    )
    assert sc.needs() == {"policy", "policy-endpoint"}
    endpoint = policy_endpoint(sc)
    assert endpoint is not None and (endpoint.interval, endpoint.pollers) == (0.5, (1, 2))
    both = parse(SCENARIO_HEAD.format(extra="", service="broker"))
    assert both.needs() == {"policy", "policy-endpoint", "cloud"}
    everyone = policy_endpoint(both)
    assert everyone is not None and everyone.pollers == (1, 2, 3)
    with pytest.raises(
        ScenarioError,
        match=r"^<scenario>:5: \[scenario\]: policy-pollers: node 4 is not one of 1..3$",
    ):
        parse(SCENARIO_HEAD.format(extra="policy-pollers = [4]", service="policy"))
    with pytest.raises(
        ScenarioError,
        match=r":12: step 2 \(cloud-outage\): service: expected one of broker, policy",
    ):
        parse(SCENARIO_HEAD.format(extra="", service="mqtt"))


def test_the_cli_refuses_a_bad_poll_interval_in_one_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from testbed.containers.cli import main as cli_main

    assert cli_main(["up", "--policy-key", "AAAA", "--policy-interval", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err == "python -m testbed containers: error: --policy-interval must be 0.1..3600 s, not 0"
    )


@pytest.mark.docker
def test_policy_cloud_scenario_every_node_enforces_what_the_endpoint_serves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.testbed.test_scenario_containers import run_in_containers

    record = run_in_containers(tmp_path, monkeypatch, "policy-cloud.toml", "--no-plots")
    versions = [e for e in record["expects"] if e["check"] == "policy-version"]
    assert [(e["version"], e["nodes"], e["missing"]) for e in versions] == [(1, 3, []), (2, 3, [])]
    assert [f["service"] for f in record["faults"] if f["kind"] == "cloud"] == ["policy"]
