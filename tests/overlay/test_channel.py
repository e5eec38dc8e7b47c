"""The channel multiplexer: round trips, interleaving, flow control, limits, liveness, GOAWAY."""

from __future__ import annotations

import random

import pytest

from overlay.channel import (
    FLAG_END,
    FLOOR_WINDOW,
    HEADER_SIZE,
    ChannelConfig,
    ChannelError,
    Connection,
    ConnectionTerminated,
    DataReceived,
    ErrorCode,
    Event,
    FrameType,
    GoAwayReceived,
    HelloReceived,
    IdleTimeout,
    PingAcked,
    StreamOpened,
    StreamReset,
    WindowOpened,
    encode_frame,
)


def pair(config: ChannelConfig | None = None) -> tuple[Connection, Connection]:
    client = Connection(client=True, now=0.0, config=config)
    server = Connection(client=False, now=0.0, config=config)
    return client, server


def pump(a: Connection, b: Connection, now: float = 0.0) -> tuple[list[Event], list[Event]]:
    """Move bytes both ways until quiet; (events at a, events at b)."""
    at_a: list[Event] = []
    at_b: list[Event] = []
    for _ in range(1000):
        out_a, out_b = a.data_to_send(), b.data_to_send()
        if not out_a and not out_b:
            return at_a, at_b
        if out_a:
            at_b += b.receive_data(out_a, now)
        if out_b:
            at_a += a.receive_data(out_b, now)
    raise AssertionError("no quiet")


def of(events: list[Event], kind: type[Event]) -> list[Event]:
    return [e for e in events if isinstance(e, kind)]


def test_hello_then_one_request_and_reply() -> None:
    client, server = pair()
    sid = client.open_stream(b"GET /temp", end=True)
    assert sid == 1
    at_client, at_server = pump(client, server)
    assert of(at_server, HelloReceived) and of(at_client, HelloReceived)
    assert of(at_server, StreamOpened) == [StreamOpened(1, b"GET /temp", True)]
    assert server.send_data(1, b"2.05 21.5C", end=True) == 10
    at_client, _ = pump(client, server)
    assert at_client == [DataReceived(1, b"2.05 21.5C", True)]
    client.acknowledge(1, 10)
    assert client.open_streams() == 0 and server.open_streams() == 0
    assert client.stats["violations"] == 0 == server.stats["violations"]


def test_byte_at_a_time_gives_the_same_events() -> None:
    client, _ = pair()
    for n in range(5):
        sid = client.open_stream(b"req%d" % n)
        assert client.send_data(sid, b"x" * 12_000, end=True) == 12_000  # within the floor
    wire = client.data_to_send()
    whole = Connection(client=False, now=0.0).receive_data(wire, 0.0)
    trickle = Connection(client=False, now=0.0)
    pieces: list[Event] = []
    for i in range(len(wire)):
        pieces += trickle.receive_data(wire[i : i + 1], 0.0)

    def joined(events: list[Event]) -> dict[int, bytes]:
        out: dict[int, bytes] = {}
        for e in events:
            if isinstance(e, StreamOpened | DataReceived):
                out[e.stream_id] = out.get(e.stream_id, b"") + e.data
        return out

    assert joined(pieces) == joined(whole)
    assert joined(whole) == {1 + 2 * n: b"req%d" % n + b"x" * 12_000 for n in range(5)}
    assert len(trickle._in) == 0


def test_many_streams_interleaved_both_directions() -> None:
    rng = random.Random(1)
    client, server = pair()
    pump(client, server)
    bodies = {client.open_stream(b"h"): rng.randbytes(rng.randrange(0, 50_000)) for _ in range(60)}
    sent = dict.fromkeys(bodies, 0)
    got: dict[int, bytes] = {}
    replies: dict[int, bytes] = {}
    while sent:
        sid = rng.choice(list(sent))
        body = bodies[sid]
        step = rng.randrange(1, 5000)
        chunk = body[sent[sid] : sent[sid] + step]
        last = sent[sid] + len(chunk) >= len(body)
        sent[sid] += client.send_data(sid, chunk, end=last)
        if last and sent[sid] >= len(body):
            del sent[sid]
        _, at_server = pump(client, server)
        for e in at_server:
            if isinstance(e, StreamOpened | DataReceived):
                got[e.stream_id] = got.get(e.stream_id, b"") + e.data
                if isinstance(e, DataReceived):
                    server.acknowledge(e.stream_id, len(e.data))
                if e.end:  # the server answers each stream when its request is complete
                    server.send_data(e.stream_id, b"ok%d" % e.stream_id, end=True)
        at_client, _ = pump(client, server)
        for e in of(at_client, DataReceived):
            assert isinstance(e, DataReceived)
            replies[e.stream_id] = replies.get(e.stream_id, b"") + e.data
            client.acknowledge(e.stream_id, len(e.data))
    assert {sid: got[sid][1:] for sid in bodies} == bodies
    assert replies == {sid: b"ok%d" % sid for sid in bodies}
    assert client.open_streams() == 0 == server.open_streams()


