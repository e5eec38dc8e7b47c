"""The publish-policy and cloud-outage actions and the policy-version check, on a fake backend.

The fake has a virtual clock and, per node, the agent's real accept rule
(:func:`overlay.policy.decide`) against the key the runner hands it at ``up``; with
``spread`` a bundle accepted on one node reaches the others ``SPREAD_S`` later (what
peer-to-peer spread will do). Real backends: test_scenario_netns.py, test_containers.py.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from overlay import policy as pol
from testbed.__main__ import main as run_cli
from testbed.scenario import ScenarioError, parse
from testbed.scenario_backends import BackendError, PolicyEndpoint
from testbed.scenario_run import execute

SCENARIOS = Path(__file__).resolve().parents[2] / "testbed" / "scenarios"
SPREAD_S = 1.5
BASE = """\
[scenario]
name = "p"
nodes = 3

[[step]]
action = "start"

[[step]]
action = "publish-policy"
label = "v1"
nodes = NODES
wait = 5

[[expect]]
check = "policy-version"
step = "v1"
within = 3
"""


class FakeBackend:
    name = "fake"
    features = frozenset({"policy", "cloud", "policy-endpoint"})

    def __init__(self, spread: bool = False, booting: int = 0) -> None:
        self.spread, self.booting = spread, booting
        self.t = 0.0
        self.trusted: dict[str, Any] = {}
        self.marks: dict[int, int] = {}
        self.pending: list[tuple[float, int, int]] = []  # (when, node, version)
        self.cloud_calls: list[tuple[float, bool]] = []
        self.endpoint_calls: list[tuple[float, bool]] = []
        self.count = 0
        self.up_args: dict[str, Any] = {}

    def up(self, nodes: int, preset: str, seed: int, *, policy_key: str | None = None,
           cloud: bool = False, policy_endpoint: PolicyEndpoint | None = None) -> None:  # fmt: skip
        self.count = nodes
        self.up_args = {"policy_key": policy_key, "cloud": cloud}
        self.endpoint = policy_endpoint
        if policy_key is not None:
            key = pol.load_public_key(policy_key.encode())
            self.trusted = pol.trusted_keys([key])
        self.marks = {i: 0 for i in range(1, nodes + 1)}

    def down(self) -> None: ...
    def now(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds
        for _when, node, version in [p for p in self.pending if p[0] <= self.t]:
            self.marks[node] = max(self.marks[node], version)
        self.pending = [p for p in self.pending if p[0] > self.t]

    def start(self, nodes: Sequence[int]) -> None: ...
    def running(self) -> set[int]:
        return set(range(1, self.count + 1))

    def views(self) -> dict[str, dict[str, str]]:
        names = [f"n{i}" for i in self.running()]
        return {o: {m: "alive" for m in names if m != o} for o in names}

    def policy_apply(self, node: int, envelope: bytes) -> dict[str, Any]:
        if self.booting:
            self.booting -= 1
            raise BackendError(f"n{node}: policy-apply: unknown command 'policy-apply'")
        decision = pol.decide(envelope, self.trusted, self.marks[node], time.time())
        if not decision.accepted:
            return {"accepted": False, "reason": decision.reason, "detail": decision.detail}
        assert decision.bundle is not None
        version = self.marks[node] = decision.bundle.version
        if self.spread:
            self.pending += [(self.t + SPREAD_S, n, version) for n in self.marks if n != node]
        return {"accepted": True, "version": version, "reason": None, "detail": ""}

    def policy_versions(self) -> dict[str, int | None]:
        return {f"n{i}": (v or None) for i, v in self.marks.items()}

    def cloud(self, running: bool) -> None:
        self.cloud_calls.append((self.t, running))

    def policy_publish(self, envelope: bytes) -> None:
        """The pollers have it one interval later; with spread the others SPREAD_S after."""
        assert self.endpoint is not None
        version = pol.decide(envelope, self.trusted, 0, time.time()).bundle.version  # type: ignore[union-attr]
        at = self.t + self.endpoint.interval
        self.pending += [(at, n, version) for n in self.endpoint.pollers]
        if self.spread:
            others = set(self.marks) - set(self.endpoint.pollers)
            self.pending += [(at + SPREAD_S, n, version) for n in others]

    def policy_endpoint(self, running: bool) -> None:
        self.endpoint_calls.append((self.t, running))


def _run(text: str, backend: FakeBackend) -> dict[str, Any]:
    return execute(parse(text, "p.toml"), backend, log=lambda line: None)  # type: ignore[arg-type]


def test_the_agents_trust_the_runs_key_and_every_node_reports_the_version() -> None:
    backend = FakeBackend()
    record = _run(BASE.replace("NODES", "[1, 2, 3]"), backend)
    assert record["ok"], record["error"] or record["expects"]
    assert (
        len(base64.b64decode(backend.up_args["policy_key"])) == 32
        and backend.up_args["cloud"] is False
    )
    assert backend.marks == {1: 1, 2: 1, 3: 1}
    (check,) = record["expects"]
    assert check["measured"] == 0 and check["missing"] == [] and check["version"] == 1


def test_a_bundle_applied_on_one_node_fails_the_check_until_it_spreads() -> None:
    one = BASE.replace("NODES", "[1]")
    stays = _run(one, FakeBackend(spread=False))
    assert not stays["ok"] and stays["error"] is None  # the step ran; the clause failed
    assert stays["expects"][0]["missing"] == ["n2", "n3"]
    assert "not on n2, n3 after 5 s" in stays["steps"][1]["detail"]
    spread = _run(one, FakeBackend(spread=True))
    assert spread["ok"], spread["expects"]
    assert spread["expects"][0]["measured"] == pytest.approx(SPREAD_S, abs=0.51)  # poll 0.5 s
    late = _run(one.replace("within = 3", "within = 1"), FakeBackend(spread=True))
    assert not late["ok"] and late["expects"][0]["missing"] == ["n2", "n3"]


def test_a_node_that_already_has_the_version_counts_as_applied() -> None:
    text = BASE.replace("NODES", "[1, 2, 3]").replace(
        "wait = 5",
        'wait = 5\n\n[[step]]\naction = "publish-policy"\nversion = 1\nnodes = [2]\nwait = 1',
    )
    record = _run(text, FakeBackend())
    assert record["ok"], record["error"]
    assert "n2 already enforced it: refused as a rollback" in record["steps"][2]["detail"]


def test_a_refusal_fails_the_step_and_an_older_version_is_new_to_a_node_without_the_newer() -> None:
    text = BASE.replace("NODES", "[1]").replace('label = "v1"', 'label = "v1"\nversion = 3') + (
        '\n[[step]]\naction = "publish-policy"\nversion = 2\nnodes = [2]\n')  # fmt: skip
    text = text.replace("within = 3", "within = 3\nnodes = [1]")
    record = _run(text, FakeBackend())
    assert record["ok"], record["error"]  # n2 never saw 3: 2 is new to it
    untrusting = FakeBackend()
    untrusting.up = lambda *a, **k: FakeBackend.up(untrusting, 3, "local", 1)  # type: ignore[method-assign]
    record = _run(text, untrusting)  # its agents trust no key
    assert record["error"] == "step 2 (publish-policy): n1 refused version 3: unknown_key: " + (
        f"signed by key {record['error'].split('signed by key ')[1]}")  # fmt: skip
    assert [s["ok"] for s in record["steps"]] == [True, False, None]


def test_an_apply_is_retried_while_a_booting_agent_lacks_the_command() -> None:
    record = _run(BASE.replace("NODES", "[1]").replace("within = 3", "within = 3\nnodes = [1]"),
                  FakeBackend(booting=3))  # fmt: skip
    assert record["ok"], record["error"]


def test_cloud_outage_stops_the_broker_for_its_seconds_then_starts_it(tmp_path: Path) -> None:
    text = BASE.split("[[step]]\naction = \"publish-policy\"")[0] + (
        '[[step]]\naction = "cloud-outage"\nseconds = 4\n\n[[expect]]\ncheck = "no-false-death"\n')  # fmt: skip
    backend = FakeBackend()
    record = _run(text, backend)
    assert record["ok"] and backend.up_args == {"policy_key": None, "cloud": True}
    (t0, stopped), (t1, started) = backend.cloud_calls
    assert (stopped, started) == (False, True) and t1 - t0 == pytest.approx(4.0)
    assert record["faults"] == [{"kind": "cloud", "service": "broker", "t0": t0, "t1": t1}]
    json.dumps(record)  # the report can hold it


@pytest.mark.parametrize(
    ("change", "needle", "problem"),
    [
        (
            ('step = "v1"', 'step = "nope"'),
            'step = "nope"',
            "no publish-policy step labelled 'nope'",
        ),
        (("nodes = NODES", "nodes = [4]"), "nodes = [4]", "node 4 is not one of 1..3"),
        (("wait = 5", "wait = 601"), "wait = 601", "out of range"),
        (("nodes = NODES", "version = 0"), "version = 0", "out of range"),
    ],
)
def test_policy_keys_are_checked_one_line_each(
    change: tuple[str, str], needle: str, problem: str
) -> None:
    text = BASE.replace(*change).replace("NODES", "[1]")
    with pytest.raises(ScenarioError) as info:
        parse(text, "p.toml")
    line = next(i for i, row in enumerate(text.splitlines(), start=1) if needle in row)
    assert str(info.value).startswith(f"p.toml:{line}: ") and problem in str(info.value)


def test_policy_and_cloud_scenarios_are_refused_on_the_simulator(
    capsys: pytest.CaptureFixture[str],
) -> None:
    for name, feature in (("policy.toml", "policy"), ("cloud-outage.toml", "cloud")):
        assert run_cli(["scenario", str(SCENARIOS / name), "--backend", "sim"]) == 2
        assert (
            f"{name}: needs {feature}, which the sim backend does not have"
            in capsys.readouterr().err
        )


CLOUD = BASE.replace("nodes = NODES", 'via = "cloud"').replace(
    "[scenario]", "[scenario]\npolicy-interval = 1\npolicy-pollers = [1]"
) + '[[step]]\naction = "cloud-outage"\nservice = "policy"\nseconds = 2\n'


def test_via_cloud_serves_the_bundle_and_measures_until_the_peers_have_it() -> None:
    backend = FakeBackend(spread=True)
    record = _run(CLOUD, backend)
    assert record["ok"], record["error"] or record["expects"]
    assert backend.endpoint == PolicyEndpoint(interval=1.0, pollers=(1,))
    (check,) = record["expects"]
    assert check["measured"] == pytest.approx(1.0 + SPREAD_S, abs=0.51)  # poll 0.5 s
    assert record["policies"]["v1"]["applied"] == ["cloud"]
    (t0, stopped), (t1, started) = backend.endpoint_calls
    assert (stopped, started, backend.cloud_calls) == (False, True, [])
    assert record["faults"] == [{"kind": "cloud", "service": "policy", "t0": t0, "t1": t1}]
    stays = _run(CLOUD, FakeBackend(spread=False))  # only the poller: the check fails
    assert not stays["ok"] and stays["expects"][0]["missing"] == ["n2", "n3"]
