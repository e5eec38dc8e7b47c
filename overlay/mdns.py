"""Agent discovery over mDNS: advertise and browse ``_edgeagent._udp.local.`` with zeroconf.

How it works. Each agent registers one service instance of type :data:`SERVICE_TYPE` whose
SRV port is its gossip port and whose TXT record carries (:data:`TXT_VERSION` ``v``) the
cluster-name hash ``c``, the node id ``id`` and the gossip port ``port``. It browses the same
type; for every instance added or updated it resolves the record (bounded: at most
:data:`MAX_PENDING_LOOKUPS` at once, a hostile LAN cannot make it queue work without limit)
and, if :func:`parse_peer` accepts it (same cluster, not ourselves, sane port and address),
hands a :class:`Peer` to the callback. Joining is the caller's business: mDNS is for finding
peers, SWIM owns liveness.

Only a hash of the cluster name is published, so the LAN learns which agents belong together
but not the name used as the AEAD associated data. zeroconf is imported here and nowhere
else; the agent imports this module only when mDNS is on.

zeroconf's register and unregister return an awaitable that must itself be awaited
(``await (await aiozc.async_register_service(info))``), or the announcement / goodbye may
never be sent.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import ipaddress
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from zeroconf import IPVersion, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from gossip.messages import Address

log = logging.getLogger(__name__)

SERVICE_TYPE = "_edgeagent._udp.local."
TXT_VERSION = "1"
CLUSTER_HASH_CHARS = 16  # 64 bits of SHA-256: enough to keep clusters apart, short for TXT
MAX_LABEL_BYTES = 63  # RFC 6763 section 4.1.1: an instance name is one DNS label
MAX_PENDING_LOOKUPS = 16  # concurrent resolutions of announced instances
LOOKUP_TIMEOUT_MS = 3000  # per resolution; zeroconf's own default is 3 s


def cluster_hash(cluster: str) -> str:
    """The value of the ``c`` TXT key: a short SHA-256 of the cluster name."""
    return hashlib.sha256(cluster.encode()).hexdigest()[:CLUSTER_HASH_CHARS]


def instance_name(node_name: str, node_id: str) -> str:
    """A DNS-label-sized, collision-resistant instance name for this node."""
    suffix = f"-{node_id[:8]}"
    head = node_name.encode()[: MAX_LABEL_BYTES - len(suffix)].decode(errors="ignore")
    return f"{head}{suffix}"


def txt_record(cluster: str, node_id: str, port: int) -> dict[str, str]:
    """The TXT properties this node advertises."""
    return {"v": TXT_VERSION, "c": cluster_hash(cluster), "id": node_id, "port": str(port)}


@dataclass(frozen=True, slots=True)
class Peer:
    """An agent of our cluster found on the LAN."""

    node_id: str
    addr: Address


def _text(value: bytes | str | None) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        try:
            return value.decode()
        except UnicodeDecodeError:
            return None
    return value


def parse_peer(
    properties: Mapping[Any, bytes | str | None],
    addresses: Sequence[str],
    *,
    cluster: str,
    own_node_id: str,
) -> Peer | None:
    """Accept an announced instance as a peer of ``cluster``, or return None.

    Rejected: another TXT version, another cluster, ourselves, a missing or bad port, no
    usable address (IPv4 preferred; link-local IPv6 needs a scope we do not track).
    """
    props = {_text(k): _text(v) for k, v in properties.items()}
    if props.get("v") != TXT_VERSION or props.get("c") != cluster_hash(cluster):
        return None
    node_id = props.get("id")
    if not node_id or node_id == own_node_id:
        return None
    try:
        port = int(props.get("port") or "")
    except ValueError:
        return None
    if not 0 < port < 65536:
        return None
    usable: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    for text in addresses:
        try:
            ip = ipaddress.ip_address(text)
        except ValueError:
            continue
        if ip.is_multicast or ip.is_unspecified or (ip.version == 6 and ip.is_link_local):
            continue
        usable.append(ip)
    if not usable:
        return None
    usable.sort(key=lambda ip: ip.version)
    return Peer(node_id=node_id, addr=(str(usable[0]), port))


class MdnsDiscovery:
    """Advertise this agent and report peers of the same cluster to ``on_peer``.

    ``interfaces`` is a list of local IP addresses to use, or None for all interfaces.
    """

    def __init__(
        self,
        *,
        node_name: str,
        node_id: str,
        cluster: str,
        addr: Address,
        on_peer: Callable[[Peer], None],
        interfaces: list[str] | None = None,
    ) -> None:
        self._node_id = node_id
        self._cluster = cluster
        self._on_peer = on_peer
        self._interfaces = interfaces
        self._info = AsyncServiceInfo(
            SERVICE_TYPE,
            f"{instance_name(node_name, node_id)}.{SERVICE_TYPE}",
            port=addr[1],
            properties=txt_record(cluster, node_id, addr[1]),
            server=f"{instance_name(node_name, node_id)}.local.",
            parsed_addresses=[addr[0]],
        )
        self._aiozc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._registered = False
        self._lookups: dict[str, asyncio.Task[None]] = {}

    async def start(self) -> None:
        """Register our instance and start browsing."""
        if self._interfaces is None:
            self._aiozc = AsyncZeroconf(ip_version=IPVersion.V4Only)
        else:
            self._aiozc = AsyncZeroconf(interfaces=self._interfaces, ip_version=IPVersion.V4Only)
        await (await self._aiozc.async_register_service(self._info, allow_name_change=True))
        self._registered = True
        self._browser = AsyncServiceBrowser(
            self._aiozc.zeroconf, SERVICE_TYPE, handlers=[self._on_change]
        )

    async def stop(self) -> None:
        """Send the goodbye, stop browsing and close the sockets (also after a failed start)."""
        if self._aiozc is None:
            return
        for task in self._lookups.values():
            task.cancel()
        try:
            if self._browser is not None:
                await self._browser.async_cancel()
                self._browser = None
            if self._registered:
                self._registered = False
                await (await self._aiozc.async_unregister_service(self._info))
        finally:
            await self._aiozc.async_close()
            self._aiozc = None

    def _on_change(
        self, zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        if state_change is ServiceStateChange.Removed or name == self._info.name:
            return
        if name in self._lookups or len(self._lookups) >= MAX_PENDING_LOOKUPS:
            return
        task = asyncio.get_running_loop().create_task(self._resolve(service_type, name))
        self._lookups[name] = task
        task.add_done_callback(functools.partial(self._lookup_done, name))

    def _lookup_done(self, name: str, task: asyncio.Task[None]) -> None:
        self._lookups.pop(name, None)

    async def _resolve(self, service_type: str, name: str) -> None:
        if self._aiozc is None:
            return
        info = AsyncServiceInfo(service_type, name)
        if not await info.async_request(self._aiozc.zeroconf, LOOKUP_TIMEOUT_MS):
            return
        peer = parse_peer(
            info.properties or {},
            info.parsed_addresses(),
            cluster=self._cluster,
            own_node_id=self._node_id,
        )
        if peer is not None:
            log.debug("mdns peer node_id=%s addr=%s:%d", peer.node_id, *peer.addr)
            self._on_peer(peer)
