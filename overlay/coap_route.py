"""CoAP routing through the mesh, sans-IO: which request is for which service, what goes upstream.

How it works
------------
The agent serves CoAP to local clients (``edgeagent run --coap``). A request is for the mesh
in one of three forms (:func:`classify`):

- **forward proxy**: ``Proxy-Scheme: coap`` + ``Uri-Host: SERVICE.mesh`` (+ Uri-Path,
  Uri-Query), or one ``Proxy-Uri: coap://SERVICE.mesh[:PORT]/path?query``, which is split
  here into the same parts (RFC 7252 6.4; aiocoap's own proxy refuses it with 5.01);
- **reverse proxy**: ``Uri-Host: SERVICE.mesh`` and no proxy option, on any port (a client
  that resolved ``SERVICE.mesh`` by mesh DNS to its agent);
- **path**: ``coap://AGENT/mesh/SERVICE/rest...`` (Uri-Path ``mesh``, ``SERVICE``, ...).

Anything else is not for the mesh (4.04). A proxy URI for a host outside ``.mesh`` is 5.05
(the agent is not an open proxy). An unsafe-to-forward option the router does not know is
4.02 (RFC 7252 5.7.1: a proxy must not forward what it does not understand).

Hop-Limit (RFC 8768, option 16) is honoured at every agent: absent means
:data:`DEFAULT_HOP_LIMIT`; each agent decrements it and refuses with 5.08 (Hop Limit
Reached) when nothing is left, so a service whose instance points back into the mesh cannot
loop. A value of 0, a repeated or over-long option is malformed (4.00).

The upstream request (:func:`upstream_options`) keeps every other option as sent (ETag,
Content-Format, Accept, If-Match, Block1/Block2, Size1/Size2, ...), replaces the
routing options by the instance's path prefix plus the request's remaining path and query,
and carries the decremented Hop-Limit. Observe is dropped here: a registration (GET or
FETCH with Observe 0) takes the long-lived path of :mod:`overlay.coap_observe` instead, and
any other Observe value (a deregistration) is an ordinary request.

The channel envelope
--------------------
A request for an instance on another node travels over the agent channel as
:func:`encode_request`: version byte 1, the per-try budget in milliseconds (u32), the service
name (u8 length), the instance's endpoint URI (u16 length), then the CoAP message in the UDP
encoding of RFC 7252 3 (NON, message id 0, no token). The reply (:func:`encode_reply`) is one
status byte (:class:`ReplyStatus`: the instance answered, or why the owning agent could not
get an answer) and a CoAP message. Both decoders are total: malformed input raises
:class:`CoapFormatError` and nothing else.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import IntEnum, StrEnum

from .catalog import RESERVED_NAMES

SERVICE_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\Z")  # as overlay.catalog

# -- numbers -------------------------------------------------------------------------------

IF_MATCH, URI_HOST, ETAG, IF_NONE_MATCH, OBSERVE, URI_PORT = 1, 3, 4, 5, 6, 7
LOCATION_PATH, OSCORE, URI_PATH, CONTENT_FORMAT, MAX_AGE, URI_QUERY = 8, 9, 11, 12, 14, 15
HOP_LIMIT, ACCEPT, LOCATION_QUERY, BLOCK2, BLOCK1, SIZE2 = 16, 17, 20, 23, 27, 28
PROXY_URI, PROXY_SCHEME, SIZE1, NO_RESPONSE = 35, 39, 60, 258

# Unsafe-to-forward options the router understands (it rewrites or passes them knowingly).
KNOWN_UNSAFE = frozenset(
    {URI_HOST, OBSERVE, URI_PORT, URI_PATH, URI_QUERY, BLOCK2, BLOCK1, PROXY_URI, PROXY_SCHEME,
     NO_RESPONSE}
)  # fmt: skip
ROUTING_OPTIONS = frozenset(
    {URI_HOST, URI_PORT, URI_PATH, URI_QUERY, PROXY_URI, PROXY_SCHEME, HOP_LIMIT, OBSERVE}
)
DEFAULT_HOP_LIMIT = 16  # RFC 8768 3: what a proxy inserts when the option is absent
MESH_SUFFIX = ".mesh"
PATH_PREFIX = "mesh"  # coap://AGENT/mesh/SERVICE/...

CON, NON, ACK, RST = 0, 1, 2, 3
METHODS = {1: "GET", 2: "POST", 3: "PUT", 4: "DELETE", 5: "FETCH", 6: "PATCH", 7: "IPATCH"}

MAX_MESSAGE_BYTES = 65536  # one CoAP message through the mesh (a UDP datagram at most)
MAX_OPTIONS = 64
MAX_OPTION_BYTES = 1034  # Proxy-Uri's maximum length (RFC 7252 5.10)
ENVELOPE_VERSION = 1


def code(cls: int, detail: int) -> int:
    return (cls << 5) | detail


def code_text(value: int) -> str:
    """``0x84`` -> ``"4.04"``."""
    return f"{value >> 5}.{value & 0x1F:02d}"


def parse_code(text: str) -> int:
    """``"5.03"`` -> 0xA3; ValueError unless it is a response code (2.00 - 5.31)."""
    cls, sep, detail = text.partition(".")
    if not sep or not cls.isdigit() or not detail.isdigit() or len(detail) != 2:
        raise ValueError(f"{text!r} is not a CoAP code like 5.03")
    c, d = int(cls), int(detail)
    if not 2 <= c <= 5 or d > 31:
        raise ValueError(f"{text!r} is not a CoAP response code")
    return code(c, d)


BAD_REQUEST, BAD_OPTION, NOT_FOUND = code(4, 0), code(4, 2), code(4, 4)
BAD_GATEWAY, SERVICE_UNAVAILABLE, GATEWAY_TIMEOUT = code(5, 2), code(5, 3), code(5, 4)
PROXYING_NOT_SUPPORTED, HOP_LIMIT_REACHED = code(5, 5), code(5, 8)


class Failure(StrEnum):
    """Why the router answers with an error itself, and (``FAILURE_CODES``) with which code."""

    MALFORMED = "malformed"
    BAD_OPTION = "bad_option"
    NOT_MESH = "not_mesh"
    NOT_PROXIED = "not_proxied"  # a proxy URI outside .mesh
    UNKNOWN_SERVICE = "unknown_service"
    NO_HEALTHY = "no_healthy"
    TIMEOUT = "timeout"
    UNREACHABLE = "unreachable"
    HOP_LIMIT = "hop_limit"


FAILURE_CODES: dict[Failure, int] = {
    Failure.MALFORMED: BAD_REQUEST,
    Failure.BAD_OPTION: BAD_OPTION,
    Failure.NOT_MESH: NOT_FOUND,
    Failure.NOT_PROXIED: PROXYING_NOT_SUPPORTED,
    Failure.UNKNOWN_SERVICE: NOT_FOUND,
    Failure.NO_HEALTHY: SERVICE_UNAVAILABLE,
    Failure.TIMEOUT: GATEWAY_TIMEOUT,
    Failure.UNREACHABLE: BAD_GATEWAY,
    Failure.HOP_LIMIT: HOP_LIMIT_REACHED,
}


class CoapFormatError(ValueError):
    """Bytes that are not a CoAP message or a mesh envelope (the only error the decoders raise)."""


Option = tuple[int, bytes]


@dataclass(frozen=True, slots=True)
class Message:
    """A CoAP message: code, options in order (number, raw value), payload."""

    code: int
    options: tuple[Option, ...] = ()
    payload: bytes = b""
    mtype: int = NON
    mid: int = 0
    token: bytes = b""

    def values(self, number: int) -> list[bytes]:
        return [v for n, v in self.options if n == number]

    @property
    def method(self) -> str:
        return METHODS.get(self.code, code_text(self.code))


# -- the CoAP codec (RFC 7252 3) -----------------------------------------------------------


def _ext(value: int) -> tuple[int, bytes]:
    if value < 13:
        return value, b""
    if value < 269:
        return 13, bytes([value - 13])
    return 14, struct.pack("!H", value - 269)


def encode_message(msg: Message) -> bytes:
    """The UDP encoding of ``msg``; ValueError if a field is out of range.

    Written for speed (it runs several times per mesh request on each agent): one bytearray,
    the common option (delta and length both under 13) one byte appended."""
    token, mid = msg.token, msg.mid
    if len(token) > 8 or not 0 <= msg.code <= 255 or not 0 <= msg.mtype <= 3:
        raise ValueError("token, code or type out of range")
    out = bytearray((0x40 | (msg.mtype << 4) | len(token), msg.code, (mid >> 8) & 0xFF, mid & 0xFF))
    out += token
    last = 0
    for number, value in sorted(msg.options, key=_number):  # stable: repeats keep order
        delta, length = number - last, len(value)
        if delta < 13 and length < 13 and delta >= 0:
            out.append((delta << 4) | length)
        elif not 0 <= delta <= 65535 + 269 or length > 65535:
            raise ValueError(f"option {number} out of range")
        else:
            dnib, dext = _ext(delta)
            lnib, lext = _ext(length)
            out.append((dnib << 4) | lnib)
            out += dext
            out += lext
        out += value
        last = number
    if msg.payload:
        out.append(0xFF)
        out += msg.payload
    return bytes(out)


def _number(option: Option) -> int:
    return option[0]


def decode_message(data: bytes) -> Message:
    """A CoAP message from its UDP encoding. Total: only CoapFormatError escapes.

    Written for speed like :func:`encode_message`: the length once, the extended nibbles
    (13: one more byte, 14: two, 15: reserved) inline."""
    if type(data) is not bytes:
        data = bytes(data)
    size = len(data)
    if not 4 <= size <= MAX_MESSAGE_BYTES:
        raise CoapFormatError("message too short or too long")
    first = data[0]
    tkl = first & 0x0F
    if first >> 6 != 1 or tkl > 8 or 4 + tkl > size:
        raise CoapFormatError("bad version or token length")
    pos, number = 4 + tkl, 0
    options: list[Option] = []
    payload = b""
    while pos < size:
        byte = data[pos]
        pos += 1
        if byte == 0xFF:
            if pos == size:
                raise CoapFormatError("payload marker without payload")
            payload = data[pos:]
            break
        delta, length = byte >> 4, byte & 0x0F
        if delta >= 13:
            delta, pos = _read_ext(delta, data, pos, size)
        if length >= 13:
            length, pos = _read_ext(length, data, pos, size)
        end = pos + length
        if end > size or len(options) >= MAX_OPTIONS:
            raise CoapFormatError("truncated option or too many options")
        number += delta
        options.append((number, data[pos:end]))
        pos = end
    mid = (data[2] << 8) | data[3]
    return Message(data[1], tuple(options), payload, (first >> 4) & 3, mid, data[4 : 4 + tkl])


def _read_ext(nibble: int, data: bytes, pos: int, size: int) -> tuple[int, int]:
    if nibble == 13:
        if pos + 1 > size:
            raise CoapFormatError("truncated option")
        return data[pos] + 13, pos + 1
    if nibble == 14:
        if pos + 2 > size:
            raise CoapFormatError("truncated option")
        return ((data[pos] << 8) | data[pos + 1]) + 269, pos + 2
    raise CoapFormatError("reserved option nibble 15")


def uint_option(value: int) -> bytes:
    """A CoAP uint option value: big-endian, no leading zero bytes (0 is empty)."""
    return value.to_bytes((value.bit_length() + 7) // 8, "big")


# -- routing ---------------------------------------------------------------------------------


class Form(StrEnum):
    PROXY = "proxy"  # Proxy-Scheme + Uri-Host, or Proxy-Uri
    REVERSE = "reverse"  # Uri-Host SERVICE.mesh
    PATH = "path"  # /mesh/SERVICE/...


@dataclass(frozen=True, slots=True)
class Route:
    """A mesh request: its form, service, remaining path and query, the hops left after us."""

    form: Form
    service: str
    path: tuple[str, ...]
    query: tuple[str, ...]
    hop_limit: int  # to send on (already decremented, >= 1)


@dataclass(frozen=True, slots=True)
class Refusal:
    """The router answers itself: ``failure`` (its code in FAILURE_CODES) and why."""

    failure: Failure
    diagnostic: str

    @property
    def code(self) -> int:
        return FAILURE_CODES[self.failure]


def next_hop_limit(msg: Message) -> int | Refusal:
    """The Hop-Limit to forward with (RFC 8768), or the refusal (4.00, 5.08)."""
    return _hop_limit(msg.values(HOP_LIMIT))


def _hop_limit(values: Sequence[bytes]) -> int | Refusal:
    if not values:
        hops = DEFAULT_HOP_LIMIT
    elif len(values) > 1 or len(values[0]) != 1 or values[0][0] == 0:
        return Refusal(Failure.MALFORMED, "Hop-Limit must be one option of 1 to 255")
    else:
        hops = values[0][0]
    if hops <= 1:
        return Refusal(Failure.HOP_LIMIT, "hop limit reached")
    return hops - 1


def _texts(values: Iterable[bytes], what: str) -> tuple[str, ...] | Refusal:
    try:
        return tuple(v.decode("utf-8") for v in values)
    except UnicodeDecodeError:
        return Refusal(Failure.MALFORMED, f"{what} is not UTF-8")


def _service_of_host(host: str) -> str | Refusal | None:
    """``SERVICE.mesh`` -> SERVICE; None if the host is not in .mesh."""
    name = host.lower().rstrip(".")
    if not name.endswith(MESH_SUFFIX):
        return None
    return _check_service(name[: -len(MESH_SUFFIX)])


def _check_service(label: str) -> str | Refusal:
    label = label.lower()
    if not SERVICE_LABEL.match(label):
        return Refusal(Failure.MALFORMED, f"{label[:64]!r} is not a service name")
    if label in RESERVED_NAMES:
        return Refusal(Failure.UNKNOWN_SERVICE, f"{label!r} is not a service")
    return label


def _unquote(text: str) -> str | Refusal:
    """RFC 3986 percent-decoding of one URI component (RFC 7252 6.4 step 8-9)."""
    raw = text.encode("utf-8")
    out, i = bytearray(), 0
    while i < len(raw):
        if raw[i] == 0x25:  # '%'
            pair = raw[i + 1 : i + 3]
            if len(pair) != 2 or not all(chr(b) in "0123456789abcdefABCDEF" for b in pair):
                return Refusal(Failure.MALFORMED, "bad percent-escape in Proxy-Uri")
            out.append(int(pair, 16))
            i += 3
        else:
            out.append(raw[i])
            i += 1
    try:
        return out.decode("utf-8")
    except UnicodeDecodeError:
        return Refusal(Failure.MALFORMED, "Proxy-Uri component is not UTF-8")


@dataclass(frozen=True, slots=True)
class SplitUri:
    scheme: str
    host: str
    path: tuple[str, ...]
    query: tuple[str, ...]


def split_proxy_uri(uri: str) -> SplitUri | Refusal:
    """RFC 7252 6.4: an absolute ``coap://host[:port]/path?query`` into its options' values."""
    scheme, sep, rest = uri.partition("://")
    if not sep or not scheme.isascii() or "#" in rest:
        return Refusal(Failure.MALFORMED, "Proxy-Uri must be an absolute URI without fragment")
    rest, _, query_text = rest.partition("?")
    slash = rest.find("/")
    authority, path_text = (rest, "") if slash < 0 else (rest[:slash], rest[slash + 1 :])
    if "@" in authority:
        return Refusal(Failure.MALFORMED, "Proxy-Uri with user info")
    if authority.startswith("["):
        host = authority[: authority.find("]") + 1]
        port = authority[len(host) :]
    else:
        host, colon, port = authority.partition(":")
        port = colon + port
    if port and not (port.startswith(":") and port[1:].isdigit()):
        return Refusal(Failure.MALFORMED, "Proxy-Uri has a bad port")
    parts: list[str] = []
    for piece in [*path_text.split("/")] if path_text else []:
        item = _unquote(piece)
        if isinstance(item, Refusal):
            return item
        parts.append(item)
    queries: list[str] = []
    for piece in query_text.split("&") if query_text else []:
        item = _unquote(piece)
        if isinstance(item, Refusal):
            return item
        queries.append(item)
    host_text = _unquote(host)
    if isinstance(host_text, Refusal):
        return host_text
    return SplitUri(scheme.lower(), host_text, tuple(parts), tuple(queries))


