"""MQTT's data representations (MQTT 5 section 1.5, the same at level 4): the two error types,
a bounds-checked reader and a writer.

The reader never indexes past its slice: every read checks the length first and raises
`MqttDecodeError(MALFORMED_PACKET)`, so a decoder built on it is total. Strings are checked
as the spec says a receiver must (well-formed UTF-8, no U+0000, section 1.5.4); the writer
refuses what a receiver would refuse, with `MqttEncodeError` (local misuse).
"""

from __future__ import annotations

import struct

from overlay.mqtt.packets import Packet, Reason

MAX_VARINT = 268_435_455  # four 7-bit groups (section 1.5.5)
MAX_VARINT_BYTES = 4
MAX_U16 = 0xFFFF
MAX_U32 = 0xFFFF_FFFF

_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")


class MqttDecodeError(Exception):
    """The peer sent something MQTT forbids; `reason` says what to answer (CONNACK or
    DISCONNECT at level 5; at level 4 the broker just closes, or answers CONNACK when a
    level-4 return code exists). The only exception the decoder raises.

    `packets` holds the packets decoded from the same `feed` call before the bad one, in
    order: they were valid and the broker may act on them before it closes.
    """

    def __init__(self, reason: Reason, message: str, packets: tuple[Packet, ...] = ()) -> None:
        super().__init__(f"{reason.name}: {message}")
        self.reason = reason
        self.message = message
        self.packets = packets


class MqttEncodeError(ValueError):
    """The caller asked to encode a packet MQTT forbids (local misuse, never the peer's)."""


def malformed(message: str) -> MqttDecodeError:
    return MqttDecodeError(Reason.MALFORMED_PACKET, message)


def protocol_error(message: str) -> MqttDecodeError:
    return MqttDecodeError(Reason.PROTOCOL_ERROR, message)


def parse_varint(
    data: bytes | bytearray, pos: int, end: int | None = None
) -> tuple[int, int] | None:
    """(value, bytes used) of the variable byte integer at `pos` (before `end`); None if it
    is cut short.

    Raises MALFORMED_PACKET for a fifth byte or a non-minimal encoding ([MQTT-1.5.5-1]).
    """
    value = 0
    stop = len(data) if end is None else end
    for i in range(MAX_VARINT_BYTES):
        if pos + i >= stop:
            return None
        byte = data[pos + i]
        value |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            if i and not byte:
                raise malformed("variable byte integer not in its shortest form")
            return value, i + 1
    raise malformed("variable byte integer longer than 4 bytes")


def decode_utf8(raw: bytes) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise malformed(f"ill-formed UTF-8 string at byte {exc.start}") from None
    if "\x00" in text:
        raise malformed("UTF-8 string contains U+0000")
    return text


class Reader:
    """Reads one packet's body (or a part of it) front to back."""

    __slots__ = ("_data", "_pos", "_end")

    def __init__(self, data: bytes, pos: int = 0, end: int | None = None) -> None:
        self._data = data
        self._pos = pos
        self._end = len(data) if end is None else end

    @property
    def remaining(self) -> int:
        return self._end - self._pos

    def _take(self, n: int, what: str) -> bytes:
        if n > self._end - self._pos:
            raise malformed(f"{what} runs past the end of the packet")
        start = self._pos
        self._pos += n
        return self._data[start : self._pos]

    def u8(self, what: str) -> int:
        return self._take(1, what)[0]

    def u16(self, what: str) -> int:
        value: int = _U16.unpack(self._take(2, what))[0]
        return value

    def u32(self, what: str) -> int:
        value: int = _U32.unpack(self._take(4, what))[0]
        return value

    def varint(self, what: str) -> int:
        parsed = parse_varint(self._data, self._pos, self._end)
        if parsed is None:
            raise malformed(f"{what} runs past the end of the packet")
        self._pos += parsed[1]
        return parsed[0]

    def binary(self, what: str) -> bytes:
        return self._take(self.u16(what), what)

    def string(self, what: str) -> str:
        return decode_utf8(self.binary(what))

    def rest(self) -> bytes:
        return self._take(self.remaining, "rest")

    def sub(self, n: int, what: str) -> Reader:
        """A reader of the next `n` bytes (a property block); this one skips them."""
        if n > self._end - self._pos:
            raise malformed(f"{what} runs past the end of the packet")
        start = self._pos
        self._pos += n
        return Reader(self._data, start, self._pos)

    def done(self, what: str) -> None:
        if self._pos != self._end:
            raise malformed(f"{self._end - self._pos} unexpected bytes after {what}")


def encode_utf8(text: str, what: str) -> bytes:
    try:
        raw = text.encode("utf-8")
    except UnicodeEncodeError:
        raise MqttEncodeError(f"{what}: not encodable as UTF-8 (lone surrogate)") from None
    if "\x00" in text:
        raise MqttEncodeError(f"{what}: contains U+0000")
    if len(raw) > MAX_U16:
        raise MqttEncodeError(f"{what}: {len(raw)} bytes, at most {MAX_U16}")
    return raw


def varint_bytes(value: int, what: str) -> bytes:
    if not 0 <= value <= MAX_VARINT:
        raise MqttEncodeError(f"{what}: {value} outside 0..{MAX_VARINT}")
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def check_range(value: int, low: int, high: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise MqttEncodeError(f"{what}: {value!r} outside {low}..{high}")
    return value


class Writer:
    """Builds one packet's variable header and payload."""

    __slots__ = ("buf",)

    def __init__(self) -> None:
        self.buf = bytearray()

    def u8(self, value: int, what: str) -> None:
        self.buf.append(check_range(value, 0, 0xFF, what))

    def u16(self, value: int, what: str) -> None:
        self.buf += _U16.pack(check_range(value, 0, MAX_U16, what))

    def u32(self, value: int, what: str) -> None:
        self.buf += _U32.pack(check_range(value, 0, MAX_U32, what))

    def varint(self, value: int, what: str) -> None:
        self.buf += varint_bytes(value, what)

    def binary(self, value: bytes, what: str) -> None:
        if len(value) > MAX_U16:
            raise MqttEncodeError(f"{what}: {len(value)} bytes, at most {MAX_U16}")
        self.buf += _U16.pack(len(value))
        self.buf += value

    def string(self, value: str, what: str) -> None:
        raw = encode_utf8(value, what)
        self.buf += _U16.pack(len(raw))
        self.buf += raw

    def raw(self, value: bytes) -> None:
        self.buf += value
