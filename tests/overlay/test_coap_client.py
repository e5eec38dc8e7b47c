"""overlay.coap_client: the owning agent's CoAP client, message layer only, no IO."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from overlay import coap_client as cc
from overlay import coap_route as cr

GET = cr.Message(cr.code(0, 1), ((cr.URI_PATH, b"t"),), b"", cr.CON)
CONTENT = cr.code(2, 5)


def _sent(datagram: bytes) -> cr.Message:
    return cr.decode_message(datagram)


def _reply(request: cr.Message, **fields: object) -> bytes:
    values: dict[str, object] = {
        "code": CONTENT,
        "options": (),
        "payload": b"21.5",
        "mtype": cr.ACK,
        "mid": request.mid,
        "token": request.token,
    }
    values.update(fields)
    return cr.encode_message(cr.Message(**values))  # type: ignore[arg-type]


def test_a_piggybacked_response_completes_the_request_without_its_id_and_token() -> None:
    ex = cc.Exchanges(rng=random.Random(1))
    token, datagram, delay = ex.start(GET)
    request = _sent(datagram)
    assert (request.mtype, request.token, request.options) == (cr.CON, token, GET.options)
    assert delay is not None and cc.ACK_TIMEOUT <= delay <= cc.ACK_TIMEOUT * 1.5
    got = ex.receive(_reply(request))
    assert isinstance(got.outcome, cc.Answer) and got.outcome.token == token and got.reply is None
    assert got.outcome.response == cr.Message(CONTENT, (), b"21.5", cr.ACK)
    assert len(ex) == 0 and ex.retransmit(token) is None


def test_a_separate_response_is_matched_by_token_and_acknowledged_every_time() -> None:
    ex = cc.Exchanges(rng=random.Random(2))
    token, datagram, _ = ex.start(GET)
    request = _sent(datagram)
    empty_ack = cr.encode_message(cr.Message(0, (), b"", cr.ACK, request.mid))
    assert ex.receive(empty_ack).outcome is None
    assert ex.retransmit(token) is None  # acknowledged: no more retransmissions
    separate = _reply(request, mtype=cr.CON, mid=(request.mid + 77) & 0xFFFF)
    got = ex.receive(separate)
    assert isinstance(got.outcome, cc.Answer) and got.outcome.token == token
    ack = _sent(got.reply or b"")
    assert (ack.mtype, ack.code, ack.mid) == (cr.ACK, 0, (request.mid + 77) & 0xFFFF)
    again = ex.receive(separate)  # our ACK was lost: the instance sends it again
    assert again.outcome is None and again.reply == got.reply
    assert ex.stats["duplicates"] == 1 and ex.stats["answered"] == 1


def test_a_reset_fails_the_request() -> None:
    ex = cc.Exchanges(rng=random.Random(3))
    token, datagram, _ = ex.start(GET)
    reset = cr.encode_message(cr.Message(0, (), b"", cr.RST, _sent(datagram).mid))
    got = ex.receive(reset)
    assert isinstance(got.outcome, cc.Reset) and got.outcome.token == token and len(ex) == 0


def test_con_retransmissions_back_off_and_end_after_max_retransmit() -> None:
    ex = cc.Exchanges(rng=random.Random(4))
    token, datagram, first = ex.start(GET)
    assert first is not None
    delays = [first]
    while (again := ex.retransmit(token)) is not None:
        assert again[0] == datagram  # the same ID: the instance deduplicates it
        delays.append(again[1])
    assert len(delays) == cc.MAX_RETRANSMIT + 1
    assert delays == [first * 2**i for i in range(len(delays))]


def test_non_requests_are_sent_as_non_and_never_retransmitted() -> None:
    ex = cc.Exchanges()
    token, datagram, delay = ex.start(cr.Message(cr.code(0, 1), (), b"", cr.NON))
    assert delay is None and _sent(datagram).mtype == cr.NON and ex.retransmit(token) is None
    got = ex.receive(_reply(_sent(datagram), mtype=cr.NON, mid=5))
    assert isinstance(got.outcome, cc.Answer) and got.reply is None


def test_what_nobody_asked_for_is_dropped_or_reset() -> None:
    ex = cc.Exchanges(rng=random.Random(5))
    token, datagram, _ = ex.start(GET)
    request = _sent(datagram)
    stranger = _reply(request, mtype=cr.CON, token=b"zz", mid=9)
    assert _sent(ex.receive(stranger).reply or b"").mtype == cr.RST
    assert ex.receive(_reply(request, mid=(request.mid + 1) & 0xFFFF)).outcome is None  # other ID
    assert ex.receive(_reply(request, token=b"other")).outcome is None  # someone else's token
    ping = cr.encode_message(cr.Message(0, (), b"", cr.CON, 3))
    assert _sent(ex.receive(ping).reply or b"").mtype == cr.RST
    assert ex.receive(b"\x00garbage").outcome is None
    assert ex.stats["malformed"] == 1 and len(ex) == 1
    assert isinstance(ex.receive(_reply(request)).outcome, cc.Answer)  # still answerable


def test_outstanding_requests_are_bounded_and_ids_stay_distinct(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(cc, "MAX_PENDING", 50)
    ex = cc.Exchanges(rng=random.Random(6))
    sent = [_sent(ex.start(GET)[1]) for _ in range(50)]
    assert len({m.mid for m in sent}) == 50 and len({m.token for m in sent}) == 50
    with pytest.raises(cc.Busy):
        ex.start(GET)
    ex.cancel(sent[0].token)
    ex.start(GET)  # room again


def test_cancelled_requests_are_forgotten() -> None:
    ex = cc.Exchanges()
    token, datagram, _ = ex.start(GET)
    ex.cancel(token)
    assert len(ex) == 0 and ex.receive(_reply(_sent(datagram))).outcome is None


@settings(max_examples=3000, deadline=None)
@given(st.binary(max_size=64), st.integers(0, 40), st.integers(0, 255))
def test_receive_is_total(noise: bytes, at: int, value: int) -> None:
    """Any datagram, random or a mutated real response, is handled or dropped: never raises."""
    ex = cc.Exchanges(rng=random.Random(7))
    _, datagram, _ = ex.start(GET)
    ex.receive(noise)
    real = bytearray(_reply(_sent(datagram), mtype=cr.CON))
    real[at % len(real)] = value
    got = ex.receive(bytes(real))
    assert got.reply is None or cr.decode_message(got.reply).code == 0
