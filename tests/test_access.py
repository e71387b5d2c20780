"""Access control: a bus's files carry its mode (default 0o600) and group,
the kernel keeps other users out, and no file another user planted at one
of a bus's names is ever used.

The tests run child processes (:mod:`access_agents`) as other users: they
switch with setgroups/setgid/setuid, so the suite must run as root.

* ``nobody`` is the other user: outsider, group member, or squatter.
* The *victim* of a squatter is a third user (the first of www-data, backup,
  daemon, bin that exists), so that the kernel's root privileges play no
  part; on a host with none of them the victim is root, which the rules of
  :mod:`shmbus._core.shmfiles` treat the same (a file is checked against the
  process's effective uid).

Note: hosts with ``fs.protected_symlinks``/``protected_regular``/
``protected_fifos`` set make the kernel refuse some of these tricks by
itself; the files planted here are chosen so that shmbus's own checks are
what the tests exercise (a symlink made by root, say, which the kernel
follows for root).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import grp
import logging
import os
import pwd
import secrets
import stat
import time
from collections.abc import Iterator
from typing import Any

import access_agents
import pytest
from access_agents import SQUAT_BYTES
from conftest import SMALL_RING, new_bus_name
from shmbus_tools.children import Agent, running

from shmbus import ShmBus
from shmbus._core.layout import LOCK_ATTACH, OFF_SLEEP_FLAGS
from shmbus._core.leftovers import cleanup
from shmbus._core.shmfiles import (
    bell_name,
    bell_path,
    bus_file_paths,
    fifo_path,
    ring_path,
    segment_path,
)
from shmbus.errors import ForeignFileError

pytestmark = [
    pytest.mark.skipif(
        os.geteuid() != 0, reason="needs root: the tests run children as other users"
    ),
    pytest.mark.usefixtures("no_resource_tracker_left"),
]

FINISH = 60.0
SECRET = {"card": "4929 0000 1111 2222", "pin": "0451"}
VICTIM_BYTES = b"the victim's own file; nobody else may change it\n"


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


def _victim(nobody: pwd.struct_passwd) -> tuple[int, int]:
    """(uid, gid) of the squatters' victim: a third user, else root."""
    for name in ("www-data", "backup", "daemon", "bin"):
        with contextlib.suppress(KeyError):
            user = pwd.getpwnam(name)
            if user.pw_uid not in (0, nobody.pw_uid):
                return user.pw_uid, user.pw_gid
    return 0, 0


NOBODY = _nobody() if os.geteuid() == 0 else None
VICTIM = _victim(NOBODY) if NOBODY is not None else (0, 0)


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
        access_agents.as_user,
        name,
        NOBODY.pw_uid,
        NOBODY.pw_gid,
        groups,
        bus_kwargs={**SMALL_RING, **(bus_kwargs or {})},
        **kwargs,
    )


def member_options(group: grp.struct_group) -> dict[str, object]:
    return {"mode": 0o660, "group": group.gr_name}


def kind_of(path: str) -> str:
    """Which file of its bus *path* is: "segment", "ring", "wake" or "bell"."""
    if ":ring." in path:
        return "ring"
    if ":wake." in path:
        return "wake"
    if ":bell." in path:
        return "bell"
    return "segment"


def files_of(name: str) -> dict[str, tuple[str, int, int, int]]:
    """{path: (kind, owner uid, permission bits, gid)} of every file of bus
    *name*, not following links."""
    result = {}
    for path in bus_file_paths(name):
        st = os.lstat(path)
        result[path] = (kind_of(path), st.st_uid, stat.S_IMODE(st.st_mode), st.st_gid)
    return result


def remove_everything(name: str, *paths: str) -> None:
    """As root: unlink every file of bus *name* and *paths*, whoever owns them."""
    for path in [*bus_file_paths(name), *paths]:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def spare_path(label: str) -> str:
    """A free path in /dev/shm named with this session's tag (so the
    session's hygiene check sees it if it is left behind)."""
    return f"/dev/shm/{new_bus_name(label)}"


def victims_file(label: str) -> str:
    """A regular file owned by the victim, 0o600, holding VICTIM_BYTES."""
    path = spare_path(label)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, VICTIM_BYTES)
        os.fchown(fd, *VICTIM)
    finally:
        os.close(fd)
    return path


