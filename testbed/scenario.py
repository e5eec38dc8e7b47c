"""Scenario files: one TOML per experiment (``testbed/scenarios/*.toml``), parsed strictly.

A scenario names a cluster size and a timeline of ``[[step]]`` actions, then ``[[expect]]``
clauses the run must satisfy; ``testbed/scenarios/README.md`` is the reference for every key.
:func:`load` returns a :class:`Scenario` or raises :class:`ScenarioError`, whose text is one
line ``FILE:LINE: problem``. ``tomllib`` keeps no positions, so the line of a key is found
again in the text: the n-th ``[[step]]`` (or ``[[expect]]``) header, then the first
``key =`` line after it and before the next header; a missing key points at its table's
header. Nodes are numbered ``1..nodes``; every backend maps the numbers to its own names.

Nothing here runs anything: :mod:`testbed.scenario_run` does.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MAX_NODES = 200  # a scenario is an experiment on one machine, not a scale test
MAX_SECONDS = 3600.0  # no single wait, load or timeout longer than an hour
MAX_STEPS = 500
PRESETS = ("lan", "wan", "local")
FAULT_KINDS = ("partition", "loss")
_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")


class ScenarioError(Exception):
    """A scenario file is wrong; ``str()`` is ``FILE:LINE: problem``."""

    def __init__(self, path: str, line: int, problem: str) -> None:
        super().__init__(f"{path}:{line}: {problem}")
        self.path, self.line, self.problem = path, line, problem


@dataclass(frozen=True)
class Step:
    """One timeline action; ``args`` holds its keys, validated and defaulted."""

    index: int  # 1-based, as the report and error messages count
    action: str
    line: int
    args: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return str(self.args.get("label") or f"{self.index}:{self.action}")


@dataclass(frozen=True)
class Expect:
    """One clause the run must satisfy."""

    index: int
    check: str
    line: int
    args: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Scenario:
    path: str
    name: str
    description: str
    nodes: int
    preset: str
    seed: int
    poll: float
    grace: float
    steps: tuple[Step, ...]
    expects: tuple[Expect, ...]
    policy_interval: float = 2.0  # the agents' [policy] interval when there is an endpoint
    policy_pollers: tuple[int, ...] | None = None  # nodes that poll it (None: every node)

    def needs(self) -> set[str]:
        """Backend features the scenario uses beyond membership ("coap", "mqtt", "overlay",
        "policy", "cloud", "policy-endpoint")."""
        needed = {s.action.split("-")[0] for s in self.steps if s.action.startswith(("coap-", "mqtt-"))}
        needed |= {ACTION_FEATURES[s.action] for s in self.steps if s.action in ACTION_FEATURES}
        if any(s.action == "cloud-outage" and s.args.get("service") == "policy" for s in self.steps):
            needed = (needed - {"cloud"}) | {"policy-endpoint"}
            if any(s.action == "cloud-outage" and s.args.get("service") == "broker" for s in self.steps):
                needed.add("cloud")
        if any(s.action == "publish-policy" and s.args.get("via") == "cloud" for s in self.steps):
            needed.add("policy-endpoint")
        if any(e.check in ("no-duplicate-address", "same-address") for e in self.expects):
            needed.add("overlay")
        return needed


# --- value checkers: each returns the cleaned value or raises ValueError(problem) ------------

Checker = Callable[[Any, int], Any]  # (value, nodes) -> cleaned


def _number(lo: float, hi: float, *, integer: bool = False) -> Checker:
    def check(value: Any, nodes: int) -> Any:
        ok = isinstance(value, int) if integer else isinstance(value, int | float)
        if isinstance(value, bool) or not ok:
            raise ValueError(f"expected {'an integer' if integer else 'a number'}, got {value!r}")
        if not lo <= value <= hi:
            raise ValueError(f"{value!r} is out of range {lo:g}..{hi:g}")
        return value

    return check


def _choice(*options: str) -> Checker:
    def check(value: Any, nodes: int) -> str:
        if value not in options:
            raise ValueError(f"expected one of {', '.join(options)}, got {value!r}")
        return str(value)

    return check


def _int_list(value: Any, nodes: int) -> list[int]:
    """A list of integers; checked as nodes once the scenario's size is known."""
    if not isinstance(value, list) or not all(type(v) is int for v in value):
        raise ValueError(f"expected a non-empty list of node numbers, got {value!r}")
    return value


