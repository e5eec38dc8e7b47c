"""Logging setup: one line per record, as key=value text or as a JSON object.

Everything logs through the stdlib ``logging`` module under the ``edgeagent``,
``overlay`` and ``gossip`` logger names; :func:`setup_logging` installs one
handler on the root logger that writes to stderr.

Structured fields convention: pass them in ``extra={"fields": {...}}``, most
easily with the :func:`fields` helper, or bind fixed ones with
:func:`with_fields` (a LoggerAdapter)::

    log = logging.getLogger("edgeagent.runtime")
    log.info("member failed", extra=fields(member="node-3", incarnation=4))
    node_log = with_fields(log, node="node-1")
    node_log.info("joined", extra=fields(peers=4))

Text (the default) gives::

    ts=2026-11-26T13:05:01.250Z level=info logger=edgeagent.runtime msg="member failed" member=node-3 incarnation=4

and ``json`` gives::

    {"ts": "2026-11-26T13:05:01.250Z", "level": "info", "logger": "edgeagent.runtime", "msg": "member failed", "member": "node-3", "incarnation": 4}

Tracebacks are folded into the same line (``exc="..."`` with escaped
newlines, or an ``"exc"`` member), so every record is exactly one line. A
field whose name collides with ts/level/logger/msg/exc is written as
``field.NAME``; a ``(host, port)`` address is written ``host:port``.

Under systemd, when stderr is the journal (``JOURNAL_STREAM`` names stderr's device and inode,
systemd.exec(5)), each line starts with its syslog priority, ``<3>`` error, ``<4>`` warning,
``<6>`` info, ``<7>`` debug (sd-daemon(3)), so ``journalctl -p warning`` filters by level.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from collections.abc import Mapping, MutableMapping
from typing import IO, Any

FIELDS_ATTR = "fields"  # the ``extra`` key holding a record's structured fields
RESERVED = ("ts", "level", "logger", "msg", "exc")
LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
# aiocoap's contexts log every unmatched response and RST at info ("Response ... could not
# be matched", "sending RST": a notification after an observation ended), which reads like
# a fault in an agent's log: below debug, only their warnings and errors are shown.
QUIET_LIBRARY_LOGGERS = ("coap", "coap-server")
JOURNAL_STREAM_ENV = "JOURNAL_STREAM"  # "DEVICE:INODE" of the stream systemd connected to journald
# syslog(3) priorities, as sd-daemon(3)'s SD_ERR, SD_WARNING, SD_INFO, SD_DEBUG prefixes.
JOURNAL_PRIORITIES = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}
_BARE_VALUE = re.compile(r"^[A-Za-z0-9_.:/@+\-\[\],]+$")
_BAD_KEY_CHARS = re.compile(r"[^A-Za-z0-9_.\-]")


def fields(**values: Any) -> dict[str, dict[str, Any]]:
    """``extra=`` for a log call carrying structured fields: ``log.info("x", extra=fields(a=1))``."""
    return {FIELDS_ATTR: values}


class _FieldsAdapter(logging.LoggerAdapter):  # type: ignore[type-arg]
    """Adds fixed fields to every record; per-call ``fields(...)`` are merged over them."""

    def process(
        self, msg: Any, kwargs: MutableMapping[str, Any]
    ) -> tuple[Any, MutableMapping[str, Any]]:
        extra = dict(kwargs.get("extra") or {})
        merged = dict(self.extra or {})
        merged.update(extra.get(FIELDS_ATTR) or {})
        extra[FIELDS_ATTR] = merged
        kwargs["extra"] = extra
        return msg, kwargs


def with_fields(logger: logging.Logger, **values: Any) -> logging.LoggerAdapter:  # type: ignore[type-arg]
    """A logger that adds ``values`` as fields to every record it emits."""
    return _FieldsAdapter(logger, values)


def _timestamp(created: float) -> str:
    seconds = int(created)
    millis = int((created - seconds) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"


def _plain(value: Any) -> Any:
    """Addresses (``(host, port)`` tuples, as everywhere in gossip/) read as ``host:port``."""
    if (
        isinstance(value, tuple)
        and len(value) == 2
        and isinstance(value[0], str)
        and isinstance(value[1], int)
    ):
        host, port = value
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return value


def _record_items(record: logging.LogRecord) -> list[tuple[str, Any]]:
    """The ordered (key, value) pairs of one record."""
    items: list[tuple[str, Any]] = [
        ("ts", _timestamp(record.created)),
        ("level", record.levelname.lower()),
        ("logger", record.name),
        ("msg", record.getMessage()),
    ]
    extra = getattr(record, FIELDS_ATTR, None)
    if isinstance(extra, Mapping):
        for key, value in extra.items():
            name = str(key)
            items.append((f"field.{name}" if name in RESERVED else name, _plain(value)))
    if record.exc_info:
        items.append(("exc", logging.Formatter().formatException(record.exc_info)))
    elif record.exc_text:
        items.append(("exc", record.exc_text))
    if record.stack_info:
        items.append(("stack", record.stack_info))
    return items


def format_value(value: Any) -> str:
    """One key=value value: bare when safe, else double-quoted with escapes (never a newline)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    text = value if isinstance(value, str) else str(value)
    if _BARE_VALUE.match(text):
        return text
    return json.dumps(text, ensure_ascii=False)


