"""Real agents on the network-namespace testbed: mDNS discovery, partitions, loss, hygiene.

Each test builds its own testbed (one namespace per host on a private bridge, one real
``edgeagent run`` process per host) and always takes it down again, dumping the agents' logs
when it fails. Timeouts are generous: they bound a hang, they do not measure speed.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from testbed import netns
from testbed.cluster import Testbed, process_start_time
from tests.host_tools import needs_netns

pytestmark = [
    needs_netns("ip", "nft"),
    pytest.mark.root,
    pytest.mark.slow,
]

CONVERGE_TIMEOUT = 60.0  # all agents up and seeing each other alive
FAIL_TIMEOUT = 60.0  # LAN: suspicion lasts at most 6 * 4 * log10(5) s, plus a probe round
HEAL_TIMEOUT = 90.0  # reconnect every 10 s, push-pull every 30 s
LOSS_PERCENT = 20
LOSS_WINDOW = 60.0
POLL = 0.5


@contextmanager
def running(tmp_path: Path, **kwargs: object) -> Iterator[Testbed]:
    """A testbed that is up for the block and down afterwards, whatever happens."""
    tb = Testbed(root=tmp_path / "testbeds", **kwargs)  # type: ignore[arg-type]
    try:
        tb.up()
        yield tb
    except BaseException:
        _print_logs(tb)
        raise
    finally:
        tb.down()


def _print_logs(tb: Testbed) -> None:
    if not tb.state:
        return
    for host in tb.hosts:
        path = tb.log_path(host.name)
        if path.exists():
            tail = path.read_text(errors="replace").splitlines()[-40:]
            print(f"===== {host.name} log (last {len(tail)} lines) =====", *tail, sep="\n")


def _sees(tb: Testbed, observers: list[str], targets: list[str], state: str) -> bool:
    """Every observer's agent has every target in ``state``."""
    for observer in observers:
        view = tb.states(observer)
        if any(view.get(t) != state for t in targets):
            return False
    return True


def _all_alive(tb: Testbed) -> bool:
    names = [h.name for h in tb.hosts]
    return _sees(tb, names, names, "alive")


def test_down_after_a_crash_halfway_through_up_removes_what_was_created(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_run = netns.run
    addresses = 0

    def failing_run(argv: list[str], **kwargs: object) -> str:
        nonlocal addresses
        if "addr" in argv and "add" in argv:
            addresses += 1
            if addresses == 2:  # h2's address: h1 and h2 exist, h3 does not yet
                raise netns.NetnsError("injected failure")
        return real_run(argv, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(netns, "run", failing_run)
    tb = Testbed(hosts=3, preset="local", mdns=False, seeds=True, root=tmp_path / "testbeds")
    with pytest.raises(netns.NetnsError, match="injected"):
        with tb:
            pass
    prefix = f"{netns.NS_PREFIX}{tb.id}-"
    assert tb.id and [ns for ns in netns.list_netns() if ns.startswith(prefix)] == []
    assert not tb.workdir.exists()


def _processes_mentioning(text: str) -> list[int]:
    """PIDs whose command line contains ``text`` (zombies and vanished ones excluded)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline and process_start_time(int(entry.name)) is not None:
            found.append(int(entry.name))
    return found


def test_five_hosts_find_each_other_by_mdns_alone(tmp_path: Path) -> None:
    with running(tmp_path, hosts=5, preset="lan", mdns=True, seeds=False) as tb:
        tb.wait_until(lambda: _all_alive(tb), CONVERGE_TIMEOUT, POLL, "5 hosts to see each other alive by mDNS")
        for host in tb.hosts:
            assert sorted(tb.states(host.name)) == [h.name for h in tb.hosts]


def test_partition_marks_other_side_dead_then_heals_without_operator(tmp_path: Path) -> None:
    with running(tmp_path, hosts=5, preset="lan", mdns=True, seeds=True) as tb:
        tb.wait_until(lambda: _all_alive(tb), CONVERGE_TIMEOUT, POLL, "convergence")
        left, right = ["h1", "h2"], ["h3", "h4", "h5"]
        tb.partition([left, right])
        tb.wait_until(
            lambda: _sees(tb, left, right, "dead") and _sees(tb, right, left, "dead"),
            FAIL_TIMEOUT, POLL, "each side of the partition to mark the other dead",
        )
        assert _sees(tb, left, left, "alive") and _sees(tb, right, right, "alive")
        tb.heal()
        tb.wait_until(lambda: _all_alive(tb), HEAL_TIMEOUT, POLL, "one view again after heal")


def test_twenty_percent_loss_on_one_host_causes_no_false_deaths(tmp_path: Path) -> None:
    with running(tmp_path, hosts=5, preset="lan", mdns=True, seeds=True) as tb:
        tb.wait_until(lambda: _all_alive(tb), CONVERGE_TIMEOUT, POLL, "convergence")
        tb.loss("h5", LOSS_PERCENT)
        deaths: list[tuple[str, str]] = []
        deadline = time.monotonic() + LOSS_WINDOW
        while time.monotonic() < deadline:
            for observer, view in tb.views().items():
                deaths += [(observer, name) for name, state in view.items() if state == "dead"]
            time.sleep(POLL)
        assert deaths == [], f"false deaths under {LOSS_PERCENT}% loss: {sorted(set(deaths))}"
        assert len(tb.views()) == 5  # every agent still answered at the end


def test_down_removes_every_namespace_process_and_file_it_created(tmp_path: Path) -> None:
    bystander = "ea-bystander-test"  # a namespace the testbed did not create must survive
    netns.run(["ip", "netns", "add", bystander])
    try:
        tb = Testbed(hosts=3, preset="local", mdns=False, seeds=True, root=tmp_path / "testbeds")
        try:
            tb.up()
            processes = {name: (rec["pid"], rec["start_time"]) for name, rec in tb.state["agents"].items()}
            namespaces = list(tb.state["namespaces"])
            workdir = tb.workdir
            assert len(processes) == 3 and len(namespaces) == 4 and workdir.is_dir()
            # A later process (as after a crashed test run) finds the testbed by its state file.
            Testbed.load(tb.id, root=tmp_path / "testbeds").down()
        finally:
            tb.down()
        tb.down()  # idempotent
        existing = netns.list_netns()
        assert [ns for ns in namespaces if ns in existing] == []
        assert [n for n, (pid, start) in processes.items() if process_start_time(pid) == start] == []
        assert _processes_mentioning(str(workdir)) == []
        assert not workdir.exists()
        assert bystander in existing
    finally:
        netns.delete_netns(bystander)
