"""The service catalog: service instances, their replicated-state value, the healthy view.

How it works
------------
An *instance* is one place a service can be reached: a service name, a protocol
(``coap`` or ``mqtt``), a host, a port, a path prefix, a weight and a few tags (``site``,
``zone``, ``version``, ...). It belongs to the node that publishes it: the node whose agent
forwards requests to it (its own services, or LAN devices it imported by mDNS).

Each node publishes *all* its instances as one value under :data:`STATE_KEY` in its
gossip-replicated state, a compact list (no field names on the wire)::

    {"v": 1, "i": [[name, proto, host, port, path, weight, {tag: value}], ...]}

The value is bounded: at most :data:`MAX_INSTANCES_PER_NODE` instances and
:data:`MAX_VALUE_BYTES` packed (a share of the gossip core's 4 KiB per-node budget, which
IPAM and the rest also use). :func:`encode_instances` refuses more with
:class:`CatalogError`. :func:`decode_instances` is total: whatever a hostile peer
publishes, it returns instances or raises :class:`CatalogError` (and nothing else); the
:class:`Catalog` drops a bad value, counts it and keeps nothing of it.

Names: a service name is one DNS label (``SERVICE.mesh``): 1-63 characters of lower-case
letters, digits and ``-``, not starting or ending with ``-``. ``node`` is reserved
(``NODE.node.mesh`` is the node zone). Input from a person is lower-cased first
(:func:`check_service_name`); input from the wire must already be canonical.

URIs: ``coap://HOST:PORT[/path]`` (or ``mqtt://``); HOST is a DNS name, an IPv4 address or
a bracketed IPv6 address; PORT defaults to 5683 (coap) / 1883 (mqtt) when left out; no
user info, query or fragment. :func:`parse_uri` raises :class:`CatalogError` (a
``ValueError``) whose message names what is wrong, fit for the CLI's one-line errors.

The healthy view
----------------
:class:`Catalog` is fed each member's state (``on_member``, the member table's
ALIVE / SUSPECT / DEAD / LEFT) and each member's published value (``on_state``). The local
node counts as ALIVE. :meth:`Catalog.healthy` gives the instances a request may go to:
those on ALIVE nodes that the balancer has not ejected. If there are none, the instances on
SUSPECT nodes that are not ejected are used as a last resort (a suspect node is often
alive; refusing it when nothing else is left turns a slow node into an outage). Instances on
DEAD or LEFT nodes are never used. :meth:`Catalog.dns_nodes` names the nodes whose agents
mesh DNS answers for ``SERVICE.mesh``; :meth:`Catalog.rows` is ``edgeagent services``.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum

import msgpack

from gossip.messages import MemberState, StateValue

STATE_KEY = "svc"  # key of a node's instance list in its replicated state
VALUE_VERSION = 1
MAX_INSTANCES_PER_NODE = 32
MAX_VALUE_BYTES = 2048  # packed; half of gossip's DEFAULT_MAX_STATE_BYTES (4096)
MAX_NAME_LEN = 63  # one DNS label (RFC 1035 2.3.4)
MAX_HOST_LEN = 253
MAX_PATH_LEN = 128
MAX_TAGS = 8
MAX_TAG_KEY_LEN = 32
MAX_TAG_VALUE_LEN = 64
MAX_WEIGHT = 1000
DEFAULT_WEIGHT = 1
DEFAULT_PORTS = {"coap": 5683, "mqtt": 1883}
RESERVED_NAMES = frozenset({"node"})
MAX_URI_LEN = 512

_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\Z")
_HOST_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9])?\Z")
_TAG_KEY = re.compile(r"[a-z][a-z0-9_.-]{0,31}\Z")
# RFC 3986 pchar, plus "/" between segments; percent-escapes kept as written.
_PATH = re.compile(r"(?:/(?:[A-Za-z0-9\-._~!$&'()*+,;=:@]|%[0-9A-Fa-f]{2})*)*\Z")
_TAG_VALUE = re.compile(r"[\x21-\x7e]{1,64}\Z")


class CatalogError(ValueError):
    """A bad service name, URI, tag or weight, or an undecodable replicated value."""


class Protocol(StrEnum):
    COAP = "coap"
    MQTT = "mqtt"


@dataclass(frozen=True, slots=True)
class Instance:
    """One instance of a service, as its owner ``node`` publishes it."""

    name: str
    protocol: Protocol
    host: str
    port: int
    path: str = ""
    weight: int = DEFAULT_WEIGHT
    tags: tuple[tuple[str, str], ...] = ()  # sorted (key, value) pairs
    node: str = ""
    # Derived once (the balancer reads them on every pick):
    endpoint: str = field(init=False, compare=False, repr=False)  # the instance's URI
    key: str = field(init=False, compare=False, repr=False)  # owner/name/URI: mesh-wide id

    def __post_init__(self) -> None:
        host = f"[{self.host}]" if ":" in self.host else self.host
        endpoint = f"{self.protocol.value}://{host}:{self.port}{self.path}"
        object.__setattr__(self, "endpoint", endpoint)
        object.__setattr__(self, "key", f"{self.node}/{self.name}/{endpoint}")

    def tag(self, key: str) -> str:
        for k, v in self.tags:
            if k == key:
                return v
        return ""

    @property
    def site(self) -> str:
        return self.tag("site")

    @property
    def zone(self) -> str:
        return self.tag("zone")

    @property
    def version(self) -> str:
        return self.tag("version")


# -- names, URIs, tags ---------------------------------------------------------------------


def check_service_name(raw: str) -> str:
    """A person's service name, lower-cased and checked; CatalogError says what is wrong."""
    name = raw.strip().lower()
    if not name:
        raise CatalogError("service name is empty")
    if len(name) > MAX_NAME_LEN:
        raise CatalogError(f"service name {raw!r} is longer than {MAX_NAME_LEN} characters")
    if not _LABEL.match(name):
        raise CatalogError(
            f"service name {raw!r} must be letters, digits and '-' (one DNS label, "
            "not starting or ending with '-')"
        )
    if name in RESERVED_NAMES:
        raise CatalogError(f"service name {name!r} is reserved")
    return name


