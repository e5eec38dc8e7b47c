"""The address a wildcard bind advertises, and the dual-stack ``[::]`` bind.

Unit tests on the choice with injected interfaces; real agents in network namespaces with no
default route (skipped, with the reason, when not root or without ``ip``).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from edgeagent import advertise
from edgeagent.advertise import Candidate, DualStackRefused, NoAdvertiseAddress
from edgeagent.agent_process import AgentProcess, agent_env
from edgeagent.onboarding import new_ca, provision_member
from tests.host_tools import needs_netns

# -- the choice --------------------------------------------------------------------------


def test_running_lan_interface_beats_link_local_and_carrierless_ones() -> None:
    found = [
        Candidate("docker0", 2, "172.17.0.1", running=False),
        Candidate("wlan0", 4, "169.254.3.3"),
        Candidate("eth1", 5, "10.1.2.3"),
        Candidate("eth0", 3, "10.9.9.9"),
    ]
    best = advertise.choose(found)
    assert best is not None and best.address == "10.9.9.9"  # running, not link-local, lowest index
    assert advertise.choose(found[:2]) == found[1]  # link-local still beats no carrier


@pytest.mark.parametrize("address", ["127.0.0.1", "127.1.2.3", "::1", "0.0.0.0", "::", "224.0.0.1"])
def test_loopback_unspecified_and_multicast_are_never_candidates(address: str) -> None:
    assert not advertise.usable(address)
    assert advertise.choose([Candidate("x", 1, address)]) is None


def test_no_default_route_advertises_the_lan_address(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(advertise, "route_source", lambda family: None)
    monkeypatch.setattr(advertise, "ipv4_interfaces", lambda: [Candidate("eth0", 2, "10.4.0.7")])
    assert advertise.advertised_host(("0.0.0.0", 7946)) == "10.4.0.7"


def test_no_usable_address_is_one_line_naming_advertise(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(advertise, "route_source", lambda family: None)
    monkeypatch.setattr(advertise, "ipv4_interfaces", lambda: [])
    monkeypatch.setattr(advertise, "ipv6_interfaces", lambda: [])
    for bind in (("0.0.0.0", 7946), ("::", 7946)):
        with pytest.raises(NoAdvertiseAddress) as raised:
            advertise.advertised_host(bind)
        message = str(raised.value)
        assert "\n" not in message and "--advertise" in message and ":7946" in message


def test_ipv6_wildcard_prefers_ipv4_then_takes_a_global_ipv6(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(advertise, "route_source", lambda family: None)
    monkeypatch.setattr(advertise, "ipv4_interfaces", lambda: [])
    monkeypatch.setattr(advertise, "ipv6_interfaces", lambda: [Candidate("eth0", 2, "fd00::5")])
    assert advertise.advertised_host(("::", 1)) == "fd00::5"
    with pytest.raises(NoAdvertiseAddress):  # an IPv4 wildcard never advertises IPv6
        advertise.advertised_host(("0.0.0.0", 1))


def test_if_inet6_keeps_global_scope_only(tmp_path: Path) -> None:
    table = tmp_path / "if_inet6"
    table.write_text(
        "00000000000000000000000000000001 01 80 10 80       lo\n"
        "fd000000000000000000000000000002 04 40 00 82     eth0\n"
        "fe8000000000000000fc00fffe000001 04 40 20 80     eth0\n"
        "garbage\n"
    )
    assert advertise.ipv6_interfaces(str(table)) == [Candidate("eth0", 4, "fd00::2")]
    assert advertise.ipv6_interfaces(str(tmp_path / "absent")) == []


def test_this_hosts_interfaces_are_read_without_loopback() -> None:
    for found in advertise.ipv4_interfaces():
        assert advertise.usable(found.address) and found.interface != "lo"


def test_mapped_ipv4_is_normalised_and_ipv4_destinations_are_mapped() -> None:
    assert advertise.unmap("::ffff:10.0.0.1") == "10.0.0.1"
    assert advertise.unmap("::FFFF:127.0.0.2") == "127.0.0.2"
    assert advertise.unmap("fd00::1") == "fd00::1" and advertise.unmap("10.0.0.1") == "10.0.0.1"
    assert advertise.socket_address(("10.0.0.1", 5), socket.AF_INET6) == ("::ffff:10.0.0.1", 5)
    assert advertise.socket_address(("fd00::1", 5), socket.AF_INET6) == ("fd00::1", 5)
    assert advertise.socket_address(("10.0.0.1", 5), socket.AF_INET) == ("10.0.0.1", 5)


def test_a_socket_that_cannot_be_dual_stack_is_refused_in_one_line() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as v4:  # has no IPV6_V6ONLY at all
        with pytest.raises(DualStackRefused) as raised:
            advertise.make_dual_stack(v4, ("::", 7946))
    assert "\n" not in str(raised.value) and "[::]:7946" in str(raised.value)
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as v6:
        v6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        advertise.make_dual_stack(v6, ("::", 7946))
        assert v6.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 0


# -- real agents in namespaces with no default route --------------------------------------

PORT = 7946


def ns(name: str, *argv: str) -> None:
    subprocess.run(["ip", "-n", name, *argv], check=True, capture_output=True)


@pytest.fixture
def lan() -> Iterator[Callable[[int, str], str]]:
    """Namespaces on one veth LAN (10.213.250.N/24), loopback up, no default route."""
    made: list[str] = []
    tag = f"ea-adv-{os.getpid()}"

    def host(n: int) -> str:
        name = f"{tag}-{n}"
        subprocess.run(["ip", "netns", "add", name], check=True)
        made.append(name)
        ns(name, "link", "set", "lo", "up")
        return name

    def link(a: str, b: str) -> None:
        subprocess.run(
            ["ip", "-n", a, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0",
             "netns", b], check=True,
        )  # fmt: skip
        for i, name in enumerate((a, b), start=1):
            ns(name, "addr", "add", f"10.213.250.{i}/24", "dev", "eth0")
            ns(name, "link", "set", "eth0", "up")

    def make(count: int, kind: str) -> str:
        names = [host(i) for i in range(1, count + 1)]
        if kind == "lan":
            link(names[0], names[1])
        return names[0]

    try:
        yield make
    finally:
        for name in made:
            subprocess.run(["ip", "netns", "del", name], check=False)


def agent_in(netns: str, state_dir: Path, name: str, *args: str) -> AgentProcess:
    argv = [
        "ip", "netns", "exec", netns, sys.executable, "-m", "edgeagent", "run",
        "--name", name, "--state-dir", str(state_dir), "--cluster", "adv",
        "--preset", "local", "--no-mdns", "--metrics", "off", *args,
    ]  # fmt: skip
    return AgentProcess(name, argv, state_dir, state_dir / "agent.log", agent_env())


def wait_members(agent: AgentProcess, want: dict[str, str], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        got = {m["name"]: m["address"] for m in agent.members() if m["state"] == "alive"}
        if got == want:
            return
        assert time.monotonic() < deadline, f"{agent.name} sees {got}, not {want}"
        time.sleep(0.2)


@needs_netns("ip")
@pytest.mark.parametrize("bind_a", ["0.0.0.0", "[::]"])
def test_lan_without_default_route_advertises_the_lan_address(
    lan: Callable[[int, str], str], bind_a: str
) -> None:
    first = lan(2, "lan")
    second = first[:-1] + "2"
    with tempfile.TemporaryDirectory(prefix="ea-adv-") as tmp:
        ca = new_ca("adv")
        for name in ("a", "b"):
            provision_member(ca, Path(tmp) / name, name)
        a = agent_in(first, Path(tmp) / "a", "a", "--bind", f"{bind_a}:{PORT}")
        b = agent_in(
            second, Path(tmp) / "b", "b", "--bind", f"0.0.0.0:{PORT}",
            "--join", f"10.213.250.1:{PORT}",
        )  # fmt: skip
        try:
            a.start()
            b.start()
            want = {"a": f"10.213.250.1:{PORT}", "b": f"10.213.250.2:{PORT}"}
            assert a.status()["address"] == want["a"]  # not 127.0.0.1: no default route here
            wait_members(a, want)  # IPv4 peer reached [::] (UDP and the push-pull over TCP)
            wait_members(b, want)
        finally:
            for agent in (a, b):
                agent.terminate()


@needs_netns("ip")
def test_only_loopback_and_no_advertise_is_one_line_and_exit_2(
    lan: Callable[[int, str], str],
) -> None:
    alone = lan(1, "alone")
    with tempfile.TemporaryDirectory(prefix="ea-adv-") as tmp:
        provision_member(new_ca("adv"), Path(tmp), "solo")
        argv = agent_in(alone, Path(tmp), "solo", "--bind", f"0.0.0.0:{PORT}").argv
        out = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        assert out.returncode == 2, out.stderr
        assert out.stderr.startswith("edgeagent: error: bind 0.0.0.0:7946: no address to advertise")
        assert "--advertise" in out.stderr and out.stderr.count("\n") == 1
        # Bound to loopback, loopback is what it advertises: nothing to refuse.
        ok = agent_in(alone, Path(tmp), "solo", "--bind", f"127.0.0.1:{PORT}")
        try:
            ok.start()
            assert ok.status()["address"] == f"127.0.0.1:{PORT}"
        finally:
            ok.terminate()
