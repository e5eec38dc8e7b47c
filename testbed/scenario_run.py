"""Run a scenario end to end: ``python -m testbed scenario FILE --backend sim|netns|containers``.

How it works. The file is parsed (:mod:`testbed.scenario`; a bad file is one line and exit 2),
the backend is built (:mod:`testbed.scenario_backends`; not root for netns, or no containers
module, or a scenario that needs CoAP on the simulator: one line, exit 2), then the steps run
in order. Whenever time passes (``sleep``, ``converge``, ``loss-ramp``, a load) the runner
polls every running node's membership view every ``poll`` seconds (the backend's clock:
virtual on the simulator) and records a timeline of samples ``(t, observer, {member:
state})``. Faults and node downtimes are recorded as intervals on the same clock. A step that
fails (a converge that times out, an action the backend refuses) ends the timeline; the
remaining steps are reported as skipped. Then each ``[[expect]]`` is judged from the record:

- ``converged``: the labelled converge step converged, within ``within`` seconds;
- ``no-false-death``: no observer's view of a member turned ``dead`` while that member was
  running and no fault of the listed kinds (default partition and loss) stood between the two
  (a node's downtime, a partition separating them, loss on either's link; each interval
  stretched by ``[scenario] grace`` seconds after it ends);
- ``detected``: after each kill of ``node``, every observer running then saw it ``dead``
  within ``within`` seconds (polling resolution: ``poll``);
- ``no-duplicate-address``: sampled after each converge step, before each reboot and at the end, no two running
  nodes held the same overlay block;
- ``success-rate``: the named CoAP load's share of 2.xx answers is at least ``min``;
- ``same-address``: after each ``reboot`` of ``node`` (SIGKILL, ``down`` seconds, start with
  the same state: the backend's ``kill`` and ``start``), every address sample from its return
  to its next downtime shows the block it held just before the kill;
- ``mqtt-delivered``: the named MQTT load's distinct messages received / published is at least
  ``min`` (and its duplicates at most ``max-duplicates``);
- ``policy-version``: every named node reported the version of the labelled
  ``publish-policy`` step within ``within`` seconds (:mod:`testbed.scenario_policy`).

The report folder (:mod:`testbed.scenario_report`) gets ``report.json``, ``report.md`` and
plots. Exit 0 only when every step ran and every clause holds, 1 otherwise.
"""

from __future__ import annotations

import argparse
import datetime
import math
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .bench.stats import nearest_rank
from .scenario import Scenario, ScenarioError, Step, load
from .scenario_backends import (
    LOAD_TIMEOUT_EXTRA,
    BackendError,
    BackendUnavailable,
    LoadHandle,
    PolicyEndpoint,
    ScenarioBackend,
    make_backend,
    neutral,
)
from .scenario_policy import Signer, policy_version, publish

INF = math.inf
MAX_LISTED = 10  # offending events listed per clause in the report
MQTT_START_TIMEOUT = 30.0  # an MQTT load client connects, subscribes and settles within this


class StepFailed(Exception):
    """A step could not complete; the run's timeline ends there."""


