"""Child-side behaviours of the access tests (run by
:class:`shmbus_tools.children.Agent`), each running as another user.

Every function becomes its user first (``setgroups``/``setgid``/``setuid``,
so the parent must be root) and only then touches ``/dev/shm``. Everything
is imported at the top of this module, even what the library imports lazily:
after the switch, the user may not be able to read the interpreter's library
(a pyenv under /root, say).

Protocol, as in :mod:`agents`: small messages over the pipe; the parent's
``"close"`` / ``"leave"`` ends an agent, which answers before it returns.
"""

from __future__ import annotations

import asyncio
import concurrent.futures.thread  # noqa: F401  (asyncio.to_thread imports it lazily)
import contextlib
import errno
import os
import secrets
import stat
from typing import Any

from shmbus_tools.children import EOF, AsyncLink, BlockingLink, kind_of

from shmbus import ShmBus
from shmbus._core.ofd import try_lock
from shmbus.errors import ForeignFileError

__all__ = [
    "as_user",
    "drawing_victim",
    "squatter",
    "try_open",
    "victim",
]

#: What a squatter writes into the regular files it plants.
SQUAT_BYTES = b"squatter's bytes, planted first" + bytes(4096 - 31)


def become(uid: int, gid: int, groups: list[int]) -> None:
    """Switch this process to user *uid*, primary group *gid* and
    supplementary *groups* (for good: the saved ids change too)."""
    os.setgroups(groups)
    os.setgid(gid)
    os.setuid(uid)


def _refusal(exc: BaseException) -> dict[str, Any]:
    return {
        "type": type(exc).__name__,
        "foreign": isinstance(exc, ForeignFileError),
        "permission": isinstance(exc, PermissionError),
        "message": str(exc),
    }


def as_user(
    link: BlockingLink,
    name: str,
    uid: int,
    gid: int,
    groups: list[int],
    *,
    bus_kwargs: dict[str, Any] | None = None,
    pattern: str | None = None,
) -> None:
    """Become user *uid* (primary group *gid*, supplementary *groups*), then
    connect. If that raises, send ``("refused", type name, message)`` and
    stop. Otherwise subscribe to *pattern* (if given), send ``"ready"`` and
    answer:

    * ``("publish", topic)``: publish ``{"uid": uid}`` on *topic*, send
      ``"published"``;
    * ``"receive"``: send ``("got", topic, payload)`` for the next event;
    * ``"close"``: close the bus, send ``("closed", None)`` or
      ``("closed", "TypeName: message")`` if close() raised, and stop.
    """
    become(uid, gid, groups)

    async def main() -> None:
        bus = ShmBus(name, **(bus_kwargs or {}))
        try:
            await bus.connect()
        except Exception as exc:
            link.send(("refused", type(exc).__name__, str(exc)))
            return
        sub = bus.subscribe(pattern) if pattern is not None else None
        inbox = AsyncLink(link)
        link.send("ready")
        while True:
            message = await inbox.expect("publish", "receive", "close", EOF)
            if kind_of(message) == "publish":
                await bus.publish(message[1], {"uid": uid})
                link.send("published")
            elif message == "receive":
                assert sub is not None
                event = await asyncio.wait_for(anext(aiter(sub)), 30)
                link.send(("got", event.topic, event.payload))
            else:  # "close", or the parent is gone
                inbox.close()
                try:
                    await bus.close()
                except Exception as exc:
                    link.send(("closed", f"{type(exc).__name__}: {exc}"))
                else:
                    link.send(("closed", None))
                return

    asyncio.run(main())


# ─── Squatting ──────────────────────────────────────────────────────────────


def squatter(
    link: BlockingLink,
    uid: int,
    gid: int,
    plan: list[tuple[str, str, str | None]],
    *,
    lock_byte: int | None = None,
    mode: int = 0o666,
) -> None:
    """Become user *uid* and plant a file at each ``(path, kind, target)``
    of *plan*, with *mode* (0o666: anyone may read and write it) whatever
    the umask:

    * ``"file"``: a regular file holding :data:`SQUAT_BYTES`, kept open
      (with a shared OFD lock on *lock_byte*, if given, so that it looks like
      a live bus);
    * ``"fifo"``: a FIFO whose read end it keeps open (so that writers can
      open it, and every byte written to it is caught);
    * ``"symlink"``: a symbolic link to *target*.

    Then send ``"ready"`` and answer ``"look"`` with ``{path: what the
    squatter sees there now}`` (see :func:`_look`), and ``"leave"`` by
    removing its files, sending ``"left"`` and returning.
    """
    become(uid, gid, [])
    held: dict[str, int] = {}
    caught: dict[str, bytes] = {}
    try:
        for path, kind, target in plan:
            if kind == "file":
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
                os.fchmod(fd, mode)
                os.write(fd, SQUAT_BYTES)
                if lock_byte is not None and not try_lock(fd, lock_byte, exclusive=False):
                    raise RuntimeError(f"could not lock byte {lock_byte} of {path}")
            elif kind == "fifo":
                os.mkfifo(path, mode)
                os.chmod(path, mode)
                fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
                caught[path] = b""
            elif kind == "symlink":
                assert target is not None
                os.symlink(target, path)
                continue
            else:
                raise ValueError(f"unknown kind {kind!r}")
            held[path] = fd
        link.send("ready")
        while True:
            message = link.recv()
            if message == "look":
                for path, fd in held.items():
                    if path in caught:
                        with contextlib.suppress(BlockingIOError):
                            caught[path] += os.read(fd, 65536)
                link.send({path: _look(path, caught.get(path)) for path, _, _ in plan})
            elif message == "leave":
                break
            else:
                raise RuntimeError(f"squatter got {message!r}")
    finally:
        for fd in held.values():
            os.close(fd)
        for path, _, _ in plan:
            with contextlib.suppress(OSError):
                os.unlink(path)
    link.send("left")


