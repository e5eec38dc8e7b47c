"""The compose file of one container testbed: N agents on a private bridge, optional broker.

How it works. :func:`compose_document` returns the file as plain data and :func:`write_compose`
writes it as YAML (``compose.yaml`` in the run dir; a small emitter, since the project has no
YAML dependency). Services ``h1``..``hN`` run the ``edgeagent-node`` image (entrypoint
``testbed/containers/entrypoint.sh``): ``h1`` is the issuer (``edgeagent init``, then a join
token written to the run dir's ``shared/token``, bind-mounted at ``/shared``), the others
enroll with that token and find each other and the issuer by mDNS (multicast is flooded on a
bridge). Each node's state dir is the run dir's ``state/hN``, bind-mounted (the host talks to
its agent over the control socket there, in milliseconds where ``docker exec`` of the CLI takes
a second). Each node has a fixed address ``SUBNET.(10+i)``, ``NET_ADMIN`` (the faults are
nftables rules inside its namespace), docker's init as PID 1 (signals reach the agent,
orphans are reaped) and ``edgeagent status`` as its healthcheck. With a broker, service
``cloud`` runs mosquitto on ``SUBNET.2:1883`` (anonymous, the private network only) and each
agent gets ``EA_CLOUD_BROKER``. With a policy endpoint, service ``policy`` runs
``policy_server.py`` (copied into the run dir's ``policy/``, mounted read-only at ``/policy``)
on ``SUBNET.3:8443``, serving ``policy/www``; agents reach it as ``https://policy:8443/NAME``
(docker's DNS on the project network) and trust ``/shared/policy-ca.pem``
(:func:`policy_config`). A node listed in ``node_args`` gets those ``edgeagent run`` flags
after the common ones (a config file of its own: ``--config`` again, the last one wins).

Every container and the network carry the label ``org.edgeagent.testbed=<project>``, and the
project name starts with ``edgeagent-tb-``, so cleanup finds exactly what a testbed made.
Format version 2.4: docker-compose 1.29 and ``docker compose`` v2 both read it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PROJECT_PREFIX = "edgeagent-tb-"
TESTBED_LABEL = "org.edgeagent.testbed"
NETWORK = "mesh"
GOSSIP_PORT = 7946
BROKER_PORT = 1883
FIRST_HOST_OCTET = 10  # h1 is SUBNET.11, hN is SUBNET.(10+N)
BROKER_OCTET = 2
POLICY_OCTET = 3
POLICY_PORT = 8443
POLICY_HOST = "policy"  # the service's name: docker's DNS resolves it on the network
POLICY_FILE = "bundle.signed"  # the served envelope
POLICY_URL = f"https://{POLICY_HOST}:{POLICY_PORT}/{POLICY_FILE}"
POLICY_REPORT_URL = f"https://{POLICY_HOST}:{POLICY_PORT}/report"  # policy_server.REPORT_PATH
POLICY_CA = "/shared/policy-ca.pem"  # in every agent's container
IMAGE_PYTHON = "/opt/edgeagent/bin/python"
STATE_DIR = "/var/lib/edgeagent"  # the agent's state dir in the image
MAX_NODES = 200
_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")
_YAML_WORDS = {"true", "false", "yes", "no", "on", "off", "null", "y", "n", "~"}
HEALTH = {"interval": "5s", "timeout": "10s", "retries": 3, "start_period": "120s"}


@dataclass(frozen=True, slots=True)
class Plan:
    """What one testbed's compose file says: its project, image, subnet and options."""

    project: str
    image: str
    subnet_prefix: str  # "172.29.7": the /24's first three octets
    nodes: int
    cluster: str
    token_mode: str = "mdns"  # or "address": the token names the issuer's address
    broker: bool = False
    run_args: tuple[str, ...] = ()
    policy: bool = False  # the "policy" HTTPS endpoint service
    node_args: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (node, more run flags)

    @property
    def subnet(self) -> str:
        return f"{self.subnet_prefix}.0/24"

    def names(self) -> list[str]:
        return [f"h{i}" for i in range(1, self.nodes + 1)]

    def ip(self, name: str) -> str:
        return f"{self.subnet_prefix}.{FIRST_HOST_OCTET + int(name[1:])}"

    def container(self, service: str) -> str:
        return f"{self.project}-{service}"

    @property
    def broker_ip(self) -> str:
        return f"{self.subnet_prefix}.{BROKER_OCTET}"

    @property
    def policy_ip(self) -> str:
        return f"{self.subnet_prefix}.{POLICY_OCTET}"

    def args_of(self, name: str) -> tuple[str, ...]:
        return self.run_args + dict(self.node_args).get(name, ())