class Run:
    """One scenario on one backend: the timeline it records and the clauses judged on it."""

    def __init__(self, scenario: Scenario, backend: ScenarioBackend, log: Callable[[str], None]) -> None:
        self.sc = scenario
        self.b = backend
        self.log = log
        self.samples: list[tuple[float, str, dict[str, str]]] = []
        self.steps: list[dict[str, Any]] = []
        self.kills: list[tuple[str, float]] = []
        self.downtime: dict[str, list[list[float]]] = {}  # node -> [[down, up]] (up INF: still)
        self.faults: list[dict[str, Any]] = []  # {kind, t0, t1, groups | node}
        self.loads: dict[str, dict[str, Any]] = {}
        self.addresses: list[dict[str, Any]] = []
        self.reboots: list[dict[str, Any]] = []  # {node, t_down, t_up, block_before}
        self.converge: dict[str, dict[str, Any]] = {}
        self.error: str | None = None
        self.policies: dict[str, dict[str, Any]] = {}  # publish-policy label -> what it saw
        self.signer = Signer() if "policy" in scenario.needs() else None
        self._handles: dict[str, LoadHandle] = {}

    # -- time and observation -----------------------------------------------------------------

    def observe(self) -> dict[str, dict[str, str]]:
        views = self.b.views()
        t = round(self.b.now(), 3)
        for observer, view in views.items():
            self.samples.append((t, observer, dict(view)))
        return views

    def wait(self, seconds: float) -> None:
        end = self.b.now() + seconds
        while True:
            self.observe()
            left = end - self.b.now()
            if left <= 0:
                return
            self.b.advance(min(self.sc.poll, left))

    def acting(self, fn: Callable[..., Any], *args: Any) -> int:
        """Run the backend action ``fn(*args)``; on a wall-clock backend in a thread while the
        running nodes are observed every ``poll`` (a container start takes 2-4 s: unobserved,
        every node's timeline had that hole). Returns how many rounds were observed meanwhile;
        ``fn``'s exception is raised here."""
        if not getattr(self.b, "wall_clock", False):
            fn(*args)
            return 0
        failure: list[BaseException] = []

        def work() -> None:
            try:
                fn(*args)
            except BaseException as exc:  # noqa: BLE001 - re-raised on the runner's thread
                failure.append(exc)

        worker = threading.Thread(target=work, name="scenario-action", daemon=True)
        worker.start()
        rounds = 0
        worker.join(self.sc.poll)
        while worker.is_alive():
            self.observe()
            rounds += 1
            worker.join(self.sc.poll)
        if failure:
            raise failure[0]
        return rounds

    def wait_until(self, cond: Callable[[dict[str, dict[str, str]]], bool], timeout: float) -> bool:
        end = self.b.now() + timeout
        while True:
            if cond(self.observe()):
                return True
            left = end - self.b.now()
            if left <= 0:
                return False
            self.b.advance(min(self.sc.poll, left))

    def converged(self, groups: Sequence[Sequence[int]] | None) -> Callable[[dict[str, dict[str, str]]], bool]:
        """Each running node sees the running nodes of its group alive, every other node dead
        or left (or not at all)."""

        def cond(views: dict[str, dict[str, str]]) -> bool:
            running = {neutral(i) for i in self.b.running()}
            if groups is None:
                sets = [running]
            else:
                sets = [{neutral(i) for i in g} & running for g in groups]
            everyone = {neutral(i) for i in range(1, self.sc.nodes + 1)}
            for group in sets:
                for observer in group:
                    view = views.get(observer)
                    if view is None:
                        return False
                    for member in everyone - {observer}:
                        state = view.get(member)
                        if member in group and state != "alive":
                            return False
                        if member not in group and state not in (None, "dead", "left"):
                            return False
            return True

        return cond

    # -- steps ----------------------------------------------------------------------------------

    def run_steps(self) -> None:
        for i, step in enumerate(self.sc.steps):
            record = {"index": step.index, "action": step.action, "label": step.label,
                      "args": _describe(step), "t_start": round(self.b.now(), 3)}  # fmt: skip
            self.steps.append(record)
            try:
                detail = self.do(step)
                record |= {"ok": True, "detail": detail}
            except (StepFailed, BackendError) as exc:
                record |= {"ok": False, "detail": str(exc)}
                self.error = f"step {step.index} ({step.action}): {exc}"
            record["t_end"] = round(self.b.now(), 3)
            self.log(f"[{record['t_start']:8.2f}s] step {step.index} {step.action} "
                     f"{record['args']}: {'ok' if record['ok'] else 'FAILED'} {record['detail']}")  # fmt: skip
            if not record["ok"]:
                for later in self.sc.steps[i + 1 :]:
                    self.steps.append({"index": later.index, "action": later.action,
                                       "label": later.label, "args": _describe(later),
                                       "ok": None, "detail": "skipped"})  # fmt: skip
                break
        self.finish()

    def finish(self) -> None:
        """Wait for loads still running, take the last samples."""
        for name in list(self._handles):
            try:
                self.collect(name)
            except BackendError as exc:
                self.error = self.error or f"load {name}: {exc}"
        if self.error is None:
            self.observe()
            self.sample_addresses()

    def do(self, step: Step) -> str:
        a, b, now = step.args, self.b, self.b.now
        if step.action == "start":
            nodes = [a["node"]] if a["node"] else a["nodes"] or sorted(
                set(range(1, self.sc.nodes + 1)) - b.running())
            rounds = self.acting(b.start, nodes)
            for n in nodes:
                self._up(neutral(n), now())
            return f"started {', '.join(neutral(n) for n in nodes)}" + _observed(rounds)
        if step.action in ("kill", "stop"):
            t_call = now()  # the node may go down any time during the call: excused from here
            rounds = self.acting(getattr(b, step.action), a["node"])
            self.downtime.setdefault(neutral(a["node"]), []).append([t_call, INF])
            if step.action == "kill":
                self.kills.append((neutral(a["node"]), now()))
            return _observed(rounds).strip()
        if step.action == "partition":
            self.acting(b.partition, a["groups"])
            self._close("partition", now())
            self.faults.append({"kind": "partition", "t0": now(), "t1": INF,
                                "groups": [[neutral(n) for n in g] for g in a["groups"]]})
            return ""
        if step.action == "heal":
            self.acting(b.heal)
            self._close("partition", now())
            return ""
        if step.action == "loss":
            self.set_loss(a["node"], a["percent"])
            return ""
        return self.do_timed(step)

    def do_timed(self, step: Step) -> str:
        a, b = step.args, self.b
        if step.action == "sleep":
            self.wait(a["seconds"])
            return ""
        if step.action == "converge":
            t0 = b.now()
            ok = self.wait_until(self.converged(a["groups"]), a["timeout"])
            took = round(b.now() - t0, 3)
            self.converge[step.label] = {"ok": ok, "seconds": took if ok else None}
            if not ok:
                raise StepFailed(f"not converged within {a['timeout']:g} s")
            self.sample_addresses()
            return f"converged in {took:g} s"
        if step.action == "loss-ramp":
            sign = 1 if a["to"] > a["from"] else -1
            levels = list(range(a["from"], a["to"], sign * a["step"])) + [a["to"]]
            for pct in levels:
                self.set_loss(a["node"], pct)
                self.wait(a["every"])
            return f"loss {' -> '.join(f'{p}%' for p in levels)}"
        if step.action == "reboot":
            return self.reboot(a["node"], a["down"])
        if step.action == "coap-serve":
            b.coap_serve(a["service"], a["nodes"], a["slow"])
            return f"{a['service']} on {', '.join(neutral(n) for n in a['nodes'])}"
        if step.action == "coap-load":
            self._handles[a["name"]] = b.coap_load(
                a["ingress"], a["service"], a["seconds"], a["rate"], a["concurrency"])
            self.loads[a["name"]] = {"kind": "coap", "ingress": neutral(a["ingress"]), "t_start": b.now(),
                                     "seconds": a["seconds"], "rate": a["rate"]}  # fmt: skip
            return ""
        if step.action == "coap-wait":
            result = self.collect(a["name"])
            return f"{result['ok']} ok, {result['failed']} failed"
        return self.do_mqtt(step)

    def do_mqtt(self, step: Step) -> str:
        a, b = step.args, self.b
        if step.action == "mqtt-load":
            handle = self._handles[a["name"]] = b.mqtt_load(
                a["pub"], a["sub"], a["count"], a["rate"], a["qos"], a["drain"])
            # it subscribes, lets the interest spread, then publishes: wait for that, observing
            self.wait_until(lambda _: handle.started is not None or handle.done(), MQTT_START_TIMEOUT)
            self.loads[a["name"]] = {"kind": "mqtt", "pub": neutral(a["pub"]), "sub": neutral(a["sub"]),
                                     "t_start": handle.started or b.now(), "seconds": a["count"] / a["rate"],
                                     "count": a["count"], "rate": a["rate"], "qos": a["qos"]}  # fmt: skip
            return ""
        if step.action == "mqtt-wait":
            result = self.collect(a["name"])
            return f"{result['received']}/{self.loads[a['name']]['count']} delivered, {result['duplicates']} duplicates"
        if step.action == "publish-policy":
            assert self.signer is not None  # made for every scenario that publishes
            return publish(self, step, self.signer)
        if step.action == "cloud-outage":
            return self.cloud_outage(a["seconds"], a["service"])
        raise StepFailed(f"unknown action {step.action}")  # the parser refuses it first

    def cloud_outage(self, seconds: float, service: str = "broker") -> str:
        """Stop the cloud broker (or the policy endpoint), ``seconds`` off (observing), start
        it again."""
        switch = self.b.cloud if service == "broker" else self.b.policy_endpoint
        switch(False)
        t0 = self.b.now()
        fault: dict[str, Any] = {"kind": "cloud", "service": service, "t0": t0, "t1": INF}
        self.faults.append(fault)
        self.wait(seconds)
        switch(True)
        fault["t1"] = t1 = self.b.now()
        what = "cloud broker" if service == "broker" else "policy endpoint"
        return f"{what} back after {t1 - t0:.1f} s"

    def collect(self, name: str) -> dict[str, Any]:
        """Wait for a load while observing, then keep its result."""
        handle = self._handles.pop(name)
        info = self.loads[name]
        self.wait(max(0.0, info["t_start"] + info["seconds"] - self.b.now()))
        self.wait_until(lambda _: handle.done(), LOAD_TIMEOUT_EXTRA)  # its drain, observing
        result = handle.result()
        info["result"] = result
        return result

    def reboot(self, node: int, down: float) -> str:
        """A power cut: SIGKILL, ``down`` seconds off (observing), start with the same state."""
        name = neutral(node)
        before = None
        if self._wants_addresses():
            self.sample_addresses()
            before = self.addresses[-1].get("blocks", {}).get(name) if self.addresses else None
        self.b.kill(node)
        t_down = round(self.b.now(), 3)
        record: dict[str, Any] = {"node": name, "t_down": t_down, "t_up": None, "block_before": before}
        self.reboots.append(record)
        self.downtime.setdefault(name, []).append([self.b.now(), INF])
        self.wait(down)
        self.acting(self.b.start, [node])
        self._up(name, self.b.now())
        record["t_up"] = t_up = round(self.b.now(), 3)
        return f"back after {t_up - t_down:.1f} s"

    def _wants_addresses(self) -> bool:
        return bool({"no-duplicate-address", "same-address"} & {e.check for e in self.sc.expects})

    def set_loss(self, node: int, percent: int) -> None:
        self.acting(self.b.loss, node, percent)
        name, now = neutral(node), self.b.now()
        open_ = [f for f in self.faults if f["kind"] == "loss" and f["node"] == name and f["t1"] == INF]
        if percent and not open_:
            self.faults.append({"kind": "loss", "t0": now, "t1": INF, "node": name, "percent": percent})
        elif not percent:
            for f in open_:
                f["t1"] = now

    def sample_addresses(self) -> None:
        if not self._wants_addresses():
            return
        try:
            blocks = self.b.overlay_addresses()
        except BackendError as exc:
            self.addresses.append({"t": self.b.now(), "error": str(exc)})
            return
        holders: dict[str, list[str]] = {}
        for node, block in blocks.items():
            if block is not None:
                holders.setdefault(block, []).append(node)
        dups = {blk: names for blk, names in holders.items() if len(names) > 1}
        self.addresses.append({"t": round(self.b.now(), 3), "blocks": blocks, "duplicates": dups})

    def _up(self, node: str, t: float) -> None:
        for interval in self.downtime.get(node, []):
            if interval[1] == INF:
                interval[1] = t

    def _close(self, kind: str, t: float) -> None:
        for fault in self.faults:
            if fault["kind"] == kind and fault["t1"] == INF:
                fault["t1"] = t


