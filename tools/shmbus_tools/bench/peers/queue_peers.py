"""Queues between processes: ``multiprocessing.Queue`` and faster-fifo.

Both are point-to-point, so pub/sub is built the way an application would:
one queue per subscriber, created by the parent and inherited across
``fork()``; the publisher encodes the shmbus envelope once per event and
``put()``s ``(topic, envelope)`` into every subscriber's queue (the queue
pickles it). Subscribers filter on the topic with the shmbus matcher and
decode the envelope into a :class:`shmbus.Event`. Both APIs are blocking.

* ``multiprocessing.Queue``: unbounded (a feeder thread writes to a pipe),
  ``q.get()``.
* ``faster_fifo.Queue``: a 16 MiB circular buffer in shared memory (a generous
  buffer: more than shmbus's 3 MiB ring per publisher), ``q.put()`` blocks
  while it is full, the subscriber takes
  what is there with ``q.get_many()``, its natural batch API.

Neither loses events, so each publisher ends its stream with a ``None``
sentinel per queue; a subscriber is done when it took one from every
publisher.
"""

from __future__ import annotations

import logging
import multiprocessing
from collections.abc import Callable
from queue import Empty
from typing import Any

from shmbus.codec import decode_envelope, encode_envelope

from ...children import BlockingLink
from ..harness import blocking_publisher, blocking_subscriber
from ..spec import RunSpec
from ..workload import EVENT_TYPE, MAX_EVENT_SIZE, Recorder, make_matcher
from . import Driver

__all__ = ["DRIVERS", "FasterFifoDriver", "MpQueueDriver"]

log = logging.getLogger("shmbus_tools.bench")

_MP = multiprocessing.get_context("fork")
FASTER_FIFO_BYTES = 16 * 1024 * 1024


class _QueueDriver(Driver):
    blocking_subscriber = True

    def publisher(self, link: BlockingLink, spec: RunSpec, resources: Any, index: int) -> None:
        queues: list[Any] = list(resources)
        puts = [queue.put for queue in queues]

        def send(topic: str, payload: dict[str, Any]) -> None:
            item = (topic, encode_envelope(topic, payload, EVENT_TYPE, MAX_EVENT_SIZE))
            for put in puts:
                put(item)

        def end_of_stream() -> None:
            for put in puts:
                put(None)

        try:
            blocking_publisher(link, spec, send, after=end_of_stream)
        finally:
            self._leave(queues)

    def subscriber(self, link: BlockingLink, spec: RunSpec, resources: Any, index: int) -> None:
        consume = self._receive_loop(resources[index], spec.publishers)
        blocking_subscriber(link, spec, consume)

    def _receive_loop(self, queue: Any, publishers: int) -> Callable[[Recorder], None]:
        raise NotImplementedError

    def _leave(self, queues: list[Any]) -> None:
        """Publisher, at exit (every subscriber is done by then)."""


class MpQueueDriver(_QueueDriver):
    name = "mpq"

    def prepare(self, spec: RunSpec) -> list[Any]:
        return [_MP.Queue() for _ in range(spec.subscribers)]

    def release(self, spec: RunSpec, resources: Any) -> None:
        for queue in resources:
            queue.close()

    def _leave(self, queues: list[Any]) -> None:
        # Whatever the feeder thread still holds is for subscribers that are
        # gone: do not wait for it at exit.
        for queue in queues:
            queue.cancel_join_thread()
            queue.close()

    def _receive_loop(self, queue: Any, publishers: int) -> Callable[[Recorder], None]:
        matcher = make_matcher()

        def consume(record: Recorder) -> None:
            get = queue.get
            ends = 0
            while True:
                item = get()
                if item is None:
                    ends += 1
                    if ends == publishers:
                        return
                    continue
                topic, body = item
                if matcher(topic):
                    record(decode_envelope(topic, body, MAX_EVENT_SIZE))

        return consume


class FasterFifoDriver(_QueueDriver):
    name = "ff"

    @classmethod
    def unavailable(cls) -> str | None:
        try:
            import faster_fifo  # noqa: F401 - the bench extra; multiprocessing.Queue needs none
        except ImportError:
            return "Python package faster_fifo is not installed (pip install 'shmbus[bench]')"
        return None

    def prepare(self, spec: RunSpec) -> list[Any]:
        import faster_fifo

        return [
            faster_fifo.Queue(max_size_bytes=FASTER_FIFO_BYTES) for _ in range(spec.subscribers)
        ]

    def _receive_loop(self, queue: Any, publishers: int) -> Callable[[Recorder], None]:
        matcher = make_matcher()

        def consume(record: Recorder) -> None:
            get_many = queue.get_many
            ends = 0
            while True:
                try:
                    items = get_many(timeout=0.1)
                except Empty:
                    continue
                for item in items:
                    if item is None:
                        ends += 1
                        if ends == publishers:
                            return
                        continue
                    topic, body = item
                    if matcher(topic):
                        record(decode_envelope(topic, body, MAX_EVENT_SIZE))

        return consume


DRIVERS: dict[str, type[Driver]] = {"mpq": MpQueueDriver, "ff": FasterFifoDriver}