def test_flow_control_blocks_the_sender_until_the_receiver_acknowledges() -> None:
    client, server = pair()
    pump(client, server)
    sid = client.open_stream(b"")
    payload = random.Random(2).randbytes(3 * 1024 * 1024)
    first = client.send_data(sid, payload)
    assert first == 256 * 1024  # the server's announced stream window
    assert client.send_window(sid) == 0
    assert client.send_data(sid, payload[first:]) == 0  # blocked: nothing sent
    received = bytearray()
    done = first
    for _ in range(200):
        _, at_server = pump(client, server)
        for e in of(at_server, DataReceived):
            assert isinstance(e, DataReceived)
            received += e.data
            server.acknowledge(sid, len(e.data))
        at_client, _ = pump(client, server)
        if done < len(payload):
            assert of(at_client, WindowOpened)
            done += client.send_data(sid, payload[done:], end=True)
        elif not at_client and not at_server:
            break
    assert bytes(received) == payload


def test_window_before_hello_is_the_floor() -> None:
    client = Connection(client=True, now=0.0)
    sid = client.open_stream(b"")
    assert client.send_data(sid, b"x" * 100_000) == FLOOR_WINDOW


def violation_after(frames: bytes, config: ChannelConfig | None = None) -> ConnectionTerminated:
    server = Connection(client=False, now=0.0, config=config)
    server.data_to_send()
    hello = Connection(client=True, now=0.0).data_to_send()
    events = server.receive_data(hello + frames, 1.0)
    terminated = of(events, ConnectionTerminated)
    assert len(terminated) == 1, events
    assert server.terminated
    out = server.data_to_send()
    assert out[0] == FrameType.GOAWAY  # the peer is told why
    assert server.receive_data(hello, 2.0) == []  # later input ignored
    result = terminated[0]
    assert isinstance(result, ConnectionTerminated)
    return result


def test_data_beyond_the_window_is_a_violation() -> None:
    frames = encode_frame(FrameType.OPEN, 0, 1, b"")
    chunk = b"x" * 16_000
    frames += encode_frame(FrameType.DATA, 0, 1, chunk) * 16  # 256,000 bytes: fits
    ok = Connection(client=False, now=0.0)
    ok.receive_data(Connection(client=True, now=0.0).data_to_send() + frames, 0.0)
    assert not ok.terminated
    over = frames + encode_frame(FrameType.DATA, 0, 1, b"y" * 6_200)  # 262,200 > 262,144
    assert violation_after(over).code == ErrorCode.FLOW_CONTROL


def test_frame_larger_than_max_is_refused_from_its_header_alone() -> None:
    header_only = encode_frame(FrameType.DATA, 0, 1, b"")[: HEADER_SIZE - 4] + (10**6).to_bytes(
        4, "big"
    )
    server = Connection(client=False, now=0.0)
    events = server.receive_data(Connection(client=True, now=0.0).data_to_send() + header_only, 0.0)
    assert of(events, ConnectionTerminated)[0] == ConnectionTerminated(
        ErrorCode.FRAME_SIZE, "frame of 1000000 bytes", False
    )
    assert len(server._in) == 0


