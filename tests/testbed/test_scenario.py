"""Scenario files: the strict parser, the runner on the simulator, the report folder.

Everything here runs on the simulator (virtual time, seeded), so no root and no wall-clock
asserts; ``test_scenario_netns.py`` runs the same files on real agents in namespaces.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from testbed.__main__ import main as run_cli
from testbed.scenario import ScenarioError, load, parse
from testbed.scenario_backends import BackendError, _Load
from testbed.scenario_run import Run, excused, mqtt_delivered, same_address, transitions_to_dead

SCENARIOS = Path(__file__).resolve().parents[2] / "testbed" / "scenarios"
GOOD = """\
[scenario]
name = "tiny"
nodes = 3

[[step]]
action = "start"

[[step]]
action = "converge"
label = "initial"
timeout = 30

[[expect]]
check = "converged"
step = "initial"
within = 20
"""


def _write(tmp_path: Path, text: str, name: str = "s.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def _line_of(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), start=1) if needle in line)


def test_every_shipped_scenario_parses() -> None:
    files = sorted(SCENARIOS.glob("*.toml"))
    assert {"partition.toml", "churn.toml", "coap-failover.toml"} <= {f.name for f in files}
    for path in files:
        scenario = load(path)
        assert scenario.steps and scenario.expects, path


@pytest.mark.parametrize(
    ("change", "needle", "problem"),
    [
        (("nodes = 3", "nodes = 3\ncolour = 1"), "colour", "unknown key 'colour'"),
        (('action = "start"', 'action = "explode"'), "explode", "unknown action 'explode'"),
        (("timeout = 30", "timeout = -1"), "timeout = -1", "out of range"),
        (("timeout = 30", 'timeout = "soon"'), "soon", "expected a number"),
        (('step = "initial"', 'step = "nowhere"'), "nowhere", "no converge step labelled 'nowhere'"),
        (('action = "start"', 'action = "kill"\nnode = 9'), "node = 9", "node 9 is not one of 1..3"),
        (('action = "start"', 'action = "partition"\ngroups = "1,2/2,3"'), "groups", "a node is in two groups"),
        (('action = "start"', 'action = "partition"\ngroups = "1,x"'), "groups", "bad node 'x'"),
        (('action = "start"', 'action = "partition"\ngroups = "1/2"'), "groups", "must name every node 1..3"),
        (('action = "start"', 'action = "coap-serve"\nservice = "t"\nnodes = [2]\nslow = [3]'), "slow",
         "slow names a node not in nodes"),
        (("within = 20\n", "within = 20\n\n[[expect]]\ncheck = \"detected\"\nnode = 2\nwithin = 5\n"),
         "node = 2", "node 2 is never killed"),
    ],
)
def test_a_bad_key_is_one_error_naming_the_file_its_line_and_the_problem(
    tmp_path: Path, change: tuple[str, str], needle: str, problem: str
) -> None:
    text = GOOD.replace(*change, 1)
    path = _write(tmp_path, text)
    with pytest.raises(ScenarioError) as info:
        load(path)
    message = str(info.value)
    assert message.startswith(f"{path}:{_line_of(text, needle)}: "), message
    assert problem in message and "\n" not in message


def test_a_missing_key_points_at_its_table(tmp_path: Path) -> None:
    text = GOOD.replace("timeout = 30\n", "")
    with pytest.raises(ScenarioError) as info:
        parse(text, "x.toml")
    assert str(info.value) == "x.toml:8: step 2 (converge): missing key 'timeout'"


def test_toml_syntax_errors_keep_tomllib_line(tmp_path: Path) -> None:
    with pytest.raises(ScenarioError) as info:
        parse(GOOD.replace("nodes = 3", "nodes = = 3"), "x.toml")
    assert str(info.value).startswith("x.toml:3: invalid TOML")


def test_cli_bad_file_is_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(tmp_path, GOOD.replace("nodes = 3", "nodes = 0"))
    assert run_cli(["scenario", str(path), "--backend", "sim", "--report", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{path}:3: [scenario]: nodes: 0 is out of range" in err[0]
    assert not (tmp_path / "r").exists()


def test_a_scenario_needing_coap_is_refused_on_the_simulator(capsys: pytest.CaptureFixture[str]) -> None:
    rc = run_cli(["scenario", str(SCENARIOS / "coap-failover.toml"), "--backend", "sim"])
    assert rc == 2
    assert "needs coap, which the sim backend does not have" in capsys.readouterr().err


def test_containers_backend_missing_is_one_line_exit_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "testbed.containers.backend", None)  # import fails: missing
    rc = run_cli(["scenario", str(SCENARIOS / "partition.toml"), "--backend", "containers"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "containers backend is not available" in err[0]


def test_netns_without_root_is_one_line_exit_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("testbed.netns.is_root", lambda: False)
    rc = run_cli(["scenario", str(SCENARIOS / "partition.toml"), "--backend", "netns"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "the netns backend needs root" in err[0]


def _png_is_a_real_plot(path: Path) -> None:
    import matplotlib.image

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    pixels = matplotlib.image.imread(path)
    height, width = pixels.shape[:2]
    assert height > 200 and width > 400, (path, pixels.shape)
    colours = {tuple(p) for p in pixels[::7, ::7, :3].reshape(-1, 3).round(2).tolist()}
    assert len(colours) > 8, f"{path} looks blank ({len(colours)} colours)"


def test_partition_passes_on_the_simulator_and_writes_the_report(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    report = tmp_path / "report"
    rc = run_cli(["scenario", str(SCENARIOS / "partition.toml"), "--backend", "sim",
                       "--report", str(report), "--quiet"])  # fmt: skip
    record = json.loads((report / "report.json").read_text())
    assert rc == 0, [e for e in record["expects"] if not e["ok"]]
    assert [e["ok"] for e in record["expects"]] == [True] * 5
    assert {s["action"] for s in record["steps"]} >= {"partition", "heal", "converge"}
    split = next(e for e in record["expects"] if e["args"].get("step") == "split")
    assert 0 < split["measured"] <= 30
    # each side saw the other dead: 2 x 3 + 3 x 2 observations after the partition
    assert len([d for d in record["detections"]["partition"] if d["seconds"] is not None]) == 12
    md = (report / "report.md").read_text()
    assert "| 4 | no-false-death |" in md and "PASS" in md
    for name in ("membership.png", "detection_cdf.png"):
        _png_is_a_real_plot(report / name)
        assert f"![{name}]({name})" in md


def test_the_simulator_run_is_deterministic(tmp_path: Path) -> None:
    runs = []
    for i in range(2):
        report = tmp_path / f"r{i}"
        run_cli(["scenario", str(SCENARIOS / "churn.toml"), "--backend", "sim",
                      "--report", str(report), "--quiet", "--no-plots"])  # fmt: skip
        record = json.loads((report / "report.json").read_text())
        runs.append((record["timeline"], record["expects"]))
    assert runs[0] == runs[1]
    assert all(e["ok"] for e in runs[0][1]), runs[0][1]
    detected = next(e for e in runs[0][1] if e["check"] == "detected")
    assert detected["observers"] == 4 and detected["undetected"] == 0


def test_an_expect_that_does_not_hold_makes_exit_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # A partition counted as no excuse: the deaths across it are false deaths by this clause,
    # and no SWIM declares a partition within 1 s with the local preset.
    text = (SCENARIOS / "partition.toml").read_text()
    text = text.replace('check = "no-false-death"', 'check = "no-false-death"\nfaults = ["loss"]')
    text = text.replace('step = "split"\nwithin = 45', 'step = "split"\nwithin = 1')
    path = _write(tmp_path, text, "fails.toml")
    report = tmp_path / "report"
    rc = run_cli(["scenario", str(path), "--backend", "sim", "--report", str(report), "--no-plots"])
    assert rc == 1
    record = json.loads((report / "report.json").read_text())
    verdicts = {(e["check"], e["args"].get("step")): e for e in record["expects"]}
    assert not verdicts[("converged", "split")]["ok"]
    assert verdicts[("converged", "split")]["measured"] > 1
    false = verdicts[("no-false-death", None)]
    assert not false["ok"] and false["measured"] == 12 and false["events"]
    assert verdicts[("converged", "initial")]["ok"]
    assert "FAIL" in capsys.readouterr().out
    assert "**FAIL**" in (report / "report.md").read_text()


def test_a_converge_that_times_out_skips_the_rest_and_exits_1(tmp_path: Path) -> None:
    # a crash is not detected within 2 s with the local preset (suspicion alone lasts 3 s)
    text = GOOD.replace('action = "start"', 'action = "start"\n\n[[step]]\naction = "kill"\n'
                        'node = 3').replace("timeout = 30", "timeout = 2")
    path = _write(tmp_path, text + '\n[[step]]\naction = "sleep"\nseconds = 1\n')
    report = tmp_path / "r"
    assert run_cli(["scenario", str(path), "--backend", "sim", "--report", str(report), "--no-plots", "--quiet"]) == 1
    record = json.loads((report / "report.json").read_text())
    assert [s["ok"] for s in record["steps"]] == [True, True, False, None]
    assert "not converged within 2 s" in record["error"]


def test_false_death_rule_excuses_only_faults_between_the_two(tmp_path: Path) -> None:
    scenario = parse(GOOD.replace("nodes = 3", "nodes = 4"), "x.toml")
    run = Run(scenario, backend=None, log=print)  # type: ignore[arg-type]
    run.samples = [
        (1.0, "n1", {"n2": "alive", "n3": "alive", "n4": "alive"}),
        (2.0, "n1", {"n2": "dead", "n3": "dead", "n4": "dead"}),
        (3.0, "n1", {"n2": "dead", "n3": "alive", "n4": "dead"}),
        (4.0, "n1", {"n2": "dead", "n3": "dead", "n4": "dead"}),
    ]
    assert transitions_to_dead(run.samples) == [
        (2.0, "n1", "n2"), (2.0, "n1", "n3"), (2.0, "n1", "n4"), (4.0, "n1", "n3")]
    run.downtime = {"n2": [[1.5, float("inf")]]}
    run.faults = [{"kind": "partition", "t0": 1.5, "t1": 1.8, "groups": [["n1", "n2", "n4"], ["n3"]]}]
    grace = scenario.grace  # 5 s by default
    assert excused(run, 2.0, "n1", "n2", ["partition", "loss"])  # n2 was down
    assert excused(run, 2.0, "n1", "n3", ["partition"])  # across the partition, within grace
    assert not excused(run, 2.0, "n1", "n3", ["loss"])  # partitions not counted as faults
    assert not excused(run, 2.0, "n1", "n4", ["partition"])  # same side, running: a false death
    assert not excused(run, 1.8 + grace + 0.1, "n1", "n3", ["partition"])  # grace over


# --- reboot and MQTT loads ------------------------------------------------------------------

REBOOT = GOOD + """
[[step]]
action = "reboot"
node = 2
down = 4

