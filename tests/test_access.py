"""Access control: a bus's files carry its mode (default 0o600) and group,
and the kernel keeps other users out.

The tests run child processes as the user ``nobody`` (they switch with
setgroups/setgid/setuid, so the suite must run as root), either in the bus's
group (as a supplementary group, the way a real member would be) or not.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import os
import pwd
import stat
from collections.abc import Iterator

import fault_agents
import pytest
from conftest import SMALL_RING
from spawn import Agent, running, stop_resource_tracker

from shmbus import ShmBus
from shmbus.leftovers import cleanup
from shmbus.segment import resource_paths

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root: the tests run children as the user nobody"
)

FINISH = 60.0


def _nobody() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("this host has no user 'nobody'")


def _shared_group(nobody: pwd.struct_passwd) -> grp.struct_group:
    """A group that is neither root's nor nobody's primary group, so that
    membership can only come from the supplementary group list."""
    for name in ("users", "staff", "daemon"):
        with contextlib.suppress(KeyError):
            group = grp.getgrnam(name)
            if group.gr_gid not in (0, nobody.pw_gid):
                return group
    pytest.skip("no group to share a bus with (looked for users, staff, daemon)")


NOBODY = _nobody() if os.geteuid() == 0 else None


@pytest.fixture(autouse=True, scope="module")
def _no_resource_tracker_left() -> Iterator[None]:
    yield
    stop_resource_tracker()


@pytest.fixture
def group() -> grp.struct_group:
    assert NOBODY is not None
    return _shared_group(NOBODY)


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def nobody_agent(
    name: str, groups: list[int], *, bus_kwargs: dict[str, object] | None = None, **kwargs: object
) -> Agent:
    """An agent running as nobody, with *groups* as its supplementary groups."""
    assert NOBODY is not None
    return Agent(
        fault_agents.as_user,
        name,
        NOBODY.pw_uid,
        NOBODY.pw_gid,
        groups,
        bus_kwargs={**SMALL_RING, **(bus_kwargs or {})},
        **kwargs,
    )


def member_options(group: grp.struct_group) -> dict[str, object]:
    return {"mode": 0o660, "group": group.gr_name}


def modes(name: str) -> dict[str, tuple[int, int]]:
    """{path: (permission bits, gid)} of every file of bus *name*."""
    result = {}
    for path in resource_paths(name):
        st = os.stat(path)
        result[path] = (stat.S_IMODE(st.st_mode), st.st_gid)
    return result


async def test_every_file_of_a_default_bus_is_owner_only_whatever_the_umask(
    bus_name: str,
) -> None:
    """With a umask of 0, a bus made with default options still has mode
    0o600 on its segment, its semaphore and its wake-up FIFO."""
    with umask(0):
        bus = ShmBus(bus_name, **SMALL_RING)
        await bus.connect()
    try:
        async with bus.subscribe(">"):
            files = modes(bus_name)
    finally:
        await bus.close()
    assert len(files) == 3 and any(":wake." in path for path in files), files
    assert {path: bits for path, (bits, _) in files.items()} == dict.fromkeys(files, 0o600)


async def test_every_file_of_a_group_bus_has_its_mode_and_group_whatever_the_umask(
    bus_name: str, group: grp.struct_group
) -> None:
    """With a umask of 0o077, a bus made with mode=0o660 and group=G has
    mode 0o660 and group G on its segment, its semaphore and its FIFO."""
    with umask(0o077):
        bus = ShmBus(bus_name, mode=0o660, group=group.gr_name, **SMALL_RING)
        await bus.connect()
    try:
        async with bus.subscribe(">"):
            files = modes(bus_name)
    finally:
        await bus.close()
    assert len(files) == 3 and any(":wake." in path for path in files), files
    assert files == dict.fromkeys(files, (0o660, group.gr_gid))


async def test_another_user_cannot_open_a_default_bus(
    bus_name: str, group: grp.struct_group
) -> None:
    """A process running as nobody (even one in a group) gets a
    PermissionError naming the bus when it connects to a 0o600 bus."""
    bus = ShmBus(bus_name, **SMALL_RING)
    await bus.connect()
    try:
        child = nobody_agent(bus_name, [group.gr_gid])
        with running(child):
            answer = child.recv(FINISH)
            assert child.join(FINISH) == 0
    finally:
        await bus.close()
    assert answer[:2] == ("refused", "PermissionError"), answer
    assert bus_name in answer[2] and "permission" in answer[2], answer[2]
    assert resource_paths(bus_name) == []


async def test_a_user_outside_the_group_cannot_open_a_group_bus(
    bus_name: str, group: grp.struct_group
) -> None:
    """A process running as nobody, not in the bus's group, gets a
    PermissionError naming the bus when it connects to a 0o660 group bus."""
    bus = ShmBus(bus_name, mode=0o660, group=group.gr_gid, **SMALL_RING)
    await bus.connect()
    try:
        child = nobody_agent(bus_name, [])
        with running(child):
            answer = child.recv(FINISH)
            assert child.join(FINISH) == 0
    finally:
        await bus.close()
    assert answer[:2] == ("refused", "PermissionError"), answer
    assert bus_name in answer[2], answer[2]


async def test_a_group_member_shares_a_group_bus_in_both_directions(
    bus_name: str, group: grp.struct_group
) -> None:
    """A process running as nobody with the bus's group as a supplementary
    group connects to a 0o660 bus, subscribes and publishes: each side
    receives the other's event."""
    bus = ShmBus(bus_name, mode=0o660, group=group.gr_name, **SMALL_RING)
    await bus.connect()
    try:
        async with bus.subscribe("from.member") as sub:
            child = nobody_agent(
                bus_name, [group.gr_gid], bus_kwargs=member_options(group), pattern="from.root"
            )
            with running(child):
                child.expect("ready", FINISH)
                await bus.publish("from.root", {"uid": 0})
                child.send("receive")
                got = child.recv(FINISH)
                child.send(("publish", "from.member"))
                child.expect("published", FINISH)
                event = await anext(aiter(sub))
                child.send("close")
                closed = child.recv(FINISH)
    finally:
        await bus.close()
    assert NOBODY is not None
    assert got == ("got", "from.root", {"uid": 0})
    assert (event.topic, event.payload) == ("from.member", {"uid": NOBODY.pw_uid})
    assert closed == ("closed", None)
    assert resource_paths(bus_name) == []


