"""The ``edgeagent run`` flags: the top layer of the config.

Every flag defaults to None ("not given"), so :func:`~edgeagent.config.load_config`
can tell a flag that was passed from one that was not; the help text names
each default from :mod:`edgeagent.config.schema`.
"""

from __future__ import annotations

import argparse

from gossip.config import PRESETS

from .schema import (
    DEFAULT_BIND_HOST,
    DEFAULT_CLUSTER,
    DEFAULT_COAP_HOST,
    DEFAULT_COAP_PORT,
    DEFAULT_DNS_PORT,
    DEFAULT_GOSSIP_PORT,
    DEFAULT_LOCAL_HOST,
    DEFAULT_LOG_FORMAT,
    DEFAULT_LOG_LEVEL,
    DEFAULT_METRICS_PORT,
    DEFAULT_MQTT_HOST,
    DEFAULT_MQTT_PORT,
    DEFAULT_PROFILE,
    ENROLL_PORT_OFFSET,
    LOG_FORMATS,
    LOG_LEVELS,
    STATE_DIR_DEFAULT_TEXT,
)


def add_agent_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``edgeagent run`` flags. Every flag defaults to None ("not given")."""
    if parser.epilog is None:
        parser.epilog = (
            "Settings come from built-in defaults < the firmware profile < the -c FILE < these flags. "
            "The file is TOML; an annotated example ships as edgeagent/example-config.toml."
        )
    _add_membership_flags(parser)
    _add_identity_flags(parser)
    _add_feature_flags(parser)


def _add_membership_flags(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add(
        "-c",
        "--config",
        metavar="FILE",
        help="TOML config file (default: none; built-in defaults and the firmware profile)",
    )
    add(
        "--name",
        help="node name, unique in the cluster (default: HOSTNAME-XXXXXX from the node id, chosen once)",
    )
    add(
        "--bind",
        metavar="HOST:PORT",
        help=f"gossip UDP+TCP address; port 0 picks one (default: {DEFAULT_BIND_HOST}:{DEFAULT_GOSSIP_PORT}; [::]:PORT for IPv6)",
    )
    add(
        "--advertise",
        metavar="HOST:PORT",
        help="address peers should dial (default: derived from --bind)",
    )
    add(
        "--join",
        metavar="HOST:PORT",
        action="append",
        help=f"seed to join; repeatable; a bare HOST means port {DEFAULT_GOSSIP_PORT} (default: none, peers come from mDNS)",
    )
    add(
        "--profile",
        metavar="NAME",
        help=f"firmware profile (default: detected from /proc/device-tree/model, else {DEFAULT_PROFILE}; see 'edgeagent profiles')",
    )
    add(
        "--preset",
        choices=sorted(PRESETS),
        help=(
            "gossip timing preset, memberlist's (default: the profile's, lan in all shipped ones); "
            "replaces the profile's and the file's gossip timing keys"
        ),
    )


def _add_identity_flags(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add(
        "--cluster",
        metavar="NAME",
        help=f"cluster name; agents only talk within one (default: {DEFAULT_CLUSTER})",
    )
    add(
        "--key-file",
        metavar="FILE",
        help=(
            "cluster keyring file; it must exist (default: STATE_DIR/keyring, written by "
            "'edgeagent init' or 'edgeagent join')"
        ),
    )
    add(
        "--state-dir",
        metavar="DIR",
        help=f"where identity, keys and state live (default: {STATE_DIR_DEFAULT_TEXT})",
    )


def add_enroll_port_argument(parser: argparse.ArgumentParser) -> None:
    """``--enroll-port``: shared by ``run`` and ``init`` (whose token names the port)."""
    parser.add_argument(
        "--enroll-port",
        metavar="PORT",
        help=(
            "TCP port where a node holding the mesh CA key (the one that ran 'edgeagent init') "
            f"enrolls new devices with join tokens, on the --bind host; 0 picks one (default: the "
            f"gossip port + {ENROLL_PORT_OFFSET}, {DEFAULT_GOSSIP_PORT + ENROLL_PORT_OFFSET})"
        ),
    )


def _add_feature_flags(parser: argparse.ArgumentParser) -> None:
    add_enroll_port_argument(parser)
    add = parser.add_argument
    add(
        "--no-mdns",
        dest="mdns",
        action="store_false",
        default=None,
        help="do not advertise or browse _edgeagent._udp by mDNS, nor announce enrollment as _edgeagent-join._tcp, nor import or export _coap._udp services (default: mDNS on in every shipped profile)",
    )
    add(
        "--metrics",
        metavar="HOST:PORT",
        help=f"serve Prometheus metrics at http://HOST:PORT/metrics, or 'off' (default: off, unless the profile turns it on at {DEFAULT_LOCAL_HOST}:{DEFAULT_METRICS_PORT})",
    )
    add(
        "--dns",
        metavar="HOST:PORT",
        help=(
            "serve mesh DNS on HOST:PORT, or 'off': NODE.node.mesh and SERVICE.mesh "
            f"(default: off, unless the profile turns it on at {DEFAULT_LOCAL_HOST}:{DEFAULT_DNS_PORT})"
        ),
    )
    add(
        "--coap",
        metavar="HOST:PORT",
        help=(
            "serve CoAP to local clients on UDP HOST:PORT and route SERVICE.mesh requests "
            f"through the mesh, or 'off' (default: {DEFAULT_COAP_HOST}:{DEFAULT_COAP_PORT})"
        ),
    )
    add(
        "--mqtt",
        metavar="HOST:PORT",
        help=(
            "be the MQTT broker (3.1.1 and 5) for local clients on TCP HOST:PORT, or 'off' "
            f"(default: {DEFAULT_MQTT_HOST}:{DEFAULT_MQTT_PORT}; also [mqtt] listen in the file)"
        ),
    )
    add(
        "--log-format",
        choices=LOG_FORMATS,
        help=f"log lines as key=value text or JSON (default: {DEFAULT_LOG_FORMAT})",
    )
    add(
        "--log-level",
        choices=LOG_LEVELS,
        help=f"minimum level logged (default: {DEFAULT_LOG_LEVEL})",
    )
