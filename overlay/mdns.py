"""Discovery over mDNS: agents (``_edgeagent._udp``) and issuers (``_edgeagent-join._tcp``).

How it works
------------
Each agent registers one service instance of type :data:`SERVICE_TYPE` whose SRV port is its
gossip port and whose TXT record carries (:data:`TXT_VERSION` ``v``) the cluster-name hash
``c``, the node id ``id`` and the gossip port ``port``. It browses the same type; for every
instance added or updated it resolves the record and :func:`classify_peer` decides:

- the TXT must be ours: at most :data:`MAX_TXT_BYTES` (checked before it is decoded), this
  version, this cluster's hash, not our own node id, a sane id and port;
- the address must be **on a link of ours** (:class:`Links`): inside the subnet of one of our
  interface addresses (the interface of the bind address when bound to one), never loopback
  unless we are bound to loopback; at most :data:`MAX_ADDRESSES_CONSIDERED` announced
  addresses are looked at. A hostile announcement cannot send us to join a host beyond the LAN.

A refusal is a reason string (:data:`REFUSALS`), counted by the caller. Resolving is bounded:
at most :data:`MAX_PENDING_LOOKUPS` at once and :data:`LOOKUPS_PER_S` on average (a token
bucket), so many announced names cost bounded memory and CPU; the excess is refused as
``rate_limited``.

An accepted peer is **not** a seed kept forever. :class:`JoinSchedule` turns it into one join
attempt now and a few retries with exponential backoff and jitter while it has not shown up
alive (:data:`MAX_ATTEMPTS`, :data:`FIRST_RETRY_S` doubling up to :data:`MAX_RETRY_S`), then
forgets it; it holds at most :data:`MAX_CANDIDATES` addresses (more are refused as ``full``),
and an announcement repeated before its backoff is over does not buy another attempt.
:class:`JoinSchedule` and :class:`Links` are sans-IO (``now`` and an injected
``random.Random``), tested on virtual time.

Issuers. An agent holding the mesh CA key registers :data:`ENROLL_SERVICE_TYPE` with its
enrollment port and a TXT carrying the first :data:`PIN_PREFIX_CHARS` hex digits of the CA pin
(:class:`EnrollAdvert`). ``edgeagent join`` browses it (:class:`IssuerBrowser`) when the token
names no issuer address or none answers, keeping the instances whose pin prefix is the token's
and whose address is on a link of the joiner (loopback allowed: a joiner binds nothing). mDNS
is only a hint: the TLS exchange checks the full pin, so an impostor copying the prefix is
refused there.

Only a hash of the cluster name and a prefix of the CA pin are published, so the LAN learns
which agents belong together but not the name used as the AEAD associated data. zeroconf (and
its ``ifaddr``, which reads the interface addresses) is imported here and nowhere else; the
agent imports this module only when mDNS is on, ``join`` only when it browses.

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
import random
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import ifaddr
from zeroconf import IPVersion, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from gossip.messages import Address

log = logging.getLogger(__name__)

SERVICE_TYPE = "_edgeagent._udp.local."
ENROLL_SERVICE_TYPE = "_edgeagent-join._tcp.local."  # RFC 6763: a service name is <= 15 bytes
TXT_VERSION = "1"
CLUSTER_HASH_CHARS = 16  # 64 bits of SHA-256: enough to keep clusters apart, short for TXT
PIN_PREFIX_CHARS = 16  # 64 bits of the CA pin: filters issuers; the full pin is checked by TLS
MAX_LABEL_BYTES = 63  # RFC 6763 section 4.1.1: an instance name is one DNS label
MAX_TXT_BYTES = 400  # ours is ~90 bytes; a larger TXT is refused before it is decoded
MAX_NODE_ID_CHARS = 64  # node ids are 32 hex digits
MAX_ADDRESSES_CONSIDERED = 8  # of the A/AAAA records of one announcement
MAX_PENDING_LOOKUPS = 16  # concurrent resolutions of announced instances
LOOKUPS_PER_S = 10.0  # average resolutions started per second (token bucket) ...
LOOKUP_BURST = 32  # ... and the burst allowed (a LAN of 32 agents starting together)
LOOKUP_TIMEOUT_MS = 3000  # per resolution; zeroconf's own default is 3 s
MAX_CANDIDATES = 32  # announced addresses being joined at once (JoinSchedule)
MAX_ATTEMPTS = 5  # join attempts per announcement: at once, then 4 retries
FIRST_RETRY_S = 2.0  # the first retry; each later one waits twice as long ...
MAX_RETRY_S = 60.0  # ... up to this
RETRY_JITTER = 0.25  # each wait is stretched or shrunk by up to 25 %
MAX_ISSUERS = 4  # issuer instances a joiner tries from one browse

# Why an announcement was refused (the keys of the refusal counters).
REFUSALS = (
    "txt_too_big", "foreign", "self", "bad_txt", "no_address", "off_link", "loopback",
    "rate_limited", "full",
)  # fmt: skip

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def cluster_hash(cluster: str) -> str:
    """The value of the ``c`` TXT key: a short SHA-256 of the cluster name."""
    return hashlib.sha256(cluster.encode()).hexdigest()[:CLUSTER_HASH_CHARS]


def pin_prefix(ca_pin: bytes) -> str:
    """The value of an issuer's ``pin`` TXT key: the first hex digits of the CA pin."""
    return ca_pin.hex()[:PIN_PREFIX_CHARS]