async def join_error(name: str, **options: Any) -> Exception | None:
    """What connecting a new instance to bus *name* raises (None if it
    connected: it is closed again, so a failing test leaves nothing)."""
    joiner = ShmBus(name, **options)
    try:
        await joiner.connect()
    except Exception as exc:
        return exc
    await joiner.close()
    return None


def owner_text(uid: int) -> str:
    return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"


# ─── Modes and groups ───────────────────────────────────────────────────────


async def test_every_file_of_a_default_bus_is_owner_only_whatever_the_umask(
    bus_name: str,
) -> None:
    """With a umask of 0, a bus made with default options still has mode
    0o600 on its segment, its ring and its wake-up FIFO."""
    with umask(0):
        bus = ShmBus(bus_name, **SMALL_RING)
        await bus.connect()
        try:
            async with bus.subscribe(">"):
                await bus.publish("owner.only", {})
                files = files_of(bus_name)
        finally:
            await bus.close()
    assert sorted(kind for kind, *_ in files.values()) == ["ring", "segment", "wake"], files
    assert {path: bits for path, (_, _, bits, _) in files.items()} == dict.fromkeys(files, 0o600)


async def test_every_file_of_a_group_bus_has_its_mode_and_group_whatever_the_umask(
    bus_name: str, group: grp.struct_group
) -> None:
    """With a umask of 0o077, a bus made with mode=0o660 and group=G has
    mode 0o660 and group G on its segment, its ring and its FIFO."""
    with umask(0o077):
        bus = ShmBus(bus_name, mode=0o660, group=group.gr_name, **SMALL_RING)
        await bus.connect()
        try:
            async with bus.subscribe(">"):
                await bus.publish("group.bits", {})
                files = files_of(bus_name)
        finally:
            await bus.close()
    assert sorted(kind for kind, *_ in files.values()) == ["ring", "segment", "wake"], files
    assert {path: (bits, gid) for path, (_, _, bits, gid) in files.items()} == dict.fromkeys(
        files, (0o660, group.gr_gid)
    )


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
    assert bus_file_paths(bus_name) == []


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
                event = await asyncio.wait_for(anext(aiter(sub)), FINISH)
                child.send("close")
                closed = child.recv(FINISH)
    finally:
        await bus.close()
    assert NOBODY is not None
    assert got == ("got", "from.root", {"uid": 0})
    assert (event.topic, event.payload) == ("from.member", {"uid": NOBODY.pw_uid})
    assert closed == ("closed", None)
    assert bus_file_paths(bus_name) == []


async def test_a_group_members_ring_and_wake_up_fifo_have_the_bus_mode_and_group(
    bus_name: str, group: grp.struct_group
) -> None:
    """The ring and the wake-up FIFO a group member creates (when it
    publishes and subscribes) are owned by it, with the bus's mode and group,
    so the other members can read its ring and wake it."""
    bus = ShmBus(bus_name, mode=0o660, group=group.gr_name, **SMALL_RING)
    await bus.connect()
    try:
        child = nobody_agent(
            bus_name, [group.gr_gid], bus_kwargs=member_options(group), pattern=">"
        )
        with running(child):
            child.expect("ready", FINISH)
            child.send(("publish", "member.ring"))
            child.expect("published", FINISH)
            members = sorted(
                (kind, uid, bits, gid)
                for kind, uid, bits, gid in files_of(bus_name).values()
                if kind != "segment"
            )
            child.send("close")
            child.recv(FINISH)
    finally:
        await bus.close()
    assert NOBODY is not None
    assert members == [
        ("ring", NOBODY.pw_uid, 0o660, group.gr_gid),
        ("wake", NOBODY.pw_uid, 0o660, group.gr_gid),
    ], members


