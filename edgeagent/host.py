"""The feature host: everything a feature of the daemon may use, and nothing else.

How it works. :class:`~edgeagent.agent.Agent` owns the lifecycle (identity, gossip driver,
control socket, signals, graceful leave). Once the driver runs it calls
``await feature.start(host)`` on each enabled feature, in the order of its feature list, with
one :class:`FeatureHost`; on the way out it calls ``await feature.stop()`` in the reverse
order, after the leave has spread (so metrics and DNS keep answering while it does). A hook
registered with ``before_leave`` runs when the leave begins, before it is broadcast (mDNS sends
its goodbye there). A feature module is imported only when its switch is on.

What a feature gets:

- ``config``: the resolved :class:`~edgeagent.config.AgentConfig`; ``identity``; ``state_dir``;
  ``clock``: the agent's hybrid logical clock (:mod:`edgeagent.clock_store`), main loop only.
- Typed commands to the gossip core (DESIGN principle 2: the core lives on the gossip thread).
  Named operations for the common cases (:meth:`~FeatureHost.set_state`,
  :meth:`~FeatureHost.broadcast`, :meth:`~FeatureHost.join`, :meth:`~FeatureHost.members`,
  :meth:`~FeatureHost.member_states`, ...) and :meth:`~FeatureHost.call` for anything else: it
  runs ``fn(core, now)`` on the gossip thread, ``core`` typed as
  :class:`gossip.core.Membership`. The result must be immutable.
- ``keyring``: the cluster keyring, owned by the gossip thread: touch it only inside
  :meth:`~FeatureHost.call`.
- Control-API commands: ``register_command(name, handler)``; ``add_status(provider)`` adds
  fields to ``edgeagent status``; ``before_leave(hook)``.
- Events: ``add_listener(fn)`` calls ``fn(events, view)`` on the main loop after every update
  from the gossip thread; ``view`` is the latest immutable snapshot.
- ``metrics``: the Prometheus registry, or None when metrics are off; ``logger(name)``.
- ``saver``: the state writer (:mod:`edgeagent.saver`): ``saver.save_json(path, doc)``
  returns a future done once the document is on disk; written off the main loop, retried on
  disk errors. Act on a saved value (publish it, answer a command) only when it is done.
- Other features: ``feature(name)`` is the enabled feature of that name, or None.
- DNS resolvers: ``add_node_resolver`` / ``add_service_resolver``. The mesh DNS feature
  answers ``NODE.node.mesh`` and ``SERVICE.mesh`` from every resolver registered, at query
  time, so the order in which features start does not matter.

``start`` must return promptly (the seeds are joined after every feature started): a feature
that needs seconds to come up runs that part in a task of its own.
"""

from __future__ import annotations

import concurrent.futures
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from gossip import events as ev
from gossip.events import Member
from gossip.keyring import Keyring
from gossip.messages import Address, StateValue
from overlay.hlc import HybridClock

from .config import AgentConfig
from .control import ControlServer, Handler
from .driver import GossipDriver, View
from .persist import NodeIdentity
from .saver import StateSaver

if TYPE_CHECKING:
    from gossip.core import Membership

    from .metrics import Registry

T = TypeVar("T")
DEBUG_COMMANDS_ENV = "EDGEAGENT_DEBUG_COMMANDS"  # "1" enables debug-* control commands (tests only)

Listener = Callable[[tuple[ev.Event, ...], View], None]
Resolver = Callable[[str], list[str]]  # lower-cased DNS label -> address texts
StatusProvider = Callable[[], Mapping[str, Any]]  # extra ``edgeagent status`` fields


LeaveHook = Callable[[], Awaitable[None]]


class Feature(Protocol):
    """One feature of the daemon: started once the driver runs, stopped after the leave."""

    async def start(self, host: FeatureHost) -> None: ...

    async def stop(self) -> None: ...


