"""fork(): a bus instance inherited by a fork child is unusable there (and
harmless), while the parent's instance keeps working.

One spawned process (:func:`fault_agents.forking_owner`) connects a bus,
subscribes and forks; its fork child exercises the inherited instance and a
new one, and leaves with ``os._exit``. The scenario runs once for the module;
each test checks one behaviour of its report.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import fault_agents
import pytest
from conftest import SMALL_RING, new_bus_name
from shmbus_tools.children import Agent, running, stop_resource_tracker

FINISH = 60.0


@pytest.fixture(scope="module")
def forked() -> Iterator[dict[str, Any]]:
    name = new_bus_name("fork")
    owner = Agent(fault_agents.forking_owner, name, bus_kwargs=SMALL_RING)
    try:
        with running(owner):
            report = owner.recv(FINISH)
            assert owner.join(FINISH) == 0
        yield report
    finally:
        stop_resource_tracker()


def test_the_parents_subscription_receives_its_own_publish_after_fork(
    forked: dict[str, Any],
) -> None:
    """After fork(), the parent's instance still publishes and its
    subscription (made before the fork) still receives."""
    assert "parent.after" in forked["received"]
    assert forked["parent_stats"]["publish_errors"] == 0


def test_publishing_on_an_inherited_instance_raises_forked_bus_error(
    forked: dict[str, Any],
) -> None:
    """In the fork child, publish on the inherited instance raises
    ForkedBusError, a RuntimeError, telling to create a new bus."""
    outcome = forked["child"]["publish"]
    assert outcome["raised"] == "ForkedBusError" and outcome["runtime_error"], outcome
    assert "fork" in outcome["message"] and "new ShmBus" in outcome["message"]


def test_subscribing_on_an_inherited_instance_raises_forked_bus_error(
    forked: dict[str, Any],
) -> None:
    """In the fork child, subscribe on the inherited instance raises
    ForkedBusError, a RuntimeError."""
    outcome = forked["child"]["subscribe"]
    assert outcome["raised"] == "ForkedBusError" and outcome["runtime_error"], outcome


def test_closing_an_inherited_instance_is_a_no_op_for_the_parent(
    forked: dict[str, Any],
) -> None:
    """close() on the inherited instance in the child raises nothing, and
    the parent's instance is still attached and alive afterwards."""
    assert forked["child"]["close"] == {"raised": None}
    assert forked["parent_alive_in_read_bus"] is True
    assert forked["child_exit"] == 0


def test_a_new_bus_in_the_fork_child_reaches_the_parents_subscription(
    forked: dict[str, Any],
) -> None:
    """A new ShmBus made in the fork child works: what it publishes is
    received by the subscription the parent made before forking."""
    assert forked["child"]["new_bus_stats"]["published"] == 1
    assert "child.new" in forked["received"]


def test_a_living_fork_child_does_not_keep_the_parents_bus_alive(
    forked: dict[str, Any],
) -> None:
    """The parent, the last instance, closes while its fork child is still
    alive: the bus's files are removed (the child kept no lock of the
    parent's)."""
    assert forked["files_after_parent_close"] == []
