"""The shipped scenarios on real agents: one namespace per node (root).

Each run builds its own testbed under pytest's tmp dir and takes it down again (the runner
does, whatever happens). The scenario files' own timeouts bound a hang; nothing here times
anything.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from testbed import netns
from testbed.__main__ import main as run_cli
from testbed.cluster import ROOT_ENV
from tests.host_tools import needs_netns

pytestmark = [needs_netns("ip", "nft"), pytest.mark.root, pytest.mark.slow]

SCENARIOS = Path(__file__).resolve().parents[2] / "testbed" / "scenarios"


def _run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str) -> tuple[int, dict]:
    monkeypatch.setenv(ROOT_ENV, str(tmp_path / "testbeds"))
    before = set(netns.list_netns())
    report = tmp_path / "report"
    rc = run_cli(["scenario", str(SCENARIOS / name), "--backend", "netns", "--report", str(report)])
    assert set(netns.list_netns()) <= before, "the run left namespaces behind"
    assert not any((tmp_path / "testbeds").glob("*/state.json")), "the run left a testbed up"
    return rc, json.loads((report / "report.json").read_text())


def test_partition_scenario_holds_on_real_agents(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rc, record = _run(tmp_path, monkeypatch, "partition.toml")
    assert rc == 0, [e for e in record["expects"] if not e["ok"]] or record["error"]
    assert record["backend"] == "netns"
    observers = {s["observer"] for s in record["timeline"]}
    assert observers == {f"n{i}" for i in range(1, 6)}
    assert len([d for d in record["detections"]["partition"] if d["seconds"] is not None]) == 12
    assert (tmp_path / "report" / "membership.png").stat().st_size > 10_000


def test_coap_failover_scenario_holds_on_real_agents(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rc, record = _run(tmp_path, monkeypatch, "coap-failover.toml")
    assert rc == 0, [e for e in record["expects"] if not e["ok"]] or record["error"]
    result = record["loads"]["main"]["result"]
    kill = next(k["t"] for k in record["kills"] if k["node"] == "n2")
    serving = [r[2] for r in result["records"] if kill - 2 < r[0] < kill and r[1]]
    assert serving.count("n2") > len(serving) / 2, "n2 (n3 is slow) was serving when it crashed"
    after = [r for r in result["records"] if r[0] > kill + 2]
    assert after and all(r[2] == "n3" for r in after if r[1]), "answers after the kill come from n3"
    assert (tmp_path / "report" / "coap.png").stat().st_size > 10_000


def test_reboot_scenario_keeps_the_block_and_the_mqtt_load_on_real_agents(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rc, record = _run(tmp_path, monkeypatch, "reboot.toml")
    assert rc == 0, [e for e in record["expects"] if not e["ok"]] or record["error"]
    (reboot,) = record["reboots"]
    assert reboot["node"] == "n2" and reboot["t_up"] - reboot["t_down"] >= 3
    after = [s["blocks"]["n2"] for s in record["addresses"] if "blocks" in s and s["t"] >= reboot["t_up"]]
    assert reboot["block_before"] and after and set(after) == {reboot["block_before"]}
    # n2 was really down: no observation from it while it was off
    assert not [s for s in record["timeline"]
                if s["observer"] == "n2" and reboot["t_down"] < s["t"] < reboot["t_up"]]  # fmt: skip
    result = record["loads"]["telemetry"]["result"]
    assert (result["received"], result["lost"], result["duplicates"]) == (400, 0, 0)
    published = [r[0] for r in result["records"]]
    assert len(published) == 400 and published[0] < reboot["t_down"] < published[-1], "the cut is mid-load"
    assert all(r[1] and r[3] is not None for r in result["records"])
    assert (tmp_path / "report" / "mqtt.png").stat().st_size > 10_000
    assert "## MQTT loads" in (tmp_path / "report" / "report.md").read_text()


def test_policy_scenario_every_node_enforces_the_bundle_on_real_agents(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rc, record = _run(tmp_path, monkeypatch, "policy.toml")
    assert rc == 0, [e for e in record["expects"] if not e["ok"]] or record["error"]
    policies = record["policies"]
    assert [policies[k]["version"] for k in ("v1", "v1-again", "v2")] == [1, 1, 2]
    assert set(policies["v1"]["seen"]) == set(policies["v2"]["seen"]) == {"n1", "n2", "n3"}
    assert policies["v1-again"]["had_it"] == ["n3"]  # the reboot kept bundle and mark
