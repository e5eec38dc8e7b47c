"""Real agent processes on loopback: two claimants of one name, and cloned state dirs.

Each agent is ``python -m edgeagent run`` with its own state dir and log, sharing one cluster
key file; ``EDGEAGENT_MACHINE_ID_FILE`` stands in for /etc/machine-id. What is asserted is
the outcome: who exits (and with which line), who stays, with which identity and block.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from edgeagent.agent_process import AgentProcess, agent_env
from edgeagent.localmesh import free_port
from edgeagent.persist import MACHINE_ID_ENV, save_keyring
from gossip.keyring import Keyring

pytestmark = pytest.mark.slow

TIMEOUT = 60.0  # generous: the machine is shared
HOST = "127.0.0.1"


class Site:
    """Agents on loopback with one key; every process is stopped at the end."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.key_file = base / "cluster.keyring"
        save_keyring(self.key_file, [Keyring.generate_key()])
        self.agents: list[AgentProcess] = []

    def machine(self, label: str) -> Path:
        path = self.base / f"machine-id-{label}"
        path.write_text(f"{label * 32}"[:32] + "\n")
        return path

    def agent(
        self, label: str, state_dir: Path, machine: Path, *flags: str, port: int | None = None
    ) -> AgentProcess:
        port = port or free_port([HOST])
        argv = [sys.executable, "-m", "edgeagent", "run", "--bind", f"{HOST}:{port}",
                "--no-mdns", "--preset", "local", "--state-dir", str(state_dir),
                "--key-file", str(self.key_file), "--metrics", "off", *flags]  # fmt: skip
        env = agent_env({MACHINE_ID_ENV: str(machine)})
        agent = AgentProcess(label, argv, state_dir, self.base / f"{label}.log", env)
        agent.port = port  # type: ignore[attr-defined]
        self.agents.append(agent)
        return agent

    def stop(self) -> None:
        for agent in self.agents:
            agent.terminate()


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    s = Site(tmp_path)
    try:
        yield s
    finally:
        s.stop()


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def seed(agent: AgentProcess) -> str:
    return f"{HOST}:{agent.port}"  # type: ignore[attr-defined]


def alive_names(agent: AgentProcess) -> set[str]:
    return {m["name"] for m in agent.members() if m["state"] == "alive"}


def test_second_node_with_a_taken_name_exits_2_and_the_first_never_flaps(site: Site) -> None:
    machine = site.machine("1")
    first = site.agent("first", site.base / "first", machine, "--name", "raspberrypi")
    first.start()
    wait_for(lambda: first.status().get("overlay_block") is not None, "the first block")
    before = first.status()
    second = site.agent("second", site.base / "second", machine, "--name", "raspberrypi",
                        "--join", seed(first))  # fmt: skip
    second.start(wait=False)
    assert second.process is not None and second.process.wait(TIMEOUT) == 2
    log = second.log_path.read_text()
    errors = [line for line in log.splitlines() if "level=error" in line]
    assert len(errors) == 1, log
    assert "node name raspberrypi is already held by node " + before["node_id"] in errors[0]
    assert seed(first) in errors[0] and "--name NAME" in errors[0] and "name = 'NAME'" in errors[0]
    assert "left the cluster" not in log  # no leave: it would be in the first node's name
    time.sleep(3.0)  # several LOCAL probe and push-pull rounds
    after = first.status()
    assert first.running and after["members"]["alive"] == 1
    assert (after["incarnation"], after["overlay_block"], after["address"]) == (
        before["incarnation"], before["overlay_block"], before["address"]
    )  # fmt: skip
    warnings = [line for line in first.log_path.read_text().splitlines() if "also claimed" in line]
    assert len(warnings) == 1


def copied_pair(site: Site, same_machine: bool) -> tuple[AgentProcess, AgentProcess]:
    """A default-named agent run once, its state dir copied; both started, the copy joining."""
    machine = site.machine("1")
    original = site.agent("original", site.base / "original", machine)
    original.start()
    wait_for(lambda: original.status().get("overlay_block") is not None, "the original's block")
    assert original.terminate() == 0
    shutil.copytree(original.state_dir, site.base / "copy")
    original.start()
    copy_machine = machine if same_machine else site.machine("2")
    copy = site.agent("copy", site.base / "copy", copy_machine, "--join", seed(original))
    copy.start(wait=False)
    return original, copy


def assert_distinct_and_joined(original: AgentProcess, copy: AgentProcess) -> None:
    def both_joined() -> bool:
        try:
            a, b = original.status(), copy.status()
        except Exception:  # the copy may be restarting
            return False
        return (
            a["members"]["alive"] == 2
            and b["members"]["alive"] == 2
            and None not in (a.get("overlay_block"), b.get("overlay_block"))
        )

    wait_for(both_joined, "both agents alive with a block each")
    a, b = original.status(), copy.status()
    assert a["node_id"] != b["node_id"] and a["name"] != b["name"]
    assert a["overlay_block"] != b["overlay_block"] and a["address"] != b["address"]
    assert alive_names(original) == alive_names(copy) == {a["name"], b["name"]}
    host = a["name"].rsplit("-", 1)[0]
    assert b["name"] == f"{host}-{b['node_id'][:6]}"  # a default name stays a default name
    assert original.running and copy.running


def test_state_dir_copied_to_another_machine_becomes_a_new_node(site: Site) -> None:
    original, copy = copied_pair(site, same_machine=False)
    assert_distinct_and_joined(original, copy)
    assert "created on another machine" in copy.log_path.read_text()


def test_copy_on_a_machine_with_the_same_machine_id_renews_and_restarts(site: Site) -> None:
    original, copy = copied_pair(site, same_machine=True)
    assert_distinct_and_joined(original, copy)
    log = copy.log_path.read_text()
    assert "is a copy of the node at " + seed(original) in log and "restarting as a new node" in log
    assert "level=error" not in log
    assert copy.process is not None and copy.process.poll() is None  # restarted in place


def test_an_incarnation_above_the_range_in_identity_json_is_repaired_on_start(site: Site) -> None:
    machine = site.machine("1")
    agent = site.agent("big", site.base / "big", machine, "--name", "big")
    agent.start()
    node_id = agent.status()["node_id"]
    assert agent.terminate() == 0
    path = agent.state_dir / "identity.json"
    doc = json.loads(path.read_text())
    doc["incarnation"] = 2**64
    path.write_text(json.dumps(doc))
    agent.start()  # starts (it once could not encode its own Alive)
    status = agent.status()
    assert status["incarnation"] == 1 and status["node_id"] == node_id
    assert json.loads(path.read_text())["incarnation"] == 1
    warnings = [line for line in agent.log_path.read_text().splitlines() if "above the most peers accept" in line]
    assert len(warnings) == 1 and "level=warning" in warnings[0], warnings
    assert agent.terminate() == 0
    agent.start()  # repaired for good: no second warning, the count goes on from there
    assert agent.status()["incarnation"] == 2
    warnings = [line for line in agent.log_path.read_text().splitlines() if "above the most peers accept" in line]
    assert len(warnings) == 1