class KeyValueFormatter(logging.Formatter):
    """``ts=... level=info logger=... msg="..." key=value`` on one line."""

    def format(self, record: logging.LogRecord) -> str:
        return " ".join(
            f"{_BAD_KEY_CHARS.sub('_', k) or '_'}={format_value(v)}"
            for k, v in _record_items(record)
        )


class JsonFormatter(logging.Formatter):
    """One JSON object per line; values that JSON cannot hold are written with ``str()``."""

    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(dict(_record_items(record)), default=str, ensure_ascii=False)


FORMATTERS: dict[str, type[logging.Formatter]] = {"text": KeyValueFormatter, "json": JsonFormatter}


def journal_priority(levelno: int) -> int:
    """The syslog priority of a logging level (a level between two takes the more severe)."""
    return next((p for level, p in sorted(JOURNAL_PRIORITIES.items()) if levelno <= level), 2)


class JournalFormatter(logging.Formatter):
    """Another formatter's line behind its journald priority prefix: ``<6>ts=... level=info``."""

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        return f"<{journal_priority(record.levelno)}>{self.inner.format(record)}"


def is_journal(stream: IO[str], environ: Mapping[str, str] | None = None) -> bool:
    """True if ``stream`` is the journal stream systemd announced in ``JOURNAL_STREAM``.

    The variable is inherited by children whose stderr may go elsewhere, so it is compared with
    the stream's own device and inode, as systemd.exec(5) advises.
    """
    announced = (os.environ if environ is None else environ).get(JOURNAL_STREAM_ENV, "")
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):  # io.StringIO and closed streams have no fd
        return False
    return announced == f"{st.st_dev}:{st.st_ino}"


def setup_logging(
    fmt: str = "text",
    level: str | int = "info",
    stream: IO[str] | None = None,
    *,
    journal: bool | None = None,
) -> logging.Handler:
    """Send all logging to ``stream`` (default stderr) as ``fmt`` ("text" or "json") at ``level``.

    ``journal`` adds the journald priority prefixes; None (the default) adds them when the
    stream is the journal (:func:`is_journal`). Calling it again replaces the handler it
    installed before. Returns the handler.
    """
    if fmt not in FORMATTERS:
        raise ValueError(f"log format must be one of {sorted(FORMATTERS)}, not {fmt!r}")
    numeric = LEVELS.get(level, None) if isinstance(level, str) else level
    if numeric is None:
        raise ValueError(f"log level must be one of {sorted(LEVELS)}, not {level!r}")
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_edgeagent", False)]:
        root.removeHandler(old)
    out = stream if stream is not None else sys.stderr
    handler = logging.StreamHandler(out)
    formatter = FORMATTERS[fmt]()
    if journal if journal is not None else is_journal(out):
        formatter = JournalFormatter(formatter)
    handler.setFormatter(formatter)
    handler._edgeagent = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(numeric)
    for name in QUIET_LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.NOTSET if numeric <= logging.DEBUG else logging.WARNING)
    return handler
