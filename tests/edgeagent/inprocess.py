"""Real agents inside the test's own event loop: real sockets on loopback, no subprocess.

Shared by the tests that need to reach into a running agent (its features, its driver):
``start`` builds an :class:`~edgeagent.agent.Agent` from command-line flags, runs it as a task
and returns once its control socket answers; ``stop`` asks for the graceful leave and checks
the exit code. Import as ``from tests.edgeagent.inprocess import ...``.

Each agent's state dir is provisioned as a member of a cluster (what ``edgeagent join`` saves,
via :func:`edgeagent.onboarding.provision_member`), unless it already holds cluster material.
Agents given the same ``shared`` directory are members of one cluster (one in-memory CA and
keyring per directory); without it each agent is its own cluster.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeagent.agent import Agent
from edgeagent.config import add_agent_arguments, load_config
from edgeagent.control import ControlClient, socket_path
from edgeagent.errors import AgentUnavailable
from edgeagent.host import Feature
from edgeagent.localmesh import port_free
from edgeagent.onboarding import ClusterCA, existing_material, new_ca, provision_member

TIMEOUT = 60.0  # generous: the machine is shared
PORTS = range(20000, 32760)  # below Linux's ephemeral range (32768-60999): no socket gets one unasked
_CLUSTERS: dict[Path, ClusterCA] = {}  # shared dir -> its cluster's CA and keyring


def make_agent(
    state_dir: Path,
    name: str = "solo",
    *flags: str,
    extra_features: Mapping[str, Feature] | None = None,
    shared: Path | None = None,
) -> Agent:
    """An agent on 127.0.0.1 at :func:`agent_port`, LOCAL timing, mDNS and metrics off."""
    parser = argparse.ArgumentParser()
    add_agent_arguments(parser)
    argv = ["--name", name, "--bind", f"127.0.0.1:{agent_port()}", "--no-mdns", "--preset", "local",
            "--state-dir", str(state_dir), "--metrics", "off", "--coap", "off", "--mqtt", "off", *flags]  # fmt: skip
    config = load_config(parser.parse_args(argv))
    if config.key_file is None and not existing_material(state_dir):
        key = (shared or state_dir).absolute()
        ca = _CLUSTERS.get(key)
        if ca is None or ca.cluster != config.cluster:
            ca = _CLUSTERS[key] = new_ca(config.cluster)
        provision_member(ca, state_dir, config.name)
    return Agent(config, extra_features=extra_features)


def agent_port(host: str = "127.0.0.1") -> int:
    """A gossip port whose neighbours + 1 and + 2 (enrollment, channel) are free too.

    Not port 0: the kernel then picks the gossip port from the ephemeral range, and the two
    beside it may be held by any socket it handed out (a CI run lost a test to a channel port
    in use). Picked below that range and checked for UDP and TCP.
    """
    rng = random.Random()
    for _ in range(500):
        port = rng.choice(PORTS)
        if all(port_free(host, port + k) for k in range(3)):
            return port
    raise OSError(f"no three free ports side by side on {host}")


def cluster_ca(state_dir: Path, shared: Path | None = None) -> ClusterCA:
    """The CA :func:`make_agent` provisioned ``state_dir`` with (to provision more members)."""
    return _CLUSTERS[(shared or state_dir).absolute()]


async def call(state_dir: Path, cmd: str, **args: Any) -> Any:
    """One control command, retried until the agent's socket answers."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        try:
            return await asyncio.to_thread(ControlClient(socket_path(state_dir)).call, cmd, **args)
        except AgentUnavailable:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


async def wait_for(predicate: Callable[[], bool], what: str) -> None:
    """Poll ``predicate`` until it holds; fail the test after :data:`TIMEOUT`."""
    deadline = time.monotonic() + TIMEOUT
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


@dataclass(slots=True)
class Running:
    """An agent running as a task of the test's loop."""

    agent: Agent
    task: asyncio.Task[int]
    state_dir: Path


async def start(
    state_dir: Path, name: str, flags: Sequence[str] = (), shared: Path | None = None
) -> Running:
    """Run an agent in ``state_dir`` (a member of ``shared``'s cluster, if given); return once
    every feature started."""
    state_dir.mkdir(exist_ok=True)
    agent = make_agent(state_dir, name, *flags, shared=shared)
    task = asyncio.create_task(agent.run())
    answered = asyncio.ensure_future(call(state_dir, "status"))
    # the control socket answers from the start, unless the agent fails before it opens
    await asyncio.wait({answered, task}, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        answered.cancel()
        raise AssertionError(f"the agent exited {task.result()} before its control socket answered")
    await answered
    await wait_for(lambda: agent.started or task.done(), "the agent's features to start")
    if task.done():
        task.result()  # raise the agent's error
    return Running(agent, task, state_dir)


async def stop(running: Running) -> None:
    """Leave gracefully; the agent must exit 0."""
    running.agent.request_stop()
    assert await asyncio.wait_for(running.task, TIMEOUT) == 0
