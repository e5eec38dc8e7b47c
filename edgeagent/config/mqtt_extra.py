"""The ``[mqtt]`` keys beyond ``listen``: the TLS listener and attach mode.

``tls_listen = "0.0.0.0:8883"`` with ``tls_cert`` and ``tls_key`` (PEM files) opens a second,
TLS (>= 1.2) listener on the same broker; ``tls_ca`` (optional) makes client certificates
required and verified against that CA bundle. ``attach = "127.0.0.1:1883"`` with
``attach_topics = ["sensors/# out 1", "cmd/# in", "state/# both 1"]`` (one
``FILTER [in|out|both [QOS]]`` a string, mosquitto bridge ``topic`` syntax, direction
default ``out``, QoS default 0) bridges those filters to an existing broker
(``edgeagent/mqtt_attach.py``); ``attach_tls_ca`` (a CA bundle) makes that connection TLS
(>= 1.2, the broker's certificate verified against it and its name or IP checked against
the ``attach`` host), ``attach_tls_cert`` with ``attach_tls_key`` add a client certificate,
``attach_username`` (with an optional ``attach_password``) is sent in CONNECT. Every bad value is one ConfigError naming the key; the
certificate files are only checked to be readable here, their contents when the listener
starts (also a ConfigError).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .checks import Invalid, check_listener, check_path, check_peer
from .reader import TableReader
from .schema import AttachTopic, MqttAttach, MqttTls

DIRECTIONS = ("in", "out", "both")
MAX_ATTACH_TOPICS = 64


def check_attach_topic(value: object) -> AttachTopic:
    expected = '"FILTER [in|out|both [QOS]]"'
    if not isinstance(value, str):
        raise Invalid(expected)
    words = value.split()
    if not 1 <= len(words) <= 3:
        raise Invalid(expected)
    from overlay.mqtt.codec import check_topic_filter  # only when [mqtt] attach_topics is set

    why = check_topic_filter(words[0])
    if why is not None or words[0].startswith("$share/"):
        raise Invalid(f"{expected} with a topic filter that is not $share ({why or 'shared'})")
    direction = words[1] if len(words) > 1 else "out"
    if direction not in DIRECTIONS:
        raise Invalid(f"{expected}: direction in, out or both")
    qos = words[2] if len(words) > 2 else "0"
    if qos not in ("0", "1", "2"):
        raise Invalid(f"{expected}: QoS 0, 1 or 2")
    return AttachTopic(words[0], direction, int(qos))


def _readable(value: object, base: Path) -> Path:
    path = check_path(value, base)
    if not os.access(path, os.R_OK) or not path.is_file():
        raise Invalid(f"a readable file (cannot read {path})")
    return path


def _topics(value: object) -> tuple[AttachTopic, ...]:
    if not isinstance(value, list) or not value or len(value) > MAX_ATTACH_TOPICS:
        raise Invalid(f"a list of 1..{MAX_ATTACH_TOPICS} topic strings")
    topics: list[AttachTopic] = []
    for item in value:
        try:
            topics.append(check_attach_topic(item))
        except Invalid as exc:
            raise Invalid(f"each item {exc.expected}") from None
    return tuple(topics)


def read_mqtt_extra(
    reader: TableReader, table: Mapping[str, Any], base: Path
) -> tuple[MqttTls | None, MqttAttach | None]:
    """The TLS listener and attach settings of one ``[mqtt]`` table (None: not set)."""
    src = reader.source

    def get(key: str, check: Any) -> Any:
        return reader.get(table, key, check, "mqtt.")

    tls_listen = get("tls_listen", check_listener)
    cert = get("tls_cert", lambda v: _readable(v, base))
    key = get("tls_key", lambda v: _readable(v, base))
    ca = get("tls_ca", lambda v: _readable(v, base))
    tls = None
    if tls_listen is not None:
        for name, got in (("tls_cert", cert), ("tls_key", key)):
            if got is None:
                raise ConfigError(f"{src}: mqtt.{name}: required with mqtt.tls_listen")
        tls = MqttTls(tls_listen, cert, key, ca)
    elif cert is not None or key is not None or ca is not None:
        raise ConfigError(f"{src}: mqtt.tls_listen: required with mqtt.tls_cert / tls_key / tls_ca")
    broker = get("attach", check_peer)
    topics = get("attach_topics", _topics)
    extra = _attach_extra(get, src, base)
    attach = None
    if broker is not None:
        if topics is None:
            raise ConfigError(f"{src}: mqtt.attach_topics: required with mqtt.attach")
        attach = MqttAttach(broker, topics, *extra)
    elif topics is not None or any(x is not None for x in extra):
        given = "attach_topics" if topics is not None else "attach_tls_* / attach_username"
        raise ConfigError(f"{src}: mqtt.attach: required with mqtt.{given}")
    return tls, attach


def _attach_extra(get: Any, src: str, base: Path) -> tuple[Any, ...]:
    """``attach_tls_ca``, ``attach_tls_cert``, ``attach_tls_key``, ``attach_username``,
    ``attach_password``, checked together (a cert needs its key and a CA, a password a user)."""
    ca, cert, key = (
        get(f"attach_tls_{k}", lambda v: _readable(v, base)) for k in ("ca", "cert", "key")
    )
    username = get("attach_username", lambda v: _credential(v, "a user name"))
    password = get("attach_password", lambda v: _credential(v, "a password"))
    if (cert is None) != (key is None):
        missing = "attach_tls_key" if key is None else "attach_tls_cert"
        raise ConfigError(
            f"{src}: mqtt.{missing}: required with mqtt.attach_tls_cert / attach_tls_key"
        )
    if cert is not None and ca is None:
        raise ConfigError(f"{src}: mqtt.attach_tls_ca: required with mqtt.attach_tls_cert")
    if password is not None and username is None:
        raise ConfigError(f"{src}: mqtt.attach_username: required with mqtt.attach_password")
    return ca, cert, key, username, password


def _credential(value: object, what: str) -> str:
    if not isinstance(value, str) or not value or len(value.encode()) > 65535 or "\0" in value:
        raise Invalid(f"{what}: a non-empty string (at most 65535 bytes, no NUL)")
    return value
