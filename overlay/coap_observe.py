"""CoAP Observe (RFC 7641) through the mesh, sans-IO: registrations, bounds, the stream format.

How it works
------------
A local client's GET (or FETCH) with ``Observe: 0`` (:func:`is_registration`) is a
registration. The ingress agent picks an instance as for any request and keeps one
long-lived exchange open to it:

- an instance of its own: one upstream observation (the adapter's aiocoap client);
- another node's: one channel stream. The request is the ordinary channel envelope of
  :mod:`overlay.coap_route` with the first byte :data:`OBSERVE_ENVELOPE` (2) instead of 1
  (:func:`encode_observe_request`), so the owner tells it apart by one byte and an agent
  without Observe support refuses it as malformed. The owner registers upstream and answers
  on the same stream with a sequence of frames (:func:`encode_notification`)::

      length u32 (of what follows) | status u8 (ReplyStatus) | CoAP message (RFC 7252 3)

  the first being the initial response, each later one a notification. The owner ends the
  stream after the frame that ends the observation (a non-2.xx code or a message without
  Observe, RFC 7641 3.2, or a failure status); either side's RESET cancels it.

The ingress numbers what it sends the client itself (:class:`Sequence`, RFC 7641 4.4:
strictly increasing 24-bit values per registration), so notifications stay fresh even when
a registration is renewed on another instance.

Ends, and what the client gets:

- the upstream ends it: its last message is passed on as the last (without Observe);
- the client deregisters (a RST to a notification, or a GET with ``Observe: 1``, which
  aiocoap reports as loss of interest): the ingress RESETs the stream, the owner cancels
  its upstream observation (aiocoap RSTs the next notification, which frees the server's);
- the path fails once notifications flow (the channel or the owner dies, the owner's
  upstream observation ends without a last message, a failure frame): the ingress moves the
  observation (:class:`Moves`): it registers again with the balancer, the failed instance
  picked only if nothing else is usable, and relays the new instance's first response as the
  next notification, so the client sees one observation go on (the reason the ingress does
  its own numbering). At most :data:`MAX_MOVES` moves in a row with no notification
  between them, the first at once, then after :data:`MOVE_BACKOFF_S` doubling; when no move
  is left, or no instance answers the new registration, the client gets a final 5.02
  without Observe (:func:`final_failure`), so it knows to register again itself;
- the path goes silent: no frame within the last one's freshness (:func:`silence_limit`: its
  Max-Age, 60 s when absent, plus :data:`SILENCE_MARGIN_S`). A server keeps what it sent
  fresh (RFC 7641 4.3.1); one that stopped, say restarted and so forgot its observers while
  its node's agent lives on, is registered at again, as a client re-registers once its
  notification is stale (3.3.1): the balancer picks again (the same instance is fine, nothing
  failed), and the first response is relayed as the next notification.

Bounds (:class:`Registry`): at most :data:`MAX_PER_CLIENT` observations per local client
address at the ingress, :data:`MAX_PER_PEER` per channel peer at the owner, and
:data:`MAX_OBSERVATIONS` per agent on each side; one over is answered 5.03 at once and
counted. A notification frame is at most one CoAP message (:data:`MAX_FRAME`), and
:class:`NotificationReader` buffers at most one frame: a longer length is a
:class:`~overlay.coap_route.CoapFormatError`, the only error it raises.
"""

from __future__ import annotations

import struct
from collections import Counter
from collections.abc import Hashable

from . import coap_route as cr

OBSERVE_ENVELOPE = 2  # first byte of an observe registration on the channel (1: a request)
MAX_PER_CLIENT = 16  # observations of one local client address, at the ingress
MAX_PER_PEER = 16  # observations one channel peer holds at this owner
MAX_OBSERVATIONS = 128  # per agent, each side (the channel serves 256 streams at once)
MAX_FRAME = 1 + cr.MAX_MESSAGE_BYTES  # status byte + one CoAP message
SEQUENCE_MODULUS = 1 << 24  # RFC 7641 4.4: Observe values are 24 bits
MAX_MOVES = 3  # moves of one observation in a row with no notification between (Moves)
MOVE_BACKOFF_S = 0.5  # wait before the second move in a row; doubles after
DEFAULT_MAX_AGE_S = 60  # RFC 7252 5.10.5: a response's freshness when it has no Max-Age
MAX_AGE_MAX_S = 0xFFFFFFFF  # the option is at most 4 bytes; a longer value counts as this
SILENCE_MARGIN_S = 2.0  # past the last frame's Max-Age before an observation counts as silent
_LEN = struct.Struct("!I")


def is_registration(code: int, observe: bytes | None) -> bool:
    """A GET or FETCH with Observe 0 (the option's value empty or a zero byte)."""
    return code in (1, 5) and observe is not None and int.from_bytes(observe, "big") == 0


def registration_of(msg: cr.Message) -> bool:
    """:func:`is_registration` for a message as :mod:`overlay.coap_route` holds it."""
    values = msg.values(cr.OBSERVE)
    return len(values) == 1 and is_registration(msg.code, values[0])


def registration_options(
    msg: cr.Message, route: cr.Route, prefix: tuple[str, ...]
) -> tuple[cr.Option, ...]:
    """The upstream options of a registration: the routed ones plus ``Observe: 0``."""
    options = (*cr.upstream_options(msg, route, prefix, route.hop_limit), (cr.OBSERVE, b""))
    return tuple(sorted(options, key=lambda o: o[0]))