Groups = dict[int, list[bytes]]  # option number -> its values, in order
_SINGLE = (URI_HOST, URI_PORT, PROXY_URI, PROXY_SCHEME, OBSERVE)  # may not repeat


def _check_options(msg: Message) -> Groups | Refusal:
    """The options by number, in one pass; or why they cannot be routed."""
    groups: Groups = {}
    for number, value in msg.options:
        if len(value) > MAX_OPTION_BYTES:
            return Refusal(Failure.MALFORMED, f"option {number} is too long")
        if number & 2 and number not in KNOWN_UNSAFE:
            return Refusal(Failure.BAD_OPTION, f"unsafe option {number} not understood")
        if number in groups:
            groups[number].append(value)
        else:
            groups[number] = [value]
    for number in _SINGLE:
        if len(groups.get(number, ())) > 1:
            return Refusal(Failure.MALFORMED, f"option {number} repeated")
    return groups


def classify(msg: Message) -> Route | Refusal:
    """Which service a request is for, in which form, with what path and Hop-Limit."""
    if msg.code not in METHODS:
        return Refusal(Failure.MALFORMED, "not a request")
    groups = _check_options(msg)
    if isinstance(groups, Refusal):
        return groups
    found = _locate(groups)
    if isinstance(found, Refusal):
        return found
    form, service, path, query = found
    hops = _hop_limit(groups.get(HOP_LIMIT, ()))
    if isinstance(hops, Refusal):
        return hops
    return Route(form, service, path, query, hops)


