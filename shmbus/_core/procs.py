"""Process identity: who is alive, told apart from a later process that
reuses the same pid.

A process is identified by its pid *and* its start time (milliseconds since
the epoch, as psutil reads it from ``/proc``). A pid whose current process
started at another time is a different process, so a recycled pid is never
mistaken for the one that recorded it. Zombies count as dead: they hold no
locks and will never write again.
"""

from __future__ import annotations

import os

import psutil

__all__ = ["command_line", "is_alive", "self_identity", "start_time_ms"]

#: psutil derives start times from clock ticks; allow for their rounding.
_START_TOLERANCE_MS = 50

_self: tuple[int, int] | None = None


def start_time_ms(pid: int) -> int | None:
    """Start time of process *pid* in ms since the epoch, or None if it is gone."""
    try:
        return round(psutil.Process(pid).create_time() * 1000)
    except (psutil.NoSuchProcess, psutil.ZombieProcess, ProcessLookupError, ValueError):
        return None


def self_identity() -> tuple[int, int]:
    """This process's (pid, start time ms), cached; refreshed in a fork child."""
    global _self
    pid = os.getpid()
    if _self is None or _self[0] != pid:
        start = start_time_ms(pid)
        _self = (pid, start if start is not None else 0)
    return _self


def is_alive(pid: int, start_ms: int) -> bool:
    """True if the process that recorded (*pid*, *start_ms*) still runs."""
    if pid <= 0:
        return False
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
        started = round(process.create_time() * 1000)
    except (psutil.NoSuchProcess, psutil.ZombieProcess, ProcessLookupError):
        return False
    except psutil.AccessDenied:
        return True  # exists, owned by someone else: assume it is the one
    return abs(started - start_ms) <= _START_TOLERANCE_MS


def command_line(pid: int, limit: int = 200) -> str:
    """A short command line of *pid* for display ('' if unknown)."""
    try:
        text = " ".join(psutil.Process(pid).cmdline())
    except (psutil.Error, ProcessLookupError):
        return ""
    return text[:limit]
