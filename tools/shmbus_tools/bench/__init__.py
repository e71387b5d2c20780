"""A side-by-side benchmark of shmbus against NATS, ZeroMQ, multiprocessing
queues, faster-fifo, iceoryx2 and (where installed) Redis.

Run it with ``tools/bench`` (which installs the ``bench`` extra), ``python -m
shmbus_tools.bench`` or ``shmbus bench``; ``--quick`` takes about a minute. It writes
``docs/bench/results.md``, ``results.json`` and the charts.

Owns
----
The ``shmbus_tools.bench`` package: the command line (:mod:`.cli`), the scenarios
and their plan (:mod:`.spec`), the workload (:mod:`.workload`), the publish
and receive loops of the child processes (:mod:`.harness`), one driver per
peer (:mod:`.peers`), running and measuring, with the protocol between the
parent and its children (:mod:`.runner`), the progress line
(:mod:`.progress`) and the outputs (:mod:`.report`). Its child processes and
the servers some peers need are started by the tools' shared harness
(:mod:`shmbus_tools.children`, :mod:`shmbus_tools.servers`). It only *uses*
shmbus's public API (plus :mod:`shmbus.codec` for peers that carry the same
envelope); it changes nothing in the library.

The ``shmbus`` command loads this module for ``shmbus bench`` and calls
:func:`add_arguments` and :func:`main`.
"""

from __future__ import annotations

from .cli import add_arguments, main

__all__ = ["add_arguments", "main"]
