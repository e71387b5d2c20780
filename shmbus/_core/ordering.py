"""Memory ordering between processes: the fences the protocols name.

Python has no fence instruction and no atomics on shared memory. What it has
is ``threading.Lock``, which CPython builds on a POSIX semaphore: acquiring
runs an atomic compare-and-swap with *acquire* ordering and releasing an
atomic add with *release* ordering (glibc's ``sem_trywait``/``sem_wait`` and
``sem_post``). From those:

* On x86-64 (TSO) stores are not reordered with stores nor loads with loads,
  so a *release* fence (earlier stores before a later store) and an
  *acquire* fence (an earlier load before later loads) need no instruction.
  Only a store followed by a load can be reordered; every locked instruction
  is a full barrier, so :func:`full_fence` is one uncontended acquire.
* Elsewhere (arm64), a release followed by an acquire is never reordered
  (ARMv8's release/acquire are RCsc), so acquire - release - acquire on a
  private lock orders every access before it against every access after it:
  all three functions are that full fence.

Each call uses a lock of its own, created for it: a signal handler that
raises between two of its operations can leave nothing held that another
call would wait for.

Which ordering each protocol step needs is written next to the step, in
:mod:`shmbus._core.ring`, :mod:`shmbus._core.directory` and :mod:`shmbus._core.wakeup`.
"""

from __future__ import annotations

import platform
import threading

__all__ = ["TSO", "acquire_fence", "full_fence", "release_fence"]

#: True where the hardware keeps stores in order and loads in order (x86-64).
TSO = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686", "x86")

_Lock = threading.Lock


def _x86_full_fence() -> None:
    """One locked compare-and-swap: a full barrier on x86."""
    _Lock().acquire(False)


def _portable_full_fence() -> None:
    """acquire, release, acquire: the release-acquire pair in the middle is
    ordered (RCsc), and it is bracketed by an acquire on each side."""
    lock = _Lock()
    lock.acquire(False)
    lock.release()
    lock.acquire(False)


def _no_fence() -> None:
    """Nothing to do: the hardware already keeps this order (x86-64 TSO)."""


full_fence = _x86_full_fence if TSO else _portable_full_fence
#: Orders every earlier store before every later store (a commit).
release_fence = _no_fence if TSO else _portable_full_fence
#: Orders an earlier load (of a commit word) before every later load.
acquire_fence = _no_fence if TSO else _portable_full_fence