def instance_name(node_name: str, node_id: str) -> str:
    """A DNS-label-sized, collision-resistant instance name for this node."""
    suffix = f"-{node_id[:8]}"
    head = node_name.encode()[: MAX_LABEL_BYTES - len(suffix)].decode(errors="ignore")
    return f"{head}{suffix}"


def txt_record(cluster: str, node_id: str, port: int) -> dict[str, str]:
    """The TXT properties this node advertises."""
    return {"v": TXT_VERSION, "c": cluster_hash(cluster), "id": node_id, "port": str(port)}


def enroll_txt_record(ca_pin: bytes) -> dict[str, str]:
    """The TXT properties an issuer advertises."""
    return {"v": TXT_VERSION, "pin": pin_prefix(ca_pin)}


@dataclass(frozen=True, slots=True)
class Peer:
    """An agent of our cluster found on the LAN."""

    node_id: str
    addr: Address


# --------------------------------------------------------------------------- the on-link rule


@dataclass(frozen=True, slots=True)
class Links:
    """The networks an announced address must fall in, and whether loopback is acceptable."""

    networks: tuple[IPNetwork, ...]
    loopback: bool = False

    @classmethod
    def of(cls, interfaces: Iterable[tuple[str, int]], bind_host: str | None) -> Links:
        """The links of an agent bound to ``bind_host`` (None: a joiner, bound to nothing).

        ``interfaces`` are our ``(address, prefix length)`` pairs. Wildcard bind: every
        non-loopback interface subnet. Bound to loopback: the loopback subnets only. Bound to
        one address: the subnet(s) of the interface holding it. A joiner: every subnet,
        loopback included.
        """
        nets: list[IPNetwork] = []
        for text, prefix in interfaces:
            try:
                nets.append(ipaddress.ip_network(f"{text}/{prefix}", strict=False))
            except ValueError:
                continue
        if bind_host is None:
            return cls(tuple(nets), loopback=True)
        try:
            bound = ipaddress.ip_address(bind_host)
        except ValueError:
            bound = ipaddress.IPv4Address(0)  # a host name: judged as a wildcard bind
        if bound.is_unspecified:
            return cls(tuple(n for n in nets if not n.network_address.is_loopback))
        if bound.is_loopback:
            loop = [n for n in nets if n.network_address.is_loopback]
            return cls(tuple(loop or [ipaddress.ip_network("127.0.0.0/8")]), loopback=True)
        return cls(tuple(n for n in nets if bound in n))

    def pick(self, addresses: Sequence[str]) -> tuple[str, str]:
        """``(address, "")``: the first on-link address (IPv4 preferred); or ``("", why)``,
        why being ``off_link``, ``loopback`` or ``no_address``."""
        found: list[IPAddress] = []
        refusal = "no_address"
        for text in addresses[:MAX_ADDRESSES_CONSIDERED]:
            try:
                ip = ipaddress.ip_address(text)
            except ValueError:
                continue
            if ip.is_multicast or ip.is_unspecified or (ip.version == 6 and ip.is_link_local):
                continue
            if ip.is_loopback and not self.loopback:
                refusal = "loopback" if refusal == "no_address" else refusal
            elif any(ip in net for net in self.networks):
                found.append(ip)
            else:
                refusal = "off_link"
        if not found:
            return "", refusal
        found.sort(key=lambda ip: ip.version)
        return str(found[0]), ""


