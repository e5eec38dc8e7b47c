"""Which CoAP devices on the LAN become mesh services, and which mesh services the LAN sees.

Sans-IO rules for the agent's mDNS service import and export (the zeroconf side is
``edgeagent/features/services_mdns.py``). Nothing here opens a socket or reads a clock.

Import. A device announcing :data:`COAP_SERVICE_TYPE` (``_coap._udp.local.``) becomes an
instance owned by the agent that sees it: :func:`classify_device` turns one resolved
announcement into an :class:`~overlay.catalog.Instance` (tag ``src=mdns``) or a refusal
reason (:data:`REFUSALS`). The service name is the TXT ``svc`` value if there is one, else
the instance label; either is lower-cased, spaces and ``_`` become ``-``, and it must then
be a valid service name (one DNS label, :func:`overlay.catalog.check_service_name`): a
hostile or odd name is refused, never rewritten into something else. The TXT record is
refused above :data:`MAX_TXT_BYTES` (the caller checks the raw size before decoding); an
optional TXT ``path`` must be a URI path. The address must be on a link of ours
(:class:`overlay.mdns.Links`, the agent-discovery rule). An announcement carrying the
:data:`EXPORT_MARK` TXT key is some agent's export of a mesh service (maybe our own):
refused as ``mesh_export``, so services never loop through the LAN. :class:`ImportTable`
holds at most :data:`MAX_IMPORTED` devices (more are refused as ``full``) and forgets one
when its announcement is withdrawn (goodbye or expiry).

Export. :func:`export_names` picks the services the agent announces on its LAN: every
service with a healthy instance that is not a device this agent imported (the LAN already
sees those directly), at most :data:`MAX_EXPORTED`, sorted. Each is announced as instance
``SERVICE._coap._udp.local.`` at the agent's address and CoAP port, TXT ``ea=1`` (the
mark) and ``path=/mesh/SERVICE`` (the router's path form), so a plain mDNS client that
browses ``_coap._udp`` finds it.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import TYPE_CHECKING

from .catalog import Catalog, CatalogError, Instance, check_service_name, make_instance

if TYPE_CHECKING:
    from .mdns import Links  # imported for the type only: overlay.mdns imports zeroconf

COAP_SERVICE_TYPE = "_coap._udp.local."
MAX_IMPORTED = 16  # devices one agent imports (half of catalog.MAX_INSTANCES_PER_NODE)
MAX_EXPORTED = 16  # mesh services one agent announces on its LAN
MAX_TXT_BYTES = 400  # a device's TXT record, raw; larger is refused before decoding
MAX_LABEL_BYTES = 63  # an mDNS instance name is one DNS label (RFC 6763 4.1.1)
EXPORT_MARK = "ea"  # TXT key on the agents' exports ("ea=1")
IMPORT_TAG = ("src", "mdns")

REFUSALS = (
    "txt_too_big", "bad_name", "bad_txt", "bad_port", "no_address", "off_link", "loopback",
    "mesh_export", "rate_limited", "full", "over_budget",
)  # fmt: skip


def _text(raw: object) -> str | None:
    if raw is None:
        return None
    if isinstance(raw, bytes):
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return "\ufffd"  # never valid below
    return str(raw)


def instance_label(name: str) -> str | None:
    """The instance label of ``LABEL._coap._udp.local.``, or None if it is not one."""
    suffix = "." + COAP_SERVICE_TYPE
    if not name.endswith(suffix):
        return None
    label = name[: -len(suffix)]
    if not label or len(label.encode("utf-8", "replace")) > MAX_LABEL_BYTES:
        return None
    if not label.isprintable():
        return None
    return label


def service_name_of(label: str, txt_svc: str | None) -> str:
    """The mesh service name a device is imported as; CatalogError if it is not usable."""
    raw = txt_svc if txt_svc is not None else label
    return check_service_name(raw.strip().lower().replace(" ", "-").replace("_", "-"))


def classify_device(
    name: str,
    properties: Mapping[object, object],
    addresses: Sequence[str],
    port: int | None,
    *,
    links: Links,
    node: str,
) -> Instance | str:
    """One resolved ``_coap._udp`` announcement -> an instance owned by ``node``, or why not."""
    label = instance_label(name)
    if label is None:
        return "bad_name"
    props: dict[str, str | None] = {}
    for key, value in properties.items():
        text_key = _text(key)
        if text_key is None or not text_key.isprintable():
            return "bad_txt"
        props[text_key.lower()] = _text(value)
    if EXPORT_MARK in props:
        return "mesh_export"
    try:
        service = service_name_of(label, props.get("svc"))
    except CatalogError:
        return "bad_name"
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        return "bad_port"
    addr, refusal = links.pick(addresses)
    if not addr:
        return refusal
    path = props.get("path") or ""
    host = f"[{addr}]" if ":" in addr else addr
    try:
        return make_instance(service, f"coap://{host}:{port}{path}", tags=[IMPORT_TAG], node=node)
    except CatalogError:
        return "bad_txt"


class ImportTable:
    """The devices this agent imported, by mDNS instance name, at most ``capacity``."""

    def __init__(self, capacity: int = MAX_IMPORTED) -> None:
        self.capacity = capacity
        self._by_name: dict[str, Instance] = {}

    def __len__(self) -> int:
        return len(self._by_name)

    def offer(self, mdns_name: str, inst: Instance) -> str:
        """``added``, ``updated``, ``same`` or ``full`` (refused: at capacity)."""
        held = self._by_name.get(mdns_name)
        if held is None and len(self._by_name) >= self.capacity:
            return "full"
        if held == inst:
            return "same"
        self._by_name[mdns_name] = inst
        return "added" if held is None else "updated"

    def remove(self, mdns_name: str) -> bool:
        """The announcement went away; True if it had been imported."""
        return self._by_name.pop(mdns_name, None) is not None

    def instances(self) -> list[Instance]:
        """The imported instances, in a stable order (by mDNS name)."""
        return [self._by_name[name] for name in sorted(self._by_name)]


def export_names(
    catalog: Catalog,
    imported: Collection[Instance],
    ejected: Collection[str] = (),
    limit: int = MAX_EXPORTED,
) -> list[str]:
    """The services to announce on this agent's LAN (see the module docstring)."""
    own = {inst.key for inst in imported}
    names = [
        service
        for service in catalog.services()
        if any(inst.key not in own for inst in catalog.healthy(service, ejected))
    ]
    return names[:limit]


def export_txt(service: str) -> dict[str, str]:
    """The TXT properties of an exported mesh service."""
    return {EXPORT_MARK: "1", "path": f"/mesh/{service}"}