class FeatureHost:
    """The interface features receive in ``start``; built by the agent once the driver runs."""

    def __init__(
        self,
        config: AgentConfig,
        identity: NodeIdentity,
        driver: GossipDriver[Membership],
        control: ControlServer,
        keyring: Keyring,
        metrics: Registry | None,
        features: Mapping[str, Feature] | None = None,
        *,
        saver: StateSaver | None = None,
        clock: HybridClock | None = None,
    ) -> None:
        self.config = config
        self._features = features if features is not None else {}
        # The state writer (off the main loop, retried); a host built without one has its own.
        self.saver = saver if saver is not None else StateSaver()
        self.clock = clock if clock is not None else HybridClock()  # main loop only
        self.identity = identity
        self.keyring = keyring  # owned by the gossip thread: use inside call() only
        self.metrics = metrics
        self._driver = driver
        self._control = control
        self._view: View | None = None  # set by the first deliver(), before any feature starts
        self._listeners: list[Listener] = []
        self._status: list[StatusProvider] = []
        self._leave_hooks: list[LeaveHook] = []
        self._node_resolvers: list[Resolver] = []
        self._service_resolvers: list[Resolver] = []

    # -- what the agent is -------------------------------------------------------------------

    @property
    def state_dir(self) -> Path:
        """Where features keep their persisted state (one file each)."""
        return Path(self.config.state_dir)

    @property
    def address(self) -> Address:
        """The gossip address this node advertises."""
        return self._driver.address

    def want_fresh_views(self) -> None:
        """Counters at most a second old in :attr:`view` even with no events (metrics)."""
        self._driver.want_fresh_views()

    @property
    def view(self) -> View:
        """The latest snapshot of the core the main loop has seen."""
        if self._view is None:
            raise RuntimeError("no view yet: the driver has not started")
        return self._view

    def feature(self, name: str) -> Any:
        """The enabled feature called ``name`` (as in ``agent.FEATURES``), or None if it is off.

        Every enabled feature object exists before the first starts; one listed earlier in
        ``FEATURES`` has started by the time a later one's ``start`` runs (e.g. the CoAP
        router uses ``host.feature("services")``: its catalog, balancer and ``healthy``).
        """
        return self._features.get(name)

    @staticmethod
    def logger(name: str = "") -> logging.Logger:
        """The logger of a feature: ``edgeagent.<name>``, or the agent's own ``edgeagent``."""
        return logging.getLogger(f"edgeagent.{name}" if name else "edgeagent")

    # -- commands to the gossip core ---------------------------------------------------------

    async def call(self, fn: Callable[[Membership, float], T]) -> T:
        """Run ``fn(core, now)`` on the gossip thread and await its (immutable) result."""
        return await self._driver.acall(fn)

    def set_state(self, key: str, value: StateValue) -> concurrent.futures.Future[None]:
        """Publish ``value`` under ``key`` in this node's replicated state."""
        return self._driver.call(lambda core, now: core.set_state(key, value, now))

    def rebroadcast_state(self, key: str) -> concurrent.futures.Future[None]:
        """Spread this node's unchanged ``key`` again (same version; only members lacking it pass it on)."""
        return self._driver.call(lambda core, now: core.rebroadcast_state(key, now))

    def delete_state(self, key: str) -> concurrent.futures.Future[None]:
        """Remove ``key`` from this node's replicated state."""
        return self._driver.call(lambda core, now: core.delete_state(key, now))

    async def broadcast(self, payload: bytes) -> None:
        """Send ``payload`` to every member as a user broadcast."""
        await self._driver.acall(lambda core, now: core.broadcast(payload, now))

    def join(self, seeds: Sequence[Address]) -> concurrent.futures.Future[None]:
        """Contact ``seeds`` to join (or rejoin) their cluster."""
        targets = list(seeds)
        return self._driver.call(lambda core, now: core.join(targets, now))

    def join_once(self, addr: Address) -> concurrent.futures.Future[None]:
        """Contact ``addr`` to join once; it is not kept as a seed (the caller retries)."""
        return self._driver.call(lambda core, now: core.join_once(addr, now))

    async def members(self) -> tuple[Member, ...]:
        """Every member the core knows, ourselves included."""
        return tuple(await self._driver.acall(lambda core, now: core.members()))

    async def num_alive(self) -> int:
        """How many members are alive, ourselves included."""
        return await self._driver.acall(lambda core, now: core.num_alive)

    async def member_states(self, key: str) -> tuple[tuple[Member, StateValue], ...]:
        """Every member with its replicated value under ``key`` (None if it has none)."""

        def collect(core: Membership, now: float) -> tuple[tuple[Member, StateValue], ...]:
            return tuple((m, core.state_of(m.name).get(key)) for m in core.members())

        return await self._driver.acall(collect)

    async def snapshot(self) -> View:
        """A fresh snapshot, taken on the gossip thread."""
        return await self._driver.snapshot()

    # -- control API, status, events ---------------------------------------------------------

    def register_command(self, name: str, handler: Handler) -> None:
        """Serve the control command ``name`` with ``handler(request)``."""
        self._control.register(name, handler)

    def add_status(self, provider: StatusProvider) -> None:
        """Merge ``provider()`` into the ``status`` command's answer."""
        self._status.append(provider)

    def status_fields(self) -> dict[str, Any]:
        """The fields every feature adds to ``status``."""
        fields: dict[str, Any] = {}
        for provider in self._status:
            fields.update(provider())
        return fields

    def before_leave(self, hook: LeaveHook) -> None:
        """Await ``hook()`` when the graceful leave begins, before it is broadcast."""
        self._leave_hooks.append(hook)

    async def leaving(self) -> None:
        """Run the ``before_leave`` hooks, in order (called by the agent)."""
        for hook in self._leave_hooks:
            try:
                await hook()
            except Exception:  # a hook's bug must not stop the leave
                logging.getLogger("edgeagent").exception("before-leave hook failed")

    def add_listener(self, listener: Listener) -> None:
        """Call ``listener(events, view)`` on the main loop after every update."""
        self._listeners.append(listener)

    def deliver(self, events: tuple[ev.Event, ...], view: View) -> None:
        """Hand one update to every listener (called by the agent)."""
        self._view = view
        for listener in self._listeners:
            try:
                listener(events, view)
            except Exception:  # one feature's bug must not stop the others hearing events
                logging.getLogger("edgeagent").exception("update listener failed")

    # -- mesh DNS resolvers ------------------------------------------------------------------

    def add_node_resolver(self, resolver: Resolver) -> None:
        """Answer ``NODE.node.mesh`` with ``resolver(node)`` (mesh DNS, when it is on)."""
        self._node_resolvers.append(resolver)

    def add_service_resolver(self, resolver: Resolver) -> None:
        """Answer ``SERVICE.mesh`` with ``resolver(service)`` (mesh DNS, when it is on)."""
        self._service_resolvers.append(resolver)

    def resolve_node(self, label: str) -> list[str]:
        """Every registered node resolver's answer for ``label``, in order, without repeats."""
        return _merged(self._node_resolvers, label)

    def resolve_service(self, label: str) -> list[str]:
        """Every registered service resolver's answer for ``label``, without repeats."""
        return _merged(self._service_resolvers, label)


def _merged(resolvers: Iterable[Resolver], label: str) -> list[str]:
    answers: list[str] = []
    for resolver in resolvers:
        answers.extend(a for a in resolver(label) if a not in answers)
    return answers
