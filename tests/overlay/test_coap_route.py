"""overlay.coap_route: the three request forms, Hop-Limit, option checks, the codecs (fuzzed)."""

from __future__ import annotations

import random
import struct

import pytest

from overlay import coap_route as cr
from overlay.coap_route import (
    HOP_LIMIT,
    PROXY_SCHEME,
    PROXY_URI,
    URI_HOST,
    URI_PATH,
    URI_QUERY,
    CoapFormatError,
    Failure,
    Form,
    MeshRequest,
    Message,
    Refusal,
    ReplyStatus,
    Route,
)

GET, POST = 1, 2


def req(*options: tuple[int, bytes | str], code: int = GET, payload: bytes = b"") -> Message:
    opts = tuple((n, v.encode() if isinstance(v, str) else v) for n, v in options)
    return Message(code, opts, payload)


def route(msg: Message) -> Route:
    got = cr.classify(msg)
    assert isinstance(got, Route), got
    return got


def refusal(msg: Message) -> Refusal:
    got = cr.classify(msg)
    assert isinstance(got, Refusal), got
    return got


def test_forward_proxy_form_with_proxy_scheme() -> None:
    r = route(
        req(
            (PROXY_SCHEME, "coap"),
            (URI_HOST, "Temperature.mesh"),
            (URI_PATH, "room"),
            (URI_PATH, "1"),
            (URI_QUERY, "u=c"),
        )
    )
    assert (r.form, r.service, r.path, r.query, r.hop_limit) == (
        Form.PROXY,
        "temperature",
        ("room", "1"),
        ("u=c",),
        cr.DEFAULT_HOP_LIMIT - 1,
    )


def test_proxy_uri_is_split_with_percent_decoding() -> None:
    r = route(req((PROXY_URI, "coap://temperature.mesh:5683/a%20b/c?x=1&y=%2F")))
    assert (r.form, r.service, r.path, r.query) == (
        Form.PROXY,
        "temperature",
        ("a b", "c"),
        ("x=1", "y=/"),
    )


def test_proxy_uri_errors() -> None:
    assert refusal(req((PROXY_URI, "coap://example.com/x"))).code == cr.PROXYING_NOT_SUPPORTED
    assert refusal(req((PROXY_URI, "http://temperature.mesh/x"))).code == cr.PROXYING_NOT_SUPPORTED
    assert refusal(req((PROXY_URI, "temperature.mesh/x"))).code == cr.BAD_REQUEST
    assert refusal(req((PROXY_URI, "coap://temperature.mesh/%zz"))).code == cr.BAD_REQUEST
    both = req((PROXY_URI, "coap://t.mesh/"), (URI_PATH, "x"))
    assert refusal(both).failure == Failure.MALFORMED


def test_reverse_form_and_path_form() -> None:
    r = route(req((URI_HOST, "temperature.mesh."), (URI_PATH, "now")))
    assert (r.form, r.service, r.path) == (Form.REVERSE, "temperature", ("now",))
    p = route(req((URI_HOST, "localhost"), (URI_PATH, "mesh"), (URI_PATH, "temp"), (URI_PATH, "x")))
    assert (p.form, p.service, p.path) == (Form.PATH, "temp", ("x",))


def test_not_a_mesh_request_and_bad_names() -> None:
    assert refusal(req((URI_PATH, ".well-known"), (URI_PATH, "core"))).code == cr.NOT_FOUND
    assert refusal(req((URI_PATH, "mesh"))).code == cr.NOT_FOUND
    assert refusal(req((URI_HOST, "bad_name.mesh"))).code == cr.BAD_REQUEST
    assert refusal(req((URI_HOST, "node.mesh"))).failure == Failure.UNKNOWN_SERVICE
    assert refusal(req((PROXY_SCHEME, "coap"))).code == cr.BAD_REQUEST
    assert refusal(Message(cr.code(2, 5))).code == cr.BAD_REQUEST  # a response, not a request


