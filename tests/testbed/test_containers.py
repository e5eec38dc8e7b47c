"""The container testbed (testbed/containers): real agents in docker containers.

The docker tests share one testbed of five containers (module scope; the images are built
once and cached by tag, see testbed/containers/image.py). They skip with the reason when
docker is missing or the images cannot be built. The first tests need no docker: the compose
file and the nftables rules the faults give each node.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from overlay.tokens import parse_token
from testbed.containers import image as images
from testbed.containers.backend import ContainerBackend, ContainerError
from testbed.containers.cli import main as cli_main
from testbed.containers.compose import TESTBED_LABEL, Plan, compose_document, to_yaml

NODES = 5
CONVERGE_S = 60.0
DETECT_S = 60.0


def _plan(nodes: int = 3, broker: bool = False) -> Plan:
    return Plan(project="edgeagent-tb-test", image="edgeagent-node:0", subnet_prefix="172.29.9",
                nodes=nodes, cluster="tb-test", broker=broker)


def _offline_backend(nodes: int = 5) -> ContainerBackend:
    tb = ContainerBackend(nodes, build=False)
    tb.plan = _plan(nodes)
    tb.state = {"faults": {"partition": [], "oneway": False, "loss": {}, "isolated": []}}
    return tb


# -- no docker needed ------------------------------------------------------------------------


def test_compose_document_gives_each_node_an_address_the_issuer_role_and_the_label() -> None:
    doc = compose_document(_plan(3, broker=True), Path("/tmp/x/shared"))
    services = doc["services"]
    assert sorted(services) == ["cloud", "h1", "h2", "h3"]
    ips = [s["networks"]["mesh"]["ipv4_address"] for s in services.values()]
    assert len(set(ips)) == 4 and all(ip.startswith("172.29.9.") for ip in ips)
    assert [services[h]["environment"]["EA_ROLE"] for h in ("h1", "h2", "h3")] == ["issuer", "member", "member"]
    assert all("NET_ADMIN" in services[h]["cap_add"] for h in ("h1", "h2", "h3"))
    assert all(s["labels"] == {TESTBED_LABEL: "edgeagent-tb-test"} for s in services.values())
    assert doc["networks"]["mesh"]["labels"] == {TESTBED_LABEL: "edgeagent-tb-test"}
    assert services["h2"]["environment"]["EA_CLOUD_BROKER"] == "172.29.9.2:1883"
    assert "cloud" not in compose_document(_plan(3), Path("/tmp/x"))["services"]
    with_state = compose_document(_plan(2), Path("/r/shared"), Path("/r/state"))["services"]
    assert with_state["h2"]["volumes"] == ["/r/shared:/shared", "/r/state/h2:/var/lib/edgeagent"]


def test_compose_document_refuses_bad_sizes_and_token_modes() -> None:
    with pytest.raises(ValueError, match="nodes"):
        compose_document(_plan(0), Path("/tmp/x"))
    bad = Plan("edgeagent-tb-t", "img", "172.29.9", 2, "c", token_mode="carrier-pigeon")
    with pytest.raises(ValueError, match="token mode"):
        compose_document(bad, Path("/tmp/x"))


def test_to_yaml_quotes_strings_and_keeps_nesting() -> None:
    text = to_yaml({"a": {"on": "yes", "list": ["x y", 3, True], "empty": []}})
    assert text == 'a:\n  "on": "yes"\n  list:\n    - "x y"\n    - 3\n    - true\n  empty: []\n'


def test_partition_rules_drop_the_other_groups_addresses_both_ways() -> None:
    tb = _offline_backend()
    tb.state["faults"]["partition"] = [["h1", "h2"], ["h3", "h4", "h5"]]
    assert tb.nft_rules("h1") == [
        ("input", "ip saddr { 172.29.9.13, 172.29.9.14, 172.29.9.15 } drop"),
        ("output", "ip daddr { 172.29.9.13, 172.29.9.14, 172.29.9.15 } drop"),
    ]
    assert tb.nft_rules("h4") == [
        ("input", "ip saddr { 172.29.9.11, 172.29.9.12 } drop"),
        ("output", "ip daddr { 172.29.9.11, 172.29.9.12 } drop"),
    ]


def test_oneway_partition_drops_only_what_the_first_group_receives() -> None:
    tb = _offline_backend()
    tb.state["faults"].update(partition=[["h1"], ["h2", "h3"]], oneway=True)
    assert tb.nft_rules("h1") == [("input", "ip saddr { 172.29.9.12, 172.29.9.13 } drop")]
    assert tb.nft_rules("h2") == []
    assert tb.nft_rules("h5") == []  # in no group: untouched


def test_loss_and_isolation_spare_loopback() -> None:
    tb = _offline_backend()
    tb.state["faults"].update(loss={"h2": 25}, isolated=["h3"])
    assert tb.nft_rules("h2") == [
        ("input", 'iifname != "lo" numgen random mod 100 < 25 drop'),
        ("output", 'oifname != "lo" numgen random mod 100 < 25 drop'),
    ]
    assert tb.nft_rules("h3") == [("input", 'iifname != "lo" drop'), ("output", 'oifname != "lo" drop')]


def test_bad_fault_arguments_are_one_error_each() -> None:
    tb = _offline_backend()
    with pytest.raises(ContainerError, match="no node 'h9'"):
        tb.partition([["h1"], ["h9"]])
    with pytest.raises(ContainerError, match="two partition groups"):
        tb.partition([["h1", "h2"], ["2"]])
    with pytest.raises(ContainerError, match="two or more"):
        tb.partition([["h1"]])
    with pytest.raises(ContainerError, match="0..100"):
        tb.loss("h1", 101)


def test_a_testbed_without_a_broker_refuses_cloud_verbs_in_one_line() -> None:
    with pytest.raises(ContainerError, match="no cloud broker"):
        _offline_backend().cloud_stop()


def test_a_run_dir_the_user_cannot_remove_is_emptied_by_a_throwaway_container(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from testbed.containers import backend

    calls: list[object] = []

    def rmtree(path: Path) -> None:
        calls.append(("rmtree", path))
        if len(calls) == 1:
            raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(backend.shutil, "rmtree", rmtree)
    monkeypatch.setattr(backend.subprocess, "run", lambda argv, **kw: calls.append(argv))
    backend._remove_run_dir(tmp_path, "edgeagent-node:0")
    assert calls[0] == calls[2] == ("rmtree", tmp_path)
    assert calls[1] == ["docker", "run", "--rm", "--network", "none", "--entrypoint", "/bin/rm", "-v",
                        f"{tmp_path}:/run-dir", "edgeagent-node:0", "-rf", "/run-dir/state", "/run-dir/shared"]
    calls.clear()
    with pytest.raises(ContainerError, match="remove it as root"):
        backend._remove_run_dir(tmp_path, None)


def test_cli_without_a_testbed_is_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["status", "--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no container testbed is up" in err


# -- docker ----------------------------------------------------------------------------------


def _docker_skip_reason() -> str | None:
    """Why the docker tests cannot run here (no docker), or None. A docker that is there but
    cannot build the image is a failure, not a reason to skip."""
    reason = images.docker_available()
    if reason is not None:
        return reason
    try:
        images.ensure_images(log=lambda line: None)
    except images.ImageError as exc:
        pytest.fail(f"docker works but the node image cannot be built: {exc}")
    return None


@pytest.fixture(scope="module")
def testbed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ContainerBackend]:
    reason = _docker_skip_reason()
    if reason is not None:
        pytest.skip(reason)
    tb = ContainerBackend(NODES, root=tmp_path_factory.mktemp("containers"), broker=True, build=False)
    try:
        tb.up()
        yield tb
    finally:
        tb.down()


def _all_alive(tb: ContainerBackend, names: list[str]) -> bool:
    views = tb.views(names)
    return all(sorted(v) == sorted(tb.names()) and set(v.values()) == {"alive"} for v in views.values())


@pytest.mark.docker
def test_five_containers_converge_by_mdns_and_a_token(testbed: ContainerBackend) -> None:
    testbed.wait_until(lambda: _all_alive(testbed, testbed.names()), CONVERGE_S,
                       what="every node to see 5 alive")
    token = parse_token((testbed.workdir / "shared" / "token").read_text().strip())
    assert token.addresses == ()  # so the joiners found the issuer by mDNS
    cluster = testbed.state["cluster"]
    for name in testbed.names()[1:]:
        assert f"joined cluster '{cluster}' as '{name}'" in testbed.logs(name)
    members = testbed.members("h3")
    assert {m["name"]: m["address"] for m in members}["h2"] == f"{testbed.ip('h2')}:7946"
    assert testbed.control_socket("h3").is_socket()  # read from the host, not by docker exec


@pytest.mark.docker
def test_partition_shows_in_members_then_heals(testbed: ContainerBackend) -> None:
    left, right = ["h1", "h2"], ["h3", "h4", "h5"]
    testbed.wait_until(lambda: _all_alive(testbed, testbed.names()), CONVERGE_S, what="convergence")
    testbed.partition([left, right])

    def split() -> bool:
        views = testbed.views()
        return all(
            all(views[a].get(b) == "alive" for b in side)
            and all(views[a].get(b) in ("suspect", "dead") for b in other)
            for side, other in ((left, right), (right, left)) for a in side
        )

    try:
        testbed.wait_until(split, DETECT_S, what="each side to see the other gone")
        assert testbed.status()["nodes"]["h4"]["partitioned"] is True
    finally:
        testbed.heal()
    testbed.wait_until(lambda: _all_alive(testbed, testbed.names()), CONVERGE_S, what="the heal")
    assert testbed.exec("h1", ["nft", "list", "table", "inet", "ea_tb"]).returncode != 0  # table gone


@pytest.mark.docker
def test_kill_then_start_rejoins_with_the_same_identity(testbed: ContainerBackend) -> None:
    before = {m["name"]: m["incarnation"] for m in testbed.members("h1")}
    testbed.kill("h5")
    assert not testbed.running("h5")
    with pytest.raises(ContainerError, match="not running"):
        testbed.kill("h5")
    testbed.start("h5")
    testbed.wait_until(lambda: _all_alive(testbed, testbed.names()), CONVERGE_S, what="h5 back")
    after = {m["name"]: m["incarnation"] for m in testbed.members("h1")}
    assert after["h5"] > before["h5"]  # same name, a later life


@pytest.mark.docker
def test_cloud_outage_stops_the_broker_container_and_starts_it_again(testbed: ContainerBackend) -> None:
    assert testbed.cloud_running()
    testbed.cloud_stop()
    assert not testbed.cloud_running() and testbed.status()["broker"]["state"] == "exited"
    assert all(testbed.running(n) for n in testbed.names())  # the agents ride it out
    testbed.cloud_start()
    assert testbed.cloud_running()
    where = ["--root", str(testbed.root), "--id", testbed.id]
    assert cli_main(["cloud", "stop", *where]) == 0 and not testbed.cloud_running()
    assert cli_main(["cloud", "start", *where]) == 0 and testbed.cloud_running()


@pytest.mark.docker
def test_down_removes_exactly_what_it_made(testbed: ContainerBackend) -> None:
    project = testbed.project
    workdir = testbed.workdir
    label = f"label={TESTBED_LABEL}={project}"

    def listed(*argv: str) -> list[str]:
        return subprocess.run(["docker", *argv, "--filter", label, "-q"],
                              capture_output=True, text=True, check=True).stdout.split()

    assert len(listed("ps", "-a")) == NODES + 1 and len(listed("network", "ls")) == 1  # + cloud
    testbed.down()
    assert listed("ps", "-a") == [] and listed("network", "ls") == []
    names = subprocess.run(["docker", "ps", "-a", "--format", "{{.Names}}"],
                           capture_output=True, text=True, check=True).stdout.split()
    assert not [n for n in names if n.startswith(project)]
    assert not workdir.exists()
    assert images.image_id(images.node_tag()) is not None  # the cached image stays
    testbed.down()  # idempotent
    assert json.dumps(testbed.state) == "{}"