def _check_host(host: str, uri: str) -> str:
    if not host:
        raise CatalogError(f"URI {uri!r} has no host")
    if host.startswith("["):
        if not host.endswith("]"):
            raise CatalogError(f"URI {uri!r}: unterminated '[' in the host")
        try:
            return str(ipaddress.IPv6Address(host[1:-1]))
        except ValueError:
            raise CatalogError(f"URI {uri!r}: {host!r} is not an IPv6 address") from None
    if len(host) > MAX_HOST_LEN:
        raise CatalogError(f"URI {uri!r}: host is longer than {MAX_HOST_LEN} characters")
    try:
        return str(ipaddress.IPv4Address(host))
    except ValueError:
        pass
    labels = host.rstrip(".").split(".")
    if not all(_HOST_LABEL.match(label) for label in labels) or labels[-1].isdigit():
        raise CatalogError(f"URI {uri!r}: {host!r} is not a host name or IP address")
    return host.rstrip(".").lower()


def _split_host_port(authority: str, uri: str) -> tuple[str, str | None]:
    if authority.startswith("["):
        end = authority.find("]")
        if end < 0:
            raise CatalogError(f"URI {uri!r}: unterminated '[' in the host")
        rest = authority[end + 1 :]
        if rest and not rest.startswith(":"):
            raise CatalogError(f"URI {uri!r}: unexpected {rest!r} after the IPv6 address")
        return authority[: end + 1], (rest[1:] if rest else None)
    if authority.count(":") > 1:
        raise CatalogError(f"URI {uri!r}: an IPv6 host must be in brackets, e.g. [::1]")
    host, sep, port = authority.partition(":")
    return host, (port if sep else None)


