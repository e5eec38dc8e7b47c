"""Network namespaces for the multi-host testbed: one namespace per host on a private bridge.

How it works. A testbed with id ``ID`` owns a bridge namespace ``ea-ID-br`` holding the bridge
``br0``, and one namespace ``ea-ID-hN`` per host. Each host gets a veth pair: ``eth0`` inside
its namespace (address ``10.213.X.N/24``, loopback up, a multicast route so mDNS leaves by
eth0) and ``hN`` inside the bridge namespace, enslaved to ``br0``. The bridge floods multicast
(IGMP snooping off), so mDNS reaches every host. Nothing is created in the root namespace but
the namespace names themselves: the root's routes and firewall neither see nor touch the test
traffic, agents can only reach each other, and deleting the namespaces removes every link and
rule with them.

Faults are nftables rules in the bridge namespace (family ``bridge``, hook ``forward``), so a
dropped frame vanishes on the wire: the sender gets no error, as on a real lossy or cut link
(a drop in the sender's own output hook would return EPERM to its ``sendto``):

- loss: table ``ea_loss_hN`` drops PCT % of the frames host N sends and, independently, PCT %
  of those it receives (``numgen random mod 100 < PCT``);
- partition: table ``ea_part`` drops every frame from a port of one group to a port of another
  (flooded multicast such as mDNS included: the bridge filters each copy per output port);
- link down: the host's bridge port goes down, cutting the host off entirely.

Every creation step is reported through a callback before the next one starts, so a caller
that records them (``testbed.cluster``) can undo a half-finished ``create`` after a crash.
:func:`scoped_network` is the short-lived form for a test that runs its own processes in the
hosts: it yields the network and, whatever happens, SIGKILLs every process left inside its
namespaces (by PID, they can only be ours) and deletes exactly the namespaces it created.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import secrets
import signal
import subprocess
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

NS_PREFIX = "ea-"  # every namespace this module creates starts with it
BRIDGE = "br0"  # inside the bridge namespace, so the name never clashes
HOST_IFACE = "eth0"
SUBNET_BASE = "10.213"  # private test subnets 10.213.X.0/24, X picked to avoid clashes
MAX_HOSTS = 250  # host N gets .N; .251-.254 stay free
LOSS_TABLE = "ea_loss"
PARTITION_TABLE = "ea_part"
MDNS_MULTICAST = "224.0.0.0/4"  # route multicast (mDNS 224.0.0.251) out of eth0


class NetnsError(Exception):
    """A namespace operation failed; the message is the failing command and its stderr."""


def is_root() -> bool:
    """Network namespaces need root (CAP_NET_ADMIN and CAP_SYS_ADMIN)."""
    return os.geteuid() == 0


def run(argv: Sequence[str], *, stdin: str | None = None, check: bool = True) -> str:
    """Run a command, return its stdout; raise :class:`NetnsError` with its stderr on failure."""
    proc = subprocess.run(list(argv), input=stdin, capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        message = (proc.stderr or proc.stdout).strip().splitlines()
        raise NetnsError(f"{' '.join(argv)}: {message[-1] if message else f'exit {proc.returncode}'}")
    return proc.stdout


def list_netns() -> set[str]:
    """Names of the network namespaces that exist now."""
    out = run(["ip", "-j", "netns", "list"], check=False).strip()
    return {entry["name"] for entry in json.loads(out)} if out else set()


def netns_pids(netns: str) -> list[int]:
    """PIDs of every process inside a namespace (empty if it does not exist)."""
    out = run(["ip", "netns", "pids", netns], check=False)
    return [int(word) for word in out.split() if word.isdigit()]


def delete_netns(netns: str) -> None:
    """Delete a namespace; deleting one that is gone is not an error."""
    if netns in list_netns():
        run(["ip", "netns", "del", netns])


def used_subnet_octets() -> set[int]:
    """Third octets X of 10.213.X.0/24 that overlap a route or address in the root namespace."""
    taken: set[int] = set()
    candidates = {x: ipaddress.ip_network(f"{SUBNET_BASE}.{x}.0/24") for x in range(256)}
    nets: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    for cmd in (["ip", "-j", "-4", "route"], ["ip", "-j", "-4", "addr"]):
        out = run(cmd, check=False).strip()
        for entry in json.loads(out) if out else []:
            dst = entry.get("dst")
            if dst and dst != "default":
                nets.append(ipaddress.ip_network(dst if "/" in dst else f"{dst}/32", strict=False))
            for info in entry.get("addr_info", []):
                nets.append(ipaddress.ip_network(f"{info['local']}/{info['prefixlen']}", strict=False))
    for x, candidate in candidates.items():
        if any(candidate.overlaps(net) for net in nets if net.version == 4):
            taken.add(x)
    return taken


def pick_subnet_octet(start: int, avoid: Iterable[int] = ()) -> int:
    """The first X from ``start`` (wrapping) with 10.213.X.0/24 free here and not in ``avoid``."""
    taken = used_subnet_octets() | set(avoid)
    for step in range(256):
        x = (start + step) % 256
        if x not in taken:
            return x
    raise NetnsError(f"no free {SUBNET_BASE}.X.0/24 subnet")


@dataclass(frozen=True, slots=True)
class HostNet:
    """One host's place on the test network."""

    index: int  # 1-based
    name: str  # "h1"
    netns: str  # "ea-ID-h1"
    ip: str  # "10.213.X.1"
    bridge_port: str  # veth end in the bridge namespace: "h1"