def interface_addresses() -> list[tuple[str, int]]:
    """This host's interface addresses as ``(address, prefix length)`` (IPv6 scope dropped)."""
    pairs: list[tuple[str, int]] = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            text = ip.ip if isinstance(ip.ip, str) else ip.ip[0]
            pairs.append((str(text), int(ip.network_prefix)))
    return pairs


# --------------------------------------------------------------------------- TXT rules


def _text(value: bytes | str | None) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        try:
            return value.decode()
        except UnicodeDecodeError:
            return None
    return value


def _port(text: str | None) -> int | None:
    if text is None or not text.isdigit() or len(text) > 5:
        return None
    port = int(text)
    return port if 0 < port < 65536 else None


def classify_peer(
    properties: Mapping[Any, bytes | str | None],
    addresses: Sequence[str],
    *,
    cluster: str,
    own_node_id: str,
    links: Links | None = None,
) -> Peer | str:
    """An announced instance as a peer of ``cluster``, or why not (one of :data:`REFUSALS`).

    ``links`` None accepts any unicast address but IPv6 link-local (which needs a scope we do
    not track); the agent always passes its :class:`Links`.
    """
    props = {_text(k): _text(v) for k, v in properties.items()}
    if props.get("v") != TXT_VERSION or props.get("c") != cluster_hash(cluster):
        return "foreign"
    node_id = props.get("id")
    if node_id == own_node_id:
        return "self"
    port = _port(props.get("port"))
    if not node_id or len(node_id) > MAX_NODE_ID_CHARS or not node_id.isprintable() or not port:
        return "bad_txt"
    addr, refusal = (links if links is not None else _ANY_UNICAST).pick(addresses)
    return Peer(node_id=node_id, addr=(addr, port)) if addr else refusal


def parse_peer(
    properties: Mapping[Any, bytes | str | None],
    addresses: Sequence[str],
    *,
    cluster: str,
    own_node_id: str,
    links: Links | None = None,
) -> Peer | None:
    """:func:`classify_peer`, with None for any refusal."""
    found = classify_peer(
        properties, addresses, cluster=cluster, own_node_id=own_node_id, links=links
    )
    return found if isinstance(found, Peer) else None


def classify_issuer(
    properties: Mapping[Any, bytes | str | None],
    addresses: Sequence[str],
    port: int | None,
    *,
    ca_pin: bytes,
    links: Links,
) -> Address | str:
    """An announced issuer of the CA pinned by ``ca_pin``, or why not."""
    props = {_text(k): _text(v) for k, v in properties.items()}
    if props.get("v") != TXT_VERSION or props.get("pin") != pin_prefix(ca_pin):
        return "foreign"
    if port is None or not 0 < port < 65536:
        return "bad_txt"
    addr, refusal = links.pick(addresses)
    return (addr, port) if addr else refusal