def _observed(rounds: int) -> str:
    """What a step's detail says of the observation while its action ran."""
    return f" (the others observed {rounds}x meanwhile)" if rounds else ""


def _describe(step: Step) -> str:
    shown = []
    for key, value in step.args.items():
        if value is None or key in ("label", "note"):
            continue
        if key == "nodes" and step.args.get("via") == "cloud":
            continue  # served at the endpoint: no node is handed the bundle
        if key == "groups":
            value = "/".join(",".join(str(n) for n in g) for g in value)
        elif isinstance(value, tuple):
            value = ",".join(str(v) for v in value)
        shown.append(f"{key}={value}")
    return " ".join(shown)


# --- judging the record ---------------------------------------------------------------------


def transitions_to_dead(samples: list[tuple[float, str, dict[str, str]]]) -> list[tuple[float, str, str]]:
    """(t, observer, member) each time an observer's view of a member turned dead."""
    last: dict[tuple[str, str], str] = {}
    out = []
    for t, observer, view in samples:
        for member, state in view.items():
            if member == observer:
                continue
            key = (observer, member)
            if state == "dead" and last.get(key) != "dead":
                out.append((t, observer, member))
            last[key] = state
    return out


def _within(t: float, t0: float, t1: float, grace: float) -> bool:
    return t0 <= t <= t1 + grace