def test_hop_limit_decrements_and_is_refused_when_spent() -> None:
    base = ((URI_HOST, b"t.mesh"),)
    assert route(req(*base, (HOP_LIMIT, b"\x05"))).hop_limit == 4
    assert route(req(*base, (HOP_LIMIT, b"\x02"))).hop_limit == 1
    spent = refusal(req(*base, (HOP_LIMIT, b"\x01")))
    assert (spent.failure, spent.code) == (Failure.HOP_LIMIT, cr.HOP_LIMIT_REACHED)
    for bad in (b"", b"\x00", b"\x01\x00"):
        assert refusal(req(*base, (HOP_LIMIT, bad))).code == cr.BAD_REQUEST
    assert refusal(req(*base, (HOP_LIMIT, b"\x05"), (HOP_LIMIT, b"\x05"))).code == cr.BAD_REQUEST


def test_unknown_unsafe_option_is_refused_safe_one_passes() -> None:
    assert refusal(req((URI_HOST, "t.mesh"), (67, b"\x01"))).code == cr.BAD_OPTION  # 67: unsafe
    assert route(req((URI_HOST, "t.mesh"), (65000, b"x"))).service == "t"  # safe-to-forward


def test_upstream_options_keep_the_rest_and_rewrite_routing() -> None:
    msg = req(
        (PROXY_SCHEME, "coap"),
        (URI_HOST, "t.mesh"),
        (cr.ETAG, b"\x01\x02"),
        (cr.OBSERVE, b""),
        (URI_PATH, "x"),
        (cr.CONTENT_FORMAT, b"\x32"),
        (cr.BLOCK2, b"\x16"),
        (URI_QUERY, "q"),
        (HOP_LIMIT, b"\x09"),
        code=POST,
    )
    r = route(msg)
    prefix = cr.instance_path("/api/v%201")
    assert prefix == ("api", "v 1")
    opts = cr.upstream_options(msg, r, prefix, r.hop_limit)
    assert opts == (
        (cr.ETAG, b"\x01\x02"),
        (URI_PATH, b"api"),
        (URI_PATH, b"v 1"),
        (URI_PATH, b"x"),
        (cr.CONTENT_FORMAT, b"\x32"),
        (URI_QUERY, b"q"),
        (HOP_LIMIT, b"\x08"),
        (cr.BLOCK2, b"\x16"),
    )


def test_codes() -> None:
    assert cr.code_text(cr.HOP_LIMIT_REACHED) == "5.08"
    assert cr.parse_code("5.03") == cr.SERVICE_UNAVAILABLE
    for bad in ("503", "1.01", "5.3", "x.yy", "5.40"):
        with pytest.raises(ValueError):
            cr.parse_code(bad)


def test_message_codec_round_trip() -> None:
    msg = Message(
        GET,
        ((URI_PATH, b"a" * 20), (URI_PATH, b"b"), (300, b"x" * 300), (2000, b"")),
        b"payload",
        cr.CON,
        0x1234,
        b"tok",
    )
    assert cr.decode_message(cr.encode_message(msg)) == msg


def test_envelopes_round_trip() -> None:
    inner = Message(GET, ((URI_PATH, b"x"),), b"")
    r = MeshRequest("temperature", "coap://127.0.0.1:5683/api", 1500, inner)
    assert cr.decode_request(cr.encode_request(r)) == r
    reply = Message(cr.code(2, 5), ((cr.CONTENT_FORMAT, b""),), b"21.5")
    assert cr.decode_reply(cr.encode_reply(ReplyStatus.ANSWERED, reply)) == (
        ReplyStatus.ANSWERED,
        reply,
    )


