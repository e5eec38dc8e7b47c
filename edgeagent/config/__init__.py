"""The agent's resolved configuration, and the loader that builds it.

One immutable :class:`AgentConfig` is built once at start-up by
:func:`load_config` from four layers, each overriding the one before::

    defaults  <  firmware profile  <  TOML file (-c)  <  command-line flags

Nothing below ``edgeagent/`` reads files or the environment: the gossip
settings leave here as a finished :class:`~gossip.config.GossipConfig`.

The package, one concept a module: :mod:`.schema` (the values, the keys and
every default, written once), :mod:`.checks` (one check per kind of value),
:mod:`.reader` (a TOML document read with one-line errors),
:mod:`.profiles` (the firmware profiles), :mod:`.layers` (what each layer
sets), :mod:`.cli_args` (the ``run`` flags), :mod:`.machine` (what is read
from the host) and :mod:`.loader` (:func:`load_config`). Imports go one way,
schema <- checks <- reader <- profiles <- layers <- loader, so there is no
cycle.

How the layers combine
----------------------
* Scalars (name, bind, cluster, ...): the highest layer that sets one wins.
  Lists are replaced, not merged: ``--join`` replaces the file's ``join``.
* Gossip timing: each ``[gossip]`` key is taken from the highest layer that
  sets it, *except* that a ``preset`` starts over. The highest layer that
  names a ``preset`` (the profile always does; the file in ``[gossip]``;
  ``--preset``) picks the base preset, and only the gossip keys from that
  layer and the layers above it apply. A preset is a coherent set of timings,
  so naming one means "this timing, plus what I set here": ``--preset wan``
  gives plain WAN timing, not WAN mixed with the profile's LAN tweaks, and a
  file that says only ``preset = "lan"`` gives memberlist's LAN timing even on
  a board whose profile tunes it (rpi-3's ``probe_timeout = 0.8`` is dropped).
  To keep a profile's tuning, leave ``preset`` out. The dropped keys are listed
  in ``AgentConfig.gossip_dropped`` (``"gossip.probe_timeout
  (firmware_profiles/rpi-3.toml)"``) for the daemon to log once at start.
* ``GossipConfig`` checks its own invariants (e.g. probe_timeout <
  probe_interval); a broken one is a ConfigError naming the highest file that
  set one of the keys involved, e.g. ``agent.toml: gossip.probe_timeout:
  expected less than gossip.probe_interval (1 s), got 2``.
* ``[limits]`` feed both ``AgentConfig.limits`` and the matching
  ``GossipConfig`` fields (``max_members``, ``max_broadcast_queue``,
  ``max_state_bytes``); they are set only in ``[limits]``, per key.
* Feature switches (mDNS, metrics, mesh DNS): the profile's ``[features]``
  give the defaults; the file's ``[features]`` and its top-level ``mdns`` /
  ``metrics`` / ``dns`` keys override them, then flags. ``metrics`` and
  ``dns`` take an address (``"HOST:PORT"``, which turns the feature on),
  ``true`` (on, at the default address) or ``false`` (off).
  ``AgentConfig.features`` reports the final switches.

TOML file schema (see ``edgeagent/example-config.toml`` for an annotated copy)
------------------------------------------------------------------------------
Top level::

    name = "node-1"                   # node name; default: HOSTNAME-XXXXXX (from the node id)
    bind = "0.0.0.0:7946"             # gossip UDP+TCP; port 0 picks one
    advertise = "192.0.2.10:7946"     # what peers dial; default: from bind
    join = ["192.0.2.11:7946"]        # seeds (a bare host means port 7946)
    cluster = "edgeagent"             # cluster name, the AEAD associated data
    key_file = "/etc/edgeagent/keyring"  # must exist; default: <state_dir>/keyring
    enroll_port = 7947                # join-token enrollment (TLS) on the CA holder;
                                      # default: the bind port + 1; 0 picks one
    state_dir = "/var/lib/edgeagent"
    profile = "rpi-4"                 # default: detected from the device tree
    log_format = "text"               # "text" (key=value) | "json"
    log_level = "info"                # debug | info | warning | error
    metrics = "127.0.0.1:9464"        # or true / false
    dns = "127.0.0.1:5354"            # or true / false
    coap = "0.0.0.0:5683"             # or true / false
    mdns = true

Tables::

    [gossip]    preset = "lan" | "wan" | "local", and any GossipConfig field
                except cluster_name (use ``cluster``) and the three limits
    [limits]    max_members, max_broadcast_queue, max_state_bytes
    [features]  mdns, metrics, dns (booleans)
    [overlay]   prefix = "10.99.0.0/16", block_prefixlen = 28,
                dead_quarantine_s = 600
    [[service]] one per instance of a mesh service this node serves: name = "temperature",
                uri = "coap://127.0.0.1:5684/sensors", weight = 1 (1..1000),
                tags = { site = "hall", version = "1.2" } (checked by
                overlay.catalog.make_instance; errors name ``service[I].KEY``)
    [services]  site = "hall" (this node's site: locality, and the site tag of its instances
                that set none); mdns_import, mdns_export (booleans, default true; both
                also need mdns)
    [mqtt]      listen = "0.0.0.0:1883" (the local MQTT broker's TCP listener), or false
                tls_listen, tls_cert, tls_key, tls_ca (a TLS listener; tls_ca: client
                certificates required); attach = "HOST:PORT", attach_topics =
                ["FILTER [in|out|both [QOS]]"] (bridge to an existing broker),
                attach_tls_ca / attach_tls_cert / attach_tls_key (TLS to it),
                attach_username / attach_password; see mqtt_extra
    [policy]    trusted_keys = ["policy-signing.pub", "<base64 of 32 bytes>"]: operators'
                Ed25519 public keys for signed policy bundles (at most 16; none: off);
                url = "https://..." (poll for the signed envelope, ETag), ca = PATH (the
                endpoint's CA; default: the system's), interval = seconds (60),
                report_url = "https://..." (the node's reported state is sent there)

Relative paths in the file are relative to the file's directory. Unknown keys
are errors. Every error is one :class:`~edgeagent.errors.ConfigError` line
naming the file (or flag), the key and what was expected, e.g.
``/etc/edgeagent.toml: gossip.probe_interval: expected a positive number, got "fast"``.
"""

