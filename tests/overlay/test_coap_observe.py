"""overlay.coap_observe: registrations, the notification stream format, bounds, fuzzing."""

from __future__ import annotations

import random

import pytest

from overlay import coap_observe as co
from overlay import coap_route as cr

GET = cr.code(0, 1)


def _registration(observe: bytes = b"") -> cr.Message:
    return cr.Message(GET, ((cr.OBSERVE, observe), (cr.URI_PATH, b"obs")))


def test_what_is_a_registration() -> None:
    assert co.is_registration(GET, b"") and co.is_registration(GET, b"\x00")
    assert co.is_registration(cr.code(0, 5), b"")  # FETCH
    assert not co.is_registration(GET, b"\x01")  # deregistration
    assert not co.is_registration(GET, None)
    assert not co.is_registration(cr.code(0, 2), b"")  # POST
    assert co.registration_of(_registration())
    assert not co.registration_of(cr.Message(GET, ((cr.OBSERVE, b""), (cr.OBSERVE, b""))))


def test_registration_options_keep_observe_and_route_the_path() -> None:
    msg = cr.Message(GET, ((cr.OBSERVE, b""), (cr.URI_PATH, b"mesh"), (cr.URI_PATH, b"s"),
                           (cr.URI_PATH, b"obs"), (cr.ETAG, b"e")))  # fmt: skip
    route = cr.classify(msg)
    assert isinstance(route, cr.Route)
    options = co.registration_options(msg, route, ("base",))
    assert [v for n, v in options if n == cr.URI_PATH] == [b"base", b"obs"]
    assert [n for n, _ in options] == sorted(n for n, _ in options)
    assert (cr.OBSERVE, b"") in options and (cr.ETAG, b"e") in options


def test_observe_envelope_round_trip_and_refusals() -> None:
    req = cr.MeshRequest("s", "coap://127.0.0.1:5683", 1500, _registration())
    data = co.encode_observe_request(req)
    assert data[0] == co.OBSERVE_ENVELOPE
    back = co.decode_observe_request(data)
    assert back.service == "s" and back.budget_ms == 1500 and co.registration_of(back.message)
    with pytest.raises(cr.CoapFormatError):
        co.decode_observe_request(cr.encode_request(req))  # a plain request's envelope
    plain = cr.MeshRequest("s", "coap://h", 1, cr.Message(GET, ((cr.URI_PATH, b"x"),)))
    with pytest.raises(cr.CoapFormatError):
        co.decode_observe_request(co.encode_observe_request(plain))


def test_frames_are_read_back_from_any_split() -> None:
    frames = [
        (
            cr.ReplyStatus.ANSWERED,
            cr.Message(cr.code(2, 5), ((cr.OBSERVE, bytes([i])),), b"v%d" % i),
        )
        for i in range(5)
    ] + [(cr.ReplyStatus.UNREACHABLE, co.final_failure(cr.Failure.UNREACHABLE, "gone"))]
    data = b"".join(co.encode_notification(s, m) for s, m in frames)
    rng = random.Random(7)
    for _ in range(50):
        reader, got, at = co.NotificationReader(), [], 0
        while at < len(data):
            step = rng.randint(1, 9)
            got += reader.feed(data[at : at + step])
            at += step
        assert [(s, m.code, m.payload) for s, m in got] == [
            (s, m.code, m.payload) for s, m in frames
        ]
        assert reader.pending == 0
    assert [co.ends_observation(s, m) for s, m in got] == [False] * 5 + [True]


def test_a_frame_longer_than_one_message_is_refused_without_buffering_it() -> None:
    reader = co.NotificationReader()
    with pytest.raises(cr.CoapFormatError):
        reader.feed((co.MAX_FRAME + 1).to_bytes(4, "big") + b"\x00" * 100)
    assert reader.pending == 0
    with pytest.raises(cr.CoapFormatError):
        co.NotificationReader().feed(b"\x00\x00\x00\x02ab")  # under status + CoAP header


