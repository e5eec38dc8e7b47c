"""Policy spread: from publishing a signed bundle at the cloud endpoint to every node enforcing
it (issue 11), in the gossip simulator and with real agents on loopback.

How it works.

- **Real** (``--real-nodes``, default 20): a stdlib HTTPS endpoint on 127.0.0.1 (certificate
  from a CA made here with ``cryptography``) and N real ``python -m edgeagent run``
  processes (:class:`testbed.loopback.LoopbackCluster`, LOCAL preset, the agent channel on).
  Only the first agent has ``[policy] url`` (it polls every ``--interval`` s, default 1);
  the others have only the trusted key, so they get the bundle from peers (replicated ``pv``,
  then a fetch over the mTLS channel, verified by each node). Version 1 is published and
  spread first (warm-up: channel connections dialled); then version 2 is published at wall
  time T and each node's ``last_sync`` (the wall time it applied the bundle, from ``policy
  status``) gives its delay. ``real_enforced_p99_s`` is the nearest-rank p99 of (last_sync -
  T) over nodes, ``real_first_s`` the first node's (the poll interval dominates it) and
  ``real_after_first_p99_s`` p99 minus first: the peer spread, the issue's target (<= 5 s).
  Then the endpoint serves version 1 again (a replay) and a tampered version 3 for a few
  intervals: ``rollbacks_accepted`` counts nodes whose high-water mark left 2 (must be 0),
  ``refusals_counted`` the refusals node 1 counted.
- **Simulated** (``--sim-nodes``, default 1000; 0 skips it): :class:`testbed.sim.Simulator`
  runs N gossip cores (LAN preset, 1 ms latency); after bootstrap one node "polls" the
  bundle at t0 and publishes ``pv``. Every node that receives a peer's ``StateChanged`` for
  ``pv`` above its own starts one fetch (at most one in flight) that completes after
  :data:`SIM_FETCH_S` (dial, TLS 1.3 handshake and one request on a 1 ms link, plus the
  signature check), then publishes ``pv`` itself, as the agent does. ``sim_enforced_p99_s``
  is the p99 of enforce time - t0 in virtual seconds. The channel itself is not simulated.

Numbers on a shared machine are "loaded machine" numbers: the real part's agents share the
CPU with whatever else runs.
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

SIM_FETCH_S = 0.010  # modelled channel fetch: connect + TLS 1.3 + request on a 1 ms link, verify
STATE_KEY = "pv"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--real-nodes", type=int, default=20, help="real agents (default 20; 0: skip)"
    )
    parser.add_argument(
        "--sim-nodes", type=int, default=1000, help="simulated nodes (default 1000; 0: skip)"
    )
    parser.add_argument(
        "--interval", type=float, default=1.0, help="node 1's poll interval, s (default 1)"
    )
    parser.add_argument("--seed", type=int, default=1, help="simulator seed (default 1)")
    parser.add_argument("--timeout", type=float, default=120.0, help="per phase, s (default 120)")


def nearest_rank(values: list[float], pct: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(pct / 100.0 * len(ordered)) - 1)]


def run(args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {"machine": "loaded machine (shared, 2 cores)"}
    result.update(run_sim(args.sim_nodes, args.seed) if args.sim_nodes > 0 else {"sim_nodes": 0})
    if args.real_nodes > 0:
        result.update(run_real(args.real_nodes, args.interval, args.timeout))
    else:
        result["real_nodes"] = 0
    return result


# -- the simulator ---------------------------------------------------------------------------


def run_sim(nodes: int, seed: int) -> dict[str, Any]:
    from gossip.config import preset
    from gossip.events import Event, StateChanged
    from testbed.bench.gossip import BOOTSTRAP_SEEDS, BOOTSTRAP_SPACING, bootstrap
    from testbed.sim import Simulator

    started = time.process_time()
    sim = Simulator(seed, preset("lan"), latency=0.001, jitter=0.0005)
    version: dict[str, int] = {}
    fetching: set[str] = set()
    enforced: dict[str, float] = {}
    state: dict[str, float | None] = {"t0": None}

    def done(name: str, v: int) -> None:
        fetching.discard(name)
        if v > version.get(name, 0) and sim.nodes[name].alive:
            version[name] = v
            enforced.setdefault(name, sim.now)
            sim.call(name, lambda core, now: core.set_state(STATE_KEY, v, now))

    def on_event(now: float, name: str, event: Event) -> None:
        if state["t0"] is None or not isinstance(event, StateChanged) or event.key != STATE_KEY:
            return
        if (
            event.owner == name
            or type(event.value) is not int
            or event.value <= version.get(name, 0)
        ):
            return
        if name not in fetching:
            fetching.add(name)
            v = event.value
            sim.schedule(now + SIM_FETCH_S, lambda: done(name, v))

    sim.on_event(on_event)
    sim.add_cluster(nodes, seeds=BOOTSTRAP_SEEDS, spacing=BOOTSTRAP_SPACING)
    if not bootstrap(sim, nodes, 600.0):
        return {"sim_nodes": nodes, "sim_enforced_p99_s": None, "sim_error": "did not converge"}
    sim.run_for(30.0)
    origin = next(iter(sim.nodes))
    t0 = state["t0"] = sim.now
    done(origin, 1)  # the node with connectivity has it at t0
    sim.run_until(t0 + 60.0)
    delays = [enforced[n] - t0 for n in sim.nodes if n in enforced]
    return {
        "sim_nodes": nodes,
        "sim_enforced": len(delays),
        "sim_enforced_p99_s": _round(nearest_rank(delays, 99.0)),
        "sim_enforced_max_s": _round(max(delays) if len(delays) == nodes else None),
        "sim_fetch_model_s": SIM_FETCH_S,
        "sim_cpu_s": round(time.process_time() - started, 1),
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


# -- real agents -----------------------------------------------------------------------------


def run_real(nodes: int, interval: float, timeout: float) -> dict[str, Any]:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from overlay import policy as pol
    from testbed.loopback import LoopbackCluster

    key = Ed25519PrivateKey.generate()
    raw = base64.b64encode(pol.raw_public_key(key.public_key())).decode()
    with tempfile.TemporaryDirectory(prefix="ea-bpol-") as tmp:
        base = Path(tmp)
        endpoint = Endpoint(base)
        try:
            plain = base / "plain.toml"
            plain.write_text(f'[policy]\ntrusted_keys = ["{raw}"]\n')
            cloud = base / "cloud.toml"
            cloud.write_text(
                f'[policy]\ntrusted_keys = ["{raw}"]\nurl = "{endpoint.url}"\n'
                f'ca = "{endpoint.ca}"\ninterval = {interval}\n'
            )
            endpoint.envelope = signed(key, 1)
            cluster = LoopbackCluster(
                nodes, extra_args=["--config", str(plain)], base_dir=base / "m"
            )
            cluster.agents[0].argv += ["--config", str(cloud)]  # the last --config wins
            with cluster:
                cluster.wait_converged(timeout)
                return _measure(cluster, endpoint, key, timeout, interval)
        finally:
            endpoint.stop()


def signed(key: Any, version: int) -> bytes:
    from overlay import policy as pol

    text = (
        f'version = {version}\nissued = {int(time.time()) - 60}\n[intentions]\ndefault = "allow"\n'
    )
    return pol.sign(text.encode(), key)


def _measure(
    cluster: Any, endpoint: Endpoint, key: Any, timeout: float, interval: float
) -> dict[str, Any]:
    from overlay import policy as pol

    def statuses() -> list[dict[str, Any]]:
        return [agent.call("policy-status") for agent in cluster.agents]

    def everyone(version: int) -> bool:
        return all(s["version"] == version for s in statuses())

    cluster.wait_for(lambda: everyone(1), timeout, "every node to enforce version 1 (warm-up)")
    published = time.time()
    endpoint.envelope = signed(key, 2)
    cluster.wait_for(lambda: everyone(2), timeout, "every node to enforce version 2")
    final = statuses()
    delays = [s["last_sync"] - published for s in final]
    first = min(delays)
    p99 = nearest_rank(delays, 99.0)
    sources = [s["source"] for s in final]
    endpoint.envelope = signed(key, 1)  # a replayed old bundle
    cluster.wait_for(lambda: endpoint.gets_since_change >= 2, timeout, "node 1 to poll the replay")
    doc = json.loads(signed(key, 2))
    doc["bundle"] = base64.b64encode(pol.parse_envelope(signed(key, 3)).bundle).decode()
    endpoint.envelope = json.dumps(doc).encode()  # tampered: v3 under v2's signature
    cluster.wait_for(
        lambda: endpoint.gets_since_change >= 2, timeout, "node 1 to poll the tampered one"
    )
    after = statuses()
    return {
        "real_nodes": len(final),
        "real_poll_interval_s": interval,
        "real_first_s": round(first, 3),
        "real_enforced_p99_s": round(p99, 3) if p99 is not None else None,
        "real_enforced_max_s": round(max(delays), 3),
        "real_after_first_p99_s": round(p99 - first, 3) if p99 is not None else None,
        "real_from_peers": sum(1 for s in sources if s and s.startswith("peer:")),
        "rollbacks_accepted": sum(1 for s in after if s["high_water"] != 2 or s["version"] != 2),
        "refusals_counted": sum(after[0]["refusals"].values()),
    }


class Endpoint:
    """The container testbed's HTTPS endpoint (:mod:`testbed.containers.policy_server`) on
    127.0.0.1, serving ``envelope`` at /policy with an ETag."""

    def __init__(self, tmp: Path) -> None:
        import threading

        from testbed.containers.policy_server import make_server

        self.ca, cert, key = _make_tls(tmp)
        self._www = tmp / "www"
        self._www.mkdir(exist_ok=True)
        self._gets_at_change = 0
        self.server = make_server(self._www, cert, key, "127.0.0.1", 0)
        self.server.RequestHandlerClass.log_message = lambda *args: None  # type: ignore[assignment]
        self._state = self.server.RequestHandlerClass.state  # type: ignore[attr-defined]
        self.url = f"https://127.0.0.1:{self.server.server_address[1]}/policy"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def gets_since_change(self) -> int:
        """GETs of the bundle answered since it last changed."""
        return int(self._state.gets) - self._gets_at_change

    @property
    def envelope(self) -> bytes:
        path = self._www / "policy"
        return path.read_bytes() if path.exists() else b""

    @envelope.setter
    def envelope(self, data: bytes) -> None:
        tmp = self._www / ".policy.tmp"
        tmp.write_bytes(data)
        tmp.replace(self._www / "policy")  # atomically: a poll sees the old one or the new one
        self._gets_at_change = int(self._state.gets)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _make_tls(tmp: Path) -> tuple[Path, Path, Path]:
    """(CA certificate, server certificate for 127.0.0.1, its key) as PEM files: the container
    testbed's throwaway CA (:mod:`testbed.containers.policy_tls`), named for loopback."""
    from testbed.containers import policy_tls as tls

    tls.write_tls(tmp, (), ("127.0.0.1",))
    return tmp / tls.CA_FILE, tmp / tls.CERT_FILE, tmp / tls.KEY_FILE
