"""The peers the benchmark drives, behind one small interface: :class:`Driver`.

Owns
----
* :class:`Driver`: what the runner needs from a peer. In the parent,
  :meth:`~Driver.unavailable` (why it cannot run here, or None),
  :meth:`~Driver.prepare` and :meth:`~Driver.release` (per-run resources:
  a bus name, queues, socket paths). In the children, :meth:`~Driver.publisher`
  and :meth:`~Driver.subscriber`, entered right after ``fork()`` with the
  child's link to the parent (:class:`shmbus_tools.children.BlockingLink`);
  for the peers of Q1 and R1 (:data:`~shmbus_tools.bench.spec.SCENARIO_PEERS`)
  also :meth:`~Driver.group_member`, :meth:`~Driver.requester` and
  :meth:`~Driver.responder`.
* :class:`Env`: what every driver may use (the servers' URLs, a private
  temporary directory, the old shmbus of ``--baseline``).
* :func:`driver_class`: name -> driver class, importing a peer's module (and
  so its client library) only when that peer is used. Every ``shm@<rev>``
  name is the baseline driver.

Each peer's module says how that peer is driven; the loops themselves live in
:mod:`shmbus_tools.bench.harness` and are the same for all.
"""

from __future__ import annotations

import abc
import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Any, ClassVar

from ...children import BlockingLink
from ..baseline import BASELINE_PREFIX, is_baseline
from ..spec import RunSpec

__all__ = ["Driver", "Env", "driver_class"]


@dataclass
class Env:
    """Shared by every driver of one benchmark."""

    #: A private directory, removed at the end (ZeroMQ ipc:// paths live here).
    tmpdir: str
    nats_url: str | None = None
    redis_url: str | None = None
    #: ``--baseline``: the old revision's shmbus package, imported under its
    #: own name (see :mod:`shmbus_tools.bench.baseline`).
    baseline: ModuleType | None = None


class Driver(abc.ABC):
    """One peer, as the runner sees it."""

    name: ClassVar[str]
    #: Subscribers run a blocking receive loop: the parent ends an overdue
    #: drain with SIGUSR1 rather than a message.
    blocking_subscriber: ClassVar[bool] = False
    #: Needs a server the runner starts: "nats", "redis" or None.
    server: ClassVar[str | None] = None

    def __init__(self, env: Env) -> None:
        self.env = env

    @classmethod
    def unavailable(cls) -> str | None:
        """Why this peer cannot run on this host, or None if it can."""
        return None

    def prepare(self, spec: RunSpec) -> Any:
        """Parent, before the run's children start: per-run resources."""
        return None

    def release(self, spec: RunSpec, resources: Any) -> None:  # noqa: B027 - optional hook
        """Parent, after every child of the run is gone."""

    @abc.abstractmethod
    def publisher(self, link: BlockingLink, spec: RunSpec, resources: Any, index: int) -> None:
        """Child: publisher number *index* (or the caller of a P1 run)."""

    @abc.abstractmethod
    def subscriber(self, link: BlockingLink, spec: RunSpec, resources: Any, index: int) -> None:
        """Child: subscriber number *index*."""

    def group_member(self, link: BlockingLink, spec: RunSpec, resources: Any, index: int) -> None:
        """Child, Q1: worker number *index* of the queue group ``spec.queue``."""
        raise NotImplementedError(f"peer {self.name} has no queue-group worker")

    def requester(self, link: BlockingLink, spec: RunSpec, resources: Any, index: int) -> None:
        """Child, R1: the requester (the run's publisher)."""
        raise NotImplementedError(f"peer {self.name} has no requester")

    def responder(self, link: BlockingLink, spec: RunSpec, resources: Any, index: int) -> None:
        """Child, R1: the responder (the run's subscriber)."""
        raise NotImplementedError(f"peer {self.name} has no responder")


_MODULES = {
    "shm": "shm_peer",
    "shmll": "shm_peer",
    "shmuv": "shm_peer",
    "shmsync": "shm_peer",
    "nats": "nats_peer",
    "zmq": "zmq_peer",
    "mpq": "queue_peers",
    "ff": "queue_peers",
    "ice": "iceoryx2_peer",
    "redis": "redis_peer",
    "sem": "references",
    "fifo": "references",
    "loop": "references",
    BASELINE_PREFIX: "shm_peer",
}


def driver_class(name: str) -> type[Driver]:
    """The driver class of peer *name* (ImportError if its library is missing)."""
    if is_baseline(name):
        name = BASELINE_PREFIX
    module = importlib.import_module(f"{__name__}.{_MODULES[name]}")
    drivers: dict[str, type[Driver]] = module.DRIVERS
    return drivers[name]