def _look(path: str, caught: bytes | None) -> dict[str, Any]:
    """What is at *path* now, as its squatter sees it: lstat fields, the
    bytes of a regular file (read anew through the name), the target of a
    link, the bytes read from a FIFO's read end."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return {"exists": False}
    seen: dict[str, Any] = {
        "exists": True,
        "type": stat.S_IFMT(st.st_mode),
        "uid": st.st_uid,
        "mode": stat.S_IMODE(st.st_mode),
        "ino": st.st_ino,
        "size": st.st_size,
    }
    if stat.S_ISREG(st.st_mode):
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            seen["content"] = os.pread(fd, st.st_size + 1, 0)
        finally:
            os.close(fd)
    elif stat.S_ISLNK(st.st_mode):
        seen["target"] = os.readlink(path)
    elif stat.S_ISFIFO(st.st_mode):
        seen["caught"] = caught
    return seen


def victim(
    link: BlockingLink,
    uid: int,
    gid: int,
    squatted: str,
    own: str,
    *,
    secret: dict[str, Any],
    bus_kwargs: dict[str, Any] | None = None,
) -> None:
    """Become user *uid*; connect to bus *squatted* (whose names someone
    else planted files at) and, if that works, publish *secret* on it and
    subscribe; then use bus *own* normally: subscribe, publish *secret*,
    receive it. Send ``{"squatted": None or the refusal, "own": (topic,
    payload) received}`` and return."""
    become(uid, gid, [])

    async def main() -> dict[str, Any]:
        refusal = None
        bus = ShmBus(squatted, **(bus_kwargs or {}))
        try:
            await bus.connect()
        except Exception as exc:
            refusal = _refusal(exc)
        else:  # the guard failed: show what the victim would then write
            try:
                async with bus.subscribe(">"):
                    await bus.publish("victim.secret", secret)
            finally:
                await bus.close()
        async with ShmBus(own, **(bus_kwargs or {})) as mine:
            async with mine.subscribe("victim.*") as sub:
                await mine.publish("victim.secret", secret)
                event = await asyncio.wait_for(anext(aiter(sub)), 30)
        return {"squatted": refusal, "own": (event.topic, event.payload)}

    link.send(asyncio.run(main()))


def drawing_victim(
    link: BlockingLink,
    name: str,
    uid: int,
    gid: int,
    *,
    first_draw: int,
    first_use: str,
    secret: dict[str, Any],
    bus_kwargs: dict[str, Any] | None = None,
) -> None:
    """Become user *uid*, connect to bus *name* and send ``"connected"``.
    On ``"go"``, make the process's next ``secrets.randbits`` return
    *first_draw* (later draws are random again), then create the file
    *first_use* names first: ``"ring"`` (publish, then subscribe),
    ``"wake"`` (subscribe, then publish) or ``"bell"`` (subscribe_sync, then
    publish); publish *secret* and receive it.
    Send ``{"draws": [...], "got": (topic, payload)}``, and on ``"close"``
    close the bus, send ``"closed"`` and return."""
    become(uid, gid, [])

    async def main() -> None:
        async with ShmBus(name, **(bus_kwargs or {})) as bus:
            link.send("connected")
            await asyncio.to_thread(link.expect, "go")
            draws: list[int] = []
            real = secrets.randbits

            def randbits(k: int) -> int:
                value = first_draw if not draws else real(k)
                draws.append(value)
                return value

            secrets.randbits = randbits
            try:
                if first_use == "bell":
                    with bus.subscribe_sync("victim.secret") as blocking:
                        await bus.publish("victim.secret", secret)
                        event = await asyncio.to_thread(blocking.get, 30)
                        link.send({"draws": draws, "got": (event.topic, event.payload)})
                        await asyncio.to_thread(link.expect, "close")
                else:
                    if first_use == "ring":
                        await bus.publish("victim.first", {})
                        sub = bus.subscribe("victim.secret")
                    elif first_use == "wake":
                        sub = bus.subscribe("victim.secret")
                    else:
                        raise ValueError(f"unknown first_use {first_use!r}")
                    async with sub:
                        await bus.publish("victim.secret", secret)
                        event = await asyncio.wait_for(anext(aiter(sub)), 30)
                        link.send({"draws": draws, "got": (event.topic, event.payload)})
                        await asyncio.to_thread(link.expect, "close")
            finally:
                secrets.randbits = real
        link.send("closed")

    asyncio.run(main())


# ─── Reading another user's files ───────────────────────────────────────────


def try_open(link: BlockingLink, uid: int, gid: int, groups: list[int], paths: list[str]) -> None:
    """Become user *uid* and try to open each of *paths* for reading and for
    writing (non-blocking, not following links); send ``{path: {"read":
    outcome, "write": outcome}}`` where an outcome is ``"opened"`` or the
    errno name of the failure."""
    become(uid, gid, groups)
    outcomes: dict[str, dict[str, str]] = {}
    for path in paths:
        outcomes[path] = {}
        for label, flags in (("read", os.O_RDONLY), ("write", os.O_WRONLY)):
            try:
                fd = os.open(path, flags | os.O_NONBLOCK | os.O_NOFOLLOW)
            except OSError as exc:
                outcomes[path][label] = errno.errorcode.get(exc.errno or 0, str(exc))
            else:
                os.close(fd)
                outcomes[path][label] = "opened"
    link.send(outcomes)