_TEXT_OPTIONS = (
    (URI_HOST, f"option {URI_HOST}"),
    (URI_PATH, f"option {URI_PATH}"),
    (URI_QUERY, f"option {URI_QUERY}"),
    (PROXY_URI, "Proxy-Uri"),
    (PROXY_SCHEME, "Proxy-Scheme"),
)


def _locate(groups: Groups) -> tuple[Form, str, tuple[str, ...], tuple[str, ...]] | Refusal:
    texts: dict[int, tuple[str, ...]] = {}
    for number, what in _TEXT_OPTIONS:
        values = groups.get(number)
        found = _texts(values, what) if values else ()
        if isinstance(found, Refusal):
            return found
        texts[number] = found
    host, path, query = texts[URI_HOST], texts[URI_PATH], texts[URI_QUERY]
    proxy_uri, scheme = texts[PROXY_URI], texts[PROXY_SCHEME]
    if proxy_uri:
        if host or path or query or scheme or groups.get(URI_PORT):
            return Refusal(Failure.MALFORMED, "Proxy-Uri together with Uri-* or Proxy-Scheme")
        split = split_proxy_uri(proxy_uri[0])
        if isinstance(split, Refusal):
            return split
        return _proxied(split.scheme, split.host, split.path, split.query)
    if scheme:
        if not host:
            return Refusal(Failure.MALFORMED, "Proxy-Scheme without Uri-Host")
        return _proxied(scheme[0].lower(), host[0], path, query)
    if host:
        service = _service_of_host(host[0])
        if isinstance(service, Refusal):
            return service
        if service is not None:
            return Form.REVERSE, service, path, query
    if len(path) >= 2 and path[0] == PATH_PREFIX:
        service = _check_service(path[1])
        if isinstance(service, Refusal):
            return service
        return Form.PATH, service, path[2:], query
    return Refusal(Failure.NOT_MESH, "not a mesh resource: use SERVICE.mesh or /mesh/SERVICE")


