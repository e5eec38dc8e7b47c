"""The ``[uplink]`` table: the MQTT uplink to cloud brokers (``features/uplink.py``).

::

    [uplink]
    brokers = ["cloud-a.example:8883", "cloud-b.example:8883"]  # tried in order, failover
    topics = [                     # mosquitto bridge ``topic`` syntax, one mapping a string
        "sensors/# out 1",                         # FILTER out|in|both QOS
        "# out 1 site1/ plant/site1/",             # ... LOCAL-PREFIX REMOTE-PREFIX
        "cmd/# in 1 \\"\\" plant/site1/",          # "" is an empty prefix, as in mosquitto
    ]
    ca_file = "cloud-ca.pem"       # TLS: a CA bundle (else the system store), and / or
    cert_file = "node.pem"         # a client certificate with its key
    key_file = "node.key"
    username = "site1"             # optional, with password
    password = "..."
    site = "hall"                  # default: [services] site, else "default"
    spool_max_bytes = 16777216     # the store-and-forward spool (>= 65536)
    ttl_s = 86400                  # a spooled message is dropped after this (0: never)
    primary_retry_s = 30           # on a secondary broker, try the first this often
    standby_s = 30                 # what a non-holder remembers for a takeover, seconds
    standby_max = 10000            # ... and messages at most
    probe_s = 30                   # a non-holder checks it reaches the cloud this often

Every bad value is one ConfigError ``FILE: uplink.KEY: expected ...`` (exit 2). TLS is on
when ``tls = true`` or any of the three files is given. Files are checked to be readable
here; relative paths are relative to the config file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .checks import Invalid, check_bool, check_path, check_positive_number, parse_hostport
from .reader import TableReader
from .schema import UPLINK_KEYS, UplinkSettings, UplinkTopic

MAX_BROKERS = 8
MAX_TOPICS = 64
MAX_PREFIX = 256
EXPECTED_TOPIC = '"FILTER out|in|both QOS [LOCAL-PREFIX REMOTE-PREFIX]"'


def _unquote(word: str) -> str:
    return "" if word == '""' else word


def check_uplink_topic(value: object) -> UplinkTopic:
    """One mapping string (mosquitto's bridge ``topic``: direction and QoS before prefixes)."""
    if not isinstance(value, str):
        raise Invalid(EXPECTED_TOPIC)
    words = value.split()
    if len(words) not in (1, 2, 3, 5):
        raise Invalid(EXPECTED_TOPIC)
    direction = words[1] if len(words) > 1 else "out"
    if direction not in ("in", "out", "both"):
        raise Invalid(f"{EXPECTED_TOPIC}: direction in, out or both")
    qos = words[2] if len(words) > 2 else "0"
    if qos not in ("0", "1", "2"):
        raise Invalid(f"{EXPECTED_TOPIC}: QoS 0, 1 or 2")
    local, remote = (_unquote(words[3]), _unquote(words[4])) if len(words) == 5 else ("", "")
    if len(local) > MAX_PREFIX or len(remote) > MAX_PREFIX:
        raise Invalid(f"{EXPECTED_TOPIC}: prefixes of at most {MAX_PREFIX} characters")
    topic = UplinkTopic(words[0], direction, int(qos), local, remote)
    from overlay.mqtt.codec import check_topic_filter  # only when [uplink] is set

    for filt in (topic.local_filter, topic.remote_filter):
        why = check_topic_filter(filt)
        if why is not None or filt.startswith("$share/"):
            raise Invalid(f"{EXPECTED_TOPIC}: {filt!r} is not a topic filter ({why or 'shared'})")
    return topic


def _topics(value: object) -> tuple[UplinkTopic, ...]:
    if not isinstance(value, list) or not value or len(value) > MAX_TOPICS:
        raise Invalid(f"a list of 1..{MAX_TOPICS} mapping strings {EXPECTED_TOPIC}")
    found = []
    for item in value:
        try:
            found.append(check_uplink_topic(item))
        except Invalid as exc:
            raise Invalid(f"each item {exc.expected}") from None
    return tuple(found)


def _brokers(value: object) -> tuple[tuple[str, int], ...]:
    if not isinstance(value, list) or not value or len(value) > MAX_BROKERS:
        raise Invalid(f'a list of 1..{MAX_BROKERS} "HOST:PORT" strings')
    out = []
    for item in value:
        if not isinstance(item, str) or ":" not in item:
            raise Invalid('a list of "HOST:PORT" strings (the port is required)')
        out.append(parse_hostport(item))
    return tuple(out)


def _readable(value: object, base: Path) -> Path:
    path = check_path(value, base)
    if not os.access(path, os.R_OK) or not path.is_file():
        raise Invalid(f"a readable file (cannot read {path})")
    return path


def _text(value: object) -> str:
    if not isinstance(value, str) or not value or len(value) > 256 or "\0" in value:
        raise Invalid("a non-empty string of at most 256 characters")
    return value


def _site(value: object) -> str:
    from overlay.uplink_select import UplinkSelectError, check_site

    try:
        return check_site(value)  # type: ignore[arg-type]
    except UplinkSelectError as exc:
        raise Invalid(str(exc)) from None


def _at_least(low: float, integer: bool = False) -> Any:
    def check(value: object) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
            raise Invalid(f"a number >= {low}")
        if value < low or value == float("inf") or (integer and not isinstance(value, int)):
            raise Invalid(f"{'an integer' if integer else 'a number'} >= {low}")
        return value

    return check


def read_uplink(reader: TableReader, base: Path) -> UplinkSettings | None:
    """The ``[uplink]`` table (None when absent: the feature is off)."""
    if "uplink" not in reader.data:
        return None
    table = reader.table("uplink")
    reader.check_keys(table, UPLINK_KEYS, "uplink.")

    def get(key: str, check: Any) -> Any:
        return reader.get(table, key, check, "uplink.")

    for key in ("brokers", "topics"):
        if key not in table:
            raise ConfigError(f"{reader.source}: uplink.{key}: required in [uplink]")
    files = {k: get(k, lambda v: _readable(v, base)) for k in ("ca_file", "cert_file", "key_file")}
    if (files["cert_file"] is None) != (files["key_file"] is None):
        missing = "key_file" if files["key_file"] is None else "cert_file"
        raise ConfigError(f"{reader.source}: uplink.{missing}: cert_file and key_file go together")
    username, password = get("username", _text), get("password", _text)
    if password is not None and username is None:
        raise ConfigError(f"{reader.source}: uplink.username: required with uplink.password")
    tls = get("tls", check_bool)
    optional = {
        k: v
        for k, v in {
            "site": get("site", _site),
            "client_id": get("client_id", _text),
            "primary_retry_s": get("primary_retry_s", check_positive_number),
            "probe_s": get("probe_s", check_positive_number),
            "spool_max_bytes": get("spool_max_bytes", _at_least(65536, integer=True)),
            "ttl_s": get("ttl_s", _at_least(0)),
            "standby_s": get("standby_s", _at_least(0)),
            "standby_max": get("standby_max", _at_least(0, integer=True)),
        }.items()
        if v is not None
    }
    return UplinkSettings(
        brokers=get("brokers", _brokers),
        topics=get("topics", _topics),
        tls=tls if tls is not None else any(v is not None for v in files.values()),
        username=username,
        password=password,
        **files,
        **optional,
    )
