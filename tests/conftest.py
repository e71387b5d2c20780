"""Fixtures shared by the whole suite, and the session's hygiene checks.

Every bus a test creates is named with this session's tag (see
:func:`bus_name`), so the end-of-session check can tell our leftovers from
anything else on the machine: the suite fails if a file of ours is left in
``/dev/shm`` or a child process is still alive.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import psutil
import pytest

from shmbus import BaseBus, MemoryBus, NullBus, ShmBus

# The checkout's tools package (shmbus_tools: the child-process harness, the
# bench, soak and demo) is on sys.path through setup.cfg's `pythonpath`; child
# processes started with `python -m ...` find it through PYTHONPATH.
TOOLS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools")
if TOOLS_DIR not in os.environ.get("PYTHONPATH", "").split(os.pathsep):
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (TOOLS_DIR, os.environ.get("PYTHONPATH", "")) if p
    )

SESSION_TAG = f"t{os.getpid()}"
_names = itertools.count()

#: Small geometry so tests that fill the ring do it quickly.
SMALL_RING = {"capacity": 1 << 20, "max_event_size": 64 * 1024}


def new_bus_name(label: str = "bus") -> str:
    """A bus name unique to this test session."""
    return f"{SESSION_TAG}-{label}-{next(_names)}"


def session_leftovers() -> list[str]:
    return sorted(entry for entry in os.listdir("/dev/shm") if SESSION_TAG + "-" in entry)


@pytest.fixture(scope="module")
def no_resource_tracker_left() -> Iterator[None]:
    """For the modules that start child processes (``pytestmark =
    pytest.mark.usefixtures("no_resource_tracker_left")``): stop
    multiprocessing's resource tracker once their tests are done, so that no
    process stays behind."""
    yield
    from shmbus_tools.children import stop_resource_tracker

    stop_resource_tracker()


@pytest.fixture
def bus_name(request: pytest.FixtureRequest) -> str:
    label = request.node.name.split("[")[0].removeprefix("test_")[:40]
    return new_bus_name(label.replace("_", "-"))


@pytest.fixture
def host(bus_name: str) -> Iterator[ShmBus]:
    """The test process's own instance of the test's bus, closed last, so
    that what is left in /dev/shm is checked after everyone else is gone."""
    bus = ShmBus(bus_name, **SMALL_RING)
    bus.connect_sync()
    try:
        yield bus
    finally:
        bus.close_sync()


@pytest.fixture(scope="session")
def contract_nats_server() -> Iterator[Any]:
    """One real nats-server (127.0.0.1, random port) for the contract tests."""
    from shmbus_tools.servers import NatsServer

    # The same limit on an event as the other transports' test buses.
    with NatsServer(max_payload=SMALL_RING["max_event_size"]) as server:
        yield server


@pytest.fixture(params=["shm", "memory", "nats"])
async def bus(request: pytest.FixtureRequest, bus_name: str) -> AsyncIterator[BaseBus]:
    """A connected bus of each transport that really delivers events."""
    instance: BaseBus
    if request.param == "shm":
        instance = ShmBus(bus_name, **SMALL_RING)
    elif request.param == "nats":
        from shmbus.nats import NatsBus

        server = request.getfixturevalue("contract_nats_server")
        instance = NatsBus(server.url, connect_timeout=5, reconnect_time_wait=0.1)
    else:
        instance = MemoryBus(max_event_size=SMALL_RING["max_event_size"])
    await instance.connect()
    try:
        yield instance
    finally:
        await instance.close()


@pytest.fixture(params=["shm", "memory", "null"])
async def any_bus(request: pytest.FixtureRequest, bus_name: str) -> AsyncIterator[BaseBus]:
    """A connected bus of every transport, the null one included."""
    instance: BaseBus
    if request.param == "shm":
        instance = ShmBus(bus_name, **SMALL_RING)
    elif request.param == "memory":
        instance = MemoryBus(max_event_size=SMALL_RING["max_event_size"])
    else:
        instance = NullBus(max_event_size=SMALL_RING["max_event_size"])
    await instance.connect()
    try:
        yield instance
    finally:
        await instance.close()


@pytest.fixture(params=["shm", "memory", "nats", "fallback"])
async def transport(request: pytest.FixtureRequest, bus_name: str) -> AsyncIterator[BaseBus]:
    """A connected bus of every transport that delivers events, the NATS
    fallback bus included (see every_transport.py)."""
    from every_transport import make

    instance = await make(request.param, request, bus_name)
    try:
        yield instance
    finally:
        await instance.close()


@pytest.fixture(params=["shm", "memory", "nats", "fallback", "null"])
async def with_null(request: pytest.FixtureRequest, bus_name: str) -> AsyncIterator[BaseBus]:
    """:func:`transport` and the null bus."""
    from every_transport import make

    instance = await make(request.param, request, bus_name)
    try:
        yield instance
    finally:
        await instance.close()


def _live_children() -> list[psutil.Process]:
    children = []
    for child in psutil.Process().children(recursive=True):
        try:
            if child.status() != psutil.STATUS_ZOMBIE:
                children.append(child)
        except psutil.NoSuchProcess:
            pass
    return children


@pytest.fixture(autouse=True, scope="session")
def no_leftovers() -> Iterator[None]:
    """Fail the session if it leaves files in /dev/shm or live children."""
    yield
    deadline = time.monotonic() + 5
    while (_live_children() or session_leftovers()) and time.monotonic() < deadline:
        time.sleep(0.05)
    children = _live_children()
    leftovers = session_leftovers()
    for child in children:
        child.kill()
    problems = []
    if leftovers:
        problems.append(f"files left in /dev/shm: {leftovers}")
    if children:
        problems.append(f"child processes left alive: {[c.pid for c in children]}")
    if problems:
        pytest.fail("test session was not clean: " + "; ".join(problems), pytrace=False)