def _proxied(
    scheme: str, host: str, path: tuple[str, ...], query: tuple[str, ...]
) -> tuple[Form, str, tuple[str, ...], tuple[str, ...]] | Refusal:
    service = _service_of_host(host)
    if service is None or scheme != "coap":
        return Refusal(Failure.NOT_PROXIED, "this agent proxies only coap://SERVICE.mesh")
    if isinstance(service, Refusal):
        return service
    return Form.PROXY, service, path, query


def instance_path(prefix: str) -> tuple[str, ...] | Refusal:
    """An instance's path prefix (``/a/b%20c``, as published) as Uri-Path segments."""
    parts: list[str] = []
    for piece in prefix.strip("/").split("/") if prefix.strip("/") else []:
        item = _unquote(piece)
        if isinstance(item, Refusal):
            return item
        parts.append(item)
    return tuple(parts)


def upstream_options(
    msg: Message, route: Route, prefix: Sequence[str], hop_limit: int
) -> tuple[Option, ...]:
    """The options of the request to an instance: ``msg``'s, routed to ``prefix + path``."""
    kept = [(n, v) for n, v in msg.options if n not in ROUTING_OPTIONS]
    kept += [(URI_PATH, p.encode()) for p in (*prefix, *route.path)]
    kept += [(URI_QUERY, q.encode()) for q in route.query]
    kept.append((HOP_LIMIT, uint_option(hop_limit)))
    return tuple(sorted(kept, key=lambda o: o[0]))


