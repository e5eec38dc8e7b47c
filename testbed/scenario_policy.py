"""A scenario's signed policy bundles: the ``publish-policy`` action and ``policy-version`` check.

How it works. A scenario that publishes policy gets a fresh Ed25519 key pair per run
(:class:`Signer`); the backend's agents trust its public key (``[policy] trusted_keys`` in
their config, set at ``up``). ``publish-policy`` writes a minimal bundle (``version``,
``issued``: now, everything else the defaults), signs it (:func:`overlay.policy.sign`) and
hands it to the agent of each listed node (the backend's ``policy_apply``: the control command
``policy-apply``), or with ``via = "cloud"`` serves it at the backend's HTTPS policy endpoint
(``policy_publish``: containers), where the nodes that poll it fetch it within their
``[policy] interval`` and the others get it from peers (t_apply: the moment it is served). Then
it polls every running node's enforced version (``policy_versions``: ``policy status``) every
``poll`` seconds, observing membership as every wait does, until each reports the version (or
a higher one) or ``wait`` seconds pass; the time each node first reported it is kept.

``policy-version`` holds when every node it names (default: every node running when the wait
ended) reported the version within ``within`` seconds of the first apply. A node that already
enforces the version (it arrived from a peer first, or it is offered again) and so refuses it
as a ``rollback`` counts as applied; any other refusal fails the step. An agent that has just
started answers its socket before its policy command exists; the apply is retried for up to
:data:`BOOT_RETRY_S` seconds while the command is unknown.
"""

from __future__ import annotations

import base64
import time
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from overlay import policy as pol

from .scenario import Step
from .scenario_backends import BackendError, neutral

if TYPE_CHECKING:
    from .scenario_run import Run

BOOT_RETRY_S = 10.0  # how long an agent that just started may lack its policy command


class Signer:
    """One run's operator key: signs bundles, names the public key the agents trust."""

    def __init__(self) -> None:
        self._key = Ed25519PrivateKey.generate()
        self.last_version = 0

    @property
    def public_b64(self) -> str:
        return base64.b64encode(pol.raw_public_key(self._key.public_key())).decode()

    def envelope(self, version: int) -> bytes:
        bundle = f"version = {version}\nissued = {int(time.time())}\n".encode()
        pol.parse_bundle(bundle)  # the agent's own validation, before anything is sent
        self.last_version = max(self.last_version, version)
        return pol.sign(bundle, self._key)


def publish(run: Run, step: Step, signer: Signer) -> str:
    """Apply a new bundle on the step's nodes; wait until every running node enforces it."""
    from .scenario_run import StepFailed

    a, b = step.args, run.b
    version = a["version"] if a["version"] is not None else signer.last_version + 1
    envelope = signer.envelope(version)
    t_apply = round(b.now(), 3)
    via_cloud = a["via"] == "cloud"
    record: dict[str, Any] = {"version": version, "t_apply": t_apply, "via": a["via"],
                              "applied": ["cloud"] if via_cloud else [neutral(n) for n in a["nodes"]],
                              "had_it": [], "seen": {}}  # fmt: skip
    if via_cloud:
        b.policy_publish(envelope)  # the pollers fetch it; the others from peers
    for node in () if via_cloud else a["nodes"]:
        answer = _apply(run, node, envelope)
        if answer.get("accepted"):
            continue
        if (
            answer.get("reason") == "rollback"
            and (b.policy_versions().get(neutral(node)) or 0) >= version
        ):
            record["had_it"].append(neutral(node))
            continue
        raise StepFailed(f"{neutral(node)} refused version {version}: {answer.get('reason')}: "
                         f"{answer.get('detail')}")  # fmt: skip
    run.policies[step.label] = record

    def everyone(_views: dict[str, dict[str, str]]) -> bool:
        now = round(b.now(), 3)
        for node, enforced in b.policy_versions().items():
            if enforced is not None and enforced >= version:
                record["seen"].setdefault(node, now)
        return {neutral(i) for i in b.running()} <= set(record["seen"])

    done = run.wait_until(everyone, a["wait"])
    record["running"] = sorted(neutral(i) for i in b.running())
    took = max((t - t_apply for t in record["seen"].values()), default=0.0)
    where = "served at the endpoint" if via_cloud else f"on {', '.join(record['applied'])}"
    head = f"version {version} {where}"
    if record["had_it"]:
        head += f" ({', '.join(record['had_it'])} already enforced it: refused as a rollback)"
    if done:
        return f"{head}; every running node after {took:.1f} s"
    missing = sorted(set(record["running"]) - set(record["seen"]))
    return f"{head}; not on {', '.join(missing)} after {a['wait']:g} s"


def _apply(run: Run, node: int, envelope: bytes) -> dict[str, Any]:
    """``policy_apply``, retried for a while when the agent has no policy command yet: an
    agent answers its control socket (so a start returns) before every feature registered
    its commands, so just after a (re)start ``policy-apply`` is briefly unknown."""
    deadline = run.b.now() + BOOT_RETRY_S
    while True:
        try:
            return run.b.policy_apply(node, envelope)
        except BackendError as exc:
            if "unknown command" not in str(exc) or run.b.now() >= deadline:
                raise
        run.b.advance(min(run.sc.poll, 0.2))


def policy_version(
    run: Run, step: str, within: float, nodes: tuple[int, ...] | None
) -> dict[str, Any]:
    """Every named node (default: those running when the step's wait ended) reported the
    step's version within ``within`` s of the apply."""
    record = run.policies.get(step)
    if record is None:
        return {"measured": None, "unit": "s (slowest node)", "ok": False, "missing": None}
    wanted = [neutral(n) for n in nodes] if nodes is not None else record["running"]
    delays = {
        n: round(record["seen"][n] - record["t_apply"], 3) for n in wanted if n in record["seen"]
    }
    late = sorted(n for n in wanted if n not in delays or delays[n] > within)
    slowest = max(delays.values()) if len(delays) == len(wanted) and delays else None
    return {"measured": slowest, "unit": "s (slowest node)", "version": record["version"],
            "nodes": len(wanted), "missing": late, "ok": bool(wanted) and not late}  # fmt: skip
