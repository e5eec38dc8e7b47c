"""Logging: one key=value or JSON line per record, with structured fields."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator

import pytest

from edgeagent.logs import fields, format_value, setup_logging, with_fields

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