def _check_port(port_text: str | None, protocol: Protocol, uri: str) -> int:
    if port_text is None:
        return DEFAULT_PORTS[protocol.value]
    if not port_text.isdigit() or len(port_text) > 5 or not 0 < int(port_text) < 65536:
        raise CatalogError(f"URI {uri!r}: port {port_text!r} is not a number from 1 to 65535")
    return int(port_text)


def _check_path(path: str, uri: str) -> str:
    path = path.rstrip("/")
    if len(path) > MAX_PATH_LEN:
        raise CatalogError(f"URI {uri!r}: path is longer than {MAX_PATH_LEN} characters")
    if not _PATH.match(path):
        raise CatalogError(f"URI {uri!r}: path {path!r} has characters a URI path may not have")
    return path


def parse_uri(uri: str) -> tuple[Protocol, str, int, str]:
    """``coap://HOST:PORT[/path]`` -> (protocol, host, port, path); CatalogError if not."""
    if len(uri) > MAX_URI_LEN:
        raise CatalogError(f"URI is longer than {MAX_URI_LEN} characters")
    scheme, sep, rest = uri.partition("://")
    if not sep:
        raise CatalogError(f"URI {uri!r} must look like coap://HOST:PORT[/path]")
    try:
        protocol = Protocol(scheme.lower())
    except ValueError:
        raise CatalogError(f"URI {uri!r}: scheme must be coap or mqtt, not {scheme!r}") from None
    if "?" in rest or "#" in rest:
        raise CatalogError(f"URI {uri!r}: a query or fragment is not allowed")
    slash = rest.find("/")
    authority, path = (rest, "") if slash < 0 else (rest[:slash], rest[slash:])
    if "@" in authority:
        raise CatalogError(f"URI {uri!r}: user info ('@') is not allowed")
    host_text, port_text = _split_host_port(authority, uri)
    host = _check_host(host_text, uri)
    return protocol, host, _check_port(port_text, protocol, uri), _check_path(path, uri)


