"""The listener's fast path, sans-IO (overlay/coap_server.py): what it handles, how it answers."""

from __future__ import annotations

import random

from overlay import coap_route as cr
from overlay import coap_server as cs

CLIENT = ("127.0.0.1", 40000)
PATH = ((cr.URI_PATH, b"mesh"), (cr.URI_PATH, b"t"))
OK = cr.Message(cr.code(2, 5), ((cr.CONTENT_FORMAT, b""),), b"21.5")


def _req(mtype: int = cr.CON, mid: int = 7, options: tuple[cr.Option, ...] = PATH) -> bytes:
    return cr.encode_message(cr.Message(1, options, b"", mtype, mid, b"tk"))


def _handled(server: cs.Server, data: bytes, now: float = 0.0) -> cs.Exchange:
    got = server.receive(data, CLIENT, now)
    assert isinstance(got, cs.Handle)
    return got.exchange


def test_a_con_request_gets_a_piggybacked_ack_and_its_retransmission_the_same_ack() -> None:
    server = cs.Server(rng=random.Random(1))
    exchange = _handled(server, _req())
    assert server.receive(_req(), CLIENT, 0.5) == cs.Send(None)  # still being answered
    datagram, delay = server.respond(exchange, OK)
    ack = cr.decode_message(datagram)
    assert (ack.mtype, ack.mid, ack.token, ack.code, ack.payload) == (
        cr.ACK,
        7,
        b"tk",
        OK.code,
        b"21.5",
    )
    assert delay is None
    assert server.receive(_req(), CLIENT, 1.0) == cs.Send(datagram)
    assert server.receive(_req(), ("127.0.0.1", 40001), 1.0) != cs.Send(datagram)  # another client
    assert server.stats["duplicates"] == 2


def test_a_slow_con_gets_an_empty_ack_then_a_separate_con_retransmitted_until_acked() -> None:
    server = cs.Server(rng=random.Random(2))
    exchange = _handled(server, _req())
    empty = server.empty_ack(exchange)
    assert empty is not None and cr.decode_message(empty) == cr.Message(0, (), b"", cr.ACK, 7)
    assert server.receive(_req(), CLIENT, 1.0) == cs.Send(empty)  # the retransmission: ACK again
    datagram, delay = server.respond(exchange, OK)
    sent = cr.decode_message(datagram)
    assert (sent.mtype, sent.token, sent.code) == (cr.CON, b"tk", OK.code) and sent.mid != 7
    assert delay is not None and cs.ACK_TIMEOUT <= delay <= cs.ACK_TIMEOUT * cs.ACK_RANDOM_FACTOR
    again = server.retransmit(CLIENT, sent.mid)
    assert again is not None and again[0] == datagram and again[1] == 2 * delay
    client_ack = cr.encode_message(cr.Message(0, (), b"", cr.ACK, sent.mid))
    assert server.receive(client_ack, CLIENT, 3.0) == cs.Send(None)  # consumed, not aiocoap's
    assert server.retransmit(CLIENT, sent.mid) is None
    assert server.receive(client_ack, CLIENT, 3.0) == cs.Delegate()  # no longer ours


def test_a_separate_response_nobody_acknowledges_stops_after_max_retransmit() -> None:
    server = cs.Server(rng=random.Random(3))
    exchange = _handled(server, _req())
    server.empty_ack(exchange)
    datagram, _ = server.respond(exchange, OK)
    mid = cs.mid_of(datagram)
    sends = 0
    while server.retransmit(CLIENT, mid) is not None:
        sends += 1
    assert sends == cs.MAX_RETRANSMIT and server.stats["separate_unacknowledged"] == 1
    assert server.empty_ack(exchange) is None  # answered already