async def test_a_group_member_that_closes_last_removes_what_it_may_and_the_rest_is_reused(
    bus_name: str, group: grp.struct_group
) -> None:
    """Root creates a 0o660 group bus, publishes, and leaves first; the group
    member (which subscribed and published), now the last instance, closes
    without an exception and removes every file it owns. Root's files stay
    (in the sticky /dev/shm only their owner may remove them); the next
    instance reuses them and works, and its close removes everything."""
    bus = ShmBus(bus_name, mode=0o660, group=group.gr_name, **SMALL_RING)
    await bus.connect()
    try:
        child = nobody_agent(
            bus_name, [group.gr_gid], bus_kwargs=member_options(group), pattern=">"
        )
        with running(child):
            child.expect("ready", FINISH)
            child.send(("publish", "member.ring"))
            child.expect("published", FINISH)
            await bus.publish("root.ring", {})
            await bus.close()
            child.send("close")
            closed = child.recv(FINISH)
        left = files_of(bus_name)
        async with ShmBus(bus_name, mode=0o660, group=group.gr_name, **SMALL_RING) as again:
            async with again.subscribe("reuse.*") as sub:
                await again.publish("reuse.works", {"ok": True})
                event = await asyncio.wait_for(anext(aiter(sub)), FINISH)
        after = bus_file_paths(bus_name)
    finally:
        cleanup(bus_name, force=True)
    assert closed == ("closed", None)
    assert segment_path(bus_name) in left, left
    assert {uid for _, uid, _, _ in left.values()} == {0}, (
        f"files the member owned were left: {left}"
    )
    assert event.payload == {"ok": True}
    assert after == []


async def test_an_instance_joining_without_the_group_options_gets_files_the_group_can_use(
    bus_name: str, group: grp.struct_group
) -> None:
    """A bus created with mode=0o660 and a group; a second instance joins
    with default options, subscribes and publishes: its FIFO and its ring
    have the bus's mode and group."""
    creator = ShmBus(bus_name, mode=0o660, group=group.gr_name, **SMALL_RING)
    joiner = ShmBus(bus_name, **SMALL_RING)
    await creator.connect()
    try:
        await joiner.connect()
        async with joiner.subscribe(">"):
            await joiner.publish("joiner.ring", {})
            files = sorted(
                (kind, bits, gid)
                for kind, _, bits, gid in files_of(bus_name).values()
                if kind != "segment"
            )
    finally:
        await joiner.close()
        await creator.close()
    assert files == [("ring", 0o660, group.gr_gid), ("wake", 0o660, group.gr_gid)], files


# ─── Squatting ──────────────────────────────────────────────────────────────


@contextlib.contextmanager
def squatting(
    plan: list[tuple[str, str, str | None]], *, lock_byte: int | None = None, mode: int = 0o666
) -> Iterator[Agent]:
    """A squatter (nobody) that has planted *plan* with *mode* (see
    :func:`access_agents.squatter`); it removes its files on the way out."""
    assert NOBODY is not None
    squatter = Agent(
        access_agents.squatter,
        NOBODY.pw_uid,
        NOBODY.pw_gid,
        plan,
        lock_byte=lock_byte,
        mode=mode,
    )
    with running(squatter):
        squatter.expect("ready", FINISH)
        yield squatter
        squatter.send("leave")
        squatter.expect("left", FINISH)


def look(squatter: Agent) -> dict[str, dict[str, Any]]:
    """What the squatter sees at its paths now."""
    squatter.send("look")
    seen: dict[str, dict[str, Any]] = squatter.recv(FINISH)
    return seen


def victim_uses(squatted: str) -> dict[str, Any]:
    """Run the victim: it tries bus *squatted*, then uses a bus of its own."""
    own = new_bus_name("victims-own")
    victim = Agent(
        access_agents.victim, *VICTIM, squatted, own, secret=SECRET, bus_kwargs=SMALL_RING
    )
    with running(victim):
        report: dict[str, Any] = victim.recv(FINISH)
        assert victim.join(FINISH) == 0
    assert bus_file_paths(own) == []
    return report


