"""Input that fails to decrypt: one warning per source per interval, counts in status."""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from pathlib import Path

import pytest

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
    assert "10.0.0.5:7946" in first[0].getMessage() and "another cluster's key" in first[0].getMessage()
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
        writer.write(struct.pack(">I", len(foreign)) + foreign)
        await writer.drain()
        await reader.read()
        writer.close()
        status = await call(running.state_dir, "status")
        for _ in range(300):  # the stream is answered by the gossip thread: poll for its count
            if status["undecryptable_streams"] == 1:
                break
            await asyncio.sleep(0.1)
            status = await call(running.state_dir, "status")
        assert status["undecryptable_datagrams"] == 3
        assert status["undecryptable_last_source"].startswith("127.0.0.1:")  # type: ignore[union-attr]
        logged = warnings(caplog)
        assert len(logged) == 1 and logged[0].fields["source"] == source  # type: ignore[attr-defined]
    finally:
        await stop(running)