def excused(run: Run, t: float, observer: str, member: str, kinds: Sequence[str]) -> bool:
    """Was there a reason for ``observer`` to see ``member`` dead at ``t``?"""
    grace = run.sc.grace
    if any(_within(t, d0, d1, grace) for d0, d1 in run.downtime.get(member, [])):
        return True
    for fault in run.faults:
        if fault["kind"] not in kinds or not _within(t, fault["t0"], fault["t1"], grace):
            continue
        if fault["kind"] == "loss" and fault["node"] in (observer, member):
            return True
        if fault["kind"] == "partition" and _side(fault["groups"], observer) != _side(fault["groups"], member):
            return True
    return False


def _side(groups: list[list[str]], node: str) -> int:
    for i, group in enumerate(groups):
        if node in group:
            return i
    return -1  # unlisted nodes form one more group together


def detections(run: Run) -> dict[str, list[dict[str, Any]]]:
    """Per kill and per partition, each observer's time from the fault to seeing it dead."""
    out: dict[str, list[dict[str, Any]]] = {"kill": [], "partition": []}
    deaths = transitions_to_dead(run.samples)
    for victim, t_kill in run.kills:
        back = min((d1 for d0, d1 in run.downtime.get(victim, []) if d0 >= t_kill), default=INF)
        watchers = {o for t, o, _ in run.samples if t >= t_kill and o != victim}
        for observer in sorted(watchers):
            seen = [t for t, o, m in deaths if o == observer and m == victim and t_kill <= t <= back]
            out["kill"].append({"victim": victim, "observer": observer, "t_fault": t_kill,
                                "seconds": round(seen[0] - t_kill, 3) if seen else None})  # fmt: skip
    for fault in (f for f in run.faults if f["kind"] == "partition"):
        for t, observer, member in deaths:
            if fault["t0"] <= t <= fault["t1"] and _side(fault["groups"], observer) != _side(fault["groups"], member):
                out["partition"].append({"victim": member, "observer": observer, "t_fault": fault["t0"],
                                         "seconds": round(t - fault["t0"], 3)})  # fmt: skip
    return out