@pytest.mark.parametrize("live", [False, True], ids=["idle", "locked-like-a-live-bus"])
async def test_a_file_another_user_planted_at_the_segment_name_is_refused_and_never_written(
    bus_name: str, live: bool
) -> None:
    """nobody plants a 0o666 regular file at ``shmbus.NAME`` (optionally
    holding a shared attach lock on it, as a live bus's instances do). The
    victim connecting to NAME gets a ForeignFileError (a PermissionError)
    naming the file and its owner; the file keeps every byte the squatter
    put there (read back by the squatter after the victim published its
    events); the victim works normally on another bus name."""
    path = segment_path(bus_name)
    try:
        with squatting([(path, "file", None)], lock_byte=LOCK_ATTACH if live else None) as sq:
            before = look(sq)
            report = victim_uses(bus_name)
            left = bus_file_paths(bus_name)
            after = look(sq)
    finally:
        remove_everything(bus_name)
    assert NOBODY is not None
    refusal = report["squatted"]
    assert refusal is not None and refusal["foreign"] and refusal["permission"], report
    assert path in refusal["message"], refusal
    assert owner_text(NOBODY.pw_uid) in refusal["message"], refusal
    assert before[path]["content"] == SQUAT_BYTES and before[path]["mode"] == 0o666
    assert after == before
    assert b"4929" not in after[path]["content"]
    assert left == [path], "the victim left files at the squatted name"
    assert report["own"] == ("victim.secret", SECRET)


async def test_a_private_file_another_user_planted_at_the_segment_name_is_a_permission_error(
    bus_name: str,
) -> None:
    """nobody plants a 0o600 regular file at ``shmbus.NAME`` (the victim
    cannot even open it): the victim connecting to NAME gets a
    PermissionError naming the file, the file is unchanged, and the victim
    works normally on another bus name."""
    path = segment_path(bus_name)
    try:
        with squatting([(path, "file", None)], mode=0o600) as sq:
            before = look(sq)
            report = victim_uses(bus_name)
            left = bus_file_paths(bus_name)
            after = look(sq)
    finally:
        remove_everything(bus_name)
    refusal = report["squatted"]
    assert refusal is not None and refusal["permission"], report
    assert path in refusal["message"], refusal
    assert before[path]["mode"] == 0o600 and after == before
    assert left == [path], "the victim left files at the squatted name"
    assert report["own"] == ("victim.secret", SECRET)


@pytest.mark.parametrize("target", ["victims-file", "missing"])
async def test_a_symlink_another_user_planted_at_the_segment_name_is_refused_and_not_followed(
    bus_name: str, target: str
) -> None:
    """nobody plants ``shmbus.NAME`` as a symlink to a file the victim owns
    (or to a name where nothing exists yet). The victim connecting to NAME
    gets a ForeignFileError naming the link; the file behind it is
    unchanged (or still absent); the victim works normally elsewhere."""
    path = segment_path(bus_name)
    behind = victims_file("victims-file") if target == "victims-file" else spare_path("missing")
    try:
        with squatting([(path, "symlink", behind)]) as sq:
            report = victim_uses(bus_name)
            left = bus_file_paths(bus_name)
            after = look(sq)
        if target == "victims-file":
            with open(behind, "rb") as f:
                content: bytes | None = f.read()
        else:
            content = None if not os.path.lexists(behind) else b"created"
    finally:
        remove_everything(bus_name, behind)
    refusal = report["squatted"]
    assert refusal is not None and refusal["foreign"] and refusal["permission"], report
    assert path in refusal["message"] and "symbolic link" in refusal["message"], refusal
    assert after[path]["target"] == behind
    assert content == (VICTIM_BYTES if target == "victims-file" else None)
    assert left == [path], "the victim left files at the squatted name"
    assert report["own"] == ("victim.secret", SECRET)


async def test_the_error_for_a_symlink_at_the_segment_name_names_who_made_it(
    bus_name: str,
) -> None:
    """The ForeignFileError for a squatted symlink names its owner, as the
    error for every other foreign file does (the victim learns whom to ask)."""
    assert NOBODY is not None
    path = segment_path(bus_name)
    os.symlink(spare_path("missing"), path)
    try:
        os.lchown(path, NOBODY.pw_uid, NOBODY.pw_gid)
        error = await join_error(bus_name, **SMALL_RING)
    finally:
        remove_everything(bus_name)
    assert isinstance(error, ForeignFileError), error
    assert owner_text(NOBODY.pw_uid) in str(error), error


