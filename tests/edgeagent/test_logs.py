"""Logging: one key=value or JSON line per record, with structured fields."""

from __future__ import annotations

import io
import json
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgeagent.logs import fields, format_value, is_journal, setup_logging, with_fields

TEXT_LINE = re.compile(
    r'^ts=\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z level=\w+ logger=\S+ msg=("([^"\\]|\\.)*"|\S+)( \S+=("([^"\\]|\\.)*"|\S+))*$'
)


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    buf = io.StringIO()
    root = logging.getLogger()
    saved = (root.level, list(root.handlers))
    yield buf
    root.handlers[:] = saved[1]
    root.setLevel(saved[0])


def test_text_lines_carry_fields_in_key_value_form(stream: io.StringIO) -> None:
    setup_logging("text", "info", stream)
    log = logging.getLogger("edgeagent.runtime")
    log.info("member failed", extra=fields(member="node-3", incarnation=4, addr=("10.0.0.1", 7946)))
    line = stream.getvalue().rstrip("\n")
    assert TEXT_LINE.match(line), line
    assert (
        ' level=info logger=edgeagent.runtime msg="member failed" member=node-3 incarnation=4 addr=10.0.0.1:7946'
        in line
    )


def test_json_lines_are_objects_with_fields(stream: io.StringIO) -> None:
    setup_logging("json", "debug", stream)
    with_fields(logging.getLogger("gossip"), node="n1").debug(
        "probe %s", "n2", extra=fields(rtt=0.002, msg="clash")
    )
    record = json.loads(stream.getvalue())
    assert (
        record["level"] == "debug" and record["logger"] == "gossip" and record["msg"] == "probe n2"
    )
    assert record["node"] == "n1" and record["rtt"] == 0.002
    assert record["field.msg"] == "clash"  # reserved names are kept, not overwritten


def test_exceptions_stay_on_one_line(stream: io.StringIO) -> None:
    setup_logging("text", "info", stream)
    try:
        raise RuntimeError("boom\nsecond line")
    except RuntimeError:
        logging.getLogger("edgeagent").exception("failed")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1 and TEXT_LINE.match(lines[0])
    assert "RuntimeError: boom\\nsecond line" in lines[0]


def test_level_filters_and_setup_replaces_its_own_handler(stream: io.StringIO) -> None:
    setup_logging("text", "info", io.StringIO())
    setup_logging("text", "warning", stream)
    log = logging.getLogger("edgeagent")
    log.info("hidden")
    log.warning("shown")
    assert stream.getvalue().count("\n") == 1 and "msg=shown" in stream.getvalue()
    assert sum(getattr(h, "_edgeagent", False) for h in logging.getLogger().handlers) == 1


def test_aiocoaps_info_lines_show_only_at_debug(stream: io.StringIO) -> None:
    for level, shown in (("info", ["warn"]), ("debug", ["note", "warn"])):
        stream.seek(0)
        stream.truncate()
        setup_logging("text", level, stream)
        for name in ("coap", "coap-server"):  # aiocoap's contexts' loggers
            logging.getLogger(name).info("note")
            logging.getLogger(name).warning("warn")
        assert re.findall(r"msg=(\w+)", stream.getvalue()) == shown * 2, (level, stream.getvalue())


def test_bad_format_or_level_is_value_error() -> None:
    with pytest.raises(ValueError):
        setup_logging("xml", "info")
    with pytest.raises(ValueError):
        setup_logging("text", "loud")


@pytest.mark.parametrize(
    ("value", "text"),
    [
        ("plain", "plain"),
        ("two words", '"two words"'),
        ('q"uote', '"q\\"uote"'),
        ("", '""'),
        (None, "null"),
        (True, "true"),
        (1.5, "1.5"),
    ],
)
def test_values_are_quoted_only_when_needed(value: object, text: str) -> None:
    assert format_value(value) == text


def test_journal_lines_start_with_their_syslog_priority(stream: io.StringIO) -> None:
    setup_logging("text", "debug", stream, journal=True)
    log = logging.getLogger("edgeagent")
    log.debug("d")
    log.info("i")
    log.warning("w")
    log.error("e")
    lines = stream.getvalue().splitlines()
    assert [line[:3] for line in lines] == ["<7>", "<6>", "<4>", "<3>"]
    assert all(TEXT_LINE.match(line[3:]) for line in lines)


def test_json_lines_get_the_prefix_too(stream: io.StringIO) -> None:
    setup_logging("json", "info", stream, journal=True)
    logging.getLogger("gossip").warning("careful")
    line = stream.getvalue()
    assert line.startswith("<4>{") and json.loads(line[3:])["msg"] == "careful"


def test_journal_is_detected_by_device_and_inode_of_the_stream(tmp_path: Path) -> None:
    with (tmp_path / "log").open("w") as out, (tmp_path / "other").open("w") as other:
        st = os.fstat(out.fileno())
        announced = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        assert is_journal(out, announced)
        assert not is_journal(other, announced)  # inherited by a child whose stderr is a file
        assert not is_journal(out, {})
        assert not is_journal(io.StringIO(), announced)


def test_setup_logging_adds_the_prefix_only_on_the_journal_stream(
    stream: io.StringIO, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with (tmp_path / "log").open("w") as out:
        st = os.fstat(out.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        setup_logging("text", "info", out)
        logging.getLogger("edgeagent").info("to the journal")
        setup_logging("text", "info", stream)
        logging.getLogger("edgeagent").info("to a pipe")
    assert (tmp_path / "log").read_text().startswith("<6>ts=")
    assert stream.getvalue().startswith("ts=")
