"""Reference rows measured next to the peers: not transports one would choose.

* ``sem`` (L1): the floor of a cross-process wake-up. The publisher writes its
  ``monotonic_ns`` stamp into an anonymous shared mapping and posts a POSIX
  semaphore; the receiver blocks in ``sem_wait`` (no asyncio, no envelope, no
  event object) and takes the difference. Same pacing code as the peers.
  The semaphore is unlinked as soon as it is created: it lives only as long as
  the processes that have it open, so nothing can be left in ``/dev/shm``.
* ``fifo`` (L1): the floor of shmbus's own wake-up mechanism in asyncio (see
  docs/DESIGN.md, "Wake-up"): the same stamp slots, but the publisher writes
  one byte to a named FIFO that the receiver's event loop watches with
  ``add_reader``; the callback hands the stamp to a coroutine through an
  ``asyncio.Queue``. The gap between this row and shmbus's is what shmbus's
  publish, reader and delivery path add at a low rate.
* ``loop`` (P1): the benchmark's own publish loop with a call that does nothing:
  building each payload dict and its time stamp. Subtract it from a P1 row to
  get the publish call alone.
"""

from __future__ import annotations

import asyncio
import mmap
import os
import time
from typing import Any

import posix_ipc

from ...children import AsyncLink, BlockingLink
from ..harness import async_subscriber, blocking_publisher, blocking_subscriber
from ..spec import RunSpec
from ..workload import Recorder
from . import Driver

__all__ = ["DRIVERS", "FifoDriver", "LoopDriver", "SemaphoreDriver"]

#: Stamps in flight: a ring of slots in the shared mapping, so a receiver a
#: little late never reads a newer stamp than the post it is taking.
_SLOTS = 512


class SemaphoreDriver(Driver):
    name = "sem"
    blocking_subscriber = True

    def prepare(self, spec: RunSpec) -> tuple[Any, mmap.mmap]:
        name = f"/shmbus-bench-{os.getpid()}-{spec.run_id}"
        semaphore = posix_ipc.Semaphore(name, posix_ipc.O_CREX, initial_value=0)
        semaphore.unlink()
        return semaphore, mmap.mmap(-1, 8 * _SLOTS)

    def release(self, spec: RunSpec, resources: Any) -> None:
        semaphore, mapping = resources
        semaphore.close()
        mapping.close()

    def publisher(self, link: BlockingLink, spec: RunSpec, resources: Any, index: int) -> None:
        semaphore, mapping = resources
        stamps = memoryview(mapping).cast("q")
        post = semaphore.release
        count = 0

        def send(topic: str, payload: dict[str, Any]) -> None:
            nonlocal count
            stamps[count % _SLOTS] = payload["t_ns"]
            count += 1
            post()

        def end_of_stream() -> None:
            stamps[count % _SLOTS] = -1
            post()

        blocking_publisher(link, spec, send, after=end_of_stream)

    def subscriber(self, link: BlockingLink, spec: RunSpec, resources: Any, index: int) -> None:
        semaphore, mapping = resources
        stamps = memoryview(mapping).cast("q")

        def consume(record: Recorder) -> None:
            wait = semaphore.acquire
            taken = 0
            while True:
                try:
                    wait()
                except posix_ipc.SignalError:
                    continue  # SIGUSR1: its handler ends the run at the next bytecode
                stamp = stamps[taken % _SLOTS]
                taken += 1
                if stamp < 0:
                    return
                record.stamped(time.monotonic_ns(), stamp)

        blocking_subscriber(link, spec, consume)


class FifoDriver(Driver):
    name = "fifo"

    def prepare(self, spec: RunSpec) -> tuple[str, mmap.mmap]:
        path = os.path.join(self.env.tmpdir, f"fifo-{spec.run_id}")
        os.mkfifo(path, 0o600)
        return path, mmap.mmap(-1, 8 * _SLOTS)

    def release(self, spec: RunSpec, resources: Any) -> None:
        path, mapping = resources
        mapping.close()
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass

    def publisher(self, link: BlockingLink, spec: RunSpec, resources: Any, index: int) -> None:
        path, mapping = resources
        stamps = memoryview(mapping).cast("q")
        # The subscriber has the FIFO open for reading by now (it is ready).
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        count = 0

        def send(topic: str, payload: dict[str, Any]) -> None:
            nonlocal count
            stamps[count % _SLOTS] = payload["t_ns"]
            count += 1
            os.write(fd, b"\x01")

        try:
            blocking_publisher(link, spec, send)
        finally:
            os.close(fd)

    def subscriber(self, link: BlockingLink, spec: RunSpec, resources: Any, index: int) -> None:
        asyncio.run(_fifo_subscriber(link, spec, resources))


async def _fifo_subscriber(pipe: BlockingLink, spec: RunSpec, resources: Any) -> None:
    path, mapping = resources
    stamps = memoryview(mapping).cast("q")
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    loop = asyncio.get_running_loop()
    handoff: asyncio.Queue[int] = asyncio.Queue()
    taken = 0

    def readable() -> None:
        nonlocal taken
        try:
            data = os.read(fd, 4096)
        except BlockingIOError:
            return
        if not data:  # the writer closed: the run is over
            loop.remove_reader(fd)
            return
        for _ in range(len(data)):
            handoff.put_nowait(stamps[taken % _SLOTS])
            taken += 1

    async def consume(record: Recorder) -> None:
        mono_ns = time.monotonic_ns
        while True:
            stamp = await handoff.get()
            record.stamped(mono_ns(), stamp)

    link = AsyncLink(pipe)
    loop.add_reader(fd, readable)
    try:
        await async_subscriber(link, spec, consume)
    finally:
        loop.remove_reader(fd)
        link.close()
        os.close(fd)


class LoopDriver(Driver):
    name = "loop"

    def publisher(self, link: BlockingLink, spec: RunSpec, resources: Any, index: int) -> None:
        def send(topic: str, payload: dict[str, Any]) -> None:
            pass

        blocking_publisher(link, spec, send)

    def subscriber(self, link: BlockingLink, spec: RunSpec, resources: Any, index: int) -> None:
        raise RuntimeError("the loop reference has no subscribers")


DRIVERS: dict[str, type[Driver]] = {
    "sem": SemaphoreDriver,
    "fifo": FifoDriver,
    "loop": LoopDriver,
}