async def test_a_group_members_file_with_bits_beyond_the_bus_mode_is_refused(
    bus_name: str, group: grp.struct_group
) -> None:
    """A file at ``shmbus.NAME`` of another user but of the bus's group is
    the group's to share; with mode 0o666, though (anyone may read it), a
    bus made with mode 0o660 refuses it, naming both modes."""
    assert NOBODY is not None
    path = segment_path(bus_name)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        os.fchown(fd, NOBODY.pw_uid, group.gr_gid)
        os.fchmod(fd, 0o666)
        error = await join_error(bus_name, mode=0o660, group=group.gr_name, **SMALL_RING)
        size = os.fstat(fd).st_size
    finally:
        os.close(fd)
        remove_everything(bus_name)
    assert isinstance(error, ForeignFileError), error
    assert path in str(error) and "0o666" in str(error) and "0o660" in str(error), error
    assert size == 0


@pytest.mark.parametrize(
    ("use", "kind"),
    [
        ("ring", "file"),
        ("ring", "fifo"),
        ("ring", "symlink"),
        ("wake", "file"),
        ("wake", "fifo"),
        ("bell", "file"),
        ("bell", "symlink"),
    ],
)
async def test_a_file_planted_at_a_ring_or_fifo_name_is_never_used_another_id_is_drawn(
    bus_name: str, use: str, kind: str
) -> None:
    """Ring, FIFO and doorbell names carry 64 random bits. Suppose a
    squatter guessed one: the victim's first draw is forced to an id whose
    name nobody has planted (a regular file, a FIFO, or a symlink to where
    a file could be created). The victim's ring (or FIFO, or doorbell) gets
    another id, the planted file is untouched (no byte written, nothing
    created behind the link), and the victim's events flow."""
    assert NOBODY is not None
    first = secrets.randbits(64) | 1
    path = {"ring": ring_path, "wake": fifo_path, "bell": bell_path}[use](bus_name, first)
    behind = spare_path("missing") if kind == "symlink" else None
    victim = Agent(
        access_agents.drawing_victim,
        bus_name,
        *VICTIM,
        first_draw=first,
        first_use=use,
        secret=SECRET,
        bus_kwargs=SMALL_RING,
    )
    try:
        with running(victim):
            victim.expect("connected", FINISH)
            with squatting([(path, kind, behind)]) as sq:
                before = look(sq)
                victim.send("go")
                report = victim.recv(FINISH)
                files = files_of(bus_name)
                after = look(sq)
                victim.send("close")
                victim.expect("closed", FINISH)
        created_behind = behind is not None and os.path.lexists(behind)
    finally:
        remove_everything(bus_name, *([behind] if behind else []))
    victims = {p: kind for p, (kind, uid, _, _) in files.items() if uid == VICTIM[0]}
    assert report["draws"][0] == first and len(report["draws"]) == 3, report
    reader_file = "bell" if use == "bell" else "wake"
    assert sorted(victims.values()) == sorted(["ring", "segment", reader_file]), files
    assert path in files and path not in victims, files
    assert after == before, "the planted file was changed"
    assert not created_behind, "a file was created behind the planted link"
    assert report["got"] == ("victim.secret", SECRET)