@pytest.mark.parametrize(
    ("frames", "code"),
    [
        (encode_frame(FrameType.OPEN, 0, 2, b""), ErrorCode.PROTOCOL),  # server's parity
        (
            encode_frame(FrameType.OPEN, 0, 3, b"") + encode_frame(FrameType.OPEN, 0, 1, b""),
            ErrorCode.PROTOCOL,
        ),  # out of order
        (encode_frame(FrameType.DATA, 0, 5, b"x"), ErrorCode.PROTOCOL),  # never opened
        (encode_frame(FrameType.DATA, 0, 0, b"x"), ErrorCode.PROTOCOL),
        (
            encode_frame(FrameType.OPEN, FLAG_END, 1, b"")
            + encode_frame(FrameType.DATA, 0, 1, b"x"),
            ErrorCode.PROTOCOL,
        ),  # after END
        (encode_frame(FrameType.RESET, 0, 1, b"\0\0"), ErrorCode.FRAME_SIZE),
        (encode_frame(FrameType.WINDOW, 0, 0, b"\0\0\0\0"), ErrorCode.PROTOCOL),  # zero
        (
            encode_frame(FrameType.WINDOW, 0, 0, (2**31 - 1).to_bytes(4, "big")),
            ErrorCode.FLOW_CONTROL,
        ),  # overflow
        (encode_frame(FrameType.PING, 0, 1, b"12345678"), ErrorCode.PROTOCOL),
        (encode_frame(FrameType.PING, 0, 0, b"1234"), ErrorCode.FRAME_SIZE),
        (encode_frame(FrameType.GOAWAY, 0, 0, b"\0"), ErrorCode.FRAME_SIZE),
        (encode_frame(FrameType.HELLO, 0, 0, b"x" * 17), ErrorCode.PROTOCOL),  # a second HELLO
    ],
)
def test_protocol_violations(frames: bytes, code: ErrorCode) -> None:
    assert violation_after(frames).code == code


def test_first_frame_must_be_a_valid_hello() -> None:
    server = Connection(client=False, now=0.0)
    events = server.receive_data(encode_frame(FrameType.PING, 0, 0, b"12345678"), 0.0)
    assert of(events, ConnectionTerminated)[0].reason == "first frame is not HELLO"  # type: ignore[attr-defined]
    low = encode_frame(FrameType.HELLO, 0, 0, bytes([1]) + (1024).to_bytes(4, "big") * 4)
    events = Connection(client=False, now=0.0).receive_data(low, 0.0)
    assert "floors" in of(events, ConnectionTerminated)[0].reason  # type: ignore[attr-defined]
    v2 = bytearray(Connection(client=True, now=0.0).data_to_send())
    v2[HEADER_SIZE] = 2
    events = Connection(client=False, now=0.0).receive_data(bytes(v2), 0.0)
    assert "version 2" in of(events, ConnectionTerminated)[0].reason  # type: ignore[attr-defined]


def test_stream_limits_both_ways() -> None:
    config = ChannelConfig(max_streams=16)
    client, server = pair(config)
    pump(client, server)
    for _ in range(16):
        client.open_stream(b"r")
    assert not client.can_open
    with pytest.raises(ChannelError, match="16 streams"):
        client.open_stream(b"r")
    pump(client, server)
    assert server.open_streams() == 16 and not server.terminated
    # A peer that ignores our limit is cut off.
    frames = b"".join(encode_frame(FrameType.OPEN, 0, 1 + 2 * i, b"") for i in range(17))
    assert violation_after(frames, config).reason == "over 16 streams"
    with pytest.raises(ChannelError, match="frame size"):
        pair()[0].open_stream(b"x" * 20_000)


def test_local_misuse_raises_channel_error() -> None:
    client, server = pair()
    sid = client.open_stream(b"", end=True)
    with pytest.raises(ChannelError, match="not open for sending"):
        client.send_data(sid, b"x")
    with pytest.raises(ChannelError, match="not open for sending"):
        client.send_data(99, b"x")
    with pytest.raises(ChannelError, match="unacknowledged"):
        client.acknowledge(1, 5)
    client.close(ErrorCode.INTERNAL, "bye")
    assert client.terminated
    with pytest.raises(ChannelError, match="closed"):
        client.open_stream(b"")
    client.reset_stream(sid)  # a no-op on a closed connection, never an error


def test_reset_both_ways_and_late_data_is_dropped_with_its_window_returned() -> None:
    client, server = pair()
    sid = client.open_stream(b"req")
    pump(client, server)
    server.reset_stream(sid, ErrorCode.CANCEL)
    client.send_data(sid, b"z" * 1000)  # crosses the RESET on the wire
    at_client, at_server = pump(client, server)
    assert at_client == [StreamReset(sid, ErrorCode.CANCEL, True, retryable=False)]
    assert server.stats["dropped_data_bytes"] == 1000
    assert not server.terminated and server._conn_recv + server._conn_unacked == 1024 * 1024


