"""Removing the files of buses that no process uses any more.

A bus's last instance removes its files when it closes; a bus whose every
process crashed leaves them in ``/dev/shm`` (the segment, the publishers'
ring files ``shmbus.NAME:ring.<id>`` with their reserved memory, the
wake-up FIFOs ``shmbus.NAME:wake.<id>`` and the blocking readers' doorbells
``sem.shmbus.NAME:bell.<id>``). A new instance on that name resets
them, so they are harmless, but they hold memory: :func:`cleanup` removes
them.

Owns
----
The decision that a bus is dead, made the way the attach protocol makes it
(:mod:`shmbus._core.segment`), and the removal of its files.

Invariants
----------
* A bus is removed only by someone holding ``LOCK_ATTACH`` of its segment
  *exclusively*, which no one can while any instance is attached (each holds
  it shared) and which makes every newcomer wait, then start over on a fresh
  segment. So a bus that is live, or comes alive during the cleanup, is never
  removed (unless ``force=True``) and no newcomer ends up on removed files.
* Orphans (rings, FIFOs or doorbells whose segment file is gone) are removed under
  the same lock: the cleaner creates the segment name itself (an empty file,
  removed with the orphans) so that a newcomer cannot create the bus's
  resources between the check and the removal.
* ``force=True`` removes the files of a live bus regardless. Its processes
  keep working on their mappings (a reader whose FIFO or doorbell was removed
  is woken by its polling timer instead) until
  they close, but they are cut off from processes that connect afterwards,
  which create a fresh bus under the same name.
* The library does not print: callers get the removed paths (and, from
  :func:`cleanup_report`, the buses left alone and why).
"""

from __future__ import annotations

import errno
import logging
import os
import re
from dataclasses import dataclass, field

from ..errors import BusInUseError, ShmBusError
from . import ofd
from .inspection import read_bus
from .layout import LOCK_ATTACH
from .segment import remove_bus_files, still_linked
from .shmfiles import SHM_DIR, bus_file_paths, validate_bus_name

__all__ = ["BusInUseError", "CleanupReport", "cleanup", "cleanup_report", "leftover_names"]

log = logging.getLogger("shmbus._core.leftovers")

_RESOURCE = re.compile(
    r"shmbus\.(?P<seg>[A-Za-z0-9_.-]+)"
    r"|shmbus\.(?P<file>[A-Za-z0-9_.-]+):(?:ring|wake)\.[0-9a-f]{16}"
    r"|sem\.shmbus\.(?P<bell>[A-Za-z0-9_.-]+):bell\.[0-9a-f]{16}"
)
_ATTEMPTS = 5


@dataclass(frozen=True, slots=True)
class CleanupReport:
    """What :func:`cleanup_report` did."""

    #: Paths removed, in removal order.
    removed: list[str] = field(default_factory=list)
    #: Buses left alone, with the reason (live, no permission, ...).
    skipped: dict[str, str] = field(default_factory=dict)


def cleanup(name: str | None = None, *, force: bool = False) -> list[str]:
    """Remove the files of bus *name*, or of every bus on this host with no
    live process; return the paths removed.

    With *name*, a live bus raises :class:`BusInUseError` (naming its
    processes) unless *force* is true; a bus with no file left returns ``[]``.
    Without *name*, live buses are skipped (and logged); see
    :func:`cleanup_report` to learn which.

    ``force=True`` removes a live bus's files too: its processes keep working
    on their mappings until they close, but processes that connect afterwards
    get a fresh, separate bus.

    Raises
    ------
    ValueError, TypeError
        *name* cannot name a bus.
    BusInUseError
        *name* is live and *force* is false.
    PermissionError
        This user may not remove the bus's files.
    """
    return cleanup_report(name, force=force, strict=True).removed


def cleanup_report(
    name: str | None = None, *, force: bool = False, strict: bool = False
) -> CleanupReport:
    """Like :func:`cleanup`, and also report the buses left alone.

    With *strict* and a *name*, a bus that cannot be removed raises
    (:class:`BusInUseError`, :class:`PermissionError`) instead of being
    reported in :attr:`CleanupReport.skipped`.
    """
    report = CleanupReport()
    names = [validate_bus_name(name)] if name is not None else leftover_names()
    for bus in names:
        try:
            report.removed.extend(_clean_one(bus, force=force))
        except (BusInUseError, OSError) as exc:
            if strict and name is not None:
                raise
            report.skipped[bus] = str(exc)
            log.info("left bus %r alone: %s", bus, exc)
    return report


def leftover_names() -> list[str]:
    """Names of the buses that have any file in ``/dev/shm`` (segment, ring,
    FIFO or doorbell), sorted."""
    names = set()
    try:
        entries = os.listdir(SHM_DIR)
    except FileNotFoundError:
        return []
    for entry in entries:
        match = _RESOURCE.fullmatch(entry)
        if match is None:
            continue
        bus = match.group("seg") or match.group("file") or match.group("bell")
        try:
            names.add(validate_bus_name(bus))
        except (TypeError, ValueError):
            continue
    return sorted(names)


def _clean_one(name: str, *, force: bool) -> list[str]:
    path = f"{SHM_DIR}/shmbus.{name}"
    for _ in range(_ATTEMPTS):
        if not bus_file_paths(name):
            return []
        fd, created = _open_or_create(path, name)
        try:
            if not ofd.try_lock(fd, LOCK_ATTACH, exclusive=True):
                if not force:
                    raise BusInUseError(_live_message(name))
                return _remove(name, path, created=created, live=True)
            if not still_linked(fd, name):
                continue  # removed or replaced meanwhile: look again
            return _remove(name, path, created=created, live=False)
        finally:
            os.close(fd)  # drops the lock: waiting newcomers start over
    raise BusInUseError(f"bus {name!r} kept changing (created and removed) during the cleanup")


def _open_or_create(path: str, name: str) -> tuple[int, bool]:
    """Open the segment read-write (write access is needed for an exclusive
    lock), creating an empty one if it is missing; (fd, created)."""
    flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        while True:
            try:
                return os.open(path, flags), False
            except FileNotFoundError:
                pass
            try:
                return os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o600), True
            except FileExistsError:
                continue
    except PermissionError:
        raise PermissionError(
            errno.EACCES, f"no permission to open bus {name!r} ({path}) for writing"
        ) from None


def _remove(name: str, path: str, *, created: bool, live: bool) -> list[str]:
    if live:
        log.warning("bus %r is live; removing its files anyway (force)", name)
    paths = [p for p in remove_bus_files(name) if not (created and p == path)]
    if paths:
        log.info("bus %r: removed %s", name, ", ".join(paths))
    return paths


def _live_message(name: str) -> str:
    try:
        info = read_bus(name)
        who = ", ".join(f"pid {s.pid} ({_short(s.command)})" for s in info.live_instances)
    except (ShmBusError, OSError):
        who = ""
    return (
        f"bus {name!r} is live ({who or 'a process is attached'}); stop its processes "
        "first, or force the removal (they keep their mappings, newcomers get a new bus)"
    )


def _short(command: str, limit: int = 60) -> str:
    text = " ".join(command.split()) or "?"
    return text if len(text) <= limit else text[: limit - 3] + "..."