@pytest.mark.parametrize("replacement", ["symlink", "regular-file", "fifo-of-another-user"])
async def test_a_publisher_never_writes_into_what_replaced_a_readers_fifo(
    bus_name: str, replacement: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A reader sleeps on its FIFO; its FIFO is then replaced (by root, so
    that no kernel protection of sticky directories gets in the way) with a
    symlink to a regular file, a regular file, or a FIFO of another user
    that someone reads. A publisher's wake-up refuses it (logged, naming the
    file): the regular file's bytes are unchanged, the other user's FIFO
    gets nothing, and the reader still gets the event by polling."""
    assert NOBODY is not None
    caplog.set_level(logging.WARNING, logger="shmbus._core.wakeup")
    reader = ShmBus(bus_name, **SMALL_RING)
    publisher = ShmBus(bus_name, **SMALL_RING)
    await reader.connect()
    await publisher.connect()
    target = spare_path("victims-file")
    spy = -1
    try:
        async with reader.subscribe("wake.*") as sub:
            [fifo] = [p for p in bus_file_paths(bus_name) if kind_of(p) == "wake"]
            os.unlink(fifo)
            if replacement == "symlink":
                private_file(target)
                os.symlink(target, fifo)
            elif replacement == "regular-file":
                target = fifo
                private_file(target)
            else:
                os.mkfifo(fifo, 0o600)
                os.chown(fifo, NOBODY.pw_uid, NOBODY.pw_gid)
                spy = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
            await asleep(reader)
            await publisher.publish("wake.up", {"n": 1})
            event = await asyncio.wait_for(anext(aiter(sub)), FINISH)
            if replacement != "fifo-of-another-user":
                with open(target, "rb") as f:
                    content = f.read()
            else:
                content = os.read(spy, 4096)  # b"": no byte, and no writer left
    finally:
        if spy >= 0:
            os.close(spy)
        await publisher.close()
        await reader.close()
        remove_everything(bus_name, target)
    refused = [r.getMessage() for r in caplog.records if r.name == "shmbus._core.wakeup"]
    assert any(fifo in message for message in refused), refused
    assert content == (b"" if replacement == "fifo-of-another-user" else VICTIM_BYTES)
    assert (event.topic, event.payload) == ("wake.up", {"n": 1})


@pytest.mark.parametrize("replacement", ["symlink", "regular-file", "semaphore-of-another-user"])
def test_a_publisher_never_posts_what_replaced_a_blocking_readers_doorbell(
    bus_name: str, replacement: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A blocking reader sleeps on its doorbell; the doorbell is then
    replaced (by root, so that no kernel protection of sticky directories
    gets in the way) with a symlink to a regular file, a regular file of the
    bus's owner and mode, or a semaphore of another user. A publisher's
    wake-up refuses it (logged, naming the file): the file's bytes are
    unchanged, the other user's semaphore is never posted, and the reader
    still gets the event by its timed re-check."""
    import concurrent.futures

    import posix_ipc

    assert NOBODY is not None
    caplog.set_level(logging.WARNING, logger="shmbus._core.wakeup")
    reader = ShmBus(bus_name, **SMALL_RING)
    publisher = ShmBus(bus_name, **SMALL_RING)
    reader.connect_sync()
    publisher.connect_sync()
    target = spare_path("victims-file")
    spy = None
    content: object = None
    try:
        with reader.subscribe_sync("bell.*") as sub:
            bell_id = reader._sync_readers[sub]._bell.bell_id
            bell = bell_path(bus_name, bell_id)
            os.unlink(bell)
            if replacement == "symlink":
                private_file(target)
                os.symlink(target, bell)
            elif replacement == "regular-file":
                target = bell
                private_file(target)
            else:
                spy = posix_ipc.Semaphore(bell_name(bus_name, bell_id), posix_ipc.O_CREX)
                os.chown(bell, NOBODY.pw_uid, NOBODY.pw_gid)
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                consumer = pool.submit(sub.get, FINISH)
                wait_asleep(reader, sub)
                publisher.publish_nowait("bell.up", {"n": 1})
                event = consumer.result(FINISH)
            if spy is None:
                with open(target, "rb") as f:
                    content = f.read()
            else:
                content = spy.value
    finally:
        if spy is not None:
            spy.close()
        publisher.close_sync()
        reader.close_sync()
        remove_everything(bus_name, target)
    refused = [r.getMessage() for r in caplog.records if r.name == "shmbus._core.wakeup"]
    assert any(bell in message for message in refused), refused
    assert content == (0 if spy is not None else VICTIM_BYTES)
    assert (event.topic, event.payload) == ("bell.up", {"n": 1})


def wait_asleep(bus: ShmBus, sub: Any) -> None:
    """Wait until the blocking reader of *sub* sleeps on its doorbell."""
    segment = bus._segment
    assert segment is not None
    flag = OFF_SLEEP_FLAGS + bus._sync_readers[sub].slot
    deadline = time.monotonic() + FINISH
    while segment.mm[flag] != 1:
        assert time.monotonic() < deadline, "the reader never went to sleep"
        time.sleep(0.002)


def test_a_doorbell_has_the_bus_mode_whatever_the_umask(bus_name: str) -> None:
    """A blocking subscription's doorbell (made by sem_open, which applies
    the umask) ends up with exactly the bus's mode, whatever the umask."""
    with umask(0):
        bus = ShmBus(bus_name, **SMALL_RING)
        try:
            with bus.subscribe_sync(">"):
                files = files_of(bus_name)
        finally:
            bus.close_sync()
    assert sorted(kind for kind, *_ in files.values()) == ["bell", "segment"], files
    assert {bits for _, _, bits, _ in files.values()} == {0o600}, files