def test_ping_keepalive_and_dead_peer_timeout() -> None:
    config = ChannelConfig(keepalive_s=10.0, ping_timeout_s=5.0, idle_timeout_s=1000.0)
    client, server = pair(config)
    pump(client, server, 0.0)
    client.ping(1.0)
    at_client, _ = pump(client, server, 1.5)
    assert at_client == [PingAcked(0.5)]
    assert client.get_timer() == 11.5  # keepalive after the last frame received
    assert client.handle_timeout(11.5) == []
    assert client.data_to_send()[0] == FrameType.PING  # a keepalive PING
    assert client.get_timer() == 16.5
    events = client.handle_timeout(16.5)  # the server never saw it: it is gone
    assert of(events, ConnectionTerminated) == [
        ConnectionTerminated(ErrorCode.TIMEOUT, "no answer to PING", False)
    ]
    assert client.get_timer() is None


def test_any_frame_proves_the_peer_alive_while_a_ping_is_out() -> None:
    config = ChannelConfig(keepalive_s=10.0, ping_timeout_s=5.0)
    client, server = pair(config)
    pump(client, server, 0.0)
    client.ping(1.0)
    client.data_to_send()  # lost on the way (say)
    sid = server.open_stream(b"push")
    client.receive_data(server.data_to_send(), 2.0)
    assert sid == 2
    assert client.handle_timeout(6.5) == [] and not client.terminated
    assert client.get_timer() == 12.0


def test_idle_timeout_fires_once_with_no_streams() -> None:
    config = ChannelConfig(keepalive_s=100.0, idle_timeout_s=30.0)
    client, server = pair(config)
    pump(client, server, 0.0)
    sid = client.open_stream(b"x", end=True)
    pump(client, server, 5.0)
    assert client.handle_timeout(40.0) == []  # a stream is open: not idle
    server.send_data(sid, b"y", end=True)
    pump(client, server, 50.0)
    assert client.get_timer() == 80.0
    assert client.handle_timeout(80.0) == [IdleTimeout(30.0)]
    assert client.handle_timeout(90.0) == []


def test_goaway_lets_open_streams_finish_and_refuses_the_rest() -> None:
    client, server = pair()
    first = client.open_stream(b"a", end=True)
    pump(client, server)
    second = client.open_stream(b"b", end=True)  # crosses the GOAWAY
    assert server.close(reason="restarting") == []
    at_client, at_server = pump(client, server)
    assert of(at_client, GoAwayReceived) == [GoAwayReceived(first, 0, "restarting")]
    assert of(at_client, StreamReset) == [
        StreamReset(second, ErrorCode.REFUSED, True, retryable=True)
    ]
    assert of(at_server, StreamOpened) == []  # the refused one was never served
    assert server.stats["refused_streams"] == 1
    with pytest.raises(ChannelError, match="going away"):
        client.open_stream(b"c")
    assert not server.finished
    server.send_data(first, b"answer", end=True)
    at_client, _ = pump(client, server)
    assert at_client == [DataReceived(first, b"answer", True)]
    assert server.finished and client.finished
    assert of(client.receive_eof(), ConnectionTerminated)[0].code == ErrorCode.NO_ERROR  # type: ignore[attr-defined]


def test_eof_resets_open_streams() -> None:
    client, server = pair()
    sid = client.open_stream(b"a")
    events = client.receive_eof()
    assert events[0] == StreamReset(sid, ErrorCode.INTERNAL, True, retryable=False)
    assert isinstance(events[1], ConnectionTerminated) and client.terminated


def test_unknown_frame_types_are_skipped() -> None:
    server = Connection(client=False, now=0.0)
    wire = Connection(client=True, now=0.0).data_to_send() + encode_frame(42, 0, 7, b"future")
    events = server.receive_data(wire + encode_frame(FrameType.OPEN, 0, 1, b"x"), 0.0)
    assert of(events, StreamOpened) and server.stats["unknown_frames"] == 1


def test_ping_flood_without_draining_is_cut_off() -> None:
    server = Connection(client=False, now=0.0, config=ChannelConfig(max_output_bytes=10_000))
    hello = Connection(client=True, now=0.0).data_to_send()
    events = server.receive_data(hello + encode_frame(FrameType.PING, 0, 0, b"p" * 8) * 2000, 0.0)
    assert of(events, ConnectionTerminated)[0].code == ErrorCode.ENHANCE_YOUR_CALM  # type: ignore[attr-defined]
    assert len(server.data_to_send()) < 12_000


def test_config_is_checked() -> None:
    with pytest.raises(ValueError, match="max_frame"):
        ChannelConfig(max_frame=1000)
    with pytest.raises(ValueError, match="stream_window"):
        ChannelConfig(stream_window=2**31)
    with pytest.raises(ValueError, match="timeouts"):
        ChannelConfig(keepalive_s=0)