def check_tags(tags: Mapping[str, str] | Iterable[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    """Tags as sorted pairs; CatalogError names a bad key or value."""
    pairs = list(tags.items()) if isinstance(tags, Mapping) else list(tags)
    if len(pairs) > MAX_TAGS:
        raise CatalogError(f"at most {MAX_TAGS} tags, not {len(pairs)}")
    seen: dict[str, str] = {}
    for key, value in pairs:
        if not isinstance(key, str) or not _TAG_KEY.match(key):
            raise CatalogError(f"tag key {key!r} must be lower-case letters, digits, '_.-'")
        if not isinstance(value, str) or not _TAG_VALUE.match(value):
            raise CatalogError(f"tag {key}: value {value!r} must be 1-64 printable characters")
        if key in seen:
            raise CatalogError(f"tag {key!r} given twice")
        seen[key] = value
    return tuple(sorted(seen.items()))


def parse_tag(text: str) -> tuple[str, str]:
    """``KEY=VALUE`` (the CLI's ``--tag``) -> (key, value)."""
    key, sep, value = text.partition("=")
    if not sep:
        raise CatalogError(f"tag {text!r} must look like KEY=VALUE")
    return check_tags([(key.strip().lower(), value.strip())])[0]


def make_instance(
    name: str,
    uri: str,
    *,
    weight: int = DEFAULT_WEIGHT,
    tags: Mapping[str, str] | Iterable[tuple[str, str]] = (),
    node: str = "",
) -> Instance:
    """An instance from a person's input (config, CLI, control API); CatalogError if bad."""
    if isinstance(weight, bool) or not isinstance(weight, int) or not 1 <= weight <= MAX_WEIGHT:
        raise CatalogError(f"weight {weight!r} must be a whole number from 1 to {MAX_WEIGHT}")
    protocol, host, port, path = parse_uri(uri)
    return Instance(
        check_service_name(name), protocol, host, port, path, weight, check_tags(tags), node
    )


# -- the replicated value ------------------------------------------------------------------


def encode_instances(instances: Iterable[Instance]) -> StateValue:
    """The value a node publishes under STATE_KEY; CatalogError if over the budget.

    One instance per (name, endpoint): the same one twice is kept once, two that differ
    (say in weight) are refused, since a receiver could not tell which is meant.
    """
    unique: dict[tuple[str, str], Instance] = {}
    for inst in instances:
        held = unique.setdefault((inst.name, inst.endpoint), inst)
        if held != inst:
            raise CatalogError(f"{inst.name} at {inst.endpoint} given twice, differently")
    items: list[StateValue] = []
    for _, inst in sorted(unique.items()):
        tags: dict[str, StateValue] = dict(inst.tags)
        items.append(
            [inst.name, inst.protocol.value, inst.host, inst.port, inst.path, inst.weight, tags]
        )
    if len(items) > MAX_INSTANCES_PER_NODE:
        raise CatalogError(f"{len(items)} instances on one node; at most {MAX_INSTANCES_PER_NODE}")
    value: StateValue = {"v": VALUE_VERSION, "i": items}
    size = len(msgpack.packb(value, use_bin_type=True))
    if size > MAX_VALUE_BYTES:
        raise CatalogError(f"service list is {size} bytes packed; at most {MAX_VALUE_BYTES}")
    return value


def _decode_one(item: object, owner: str) -> Instance:
    if not isinstance(item, list) or len(item) != 7:
        raise CatalogError("instance is not a list of 7 fields")
    name, proto, host, port, path, weight, tags = item
    if not isinstance(name, str) or not _LABEL.match(name) or name in RESERVED_NAMES:
        raise CatalogError("bad service name")
    if not isinstance(proto, str) or proto not in DEFAULT_PORTS:
        raise CatalogError("bad protocol")
    if not isinstance(host, str) or not 0 < len(host) <= MAX_HOST_LEN:
        raise CatalogError("bad host")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise CatalogError("bad port")
    if not isinstance(path, str) or len(path) > MAX_PATH_LEN or not _PATH.match(path):
        raise CatalogError("bad path")
    if isinstance(weight, bool) or not isinstance(weight, int) or not 1 <= weight <= MAX_WEIGHT:
        raise CatalogError("bad weight")
    if not isinstance(tags, dict):
        raise CatalogError("tags are not a map")
    canonical_host = _check_host(f"[{host}]" if ":" in host else host, "(replicated)")
    if canonical_host != host:
        raise CatalogError("host is not in canonical form")
    return Instance(
        name, Protocol(proto), host, port, path, weight, check_tags(tags.items()), owner
    )


def decode_instances(owner: str, value: object) -> tuple[Instance, ...]:
    """``owner``'s published value -> its instances. Total: only CatalogError escapes."""
    if value is None:
        return ()
    if not isinstance(value, dict) or value.get("v") != VALUE_VERSION:
        raise CatalogError("not a version-1 service list")
    items = value.get("i")
    if not isinstance(items, list) or len(items) > MAX_INSTANCES_PER_NODE:
        raise CatalogError("instance list missing or too long")
    try:
        found = tuple(_decode_one(item, owner) for item in items)
    except CatalogError:
        raise
    except Exception as exc:  # defensive: the value came from the network
        raise CatalogError(f"undecodable instance: {type(exc).__name__}") from None
    if len({i.key for i in found}) != len(found):
        raise CatalogError("duplicate instance")
    return found


# -- the healthy view ----------------------------------------------------------------------


class InstanceState(StrEnum):
    """What ``edgeagent services`` shows for an instance."""

    HEALTHY = "healthy"
    SUSPECT = "suspect"  # its node is suspected: used only when nothing healthy is left
    EJECTED = "ejected"  # the balancer's outlier detection took it out for a while
    DOWN = "down"  # its node is dead or left


@dataclass
class Catalog:
    """The mesh's instances, by owner, and the member states that decide which are usable."""

    local: str
    _by_node: dict[str, tuple[Instance, ...]] = field(default_factory=dict)
    _members: dict[str, MemberState] = field(default_factory=dict)
    _by_service: dict[str, list[Instance]] | None = None
    stats: dict[str, int] = field(
        default_factory=lambda: {"bad_values": 0, "values": 0, "withdrawn": 0}
    )

    def on_member(self, name: str, state: MemberState) -> None:
        """The member table's state of ``name`` changed."""
        self._members[name] = state

    def on_reaped(self, name: str) -> None:
        """``name`` is gone from the member table: forget it and its instances."""
        self._members.pop(name, None)
        if self._by_node.pop(name, None) is not None:
            self._by_service = None

    def on_state(self, owner: str, value: object) -> bool:
        """``owner``'s STATE_KEY changed (None: deleted). False if the value was dropped."""
        try:
            found = decode_instances(owner, value)
        except CatalogError:
            self.stats["bad_values"] += 1
            found = ()
            ok = False
        else:
            self.stats["values" if found else "withdrawn"] += 1
            ok = True
        if found:
            self._by_node[owner] = found
        else:
            self._by_node.pop(owner, None)
        self._by_service = None
        return ok

    def state_of(self, node: str) -> MemberState | None:
        return MemberState.ALIVE if node == self.local else self._members.get(node)

    def _index(self) -> dict[str, list[Instance]]:
        if self._by_service is None:
            index: dict[str, list[Instance]] = {}
            for node in sorted(self._by_node):
                for inst in self._by_node[node]:
                    index.setdefault(inst.name, []).append(inst)
            self._by_service = index
        return self._by_service

    def services(self) -> list[str]:
        """Every service name some node publishes, sorted."""
        return sorted(self._index())

    def services_of(self, node: str) -> set[str]:
        """The service names ``node`` publishes instances of (empty if none)."""
        return {inst.name for inst in self._by_node.get(node, ())}

    def instances(self, service: str) -> list[Instance]:
        """Every published instance of ``service`` (whatever its health), in a stable order."""
        return list(self._index().get(service, ()))

    def instance_state(self, inst: Instance, ejected: Collection[str] = ()) -> InstanceState:
        state = self.state_of(inst.node)
        if state not in (MemberState.ALIVE, MemberState.SUSPECT):
            return InstanceState.DOWN
        if inst.key in ejected:
            return InstanceState.EJECTED
        return InstanceState.HEALTHY if state == MemberState.ALIVE else InstanceState.SUSPECT

    def healthy(self, service: str, ejected: Collection[str] = ()) -> list[Instance]:
        """The instances a request may go to (see the module docstring)."""
        states = [(i, self.instance_state(i, ejected)) for i in self.instances(service)]
        alive = [i for i, s in states if s == InstanceState.HEALTHY]
        return alive or [i for i, s in states if s == InstanceState.SUSPECT]

    def dns_nodes(self, service: str, ejected: Collection[str] = ()) -> list[str]:
        """The nodes whose agents mesh DNS answers for ``SERVICE.mesh`` (no duplicates)."""
        return list(dict.fromkeys(i.node for i in self.healthy(service.lower(), ejected)))

    def rows(self, ejected: Collection[str] = ()) -> list[dict[str, object]]:
        """``edgeagent services --json``: {name, protocol, node, endpoint, state, weight, tags}."""
        return [
            {
                "name": inst.name,
                "protocol": inst.protocol.value,
                "node": inst.node,
                "endpoint": inst.endpoint,
                "state": self.instance_state(inst, ejected).value,
                "weight": inst.weight,
                "tags": dict(inst.tags),
            }
            for service in self.services()
            for inst in self.instances(service)
        ]