class Network:
    """The namespaces, bridge and veths of one testbed, and the faults applied to them."""

    def __init__(self, testbed_id: str, hosts: int, subnet_octet: int) -> None:
        if not 1 <= hosts <= MAX_HOSTS:
            raise ValueError(f"hosts must be 1..{MAX_HOSTS}, not {hosts}")
        self.id = testbed_id
        self.subnet = f"{SUBNET_BASE}.{subnet_octet}.0/24"
        self.bridge_ns = f"{NS_PREFIX}{testbed_id}-br"
        self.hosts = [
            HostNet(
                index=i,
                name=f"h{i}",
                netns=f"{NS_PREFIX}{testbed_id}-h{i}",
                ip=f"{SUBNET_BASE}.{subnet_octet}.{i}",
                bridge_port=f"h{i}",
            )
            for i in range(1, hosts + 1)
        ]
        self._by_name = {h.name: h for h in self.hosts}

    @property
    def namespaces(self) -> list[str]:
        """Every namespace of this network, bridge first."""
        return [self.bridge_ns, *(h.netns for h in self.hosts)]

    def host(self, name: str) -> HostNet:
        """Look a host up by name (``h3``) or number (``3``)."""
        key = f"h{name}" if name.isdigit() else name
        try:
            return self._by_name[key]
        except KeyError:
            raise KeyError(f"no host {name!r}; hosts are h1..h{len(self.hosts)}") from None

    # -- building -----------------------------------------------------------------------------

    def create(self, on_created: Callable[[str], None]) -> None:
        """Create the bridge namespace, then each host; ``on_created(netns)`` follows each one."""
        br = self.bridge_ns
        run(["ip", "netns", "add", br])
        on_created(br)
        self._ns(br, "ip", "link", "set", "lo", "up")
        self._ns(br, "ip", "link", "add", BRIDGE, "type", "bridge", "mcast_snooping", "0")
        self._ns(br, "ip", "link", "set", BRIDGE, "up")
        for host in self.hosts:
            run(["ip", "netns", "add", host.netns])
            on_created(host.netns)
            self._ns(host.netns, "ip", "link", "set", "lo", "up")
            run(["ip", "-n", br, "link", "add", host.bridge_port, "type", "veth",
                 "peer", "name", HOST_IFACE, "netns", host.netns])
            self._ns(br, "ip", "link", "set", host.bridge_port, "master", BRIDGE)
            self._ns(br, "ip", "link", "set", host.bridge_port, "up")
            self._ns(host.netns, "ip", "addr", "add", f"{host.ip}/24", "dev", HOST_IFACE)
            self._ns(host.netns, "ip", "link", "set", HOST_IFACE, "up")
            self._ns(host.netns, "ip", "route", "add", MDNS_MULTICAST, "dev", HOST_IFACE)

    def exec_argv(self, host: HostNet, argv: Sequence[str]) -> list[str]:
        """The command line that runs ``argv`` inside a host's namespace."""
        return ["ip", "netns", "exec", host.netns, *argv]

    def _ns(self, netns: str, *argv: str, stdin: str | None = None) -> str:
        return run(["ip", "netns", "exec", netns, *argv], stdin=stdin)

    # -- faults -------------------------------------------------------------------------------

    def set_loss(self, host: HostNet, percent: int) -> None:
        """Drop ``percent`` % of the frames a host sends and, independently, of those it receives.

        0 removes the loss. The drop happens on the bridge, so the sender sees no error, as on a
        lossy radio link.
        """
        if not 0 <= percent <= 100:
            raise ValueError(f"loss must be 0..100 percent, not {percent}")
        port = host.bridge_port
        self._replace_table(f"{LOSS_TABLE}_{port}", [] if percent == 0 else [
            f'iifname "{port}" numgen random mod 100 < {percent} drop',
            f'oifname "{port}" numgen random mod 100 < {percent} drop',
        ])

    def partition(self, groups: Sequence[Sequence[HostNet]], *, oneway: bool = False) -> None:
        """Cut traffic between groups; hosts in no group keep talking to everyone.

        With ``oneway``, only frames *into* the first group from the others are dropped (an
        asymmetric link: the first group can still send). Replaces any earlier partition.
        """
        seen: set[str] = set()
        for group in groups:
            for host in group:
                if host.name in seen:
                    raise ValueError(f"host {host.name} is in more than one group")
                seen.add(host.name)
        rules = []
        for i, group in enumerate(groups):
            others = [h for j, g in enumerate(groups) if j != i for h in g]
            if not group or not others or (oneway and i != 0):
                continue
            rules.append(f"iifname {_set(others)} oifname {_set(group)} drop")
        self._replace_table(PARTITION_TABLE, rules)

    def heal_partitions(self) -> None:
        """Remove the partition rules (loss and links stay as they are)."""
        self._replace_table(PARTITION_TABLE, [])

    def set_link(self, host: HostNet, up: bool) -> None:
        """Bring a host's bridge port up or down (down: the host hears and reaches no one)."""
        self._ns(self.bridge_ns, "ip", "link", "set", host.bridge_port, "up" if up else "down")

    def _replace_table(self, table: str, rules: Sequence[str]) -> None:
        """Atomically replace one nftables table on the bridge (no rules: remove it)."""
        # "add table" then "delete table" makes the delete safe when the table did not exist.
        script = [f"add table bridge {table}", f"delete table bridge {table}"]
        if rules:
            script.append(f"table bridge {table} {{")
            script.append("  chain forward {")
            script.append("    type filter hook forward priority 0; policy accept;")
            script.extend(f"    {rule}" for rule in rules)
            script.append("  }")
            script.append("}")
        self._ns(self.bridge_ns, "nft", "-f", "-", stdin="\n".join(script) + "\n")

    def faults(self) -> dict[str, dict[str, object]]:
        """What is applied now, per host: loss percent, partitioned or not, link up or down."""
        ruleset = self._ns(self.bridge_ns, "nft", "list", "ruleset")
        links = {
            entry["ifname"]: "UP" in entry.get("flags", [])
            for entry in json.loads(run(["ip", "-n", self.bridge_ns, "-j", "link", "show"]))
        }
        partition = ruleset.split(f"table bridge {PARTITION_TABLE} ", 1)
        part_rules = partition[1].split("}\n}", 1)[0] if len(partition) > 1 else ""
        result: dict[str, dict[str, object]] = {}
        for host in self.hosts:
            port = host.bridge_port
            loss = 0
            table = ruleset.split(f"table bridge {LOSS_TABLE}_{port} ", 1)
            if len(table) > 1:
                loss = int(table[1].split("mod 100 < ", 1)[1].split()[0])
            result[host.name] = {
                "loss_percent": loss,
                "partitioned": f'"{port}"' in part_rules,
                "link_up": links.get(port, False),
            }
        return result


def _set(hosts: Sequence[HostNet]) -> str:
    """An nftables anonymous set of bridge port names: ``{ "h1", "h2" }``."""
    return "{ " + ", ".join(f'"{h.bridge_port}"' for h in hosts) + " }"


@contextlib.contextmanager
def scoped_network(hosts: int) -> Iterator[Network]:
    """A fresh network of ``hosts`` hosts for the block; removed afterwards, even on failure."""
    existing = list_netns()
    while True:
        testbed_id = secrets.token_hex(2)
        if not any(n.startswith(f"{NS_PREFIX}{testbed_id}-") for n in existing):
            break
    network = Network(testbed_id, hosts, pick_subnet_octet(int(testbed_id, 16) % 256))
    created: list[str] = []
    try:
        network.create(created.append)
        yield network
    finally:
        for ns in reversed(created):
            for pid in netns_pids(ns):  # only processes inside our own namespaces
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            delete_netns(ns)
