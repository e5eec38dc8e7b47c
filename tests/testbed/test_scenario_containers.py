"""The shipped scenarios on docker containers (the second real backend): partition,
reboot (a power cut mid MQTT load, the load client inside the pub container) and
coap-failover (CoAP servers and the load client inside the containers; about 30 s).

Skipped with the reason when no docker daemon answers; a docker that cannot build the node
image fails (see tests/testbed/test_containers.py). The runner takes its containers down
whatever happens; this test checks nothing labelled as a testbed is left.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from testbed.__main__ import main as run_cli
from tests.testbed.test_containers import _docker_skip_reason

pytestmark = [pytest.mark.docker, pytest.mark.slow]

SCENARIOS = Path(__file__).resolve().parents[2] / "testbed" / "scenarios"


def _labelled(kind: str) -> set[str]:
    out = subprocess.run(
        ["docker", kind, "ls", *(["-a"] if kind == "container" else []), "-q",
         "--filter", "label=org.edgeagent.testbed"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return set(out.stdout.split())


def run_in_containers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, scenario: str,
                      *extra: str) -> dict[str, Any]:  # fmt: skip
    """Run a shipped scenario on containers (skipped without docker); assert it passed and
    left nothing labelled behind; its report.json."""
    reason = _docker_skip_reason()
    if reason is not None:
        pytest.skip(reason)
    monkeypatch.setenv("EDGEAGENT_CONTAINERS_DIR", str(tmp_path / "runs"))
    before = {kind: _labelled(kind) for kind in ("container", "network")}
    report = tmp_path / "report"
    rc = run_cli(["scenario", str(SCENARIOS / scenario), "--backend", "containers",
                  "--report", str(report), *extra])  # fmt: skip
    record: dict[str, Any] = json.loads((report / "report.json").read_text())
    assert rc == 0, [e for e in record["expects"] if not e["ok"]] or record["error"]
    for kind in ("container", "network"):
        assert _labelled(kind) <= before[kind], f"the run left a {kind} behind"
    return record


def test_partition_scenario_holds_in_containers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    record = run_in_containers(tmp_path, monkeypatch, "partition.toml")
    assert record["backend"] == "containers"
    assert {s["observer"] for s in record["timeline"]} == {f"n{i}" for i in range(1, 6)}


def test_reboot_scenario_with_its_mqtt_load_holds_in_containers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    record = run_in_containers(tmp_path, monkeypatch, "reboot.toml", "--no-plots")
    (reboot,) = record["reboots"]
    assert reboot["t_up"] - reboot["t_down"] >= 3 and reboot["block_before"]
    assert not [s for s in record["timeline"]
                if s["observer"] == "n2" and reboot["t_down"] < s["t"] < reboot["t_up"]]  # fmt: skip
    result = record["loads"]["telemetry"]["result"]
    assert (result["received"], result["lost"], result["duplicates"]) == (400, 0, 0)
    published = [r[0] for r in result["records"]]
    assert published[0] < reboot["t_down"] < published[-1], "the cut is mid-load"


def test_coap_failover_scenario_holds_in_containers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    record = run_in_containers(tmp_path, monkeypatch, "coap-failover.toml", "--no-plots")
    (kill,) = [s for s in record["steps"] if s["action"] == "kill"]
    records = record["loads"]["main"]["result"]["records"]
    assert records[0][0] < kill["t_start"] < records[-1][0], "the crash is mid-load"
    serving = [r[2] for r in records if kill["t_start"] - 2 < r[0] < kill["t_start"] and r[1]]
    assert serving.count("n2") > len(serving) / 2, "n2 (n3 is slow) was serving when it crashed"
    after = [r[2] for r in records if r[0] > kill["t_end"] and r[1]]
    assert after and set(after) == {"n3"}, "after the crash only n3 answers (n2's server went with it)"
    assert {r[2] for r in records if r[1]} <= {"n2", "n3"}