def test_a_blocking_reader_of_a_group_bus_sleeps_on_a_fifo_with_the_bus_mode_and_group(
    bus_name: str, group: grp.struct_group
) -> None:
    """On a bus shared with a group, a blocking subscription has no
    semaphore (a group member could write its memory, which the C library
    trusts): its reader sleeps on a wake-up FIFO with the bus's mode and
    group, whatever the umask."""
    with umask(0o077):
        bus = ShmBus(bus_name, **member_options(group), **SMALL_RING)
        try:
            with bus.subscribe_sync(">"):
                files = files_of(bus_name)
        finally:
            bus.close_sync()
    assert sorted(kind for kind, *_ in files.values()) == ["segment", "wake"], files
    assert {(bits, gid) for _, _, bits, gid in files.values()} == {(0o660, group.gr_gid)}


def test_a_group_members_events_wake_a_blocking_reader_of_a_group_bus(
    bus_name: str, group: grp.struct_group
) -> None:
    """A group member (nobody) publishes on a 0o660 group bus while root's
    blocking subscription waits on its FIFO: the event arrives."""
    import concurrent.futures

    bus = ShmBus(bus_name, **member_options(group), **SMALL_RING)
    bus.connect_sync()
    try:
        with bus.subscribe_sync("from.member") as sub:
            child = nobody_agent(
                bus_name, [group.gr_gid], bus_kwargs=member_options(group), pattern="none"
            )
            with running(child), concurrent.futures.ThreadPoolExecutor(1) as pool:
                child.expect("ready", FINISH)
                consumer = pool.submit(sub.get, FINISH)
                wait_asleep(bus, sub)
                child.send(("publish", "from.member"))
                child.expect("published", FINISH)
                event = consumer.result(FINISH)
                child.send("close")
                child.recv(FINISH)
    finally:
        bus.close_sync()
    assert (event.topic, event.payload) == ("from.member", {"uid": NOBODY.pw_uid})
    assert bus_file_paths(bus_name) == []


