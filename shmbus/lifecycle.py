"""The life cycle every transport instance goes through: :class:`LifecycleState`.

Rules
-----
An instance starts ``NEW`` and moves only along these transitions:

=========  =========  ======================================================
from       to         when
=========  =========  ======================================================
``NEW``    ``OPEN``   ``connect()`` succeeded (also an implicit connect)
``NEW``    ``CLOSED`` ``close()`` before any connect
``OPEN``   ``CLOSED`` ``close()``
``OPEN``   ``FORKED`` in a ``fork()`` child, the child's copy of the instance
                      (shared memory only; using it raises
                      :class:`~shmbus.errors.ForkedBusError`)
``FORKED`` ``CLOSED`` ``close()`` in the child (releases nothing shared)
=========  =========  ======================================================

``CLOSED`` is final: ``connect()``, ``publish()`` and ``subscribe()`` on a
closed instance raise :class:`RuntimeError` (:class:`~shmbus.errors.BusClosedError`),
and ``close()`` again does nothing. A failed ``connect()`` leaves the state
``NEW`` so that it may be retried.

The members are strings (``str(LifecycleState.OPEN) == "open"``), so a
``repr`` that shows the state reads the same as before they were an enum;
compare them with ``is``.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping

__all__ = ["TRANSITIONS", "LifecycleState"]


class LifecycleState(enum.StrEnum):
    """The state of one bus instance; see the module docstring for the rules."""

    NEW = "new"
    OPEN = "open"
    CLOSED = "closed"
    FORKED = "forked"


#: The allowed transitions, as the table in the module docstring lists them.
TRANSITIONS: Mapping[LifecycleState, frozenset[LifecycleState]] = {
    LifecycleState.NEW: frozenset({LifecycleState.OPEN, LifecycleState.CLOSED}),
    LifecycleState.OPEN: frozenset({LifecycleState.CLOSED, LifecycleState.FORKED}),
    LifecycleState.FORKED: frozenset({LifecycleState.CLOSED}),
    LifecycleState.CLOSED: frozenset(),
}