def encode_observe_request(req: cr.MeshRequest) -> bytes:
    return bytes([OBSERVE_ENVELOPE]) + cr.encode_request(req)[1:]


def decode_observe_request(data: bytes) -> cr.MeshRequest:
    """An observe registration from the channel. Total: only CoapFormatError escapes."""
    if not data or data[0] != OBSERVE_ENVELOPE:
        raise cr.CoapFormatError("not an observe registration")
    req = cr.decode_request(bytes([cr.ENVELOPE_VERSION]) + data[1:])
    if not registration_of(req.message):
        raise cr.CoapFormatError("an observe envelope without Observe: 0")
    return req


def encode_notification(status: cr.ReplyStatus, msg: cr.Message) -> bytes:
    body = cr.encode_reply(status, msg)
    return _LEN.pack(len(body)) + body


class NotificationReader:
    """Frames out of a stream's bytes, as they come. Holds at most one frame."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[tuple[cr.ReplyStatus, cr.Message]]:
        self._buffer += data
        out: list[tuple[cr.ReplyStatus, cr.Message]] = []
        while len(self._buffer) >= _LEN.size:
            (length,) = _LEN.unpack_from(self._buffer)
            if not 5 <= length <= MAX_FRAME:
                self._buffer.clear()
                raise cr.CoapFormatError(f"notification frame of {length} bytes")
            if len(self._buffer) < _LEN.size + length:
                break
            frame = bytes(self._buffer[_LEN.size : _LEN.size + length])
            del self._buffer[: _LEN.size + length]
            out.append(cr.decode_reply(frame))
        return out

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame held."""
        return len(self._buffer)


def ends_observation(status: cr.ReplyStatus, msg: cr.Message) -> bool:
    """This frame is the last (RFC 7641 3.2: an error, or a response without Observe)."""
    return status != cr.ReplyStatus.ANSWERED or msg.code >> 5 != 2 or not msg.values(cr.OBSERVE)


def silence_limit(msg: cr.Message) -> float:
    """Seconds without a frame after ``msg`` before its observation counts as silent."""
    values = msg.values(cr.MAX_AGE)
    age = min(int.from_bytes(values[0], "big"), MAX_AGE_MAX_S) if values else DEFAULT_MAX_AGE_S
    return age + SILENCE_MARGIN_S


class Sequence:
    """The Observe values the ingress sends one client: 0, 1, 2, ... modulo 2^24."""

    def __init__(self) -> None:
        self._next = 0

    def next(self) -> int:
        value = self._next
        self._next = (self._next + 1) % SEQUENCE_MODULUS
        return value


class Moves:
    """When one observation moves to another instance (see the module docstring)."""

    def __init__(self, limit: int = MAX_MOVES, backoff_s: float = MOVE_BACKOFF_S) -> None:
        self.limit, self.backoff_s = limit, backoff_s
        self.in_a_row = 0  # moves since the last notification delivered
        self.total = 0

    def may_move(self) -> bool:
        return self.in_a_row < self.limit

    def should_move(self, status: cr.ReplyStatus, registered: bool) -> bool:
        """This frame is a failure of the path (not the resource's answer) and we may move."""
        return registered and status != cr.ReplyStatus.ANSWERED and self.may_move()

    def delivered(self) -> None:
        """A notification reached the client: the path works again."""
        self.in_a_row = 0

    def move(self) -> float:
        """Count one move; the seconds to wait before registering again."""
        delay = 0.0 if self.in_a_row == 0 else self.backoff_s * 2 ** (self.in_a_row - 1)
        self.in_a_row += 1
        self.total += 1
        return delay


def for_client(msg: cr.Message, observe: int | None) -> cr.Message:
    """``msg`` with its Observe option replaced by ``observe`` (None: removed, the last)."""
    options = tuple(o for o in msg.options if o[0] != cr.OBSERVE)
    if observe is not None:
        options = tuple(
            sorted((*options, (cr.OBSERVE, cr.uint_option(observe))), key=lambda o: o[0])
        )
    return cr.Message(msg.code, options, msg.payload, msg.mtype)


def final_failure(failure: cr.Failure, why: str) -> cr.Message:
    """What the client gets when the mesh ends its observation (5.02, 5.03, 5.04)."""
    return cr.refusal_message(cr.Refusal(failure, why))


class Registry:
    """Observations held, by key (a client address, a peer), bounded per key and in total."""

    def __init__(self, per_key: int, total: int) -> None:
        if per_key < 1 or total < 1:
            raise ValueError("observation limits must be at least 1")
        self.per_key, self.total = per_key, total
        self._held: Counter[Hashable] = Counter()
        self._total = 0
        self.refused = 0

    def admit(self, key: Hashable) -> bool:
        """Take one slot for ``key``; False (and counted) when a bound is reached."""
        if self._held.get(key, 0) >= self.per_key or self._total >= self.total:
            self.refused += 1
            return False
        self._held[key] += 1
        self._total += 1
        return True

    def release(self, key: Hashable) -> None:
        held = self._held.get(key, 0)
        if not held:
            return
        self._total -= 1
        if held == 1:
            del self._held[key]
        else:
            self._held[key] = held - 1

    def held(self, key: Hashable | None = None) -> int:
        return self._total if key is None else self._held.get(key, 0)