def private_file(path: str) -> None:
    """Create *path* as root's, mode 0o600 (like a bus file: only the FIFO
    checks can tell it apart), holding VICTIM_BYTES."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, VICTIM_BYTES)
    finally:
        os.close(fd)


async def asleep(bus: ShmBus) -> None:
    """Wait until *bus*'s reader has set its sleep flag (so the next publish
    wakes it through its FIFO)."""
    segment = bus._segment
    assert segment is not None
    loop = asyncio.get_running_loop()
    deadline = loop.time() + FINISH
    while segment.mm[OFF_SLEEP_FLAGS + segment.slot] != 1:
        assert loop.time() < deadline, "the reader never went to sleep"
        await asyncio.sleep(0.005)


# ─── Joining and reading ────────────────────────────────────────────────────


async def test_a_joiner_refuses_a_segment_whose_mode_was_widened_behind_the_creators_back(
    bus_name: str,
) -> None:
    """The segment of a live default bus is chmod'ed to 0o666 (its header
    still says 0o600): a new instance joining refuses it with a
    ForeignFileError naming both modes."""
    creator = ShmBus(bus_name, **SMALL_RING)
    await creator.connect()
    try:
        os.chmod(segment_path(bus_name), 0o666)
        error = await join_error(bus_name, **SMALL_RING)
    finally:
        await creator.close()
    assert isinstance(error, ForeignFileError), error
    message = str(error)
    assert segment_path(bus_name) in message, message
    assert "0o600" in message and "0o666" in message, message


@pytest.mark.parametrize("joiner", ["default-options", "group-options"])
async def test_a_joiner_refuses_a_segment_whose_group_was_changed_behind_the_creators_back(
    bus_name: str, group: grp.struct_group, joiner: str
) -> None:
    """The segment of a live group bus is given to another group (its
    header still names the bus's): a new instance joining refuses it with a
    ForeignFileError naming both groups, whether it asks for the bus's group
    or adopts whatever the bus has (default options: only the header can
    tell it what the group should be)."""
    other = next((g for g in grp.getgrall() if g.gr_gid not in (0, group.gr_gid)), None)
    if other is None:
        pytest.skip("no second group on this host")
    options: dict[str, Any] = member_options(group) if joiner == "group-options" else {}
    creator = ShmBus(bus_name, mode=0o660, group=group.gr_name, **SMALL_RING)
    await creator.connect()
    try:
        os.chown(segment_path(bus_name), -1, other.gr_gid)
        error = await join_error(bus_name, **options, **SMALL_RING)
    finally:
        await creator.close()
    assert isinstance(error, ForeignFileError), error
    message = str(error)
    assert segment_path(bus_name) in message, message
    assert f"gid {group.gr_gid}" in message and f"gid {other.gr_gid}" in message, message


async def test_a_ring_file_of_another_user_named_by_the_directory_is_never_read(
    bus_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A live publisher's ring file is given to nobody (as if another user
    had put its own file under a name the directory lists). A subscriber
    joining afterwards does not read it: it logs the refusal naming the file
    and its owner, counts it as corrupt, and delivers none of the events
    written into that ring, while another publisher's events flow."""
    assert NOBODY is not None
    caplog.set_level(logging.WARNING, logger="shmbus._core.directory")
    tampered = ShmBus(bus_name, **SMALL_RING)
    clean = ShmBus(bus_name, **SMALL_RING)
    subscriber = ShmBus(bus_name, **SMALL_RING)
    for bus in (tampered, clean, subscriber):
        await bus.connect()
    try:
        await tampered.publish("tampered.first", {})
        [ring] = [p for p in bus_file_paths(bus_name) if kind_of(p) == "ring"]
        os.chown(ring, NOBODY.pw_uid, -1)
        async with subscriber.subscribe(">") as sub:
            await clean.publish("clean.marker", {"n": 1})
            first = await asyncio.wait_for(anext(aiter(sub)), FINISH)
            for n in range(3):
                await tampered.publish("tampered.secret", {"n": n})
            await clean.publish("clean.marker", {"n": 2})
            second = await asyncio.wait_for(anext(aiter(sub)), FINISH)
            await asyncio.sleep(0.3)  # room for anything else to arrive
            statistics = sub.statistics()
        corrupt = subscriber.stats().corrupt
    finally:
        for bus in (subscriber, clean, tampered):
            await bus.close()
        remove_everything(bus_name)
    warnings = [r.getMessage() for r in caplog.records if r.name == "shmbus._core.directory"]
    assert (first.topic, first.payload) == ("clean.marker", {"n": 1})
    assert (second.topic, second.payload) == ("clean.marker", {"n": 2})
    assert (statistics.queued, statistics.dropped) == (0, 0), statistics
    assert corrupt == 1
    assert any(ring in w and owner_text(NOBODY.pw_uid) in w for w in warnings), warnings


async def test_no_file_of_a_default_bus_can_be_opened_by_another_user(
    bus_name: str, group: grp.struct_group
) -> None:
    """With a umask of 0, a default bus carrying events (a segment, a ring
    holding an event, a FIFO): nobody, even a member of the files' group
    and of a shared group, gets EACCES opening any of them, for reading or
    for writing."""
    assert NOBODY is not None
    with umask(0):
        bus = ShmBus(bus_name, **SMALL_RING)
        await bus.connect()
    try:
        async with bus.subscribe(">") as sub:
            await bus.publish("private.event", SECRET)
            await asyncio.wait_for(anext(aiter(sub)), FINISH)
            paths = bus_file_paths(bus_name)
            groups = sorted({os.stat(p).st_gid for p in paths} | {group.gr_gid})
            child = Agent(access_agents.try_open, NOBODY.pw_uid, NOBODY.pw_gid, groups, paths)
            with running(child):
                outcomes = child.recv(FINISH)
                assert child.join(FINISH) == 0
    finally:
        await bus.close()
    assert sorted(kind_of(p) for p in paths) == ["ring", "segment", "wake"], paths
    denied = {"read": errno.errorcode[errno.EACCES], "write": errno.errorcode[errno.EACCES]}
    assert outcomes == dict.fromkeys(paths, denied)