def test_a_non_request_gets_a_non_response_and_its_repeat_is_dropped() -> None:
    server = cs.Server(rng=random.Random(4))
    exchange = _handled(server, _req(cr.NON))
    assert server.empty_ack(exchange) is None
    datagram, delay = server.respond(exchange, OK)
    sent = cr.decode_message(datagram)
    assert (sent.mtype, sent.token, delay) == (cr.NON, b"tk", None)
    assert server.receive(_req(cr.NON), CLIENT, 0.1) == cs.Send(None)


def test_blocks_observe_no_response_pings_responses_and_garbage_go_to_aiocoap() -> None:
    server = cs.Server(rng=random.Random(5))
    for number in (cr.BLOCK1, cr.BLOCK2, cr.OBSERVE, cr.NO_RESPONSE):
        assert server.receive(_req(options=((number, b""), *PATH)), CLIENT, 0) == cs.Delegate()
    ping = cr.encode_message(cr.Message(0, (), b"", cr.CON, 9))
    response = cr.encode_message(cr.Message(OK.code, (), b"", cr.CON, 10, b"x"))
    for other in (ping, response, b"\x40", b"\xff" * 8):
        assert server.receive(other, CLIENT, 0) == cs.Delegate()
    assert server.receive(_req(), CLIENT, 0, multicast=True) == cs.Delegate()
    assert len(server) == 0


def test_an_unencodable_response_becomes_a_5_00() -> None:
    server = cs.Server(rng=random.Random(6))
    exchange = _handled(server, _req())
    bad = cr.Message(OK.code, ((cr.ETAG, b"x" * 70000),))
    datagram, _ = server.respond(exchange, bad)
    assert cr.decode_message(datagram).code == cr.code(5, 0)


def test_the_deduplication_table_is_bounded_by_count_and_by_age() -> None:
    server = cs.Server(rng=random.Random(7), cap=100, lifetime=10.0)
    for mid in range(500):
        _handled(server, _req(mid=mid), now=mid * 0.001)
    assert len(server) == 100
    assert isinstance(server.receive(_req(mid=0), CLIENT, 1.0), cs.Handle)  # forgotten: new
    assert server.receive(_req(mid=499), CLIENT, 1.0) == cs.Send(None)
    _handled(server, _req(mid=1000), now=20.0)
    assert len(server) == 1  # everything older than the lifetime went


def test_receive_and_respond_are_total_and_bounded_under_10000_hostile_datagrams() -> None:
    rng = random.Random(8)
    server = cs.Server(rng=random.Random(9), cap=256)
    seeds = [
        _req(),
        _req(cr.NON, 3),
        _req(options=((cr.URI_HOST, b"t.mesh"), (cr.HOP_LIMIT, b"\x05"))),
        cr.encode_message(cr.Message(0, (), b"", cr.ACK, 7)),
        cr.encode_message(cr.Message(2, PATH, b"payload", cr.CON, 1, b"12345678")),
    ]
    outcomes: dict[str, int] = {}
    for i in range(12000):
        if i % 3 == 0:
            data = bytes(rng.randrange(256) for _ in range(rng.randrange(40)))
        else:
            mutated = bytearray(rng.choice(seeds))
            for _ in range(rng.randrange(1, 4)):
                mutated[rng.randrange(len(mutated))] = rng.randrange(256)
            data = bytes(mutated[: rng.randrange(1, len(mutated) + 1)])
        got = server.receive(data, ("127.0.0.1", rng.randrange(4)), i * 0.01, rng.random() < 0.05)
        outcomes[type(got).__name__] = outcomes.get(type(got).__name__, 0) + 1
        if isinstance(got, cs.Handle):
            if rng.random() < 0.5:
                server.empty_ack(got.exchange)
            datagram, _ = server.respond(got.exchange, OK)
            cr.decode_message(datagram)  # what we send decodes
            server.retransmit(got.exchange.remote, cs.mid_of(datagram))
        assert len(server) <= 256
    assert outcomes.get("Handle", 0) > 100 and outcomes.get("Delegate", 0) > 100