def test_fuzzed_streams_raise_only_the_format_error() -> None:
    rng = random.Random(11)
    good = co.encode_notification(
        cr.ReplyStatus.ANSWERED, cr.Message(cr.code(2, 5), ((cr.OBSERVE, b"\x01"),), b"x")
    )
    for _ in range(20_000):
        data = bytearray(good * rng.randint(1, 3))
        for _ in range(rng.randint(1, 6)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        reader = co.NotificationReader()
        try:
            reader.feed(bytes(data))
        except cr.CoapFormatError:
            pass
        assert reader.pending <= 4 + co.MAX_FRAME


def test_ends_observation_rules() -> None:
    ok = cr.Message(cr.code(2, 5), ((cr.OBSERVE, b"\x02"),), b"")
    assert not co.ends_observation(cr.ReplyStatus.ANSWERED, ok)
    assert co.ends_observation(cr.ReplyStatus.ANSWERED, cr.Message(cr.code(2, 5)))  # no Observe
    assert co.ends_observation(
        cr.ReplyStatus.ANSWERED, cr.Message(cr.code(4, 4), ((cr.OBSERVE, b"\x02"),))
    )
    assert co.ends_observation(cr.ReplyStatus.TIMEOUT, ok)


def test_sequence_and_client_renumbering() -> None:
    seq = co.Sequence()
    assert [seq.next() for _ in range(3)] == [0, 1, 2]
    seq._next = co.SEQUENCE_MODULUS - 1
    assert [seq.next(), seq.next()] == [co.SEQUENCE_MODULUS - 1, 0]
    upstream = cr.Message(
        cr.code(2, 5), ((cr.OBSERVE, b"\x09\x09"), (cr.CONTENT_FORMAT, b"")), b"v"
    )
    out = co.for_client(upstream, 300)
    assert out.values(cr.OBSERVE) == [cr.uint_option(300)] and out.payload == b"v"
    assert co.for_client(upstream, None).values(cr.OBSERVE) == []


def test_registry_bounds_per_key_and_in_total() -> None:
    reg = co.Registry(per_key=2, total=3)
    assert reg.admit("a") and reg.admit("a") and not reg.admit("a")
    assert reg.admit("b") and not reg.admit("c")  # total reached
    assert reg.refused == 2 and reg.held() == 3 and reg.held("a") == 2
    reg.release("a")
    assert reg.admit("c") and reg.held() == 3
    for key in ("a", "b", "c", "c"):  # the extra release of c is a no-op
        reg.release(key)
    assert reg.held() == 0
    with pytest.raises(ValueError):
        co.Registry(0, 1)


def test_moves_are_bounded_in_a_row_and_back_off() -> None:
    moves = co.Moves(limit=3, backoff_s=0.5)
    failed, answered = cr.ReplyStatus.UNREACHABLE, cr.ReplyStatus.ANSWERED
    assert not moves.should_move(answered, True)  # the resource's own answer is passed on
    assert not moves.should_move(failed, False)  # nothing registered: the failure is final
    assert moves.should_move(cr.ReplyStatus.TIMEOUT, True)
    assert [moves.move() for _ in range(3)] == [0.0, 0.5, 1.0]
    assert not moves.may_move() and not moves.should_move(failed, True)  # the failure goes out
    moves.delivered()  # a notification came through the new path: moves are allowed again
    assert moves.may_move() and moves.move() == 0.0 and moves.total == 4


def test_silence_limit_is_the_last_frames_max_age_and_a_margin() -> None:
    def note(*options: cr.Option) -> cr.Message:
        return cr.Message(0x45, ((cr.OBSERVE, b"\x05"), *options), b"x")  # 2.05

    margin = co.SILENCE_MARGIN_S
    assert co.silence_limit(note()) == 60 + margin  # RFC 7252: no Max-Age is 60 s
    assert co.silence_limit(note((cr.MAX_AGE, cr.uint_option(5)))) == 5 + margin
    assert co.silence_limit(note((cr.MAX_AGE, b""))) == margin  # 0: stale at once
    hostile = note((cr.MAX_AGE, b"\xff" * 64))  # longer than the option may be: capped
    assert co.silence_limit(hostile) == co.MAX_AGE_MAX_S + margin