_ANY_UNICAST = Links((ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0")), True)


# --------------------------------------------------------------------------- join schedule


@dataclass(slots=True)
class _Candidate:
    attempts: int
    next_at: float  # the next retry, or (attempts used up) when it is forgotten


class JoinSchedule:
    """Join attempts for announced addresses: capped in count, retried with backoff (sans-IO).

    :meth:`offer` for each accepted announcement says whether to join now; :meth:`due`
    returns the retries whose time has come; :meth:`done` forgets an address that joined (its
    member is alive). ``now`` is any monotonic clock; ``rng`` draws the jitter.
    """

    def __init__(
        self,
        rng: random.Random,
        *,
        capacity: int = MAX_CANDIDATES,
        attempts: int = MAX_ATTEMPTS,
        first_retry: float = FIRST_RETRY_S,
        max_retry: float = MAX_RETRY_S,
        jitter: float = RETRY_JITTER,
    ) -> None:
        self._rng = rng
        self._capacity = capacity
        self._attempts = attempts
        self._first = first_retry
        self._max = max_retry
        self._jitter = jitter
        self._table: dict[Address, _Candidate] = {}

    def __len__(self) -> int:
        return len(self._table)

    def __contains__(self, addr: object) -> bool:
        return addr in self._table

    def wait(self, attempts: int) -> float:
        """The wait after the ``attempts``-th attempt: doubling from the first retry, capped,
        with jitter."""
        base = min(self._max, self._first * 2.0 ** min(attempts - 1, 30))
        return base * (1.0 + self._jitter * (2.0 * self._rng.random() - 1.0))

    def offer(self, addr: Address, now: float) -> str:
        """An accepted announcement of ``addr``: ``join`` (attempt now), ``backoff`` (an attempt
        is scheduled or was just made) or ``full`` (refused: the table is at capacity)."""
        if addr in self._table:
            return "backoff"
        self._expire(now)
        if len(self._table) >= self._capacity:
            return "full"
        self._table[addr] = _Candidate(1, now + self.wait(1))
        return "join"

    def due(self, now: float) -> list[Address]:
        """The addresses to retry now; those whose attempts are used up are forgotten."""
        retry: list[Address] = []
        for addr, cand in list(self._table.items()):
            if cand.next_at > now:
                continue
            if cand.attempts >= self._attempts:
                del self._table[addr]
                continue
            cand.attempts += 1
            cand.next_at = now + self.wait(cand.attempts)
            retry.append(addr)
        return retry

    def done(self, addr: Address) -> None:
        """``addr`` joined: no more attempts (a later announcement starts afresh)."""
        self._table.pop(addr, None)

    def next_deadline(self) -> float | None:
        """When :meth:`due` next has something to do (None: nothing scheduled)."""
        return min((c.next_at for c in self._table.values()), default=None)

    def _expire(self, now: float) -> None:
        for addr, cand in list(self._table.items()):
            if cand.attempts >= self._attempts and cand.next_at <= now:
                del self._table[addr]


class TokenBucket:
    """``rate`` events per second on average, ``burst`` at once (sans-IO: ``now`` passed in)."""

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self._rate = rate
        self._burst = float(burst)
        self._tokens = float(burst)
        self._at = now

    def take(self, now: float) -> bool:
        """Spend one token if there is one."""
        self._tokens = min(self._burst, self._tokens + max(0.0, now - self._at) * self._rate)
        self._at = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True


# --------------------------------------------------------------------------- zeroconf


class _Resolver:
    """Bounded resolution of announced instances: concurrency cap, rate limit, TXT size cap."""

    def __init__(self, on_info: Callable[[AsyncServiceInfo], None], on_refused: Callable[[str], object]) -> None:
        self.aiozc: AsyncZeroconf | None = None
        self.own_name = ""
        self._on_info = on_info
        self._on_refused = on_refused
        self._lookups: dict[str, asyncio.Task[None]] = {}
        self._bucket: TokenBucket | None = None

    def on_change(
        self, zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        if state_change is ServiceStateChange.Removed or name == self.own_name:
            return
        if name in self._lookups:
            return
        loop = asyncio.get_running_loop()
        if self._bucket is None:
            self._bucket = TokenBucket(LOOKUPS_PER_S, LOOKUP_BURST, loop.time())
        if len(self._lookups) >= MAX_PENDING_LOOKUPS or not self._bucket.take(loop.time()):
            self._on_refused("rate_limited")
            return
        task = loop.create_task(self._resolve(service_type, name))
        self._lookups[name] = task
        task.add_done_callback(functools.partial(self._done, name))

    def _done(self, name: str, task: asyncio.Task[None]) -> None:
        self._lookups.pop(name, None)

    def cancel(self) -> None:
        for task in self._lookups.values():
            task.cancel()

    async def _resolve(self, service_type: str, name: str) -> None:
        if self.aiozc is None:
            return
        info = AsyncServiceInfo(service_type, name)
        if not await info.async_request(self.aiozc.zeroconf, LOOKUP_TIMEOUT_MS):
            return
        if len(info.text or b"") > MAX_TXT_BYTES:
            self._on_refused("txt_too_big")
            return
        self._on_info(info)


def _zeroconf(interfaces: list[str] | None) -> AsyncZeroconf:
    if interfaces is None:
        return AsyncZeroconf(ip_version=IPVersion.V4Only)
    return AsyncZeroconf(interfaces=interfaces, ip_version=IPVersion.V4Only)


class MdnsDiscovery:
    """Advertise this agent and report peers of the same cluster to ``on_peer``.

    ``interfaces`` is a list of local IP addresses to use, or None for all interfaces.
    ``links`` returns the :class:`Links` announced addresses must fall in (called per
    announcement, so the caller may refresh it); ``on_refused`` gets each refusal's reason.
    """

    def __init__(
        self,
        *,
        node_name: str,
        node_id: str,
        cluster: str,
        addr: Address,
        on_peer: Callable[[Peer], None],
        links: Callable[[], Links],
        on_refused: Callable[[str], object] = lambda reason: None,
        interfaces: list[str] | None = None,
    ) -> None:
        self._node_id = node_id
        self._cluster = cluster
        self._on_peer = on_peer
        self._links = links
        self._on_refused = on_refused
        self._interfaces = interfaces
        self._info = AsyncServiceInfo(
            SERVICE_TYPE,
            f"{instance_name(node_name, node_id)}.{SERVICE_TYPE}",
            port=addr[1],
            properties=txt_record(cluster, node_id, addr[1]),
            server=f"{instance_name(node_name, node_id)}.local.",
            parsed_addresses=[addr[0]],
        )
        self._resolver = _Resolver(self._on_info, on_refused)
        self._resolver.own_name = self._info.name
        self._aiozc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._registered = False

    async def start(self) -> None:
        """Register our instance and start browsing."""
        self._aiozc = self._resolver.aiozc = _zeroconf(self._interfaces)
        await (await self._aiozc.async_register_service(self._info, allow_name_change=True))
        self._registered = True
        self._resolver.own_name = self._info.name  # allow_name_change may have renamed us
        self._browser = AsyncServiceBrowser(
            self._aiozc.zeroconf, SERVICE_TYPE, handlers=[self._resolver.on_change]
        )

    async def stop(self) -> None:
        """Send the goodbye, stop browsing and close the sockets (also after a failed start)."""
        if self._aiozc is None:
            return
        self._resolver.cancel()
        try:
            if self._browser is not None:
                await self._browser.async_cancel()
                self._browser = None
            if self._registered:
                self._registered = False
                await (await self._aiozc.async_unregister_service(self._info))
        finally:
            await self._aiozc.async_close()
            self._aiozc = self._resolver.aiozc = None

    def _on_info(self, info: AsyncServiceInfo) -> None:
        found = classify_peer(
            info.properties or {},
            info.parsed_addresses(),
            cluster=self._cluster,
            own_node_id=self._node_id,
            links=self._links(),
        )
        if isinstance(found, Peer):
            log.debug("mdns peer node_id=%s addr=%s:%d", found.node_id, *found.addr)
            self._on_peer(found)
        else:
            self._on_refused(found)


class EnrollAdvert:
    """Announce an issuer's enrollment listener (:data:`ENROLL_SERVICE_TYPE`)."""

    def __init__(
        self,
        *,
        node_name: str,
        node_id: str,
        ca_pin: bytes,
        addr: Address,
        interfaces: list[str] | None = None,
    ) -> None:
        label = instance_name(node_name, node_id)
        self._interfaces = interfaces
        self._info = AsyncServiceInfo(
            ENROLL_SERVICE_TYPE,
            f"{label}.{ENROLL_SERVICE_TYPE}",
            port=addr[1],
            properties=enroll_txt_record(ca_pin),
            server=f"{label}-enroll.local.",
            parsed_addresses=[addr[0]],
        )
        self._aiozc: AsyncZeroconf | None = None
        self._registered = False

    async def start(self) -> None:
        """Register the instance (takes a second or two: zeroconf probes the name first)."""
        self._aiozc = _zeroconf(self._interfaces)
        await (await self._aiozc.async_register_service(self._info, allow_name_change=True))
        self._registered = True

    async def stop(self) -> None:
        """Send the goodbye and close the sockets (also after a failed start)."""
        if self._aiozc is None:
            return
        try:
            if self._registered:
                self._registered = False
                await (await self._aiozc.async_unregister_service(self._info))
        finally:
            await self._aiozc.async_close()
            self._aiozc = None


class IssuerBrowser:
    """Issuers of one CA announced on the LAN, as they are found, for at most ``timeout_s``.

    ``async with IssuerBrowser(pin, links, 5.0) as found: addr = await found.next()``; next
    returns None once the browse time is over (or :data:`MAX_ISSUERS` were returned). Refusals
    are counted in :attr:`refused`. A host with no multicast raises OSError from ``__aenter__``.
    """

    def __init__(self, ca_pin: bytes, links: Links, timeout_s: float) -> None:
        self._pin = ca_pin
        self._links = links
        self._timeout = timeout_s
        self._queue: asyncio.Queue[Address] = asyncio.Queue(MAX_ISSUERS)
        self._seen: set[Address] = set()
        self._returned = 0
        self._deadline = 0.0
        self._resolver = _Resolver(self._on_info, self._refuse)
        self._browser: AsyncServiceBrowser | None = None
        self.refused: Counter[str] = Counter()

    async def __aenter__(self) -> IssuerBrowser:
        self._deadline = asyncio.get_running_loop().time() + self._timeout
        self._resolver.aiozc = _zeroconf(None)
        try:
            self._browser = AsyncServiceBrowser(
                self._resolver.aiozc.zeroconf, ENROLL_SERVICE_TYPE, handlers=[self._resolver.on_change]
            )
        except BaseException:
            await self._resolver.aiozc.async_close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._resolver.cancel()
        aiozc, self._resolver.aiozc = self._resolver.aiozc, None
        if aiozc is None:
            return
        try:
            if self._browser is not None:
                await self._browser.async_cancel()
        finally:
            await aiozc.async_close()

    async def next(self) -> Address | None:
        """The next issuer found, or None when the browse time is over."""
        if self._returned >= MAX_ISSUERS:
            return None
        left = self._deadline - asyncio.get_running_loop().time()
        if left <= 0 and self._queue.empty():
            return None
        try:
            addr = await asyncio.wait_for(self._queue.get(), max(left, 0.0))
        except TimeoutError:
            return None
        self._returned += 1
        return addr

    def _refuse(self, reason: str) -> None:
        self.refused[reason] += 1

    def _on_info(self, info: AsyncServiceInfo) -> None:
        found = classify_issuer(
            info.properties or {}, info.parsed_addresses(), info.port,
            ca_pin=self._pin, links=self._links,
        )  # fmt: skip
        if isinstance(found, str):
            self._refuse(found)
        elif found not in self._seen and not self._queue.full():
            self._seen.add(found)
            self._queue.put_nowait(found)