def compose_document(plan: Plan, shared_dir: Path, state_root: Path | None = None) -> dict[str, Any]:
    """The compose file as data (``state_root``: bind-mount ``state_root/hN`` as each node's
    state dir, so the host reaches its control socket)."""
    if not 1 <= plan.nodes <= MAX_NODES:
        raise ValueError(f"nodes must be 1..{MAX_NODES}, not {plan.nodes}")
    if plan.token_mode not in ("mdns", "address"):
        raise ValueError(f"token mode must be mdns or address, not {plan.token_mode!r}")
    labels = {TESTBED_LABEL: plan.project}
    services: dict[str, Any] = {}
    for name in plan.names():
        env = {
            "EA_NAME": name,
            "EA_ROLE": "issuer" if name == "h1" else "member",
            "EA_CLUSTER": plan.cluster,
            "EA_TOKEN_MODE": plan.token_mode,
            "EA_RUN_ARGS": " ".join(plan.args_of(name)),
        }
        if plan.broker:
            env["EA_CLOUD_BROKER"] = f"{plan.broker_ip}:{BROKER_PORT}"
        services[name] = {
            "image": plan.image,
            "container_name": plan.container(name),
            "hostname": name,
            "init": True,
            "cap_add": ["NET_ADMIN"],
            "environment": env,
            "volumes": [f"{shared_dir}:/shared",
                        *([f"{state_root / name}:{STATE_DIR}"] if state_root is not None else [])],
            "networks": {NETWORK: {"ipv4_address": plan.ip(name)}},
            "labels": labels,
            "healthcheck": {"test": ["CMD", "edgeagent", "status"], **HEALTH},
            "restart": "no",
        }
    if plan.broker:
        services["cloud"] = {
            "image": plan.image,
            "container_name": plan.container("cloud"),
            "hostname": "cloud",
            "init": True,
            "entrypoint": ["mosquitto", "-c", "/shared/mosquitto.conf"],
            "volumes": [f"{shared_dir}:/shared:ro"],
            "networks": {NETWORK: {"ipv4_address": plan.broker_ip}},
            "labels": labels,
            "restart": "no",
        }
    if plan.policy:
        services[POLICY_HOST] = policy_service(plan, shared_dir.parent / "policy", labels)
    return {
        "version": "2.4",
        "services": services,
        "networks": {NETWORK: {
            "driver": "bridge",
            "labels": labels,
            "ipam": {"config": [{"subnet": plan.subnet}]},
        }},
    }


def policy_service(plan: Plan, policy_dir: Path, labels: dict[str, str]) -> dict[str, Any]:
    """The ``policy`` service: ``policy_server.py`` on the image's python, serving ``www``."""
    return {
        "image": plan.image,
        "container_name": plan.container(POLICY_HOST),
        "hostname": POLICY_HOST,
        "init": True,
        "entrypoint": [IMAGE_PYTHON, "/policy/policy_server.py", "--root", "/policy/www",
                       "--cert", "/policy/tls/server.pem", "--key", "/policy/tls/server.key",
                       "--port", str(POLICY_PORT)],  # fmt: skip
        "volumes": [f"{policy_dir}:/policy:ro"],
        "networks": {NETWORK: {"ipv4_address": plan.policy_ip}},
        "labels": labels,
        "restart": "no",
    }


def policy_config(keys: Sequence[str], *, poll: bool, interval: float) -> str:
    """An agent's ``[policy]`` table: trust ``keys`` (base64 Ed25519) and, with ``poll``, poll
    the testbed's endpoint every ``interval`` s (its CA: :data:`POLICY_CA`) and report its
    policy state there (:data:`POLICY_REPORT_URL`; read back with ``policy_reports``)."""
    text = "\n[policy]\ntrusted_keys = [" + ", ".join(json.dumps(k) for k in keys) + "]\n"
    if poll:
        text += f"url = {json.dumps(POLICY_URL)}\nca = {json.dumps(POLICY_CA)}\ninterval = {float(interval)!r}\n"
        text += f"report_url = {json.dumps(POLICY_REPORT_URL)}\n"
    return text


MOSQUITTO_CONF = f"""\
# The testbed's "cloud" broker: anonymous, reachable only on the testbed's private network.
listener {BROKER_PORT} 0.0.0.0
allow_anonymous true
persistence false
log_dest stderr
"""


def write_compose(plan: Plan, run_dir: Path) -> Path:
    """Write ``compose.yaml`` (and the broker's config, the policy server's source and its
    served dir) into ``run_dir``; return its path. The policy endpoint's TLS files
    (``policy/tls``, ``shared/policy-ca.pem``) are the caller's (:mod:`.policy_tls`)."""
    shared = run_dir / "shared"
    shared.mkdir(parents=True, exist_ok=True)
    states = run_dir / "state"
    for name in plan.names():
        (states / name).mkdir(parents=True, exist_ok=True)
    if plan.broker:
        (shared / "mosquitto.conf").write_text(MOSQUITTO_CONF)
    if plan.policy:
        served = run_dir / "policy" / "www"
        served.mkdir(parents=True, exist_ok=True)
        source = Path(__file__).resolve().parent / "policy_server.py"
        (run_dir / "policy" / "policy_server.py").write_text(source.read_text())
    path = run_dir / "compose.yaml"
    header = f"# Generated by testbed.containers.compose for testbed {plan.project}.\n"
    path.write_text(header + to_yaml(compose_document(plan, shared, states)))
    return path


def to_yaml(value: Any, indent: int = 0) -> str:
    """Block-style YAML of dicts, lists and scalars (strings quoted as JSON, a YAML subset)."""
    pad = "  " * indent
    lines: list[str] = []
    if isinstance(value, Mapping):
        for key, item in value.items():
            lines.append(_entry(f"{pad}{_key(key)}:", item, indent))
    elif isinstance(value, Sequence) and not isinstance(value, str):
        for item in value:
            lines.append(_entry(f"{pad}-", item, indent))
    else:
        return f"{pad}{_scalar(value)}\n"
    return "".join(lines)


def _entry(head: str, item: Any, indent: int) -> str:
    if isinstance(item, Mapping | list | tuple) and item:
        return f"{head}\n{to_yaml(item, indent + 1)}"
    if isinstance(item, Mapping):
        return f"{head} {{}}\n"
    if isinstance(item, list | tuple):
        return f"{head} []\n"
    return f"{head} {_scalar(item)}\n"


def _key(key: Any) -> str:
    """A mapping key, bare when it is a plain word YAML reads as that string."""
    text = str(key)
    if _PLAIN_KEY.fullmatch(text) and text.lower() not in _YAML_WORDS:
        return text
    return json.dumps(text)


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    return json.dumps(str(value))
