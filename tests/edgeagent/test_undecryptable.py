"""Input that fails to decrypt: one warning per source per interval, counts in status."""

from __future__ import annotations

import asyncio
import logging
import socket
from pathlib import Path

import pytest

from edgeagent.streams import HEADER_PLAIN, HEADER_SIZE
from edgeagent.undecryptable import DATAGRAM, STREAM, UndecryptableLog
from gossip.codec import DatagramHeader, destination_tag, encode_datagram
from gossip.keyring import Keyring
from gossip.messages import Ping
from tests.edgeagent.inprocess import call, start, stop, wait_for

LOGGER = "edgeagent.undecryptable"
A = ("10.0.0.5", 7946)
B = ("10.0.0.6", 7946)


def warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]


def test_one_warning_per_source_per_interval_naming_source_and_cause(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, LOGGER)
    undecryptable = UndecryptableLog(interval=60.0)
    for i in range(5):
        undecryptable.record(A, DATAGRAM, 1.0 + i)
    undecryptable.record(("10.0.0.5", 40000), STREAM, 7.0)  # same host, another port
    undecryptable.record(B, DATAGRAM, 8.0)
    first = warnings(caplog)
    assert [r.fields["source"] for r in first] == ["10.0.0.5:7946", "10.0.0.6:7946"]  # type: ignore[attr-defined]
    assert (
        "10.0.0.5:7946" in first[0].getMessage()
        and "another cluster's key" in first[0].getMessage()
    )
    undecryptable.record(A, DATAGRAM, 61.5)
    again = warnings(caplog)[2]
    assert again.fields["suppressed"] == 5  # type: ignore[attr-defined]
    report = undecryptable.report()
    assert (report.datagrams, report.streams, report.last_source) == (7, 1, A)
    assert report.status(71.5)["undecryptable_last_s_ago"] == 10.0


def test_spoofed_sources_cannot_flood_the_log(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, LOGGER)
    undecryptable = UndecryptableLog(interval=60.0, max_warnings=3, max_sources=8)
    for i in range(100):
        undecryptable.record((f"10.1.0.{i}", 7946), DATAGRAM, 1.0)
    assert len(warnings(caplog)) == 3
    undecryptable.record(("10.2.0.1", 7946), DATAGRAM, 62.0)  # a new interval warns again
    assert len(warnings(caplog)) == 4
    assert undecryptable.report().datagrams == 101


async def test_agent_warns_once_and_status_shows_undecryptable_input(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, LOGGER)
    running = await start(tmp_path / "a", "a")
    try:
        host, port = running.agent.driver.address
        plain = encode_datagram(
            [Ping(seq=1, target="a", source="x", source_addr=("127.0.0.9", 1))], DatagramHeader("x", 1, 0, destination_tag("a"))
        )
        foreign = Keyring([Keyring.generate_key()]).encrypt(plain, b"edgeagent")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind(("127.0.0.1", 0))
            source = f"127.0.0.1:{sock.getsockname()[1]}"
            for _ in range(3):
                sock.sendto(foreign, (host, port))
            await wait_for(lambda: len(warnings(caplog)) >= 1, "the warning")
        reader, writer = await asyncio.open_connection(host, port)
        # A whole stream header sealed with another cluster's key (streams.HEADER_SIZE bytes).
        header = Keyring([Keyring.generate_key()]).encrypt(bytes(HEADER_PLAIN.size), b"x")
        assert len(header) == HEADER_SIZE
        writer.write(header)
        await writer.drain()
        await reader.read()
        writer.close()
        status = await call(running.state_dir, "status")
        for _ in range(300):  # the stream is answered by the gossip thread: poll for its count
            if status["stream_drops"].get("unauthenticated") == 1:  # type: ignore[union-attr]
                break
            await asyncio.sleep(0.1)
            status = await call(running.state_dir, "status")
        # A stream whose sealed header does not open is dropped before any body is read, as
        # "unauthenticated" (the header check is the decrypt); it never reaches the core.
        drops = status["stream_drops"]
        assert drops["unauthenticated"] == 1 and drops["header_timeout"] == 0  # type: ignore[index]
        assert status["undecryptable_datagrams"] == 3
        assert status["undecryptable_last_source"].startswith("127.0.0.1:")  # type: ignore[union-attr]
        logged = warnings(caplog)
        assert len(logged) == 1 and logged[0].fields["source"] == source  # type: ignore[attr-defined]
    finally:
        await stop(running)


async def test_status_shows_stream_drops_by_reason_next_to_undecryptable(tmp_path: Path) -> None:
    from edgeagent.commands.status import render

    running = await start(tmp_path / "a", "a")
    try:
        host, port = running.agent.driver.address
        _, idle = await asyncio.open_connection(host, port)  # never sends a header
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"\x00" * HEADER_SIZE)  # a header that does not open with the cluster key
        await writer.drain()
        await reader.read()
        writer.close()

        async def drops() -> dict[str, int]:
            return (await call(running.state_dir, "status"))["stream_drops"]

        deadline = asyncio.get_running_loop().time() + 30.0
        while (got := await drops())["header_timeout"] < 1:  # the 2 s header timeout
            assert asyncio.get_running_loop().time() < deadline, got
            await asyncio.sleep(0.1)
        idle.close()
        status = await call(running.state_dir, "status")
        assert status["stream_drops"]["unauthenticated"] == 1
        assert status["stream_drops"]["header_timeout"] == 1
        assert status["stream_drops"]["over_budget"] == status["stream_drops"]["per_source"] == 0
        text = render(status)
        line = next(row for row in text.splitlines() if row.startswith("stream drops"))
        assert "unauthenticated 1" in line and "header timeout 1" in line
        assert "over budget" not in line  # zero counts are left out
        undecryptable = next(r for r in text.splitlines() if r.startswith("undecrypted:"))
        assert f"{status['undecryptable_datagrams']} datagrams" in undecryptable
        assert "state saves:" in text and text.rstrip().endswith("ok")
    finally:
        await stop(running)