def refusal_message(refusal: Refusal) -> Message:
    """The response the router sends for ``refusal`` (diagnostic payload, RFC 7252 5.5.2)."""
    return Message(refusal.code, (), refusal.diagnostic.encode()[:128])


# -- the channel envelope ------------------------------------------------------------------


class ReplyStatus(IntEnum):
    """How the owning agent's try went (first byte of a channel reply)."""

    ANSWERED = 0  # the instance answered: the message is its response
    TIMEOUT = 1  # the instance did not answer in time
    UNREACHABLE = 2  # the instance could not be sent to
    REFUSED = 3  # the owner does not (any more) publish that instance, or the request was bad
    HOP_LIMIT = 4  # the owner's Hop-Limit check refused it (a 5.08 in the message)


@dataclass(frozen=True, slots=True)
class MeshRequest:
    service: str
    endpoint: str  # the instance's URI, as in the catalog
    budget_ms: int  # how long the caller waits for this try
    message: Message


def encode_request(req: MeshRequest) -> bytes:
    service, endpoint = req.service.encode(), req.endpoint.encode()
    if len(service) > 255 or len(endpoint) > 65535:
        raise ValueError("service or endpoint too long")
    head = struct.pack("!BI", ENVELOPE_VERSION, max(0, min(req.budget_ms, 0xFFFFFFFF)))
    return (
        head
        + bytes([len(service)])
        + service
        + struct.pack("!H", len(endpoint))
        + endpoint
        + encode_message(req.message)
    )