[[step]]
action = "converge"
label = "after"
timeout = 30

[[expect]]
check = "same-address"
node = 2

[[expect]]
check = "no-false-death"
"""
MQTT = GOOD + """
[[step]]
action = "mqtt-load"
name = "m"
pub = 1
sub = 3
count = 10

[[step]]
action = "mqtt-wait"
name = "m"

[[expect]]
check = "mqtt-delivered"
load = "m"
min = 0.99
"""


@pytest.mark.parametrize(
    ("base", "change", "needle", "problem"),
    [
        (REBOOT, ("node = 2\ndown = 4", "node = 7\ndown = 4"), "node = 7", "node 7 is not one of 1..3"),
        (REBOOT, ("down = 4", "down = 601"), "down = 601", "down: 601 is out of range 0..600"),
        (REBOOT, ("down = 4", 'down = "long"'), "long", "expected a number"),
        (REBOOT, ("check = \"same-address\"\nnode = 2", "check = \"same-address\"\nnode = 3"),
         "node = 3", "node 3 is never rebooted"),
        (MQTT, ("sub = 3", "sub = 1"), "sub = 1", "pub and sub are the same node"),
        (MQTT, ("count = 10", "count = 10\nqos = 2"), "qos = 2", "qos: 2 is out of range 0..1"),
        (MQTT, ("count = 10", "count = 0"), "count = 0", "count: 0 is out of range"),
        (MQTT, ("count = 10", "count = 10\ndrain = 60"), "drain = 60", "drain: 60 is out of range"),
        (MQTT, ("count = 10", "count = 10\ntopic = \"x\""), "topic", "unknown key 'topic'"),
        (MQTT, ('action = "mqtt-wait"\nname = "m"', 'action = "mqtt-wait"\nname = "other"'),
         'name = "other"', "no mqtt-load named 'other' before it"),
        (MQTT, ('load = "m"', 'load = "nope"'), 'load = "nope"', "no mqtt-load named 'nope'"),
        (MQTT, ('min = 0.99', 'min = 0.99\nmax-duplicates = -1'), "max-duplicates", "out of range"),
        (MQTT, ('check = "mqtt-delivered"', 'check = "success-rate"'), 'load = "m"', "no coap-load named 'm'"),
    ],
)
def test_reboot_and_mqtt_keys_are_checked_one_line_each(
    tmp_path: Path, base: str, change: tuple[str, str], needle: str, problem: str
) -> None:
    assert change[0] in base, change
    text = base.replace(*change, 1)
    path = _write(tmp_path, text)
    with pytest.raises(ScenarioError) as info:
        load(path)
    message = str(info.value)
    assert message.startswith(f"{path}:{_line_of(text, needle)}: "), message
    assert problem in message and "\n" not in message


def test_a_wait_must_name_a_load_of_its_own_kind() -> None:
    text = MQTT.replace('action = "mqtt-wait"', 'action = "coap-wait"')
    with pytest.raises(ScenarioError) as info:
        parse(text, "m.toml")
    line = _line_of(text, 'action = "coap-wait"') + 1  # its name key
    assert str(info.value) == f"m.toml:{line}: step 4: no coap-load named 'm' before it"


def test_the_good_reboot_and_mqtt_files_parse_with_defaults() -> None:
    reboot = parse(REBOOT, "r.toml")
    step = next(s for s in reboot.steps if s.action == "reboot")
    assert step.args["down"] == 4 and reboot.needs() == {"overlay"}
    mqtt = parse(MQTT, "m.toml")
    load_step = next(s for s in mqtt.steps if s.action == "mqtt-load")
    assert (load_step.args["rate"], load_step.args["qos"], load_step.args["drain"]) == (50, 1, 5.0)
    assert mqtt.needs() == {"mqtt"}
    assert parse(REBOOT.replace("down = 4\n", ""), "r.toml").steps[2].args["down"] == 5.0


def test_a_reboot_on_the_simulator_keeps_the_block_and_converges(tmp_path: Path) -> None:
    report = tmp_path / "r"
    path = _write(tmp_path, REBOOT)
    rc = run_cli(["scenario", str(path), "--backend", "sim", "--report", str(report), "--no-plots", "--quiet"])
    record = json.loads((report / "report.json").read_text())
    assert rc == 0, [e for e in record["expects"] if not e["ok"]] or record["error"]
    (reboot,) = record["reboots"]
    assert reboot["node"] == "n2" and reboot["t_up"] - reboot["t_down"] >= 4
    assert reboot["block_before"] is not None
    after = [s["blocks"]["n2"] for s in record["addresses"] if s["t"] >= reboot["t_up"]]
    assert after and set(after) == {reboot["block_before"]}
    assert record["downtime"]["n2"] == [[reboot["t_down"], reboot["t_up"]]]
    same = next(e for e in record["expects"] if e["check"] == "same-address")
    assert same["measured"] == 1 and same["ok"]


def test_the_mqtt_scenario_is_refused_on_the_simulator(capsys: pytest.CaptureFixture[str]) -> None:
    rc = run_cli(["scenario", str(SCENARIOS / "reboot.toml"), "--backend", "sim"])
    assert rc == 2
    assert "reboot.toml: needs mqtt, which the sim backend does not have" in capsys.readouterr().err


def test_same_address_fails_when_the_block_changes_or_is_never_seen() -> None:
    run = Run(parse(REBOOT, "r.toml"), backend=None, log=print)  # type: ignore[arg-type]
    run.reboots = [{"node": "n2", "t_down": 10.0, "t_up": 14.0, "block_before": "10.0.0.16/28"}]
    run.downtime = {"n2": [[10.0, 14.0]]}
    run.addresses = [{"t": 9.0, "blocks": {"n2": "10.0.0.16/28"}},
                     {"t": 15.0, "blocks": {"n2": None}},
                     {"t": 16.0, "blocks": {"n2": "10.0.0.16/28"}}]  # fmt: skip
    assert same_address(run, "n2")["ok"]  # not yet active at 15 s, then the same block
    run.addresses.append({"t": 17.0, "blocks": {"n2": "10.0.0.32/28"}})
    changed = same_address(run, "n2")
    assert not changed["ok"] and changed["events"][0]["after"] == ["10.0.0.16/28", "10.0.0.32/28"]
    run.addresses = run.addresses[:2]  # never active again after the reboot
    assert not same_address(run, "n2")["ok"]
    run.reboots[0]["block_before"] = None  # no block before: nothing to keep
    run.addresses.append({"t": 16.0, "blocks": {"n2": "10.0.0.16/28"}})
    assert not same_address(run, "n2")["ok"]


def test_mqtt_delivered_counts_lost_and_duplicates() -> None:
    run = Run(parse(MQTT, "m.toml"), backend=None, log=print)  # type: ignore[arg-type]
    run.loads = {"m": {"kind": "mqtt", "count": 200, "result": {"received": 198, "lost": 2, "duplicates": 3}}}
    assert mqtt_delivered(run, "m", 0.99, None) | {} == {
        "measured": 0.99, "unit": "ratio delivered", "published": 200, "duplicates": 3, "lost": 2, "ok": True}
    assert not mqtt_delivered(run, "m", 0.995, None)["ok"]
    assert not mqtt_delivered(run, "m", 0.99, 2)["ok"]  # three duplicates, two allowed
    assert mqtt_delivered(run, "m", 0.99, 3)["ok"]
    run.loads["m"].pop("result")  # the load never finished
    assert not mqtt_delivered(run, "m", 0.0, None)["ok"]


def _load_process(script: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip


def test_a_load_process_is_read_in_the_background_and_its_records_shifted() -> None:
    clock = iter([100.0]).__next__  # the backend time "started" arrives
    good = _load_process("import json, sys; print('started', file=sys.stderr, flush=True); "
                         "print(json.dumps({'received': 2, 'records': [[0.5, True, '', 1.0]] * 2}))")
    load = _Load(good, clock, 5.0, "MQTT")
    assert load.wait_started(10.0) and load.started == 100.0
    result = load.result()
    assert load.done() and result["received"] == 2 and result["records"][0] == [100.5, True, "", 1.0]
    failed = _load_process("import sys; print('cannot connect to 10.0.0.3:1883', file=sys.stderr); sys.exit(1)")
    load = _Load(failed, clock, 5.0, "MQTT")
    assert not load.wait_started(10.0)
    with pytest.raises(BackendError, match="MQTT load client did not start: cannot connect to 10.0.0.3:1883"):
        load.result()
    garbled = _load_process("import sys; print('started', file=sys.stderr, flush=True); print('[1, 2')")
    with pytest.raises(BackendError, match="the CoAP load failed"):
        _Load(garbled, lambda: 0.0, 5.0).result()


def test_agent_logs_are_one_file_per_node_and_never_a_path(tmp_path: Path) -> None:
    from testbed.scenario_report import _write_logs

    written = _write_logs(tmp_path, {"n1": "line\n", "../n2": "escape", "n3": ""})
    assert written == [tmp_path / "logs" / "n1.log", tmp_path / "logs" / "n3.log"]
    assert (tmp_path / "logs" / "n1.log").read_text() == "line\n" and not (tmp_path / "n2.log").exists()


class _Bars:
    def __init__(self) -> None:
        self.calls: list[tuple[list[int], dict[str, object]]] = []

    def bar(self, xs: list[float], heights: list[int], **kw: object) -> None:
        self.calls.append((list(heights), kw))


def test_coap_bars_stack_answers_by_instance_so_a_failover_shows() -> None:
    from testbed.scenario_report import _WORDS, _count_bars, _per_second

    # second 0: n2 answers twice, n3 once; second 1: one fails, n3 answers the rest
    records = [[0.1, True, "n2", 1.0], [0.2, True, "n2", 1.0], [0.3, True, "n3", 1.0],
               [1.1, False, "", 5000.0], [1.2, True, "n3", 2.0], [1.3, True, "n3", 2.0]]  # fmt: skip
    ax = _Bars()
    _count_bars(ax, "m", records, _per_second(records), _WORDS["coap"])
    assert [(h, kw["label"], kw.get("bottom")) for h, kw in ax.calls] == [
        ([2, 0], "m: answered by n2", [0, 0]),
        ([1, 2], "m: answered by n3", [2, 0]),
        ([0, 1], "m: failed", [3, 2]),
    ]
    one = [r for r in records if r[2] != "n2"]  # a single instance: sent and failed, as before
    ax = _Bars()
    _count_bars(ax, "m", one, _per_second(one), _WORDS["coap"])
    assert [(h, kw["label"]) for h, kw in ax.calls] == [([1, 3], "m: sent"), ([0, 1], "m: failed")]