def _string(value: Any, nodes: int) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"expected a non-empty string, got {value!r}")
    if "\n" in value or len(value) > 200:
        raise ValueError("expected one line of at most 200 characters")
    return value


def _name(value: Any, nodes: int) -> str:
    if not isinstance(value, str) or not _NAME.match(value):
        raise ValueError(f"expected a name of lowercase letters, digits and '-', got {value!r}")
    return value


def _node(value: Any, nodes: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected a node number, got {value!r}")
    if not 1 <= value <= nodes:
        raise ValueError(f"node {value} is not one of 1..{nodes}")
    return value


def _nodes(value: Any, nodes: int) -> tuple[int, ...]:
    if not isinstance(value, list) or not value:
        raise ValueError(f"expected a non-empty list of node numbers, got {value!r}")
    cleaned = tuple(_node(v, nodes) for v in value)
    if len(set(cleaned)) != len(cleaned):
        raise ValueError("a node is listed twice")
    return cleaned


def parse_groups(value: Any, nodes: int) -> tuple[tuple[int, ...], ...]:
    """``"1,2/3,4,5"`` -> ((1, 2), (3, 4, 5)); two or more groups, no node twice."""
    if not isinstance(value, str):
        raise ValueError(f'expected groups as a string like "1,2/3,4,5", got {value!r}')
    groups = []
    for part in value.split("/"):
        members = []
        for item in part.split(","):
            item = item.strip()
            if not item.isdigit():
                raise ValueError(f'bad node {item!r} in groups {value!r} (want "1,2/3,4,5")')
            members.append(_node(int(item), nodes))
        groups.append(tuple(members))
    flat = [n for g in groups for n in g]
    if len(groups) < 2:
        raise ValueError(f'groups {value!r}: need two or more groups separated by "/"')
    if len(set(flat)) != len(flat):
        raise ValueError(f"groups {value!r}: a node is in two groups")
    return tuple(groups)


def _groups_any(value: Any, nodes: int) -> tuple[tuple[int, ...], ...]:
    """Like :func:`parse_groups` but one group is allowed (a converge on a subset)."""
    if isinstance(value, str) and "/" not in value:
        return (_one_group(value, nodes),)
    return parse_groups(value, nodes)


def _one_group(value: str, nodes: int) -> tuple[int, ...]:
    items = [i.strip() for i in value.split(",")]
    if not all(i.isdigit() for i in items):
        raise ValueError(f'bad group {value!r} (want "1,2,3")')
    return _nodes([int(i) for i in items], nodes)


def _faults(value: Any, nodes: int) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(v in FAULT_KINDS for v in value):
        raise ValueError(f"expected a list of {', '.join(FAULT_KINDS)}, got {value!r}")
    return tuple(value)


POSITIVE = _number(0.001, MAX_SECONDS)
PERCENT = _number(0, 100, integer=True)

# key -> (checker, required, default). "label" and "note" are allowed on every step.
_COMMON: dict[str, tuple[Checker, bool, Any]] = {
    "label": (_name, False, None),
    "note": (_string, False, None),
}
ACTION_FEATURES = {"publish-policy": "policy", "cloud-outage": "cloud"}
STEP_SPECS: dict[str, dict[str, tuple[Checker, bool, Any]]] = {
    "start": {"nodes": (_nodes, False, None), "node": (_node, False, None)},
    "converge": {"timeout": (POSITIVE, True, None), "groups": (_groups_any, False, None)},
    "kill": {"node": (_node, True, None)},
    "stop": {"node": (_node, True, None)},
    "partition": {"groups": (parse_groups, True, None)},
    "heal": {},
    "loss": {"node": (_node, True, None), "percent": (PERCENT, True, None)},
    "loss-ramp": {
        "node": (_node, True, None),
        "from": (PERCENT, True, None),
        "to": (PERCENT, True, None),
        "step": (_number(1, 100, integer=True), True, None),
        "every": (POSITIVE, True, None),
    },
    "sleep": {"seconds": (POSITIVE, True, None)},
    "coap-serve": {"service": (_name, True, None), "nodes": (_nodes, True, None),
                   "slow": (_nodes, False, ())},  # fmt: skip
    "coap-load": {
        "name": (_name, True, None),
        "ingress": (_node, True, None),
        "service": (_name, True, None),
        "seconds": (POSITIVE, True, None),
        "rate": (_number(1, 2000), False, 50),
        "concurrency": (_number(1, 200, integer=True), False, 10),
    },
    "coap-wait": {"name": (_name, True, None)},
    "reboot": {"node": (_node, True, None), "down": (_number(0, 600), False, 5.0)},
    "mqtt-load": {
        "name": (_name, True, None),
        "pub": (_node, True, None),
        "sub": (_node, True, None),
        "count": (_number(1, 100_000, integer=True), True, None),
        "rate": (_number(1, 5000), False, 50),
        "qos": (_number(0, 1, integer=True), False, 1),
        "drain": (_number(0.5, 30), False, 5.0),
    },
    "mqtt-wait": {"name": (_name, True, None)},
    "publish-policy": {
        "nodes": (_nodes, False, (1,)),
        "version": (_number(1, 2**31, integer=True), False, None),
        "wait": (_number(0, 600), False, 30.0),
        "via": (_choice("control", "cloud"), False, "control"),
    },
    "cloud-outage": {
        "seconds": (_number(0, 3600), True, None),
        "service": (_choice("broker", "policy"), False, "broker"),
    },
}
EXPECT_SPECS: dict[str, dict[str, tuple[Checker, bool, Any]]] = {
    "converged": {"step": (_name, True, None), "within": (POSITIVE, True, None)},
    "no-false-death": {"faults": (_faults, False, FAULT_KINDS)},
    "detected": {"node": (_node, True, None), "within": (POSITIVE, True, None)},
    "no-duplicate-address": {},
    "success-rate": {"load": (_name, True, None), "min": (_number(0, 1), True, None)},
    "same-address": {"node": (_node, True, None)},
    "mqtt-delivered": {
        "load": (_name, True, None),
        "min": (_number(0, 1), True, None),
        "max-duplicates": (_number(0, 100_000, integer=True), False, None),
    },
    "policy-version": {
        "step": (_name, True, None),
        "within": (POSITIVE, True, None),
        "nodes": (_nodes, False, None),
    },
}
SCENARIO_SPEC: dict[str, tuple[Checker, bool, Any]] = {
    "name": (_name, True, None),
    "description": (_string, False, ""),
    "nodes": (_number(1, MAX_NODES, integer=True), True, None),
    "seed": (_number(0, 2**31, integer=True), False, 1),
    "poll": (_number(0.1, 5.0), False, 0.5),
    "grace": (_number(0, 120.0), False, 5.0),
    "policy-interval": (_number(0.1, 600), False, 2.0),
    "policy-pollers": (_int_list, False, None),
}


def _preset(value: Any, nodes: int) -> str:
    if value not in PRESETS:
        raise ValueError(f"expected one of {', '.join(PRESETS)}, got {value!r}")
    return str(value)


SCENARIO_SPEC["preset"] = (_preset, False, "local")  # after the others: defined below them


# --- locating lines ---------------------------------------------------------------------------

_HEADER = re.compile(r"^\s*\[\[?\s*([A-Za-z0-9_.-]+)\s*\]\]?")


class _Lines:
    """Find the line of a table header or a key in the text (tomllib keeps no positions)."""

    def __init__(self, text: str) -> None:
        self.lines = text.splitlines()
        self.headers: list[tuple[int, str, bool]] = []  # (line, name, is array-of-tables)
        for i, line in enumerate(self.lines, start=1):
            match = _HEADER.match(line)
            if match and not line.lstrip().startswith("#"):
                self.headers.append((i, match.group(1), line.lstrip().startswith("[[")))

    def table(self, name: str, nth: int = 0) -> int:
        """The line of the nth ``[name]`` / ``[[name]]`` header (1 if not found)."""
        found = [line for line, n, _ in self.headers if n == name]
        return found[nth] if nth < len(found) else 1

    def key(self, table_line: int, key: str) -> int:
        """The line of ``key =`` inside the table starting at ``table_line``."""
        ends = [line for line, _, _ in self.headers if line > table_line]
        end = ends[0] if ends else len(self.lines) + 1
        pattern = re.compile(rf'^\s*("?){re.escape(key)}\1\s*=')
        for i in range(table_line, end):
            if i >= 1 and pattern.match(self.lines[i - 1]):
                return i
        return table_line


# --- parsing ----------------------------------------------------------------------------------


def load(path: str | Path) -> Scenario:
    """Read and validate a scenario file; ScenarioError (one line) on any problem."""
    name = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ScenarioError(name, 0, f"cannot read: {exc}") from None
    return parse(text, name)


def parse(text: str, path: str = "<scenario>") -> Scenario:
    """Validate scenario TOML ``text``; ``path`` names it in errors."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        match = re.search(r"\(at line (\d+), column \d+\)", str(exc))
        line = int(match.group(1)) if match else 1
        problem = re.sub(r"\s*\(at line \d+, column \d+\)", "", str(exc)) or "invalid TOML"
        raise ScenarioError(path, line, f"invalid TOML: {problem}") from None
    lines = _Lines(text)

    def fail(line: int, problem: str) -> ScenarioError:
        return ScenarioError(path, line, problem)

    for key in data:
        if key not in ("scenario", "step", "expect"):
            raise fail(lines.key(1, key) if key not in _table_names(lines) else lines.table(key),
                       f"unknown table or key {key!r} (want [scenario], [[step]], [[expect]])")
    head = data.get("scenario")
    if not isinstance(head, dict):
        raise fail(1, "missing the [scenario] table (name, nodes)")
    head_line = lines.table("scenario")
    meta = _fields(head, SCENARIO_SPEC, 0, head_line, lines, fail, "[scenario]")
    nodes = int(meta["nodes"])
    pollers = meta["policy-pollers"]
    if pollers is not None:
        try:
            pollers = _nodes(pollers, nodes)
        except ValueError as exc:
            raise fail(lines.key(head_line, "policy-pollers"), f"[scenario]: policy-pollers: {exc}") from None
    steps = _steps(data.get("step"), nodes, lines, fail)
    expects = _expects(data.get("expect"), nodes, lines, fail)
    _cross_check(steps, expects, lines, fail)
    return Scenario(
        path=path, name=meta["name"], description=meta["description"], nodes=nodes,
        preset=meta["preset"], seed=int(meta["seed"]), poll=float(meta["poll"]),
        grace=float(meta["grace"]), steps=steps, expects=expects,
        policy_interval=float(meta["policy-interval"]), policy_pollers=pollers,
    )  # fmt: skip


def _table_names(lines: _Lines) -> set[str]:
    return {n for _, n, _ in lines.headers}


def _fields(
    table: Mapping[str, Any],
    spec: Mapping[str, tuple[Checker, bool, Any]],
    nodes: int,
    table_line: int,
    lines: _Lines,
    fail: Callable[[int, str], ScenarioError],
    what: str,
    skip: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Check a table's keys against ``spec``: unknown, missing, wrong type or range."""
    out: dict[str, Any] = {}
    for key, value in table.items():
        if key in skip:
            continue
        if key not in spec:
            known = ", ".join(sorted(spec)) or "none besides the action"
            raise fail(lines.key(table_line, key), f"{what}: unknown key {key!r} (known: {known})")
        checker = spec[key][0]
        try:
            out[key] = checker(value, nodes)
        except ValueError as exc:
            raise fail(lines.key(table_line, key), f"{what}: {key}: {exc}") from None
    for key, (_, required, default) in spec.items():
        if key not in out:
            if required:
                raise fail(table_line, f"{what}: missing key {key!r}")
            out[key] = default
    return out


def _array(
    value: Any, name: str, lines: _Lines, fail: Callable[[int, str], ScenarioError]
) -> list[dict[str, Any]]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise fail(lines.table(name), f"{name}: expected [[{name}]] tables")
    if len(value) > MAX_STEPS:
        raise fail(lines.table(name, MAX_STEPS), f"more than {MAX_STEPS} [[{name}]] tables")
    return value


def _steps(
    value: Any, nodes: int, lines: _Lines, fail: Callable[[int, str], ScenarioError]
) -> tuple[Step, ...]:
    steps = []
    for i, table in enumerate(_array(value, "step", lines, fail)):
        line = lines.table("step", i)
        action = table.get("action")
        if action is None:
            raise fail(line, f"step {i + 1}: missing key 'action'")
        if action not in STEP_SPECS:
            known = ", ".join(STEP_SPECS)
            raise fail(lines.key(line, "action"), f"step {i + 1}: unknown action {action!r} (known: {known})")
        spec = {**_COMMON, **STEP_SPECS[action]}
        args = _fields(table, spec, nodes, line, lines, fail, f"step {i + 1} ({action})", ("action",))
        if action == "start" and args["node"] is not None and args["nodes"] is not None:
            raise fail(line, f"step {i + 1} (start): give node or nodes, not both")
        if action == "partition" and sum(map(len, args["groups"])) != nodes:
            # the backends differ on nodes left out (the simulator isolates them together, the
            # namespace testbed lets them reach everyone), so a scenario names every node
            raise fail(lines.key(line, "groups"), f"step {i + 1} (partition): groups must name "
                       f"every node 1..{nodes} once")  # fmt: skip
        if action == "coap-serve" and not set(args["slow"]) <= set(args["nodes"]):
            raise fail(lines.key(line, "slow"), f"step {i + 1} (coap-serve): slow names a node not in nodes")
        if action == "loss-ramp" and args["from"] == args["to"]:
            raise fail(lines.key(line, "to"), f"step {i + 1} (loss-ramp): from and to are equal")
        steps.append(Step(i + 1, action, line, args))
    if not steps:
        raise fail(1, "no [[step]] tables: a scenario needs a timeline")
    return tuple(steps)


def _expects(
    value: Any, nodes: int, lines: _Lines, fail: Callable[[int, str], ScenarioError]
) -> tuple[Expect, ...]:
    expects = []
    for i, table in enumerate(_array(value, "expect", lines, fail)):
        line = lines.table("expect", i)
        check = table.get("check")
        if check is None:
            raise fail(line, f"expect {i + 1}: missing key 'check'")
        if check not in EXPECT_SPECS:
            known = ", ".join(EXPECT_SPECS)
            raise fail(lines.key(line, "check"), f"expect {i + 1}: unknown check {check!r} (known: {known})")
        args = _fields(table, EXPECT_SPECS[check], nodes, line, lines, fail, f"expect {i + 1} ({check})", ("check",))
        expects.append(Expect(i + 1, check, line, args))
    if not expects:
        raise fail(1, "no [[expect]] tables: a scenario must say what has to hold")
    return tuple(expects)


def _cross_check(
    steps: tuple[Step, ...],
    expects: tuple[Expect, ...],
    lines: _Lines,
    fail: Callable[[int, str], ScenarioError],
) -> None:
    """References between tables: labels, loads, killed nodes."""
    labels: dict[str, Step] = {}
    for step in steps:
        label = step.args.get("label")
        if label is not None:
            if label in labels:
                raise fail(lines.key(step.line, "label"), f"step {step.index}: label {label!r} is used twice")
            labels[label] = step
    loads = {s.args["name"]: s for s in steps if s.action in ("coap-load", "mqtt-load")}
    started: dict[str, str] = {}  # load name -> its kind ("coap", "mqtt"); one namespace for both
    for step in steps:
        kind, _, verb = step.action.partition("-")
        if verb == "load":
            if step.args["name"] in started:
                raise fail(lines.key(step.line, "name"), f"step {step.index}: load {step.args['name']!r} is started twice")
            started[step.args["name"]] = kind
        if verb == "wait" and started.get(step.args["name"]) != kind:
            raise fail(lines.key(step.line, "name"), f"step {step.index}: no {kind}-load named {step.args['name']!r} before it")
        if step.action == "mqtt-load" and step.args["pub"] == step.args["sub"]:
            raise fail(lines.key(step.line, "sub"), f"step {step.index} (mqtt-load): pub and sub are the same node "
                       "(the load measures delivery through the mesh)")  # fmt: skip
    killed = {s.args["node"] for s in steps if s.action == "kill"}
    rebooted = {s.args["node"] for s in steps if s.action == "reboot"}
    for exp in expects:
        a = exp.args
        if exp.check == "converged":
            target = labels.get(a["step"])
            if target is None or target.action != "converge":
                raise fail(lines.key(exp.line, "step"), f"expect {exp.index}: no converge step labelled {a['step']!r}")
        elif exp.check in ("success-rate", "mqtt-delivered"):
            kind = "coap" if exp.check == "success-rate" else "mqtt"
            if a["load"] not in loads or loads[a["load"]].action != f"{kind}-load":
                raise fail(lines.key(exp.line, "load"), f"expect {exp.index}: no {kind}-load named {a['load']!r}")
        elif exp.check == "detected" and a["node"] not in killed:
            raise fail(lines.key(exp.line, "node"), f"expect {exp.index}: node {a['node']} is never killed")
        elif exp.check == "same-address" and a["node"] not in rebooted:
            raise fail(lines.key(exp.line, "node"), f"expect {exp.index}: node {a['node']} is never rebooted")
        elif exp.check == "policy-version":
            target = labels.get(a["step"])
            if target is None or target.action != "publish-policy":
                raise fail(lines.key(exp.line, "step"), f"expect {exp.index}: no publish-policy step labelled {a['step']!r}")