async def test_a_group_members_wake_up_fifo_has_the_bus_mode_and_group(
    bus_name: str, group: grp.struct_group
) -> None:
    """The wake-up FIFO a group member creates when it subscribes is owned
    by it, with the bus's mode and group, so other members can wake it."""
    bus = ShmBus(bus_name, mode=0o660, group=group.gr_name, **SMALL_RING)
    await bus.connect()
    try:
        child = nobody_agent(
            bus_name, [group.gr_gid], bus_kwargs=member_options(group), pattern=">"
        )
        with running(child):
            child.expect("ready", FINISH)
            fifos = {
                path: (os.stat(path).st_uid, bits, gid)
                for path, (bits, gid) in modes(bus_name).items()
                if ":wake." in path
            }
            child.send("close")
            child.recv(FINISH)
    finally:
        await bus.close()
    assert NOBODY is not None
    assert list(fifos.values()) == [(NOBODY.pw_uid, 0o660, group.gr_gid)], fifos


async def test_a_group_member_that_closes_last_removes_what_it_may_and_the_rest_is_reused(
    bus_name: str, group: grp.struct_group
) -> None:
    """Root creates a 0o660 group bus and leaves first; the group member, now
    the last instance, closes without an exception and removes every file it
    owns. Root's files stay (in the sticky /dev/shm only their owner may
    remove them); the next instance reuses them and works, and its close
    removes everything."""
    bus = ShmBus(bus_name, mode=0o660, group=group.gr_name, **SMALL_RING)
    await bus.connect()
    try:
        child = nobody_agent(
            bus_name, [group.gr_gid], bus_kwargs=member_options(group), pattern=">"
        )
        with running(child):
            child.expect("ready", FINISH)
            await bus.close()
            child.send("close")
            closed = child.recv(FINISH)
        left = resource_paths(bus_name)
        owners = {os.stat(path).st_uid for path in left}
        async with ShmBus(bus_name, mode=0o660, group=group.gr_name, **SMALL_RING) as again:
            async with again.subscribe("reuse.*") as sub:
                await again.publish("reuse.works", {"ok": True})
                event = await asyncio.wait_for(sub.__anext__(), FINISH)
        after = resource_paths(bus_name)
    finally:
        cleanup(bus_name, force=True)
    assert closed == ("closed", None)
    assert owners <= {0}, f"files the member owned were left: {left}"
    assert event.payload == {"ok": True}
    assert after == []


async def test_an_instance_joining_without_the_group_options_gets_a_fifo_the_group_can_use(
    bus_name: str, group: grp.struct_group
) -> None:
    """A bus created with mode=0o660 and a group; a second instance joins
    with default options and subscribes: its FIFO has the bus's mode and
    group."""
    creator = ShmBus(bus_name, mode=0o660, group=group.gr_name, **SMALL_RING)
    joiner = ShmBus(bus_name, **SMALL_RING)
    await creator.connect()
    try:
        await joiner.connect()
        async with joiner.subscribe(">"):
            fifos = {path: m for path, m in modes(bus_name).items() if ":wake." in path}
    finally:
        await joiner.close()
        await creator.close()
    assert list(fifos.values()) == [(0o660, group.gr_gid)], fifos