def test_decoders_are_total_under_mutation() -> None:
    """20,000 mutated and random inputs: only CoapFormatError, never another exception."""
    rng = random.Random(9)
    seeds = [
        cr.encode_request(
            MeshRequest("t", "coap://[::1]:5683", 10, req((URI_PATH, "x"), (PROXY_URI, "y")))
        ),
        cr.encode_reply(ReplyStatus.TIMEOUT, Message(cr.GATEWAY_TIMEOUT, (), b"late")),
        cr.encode_message(req((URI_HOST, "t.mesh"), (HOP_LIMIT, b"\x03"), payload=b"p")),
    ]
    decoders = (cr.decode_request, cr.decode_reply, cr.decode_message)
    ran = rejected = 0
    for i in range(20_000):
        data = bytearray(rng.choice(seeds))
        if i % 10 == 0:
            data = bytearray(rng.randbytes(rng.randrange(0, 64)))
        for _ in range(rng.randrange(1, 4)):
            if data and rng.random() < 0.6:
                data[rng.randrange(len(data))] = rng.randrange(256)
            else:
                del data[rng.randrange(len(data) + 1) :]
        for decode in decoders:
            ran += 1
            try:
                decoded = decode(bytes(data))
            except CoapFormatError:
                rejected += 1
                continue
            if isinstance(decoded, Message):  # whatever decodes can be classified
                cr.classify(decoded)
    assert ran == 60_000 and 0 < rejected < ran


def _reference_decode(data: bytes) -> Message:
    """The first, plain decoder (before it was written for speed): the differential oracle."""
    if not 4 <= len(data) <= cr.MAX_MESSAGE_BYTES:
        raise cr.CoapFormatError("size")
    first, code_byte, mid = data[0], data[1], struct.unpack_from("!H", data, 2)[0]
    tkl = first & 0x0F
    if first >> 6 != 1 or tkl > 8 or 4 + tkl > len(data):
        raise cr.CoapFormatError("version")
    token, pos, number = data[4 : 4 + tkl], 4 + tkl, 0
    options: list[cr.Option] = []
    payload = b""

    def ext(nibble: int, pos: int) -> tuple[int, int]:
        if nibble < 13:
            return nibble, pos
        width = {13: 1, 14: 2}.get(nibble)
        if width is None or pos + width > len(data):
            raise cr.CoapFormatError("nibble")
        return int.from_bytes(data[pos : pos + width], "big") + (
            13 if width == 1 else 269
        ), pos + width

    while pos < len(data):
        byte = data[pos]
        pos += 1
        if byte == 0xFF:
            payload = data[pos:]
            if not payload:
                raise cr.CoapFormatError("marker")
            break
        delta, pos = ext(byte >> 4, pos)
        length, pos = ext(byte & 0x0F, pos)
        if pos + length > len(data) or len(options) >= cr.MAX_OPTIONS:
            raise cr.CoapFormatError("truncated")
        number += delta
        options.append((number, bytes(data[pos : pos + length])))
        pos += length
    return Message(code_byte, tuple(options), bytes(payload), (first >> 4) & 3, mid, bytes(token))


def test_the_codec_agrees_with_the_plain_reference_on_10000_mutated_messages() -> None:
    rng = random.Random(12)
    seeds = [
        cr.encode_message(req((URI_HOST, "t.mesh"), (HOP_LIMIT, b"\x03"), payload=b"p")),
        cr.encode_message(Message(2, ((cr.ETAG, b"e" * 20), (cr.SIZE1, b"\x01" * 3)), b"x", 0, 9)),
        cr.encode_message(Message(69, ((cr.NO_RESPONSE, b"\x02"), (2000, b"y" * 300)), b"", 2)),
    ]
    agreed = decoded = 0
    for i in range(10_000):
        data = (
            bytearray(rng.choice(seeds)) if i % 5 else bytearray(rng.randbytes(rng.randrange(40)))
        )
        for _ in range(rng.randrange(1, 4)):
            if data and rng.random() < 0.7:
                data[rng.randrange(len(data))] = rng.randrange(256)
            else:
                del data[rng.randrange(len(data) + 1) :]
        try:
            want: Message | None = _reference_decode(bytes(data))
        except cr.CoapFormatError:
            want = None
        try:
            got: Message | None = cr.decode_message(bytes(data))
        except cr.CoapFormatError:
            got = None
        assert got == want
        if got is not None:
            decoded += 1
            again = cr.decode_message(cr.encode_message(got))
            assert again == Message(got.code, tuple(sorted(got.options, key=lambda o: o[0])),
                                    got.payload, got.mtype, got.mid, got.token)  # fmt: skip
        agreed += 1
    assert agreed == 10_000 and decoded > 1000