def judge(run: Run) -> list[dict[str, Any]]:
    """Each expect clause with its measured value and whether it holds."""
    found = detections(run)
    results = []
    for exp in run.sc.expects:
        a = exp.args
        res: dict[str, Any] = {"index": exp.index, "check": exp.check,
                               "args": {k: v for k, v in a.items()}}  # fmt: skip
        if exp.check == "converged":
            conv = run.converge.get(a["step"], {"ok": False, "seconds": None})
            took = conv["seconds"]
            res |= {"measured": took, "unit": "s",
                    "ok": bool(conv["ok"]) and took is not None and took <= a["within"]}  # fmt: skip
        elif exp.check == "no-false-death":
            false = [(t, o, m) for t, o, m in transitions_to_dead(run.samples)
                     if not excused(run, t, o, m, a["faults"])]  # fmt: skip
            res |= {"measured": len(false), "unit": "false deaths", "ok": not false,
                    "events": [{"t": t, "observer": o, "member": m} for t, o, m in false[:MAX_LISTED]]}
        elif exp.check == "detected":
            rows = [r for r in found["kill"] if r["victim"] == neutral(a["node"])]
            times = [r["seconds"] for r in rows if r["seconds"] is not None]
            missing = len(rows) - len(times)
            res |= {"measured": max(times) if times else None, "unit": "s (slowest observer)",
                    "p50": nearest_rank(times, 50), "observers": len(rows), "undetected": missing,
                    "ok": bool(rows) and not missing and max(times) <= a["within"]}  # fmt: skip
        elif exp.check == "no-duplicate-address":
            dups = [s for s in run.addresses if s.get("duplicates")]
            errors = [s["error"] for s in run.addresses if "error" in s]
            res |= {"measured": len(dups), "unit": "samples with duplicates",
                    "samples": len(run.addresses), "ok": bool(run.addresses) and not dups and not errors,
                    "events": (dups or errors)[:MAX_LISTED]}  # fmt: skip
        elif exp.check == "same-address":
            res |= same_address(run, neutral(a["node"]))
        elif exp.check == "mqtt-delivered":
            res |= mqtt_delivered(run, a["load"], a["min"], a["max-duplicates"])
        elif exp.check == "policy-version":
            res |= policy_version(run, a["step"], a["within"], a["nodes"])
        elif exp.check == "success-rate":
            result = run.loads.get(a["load"], {}).get("result")
            total = (result["ok"] + result["failed"]) if result else 0
            ratio = round(result["ok"] / total, 5) if result and total else None
            res |= {"measured": ratio, "unit": "ratio", "requests": total,
                    "ok": ratio is not None and ratio >= a["min"]}  # fmt: skip
        results.append(res)
    return results