def decode_request(data: bytes) -> MeshRequest:
    """A channel request. Total: only CoapFormatError escapes."""
    if len(data) < 8 or data[0] != ENVELOPE_VERSION:
        raise CoapFormatError("not a version-1 mesh request")
    budget = struct.unpack_from("!I", data, 1)[0]
    n = data[5]
    service_raw = data[6 : 6 + n]
    pos = 6 + n
    if len(service_raw) != n or pos + 2 > len(data):
        raise CoapFormatError("truncated mesh request")
    m = struct.unpack_from("!H", data, pos)[0]
    endpoint_raw = data[pos + 2 : pos + 2 + m]
    if len(endpoint_raw) != m:
        raise CoapFormatError("truncated mesh request")
    try:
        service, endpoint = service_raw.decode("ascii"), endpoint_raw.decode("utf-8")
    except UnicodeDecodeError:
        raise CoapFormatError("service or endpoint not text") from None
    return MeshRequest(service, endpoint, budget, decode_message(data[pos + 2 + m :]))


def encode_reply(status: ReplyStatus, msg: Message) -> bytes:
    return bytes([status]) + encode_message(msg)


def decode_reply(data: bytes) -> tuple[ReplyStatus, Message]:
    """A channel reply. Total: only CoapFormatError escapes."""
    status = _REPLY_STATUSES.get(data[0]) if data else None
    if status is None:
        raise CoapFormatError("bad reply status")
    return status, decode_message(data[1:])


_REPLY_STATUSES = {int(s): s for s in ReplyStatus}  # not set(ReplyStatus) per reply