from __future__ import annotations

from .checks import parse_hostport, show
from .cli_args import add_agent_arguments, add_enroll_port_argument
from .loader import load_config
from .machine import default_state_dir, read_device_model, read_memory_mb
from .profiles import Profile, detect_profile, load_profiles, parse_profile
from .reader import TableReader, read_toml
from .schema import (
    DEFAULT_BIND_HOST,
    DEFAULT_BLOCK_PREFIXLEN,
    DEFAULT_CLUSTER,
    DEFAULT_DEAD_QUARANTINE_S,
    DEFAULT_DNS_PORT,
    DEFAULT_GOSSIP_PORT,
    DEFAULT_LOCAL_HOST,
    DEFAULT_LOG_FORMAT,
    DEFAULT_LOG_LEVEL,
    DEFAULT_METRICS_PORT,
    DEFAULT_OVERLAY_PREFIX,
    DEFAULT_PRESET,
    DEFAULT_PROFILE,
    FILE_KEYS,
    GOSSIP_FIELDS_ELSEWHERE,
    LOG_FORMATS,
    LOG_LEVELS,
    OVERLAY_KEYS,
    AgentConfig,
    Features,
    HostPort,
    Limits,
)

__all__ = [
    "DEFAULT_BIND_HOST",
    "DEFAULT_BLOCK_PREFIXLEN",
    "DEFAULT_CLUSTER",
    "DEFAULT_DEAD_QUARANTINE_S",
    "DEFAULT_DNS_PORT",
    "DEFAULT_GOSSIP_PORT",
    "DEFAULT_LOCAL_HOST",
    "DEFAULT_LOG_FORMAT",
    "DEFAULT_LOG_LEVEL",
    "DEFAULT_METRICS_PORT",
    "DEFAULT_OVERLAY_PREFIX",
    "DEFAULT_PRESET",
    "DEFAULT_PROFILE",
    "FILE_KEYS",
    "GOSSIP_FIELDS_ELSEWHERE",
    "LOG_FORMATS",
    "LOG_LEVELS",
    "OVERLAY_KEYS",
    "AgentConfig",
    "Features",
    "HostPort",
    "Limits",
    "Profile",
    "TableReader",
    "add_agent_arguments",
    "add_enroll_port_argument",
    "default_state_dir",
    "detect_profile",
    "load_config",
    "load_profiles",
    "parse_hostport",
    "parse_profile",
    "read_device_model",
    "read_memory_mb",
    "read_toml",
    "show",
]