def same_address(run: Run, node: str) -> dict[str, Any]:
    """Each reboot of ``node``: its own block before it, and in every address sample from its
    return to its next downtime (samples where it holds none yet are skipped; one must hold)."""
    kept, events = 0, []
    downs = sorted(d0 for d0, _ in run.downtime.get(node, []))
    for reboot in (r for r in run.reboots if r["node"] == node):
        t_up = reboot["t_up"] if reboot["t_up"] is not None else INF
        until = min((d for d in downs if d > t_up), default=INF)
        after = [s["blocks"].get(node) for s in run.addresses
                 if "blocks" in s and t_up <= s["t"] < until]  # fmt: skip
        held = [blk for blk in after if blk is not None]
        ok = reboot["block_before"] is not None and bool(held) and all(b == reboot["block_before"] for b in held)
        kept += ok
        if not ok:
            events.append({"t_down": reboot["t_down"], "before": reboot["block_before"],
                           "after": sorted(set(held)) or None})  # fmt: skip
    total = sum(r["node"] == node for r in run.reboots)
    return {"measured": kept, "unit": f"of {total} reboots kept the block", "ok": total > 0 and kept == total,
            "events": events[:MAX_LISTED]}  # fmt: skip


def mqtt_delivered(run: Run, name: str, least: float, max_dup: int | None) -> dict[str, Any]:
    """The load's share of published messages the subscriber got (duplicates not counted)."""
    info = run.loads.get(name, {})
    result, count = info.get("result"), info.get("count", 0)
    ratio = round(result["received"] / count, 5) if result and count else None
    dups = result["duplicates"] if result else None
    ok = ratio is not None and ratio >= least and (max_dup is None or (dups is not None and dups <= max_dup))
    return {"measured": ratio, "unit": "ratio delivered", "published": count, "duplicates": dups,
            "lost": result["lost"] if result else None, "ok": ok}  # fmt: skip


def policy_endpoint(scenario: Scenario) -> PolicyEndpoint | None:
    """What the backend's policy endpoint needs (None: the scenario uses none)."""
    if "policy-endpoint" not in scenario.needs():
        return None
    pollers = scenario.policy_pollers or tuple(range(1, scenario.nodes + 1))
    return PolicyEndpoint(interval=scenario.policy_interval, pollers=pollers)


def execute(scenario: Scenario, backend: ScenarioBackend, log: Callable[[str], None]) -> dict[str, Any]:
    """Up, steps, down; the record as one dict (what report.json holds)."""
    run = Run(scenario, backend, log)
    started = datetime.datetime.now(datetime.UTC)
    backend.up(scenario.nodes, scenario.preset, scenario.seed,
               policy_key=run.signer.public_b64 if run.signer is not None else None,
               cloud="cloud" in scenario.needs(),
               policy_endpoint=policy_endpoint(scenario))  # fmt: skip
    agent_logs: dict[str, str] = {}
    try:
        run.run_steps()
    finally:
        agent_logs = _agent_logs(backend)
        backend.down()
    expects = judge(run)
    ok = run.error is None and all(e["ok"] for e in expects)
    return {
        "scenario": {"name": scenario.name, "file": scenario.path, "description": scenario.description,
                     "nodes": scenario.nodes, "preset": scenario.preset, "seed": scenario.seed,
                     "poll": scenario.poll, "grace": scenario.grace},
        "backend": backend.name,
        "started": started.isoformat(timespec="seconds"),
        "ok": ok,
        "error": run.error,
        "steps": run.steps,
        "expects": expects,
        "detections": detections(run),
        "faults": _finite(run.faults),
        "downtime": {n: [[d0, None if d1 == INF else d1] for d0, d1 in iv] for n, iv in run.downtime.items()},
        "kills": [{"node": n, "t": t} for n, t in run.kills],
        "loads": run.loads,
        "addresses": run.addresses,
        "reboots": run.reboots,
        "policies": run.policies,
        "timeline": [{"t": t, "observer": o, "view": v} for t, o, v in run.samples],
        "agent_logs": agent_logs,
    }  # fmt: skip


def _agent_logs(backend: ScenarioBackend) -> dict[str, str]:
    """Each node's agent log, taken before the backend goes down (a backend that keeps none: {})."""
    logs = getattr(backend, "agent_logs", None)
    if logs is None:
        return {}
    try:
        return dict(logs())
    except Exception:  # noqa: BLE001 - the run's record matters more than its logs
        return {}


def _finite(faults: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{**f, "t1": None if f["t1"] == INF else f["t1"]} for f in faults]


# --- command line -----------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="a scenario TOML file (see testbed/scenarios/README.md)")
    parser.add_argument("--backend", choices=("sim", "netns", "containers"), default="sim",
                        help="where to run it (default sim: virtual time, membership only)")
    parser.add_argument("--report", type=Path, help="report folder (default: a new timestamped "
                        "folder under the current directory)")
    parser.add_argument("--no-plots", action="store_true", help="report.json and report.md only")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")


def main(args: argparse.Namespace, prog: str = "python -m testbed scenario") -> int:
    def fail(message: str) -> int:
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 2

    try:
        scenario = load(args.file)
        backend = make_backend(args.backend)
    except (ScenarioError, BackendUnavailable) as exc:
        return fail(str(exc))
    lacking = scenario.needs() - backend.features
    if lacking:
        return fail(f"{scenario.path}: needs {', '.join(sorted(lacking))}, which the "
                    f"{backend.name} backend does not have")  # fmt: skip
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    folder = args.report or Path.cwd() / f"scenario-{scenario.name}-{backend.name}-{stamp}"
    def log(line: str) -> None:
        if not args.quiet:
            print(line, flush=True)

    try:
        record = execute(scenario, backend, log)
    except BackendUnavailable as exc:
        return fail(str(exc))
    from .scenario_report import write_report

    write_report(folder, record, plots=not args.no_plots)
    for exp in record["expects"]:
        log(f"expect {exp['index']} {exp['check']}: {'PASS' if exp['ok'] else 'FAIL'} "
            f"(measured {exp['measured']} {exp.get('unit', '')})")  # fmt: skip
    if record["error"]:
        log(f"error: {record['error']}")
    log(f"{'PASS' if record['ok'] else 'FAIL'}: report in {folder}")
    return 0 if record["ok"] else 1
