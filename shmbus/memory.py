"""In-process transports: :class:`MemoryBus` (real pub/sub inside one process)
and :class:`NullBus` (publishes vanish, subscriptions end at once).

``MemoryBus`` is the test double for code written against the contract, so it
is strict in the same ways as the shared-memory bus: it validates topics,
patterns and payloads, enforces ``max_event_size``, and round-trips every
envelope through the wire codec so a payload that would not survive msgpack
fails here too. Events are routed to subscriptions on their home loops with
bounded drop-oldest queues, and handed to blocking subscriptions
(``subscribe_sync()``) under their lock, from whichever thread publishes.
"""

from __future__ import annotations

import threading
from typing import Any

from ._checks import check_int
from ._core.layout import MIN_MAX_EVENT_SIZE
from .codec import decode_envelope, encode_envelope
from .contract import BaseBus, validate_pattern, validate_topic
from .delivery import BlockingSubscription, QueueSubscription
from .stats import BusStats

__all__ = ["MemoryBus", "NullBus"]


class _LocalBus(BaseBus):
    """Lifecycle and argument checks shared by the in-process transports."""

    def __init__(self, *, max_event_size: int = 1_048_576, queue_size: int = 1024) -> None:
        self.max_event_size = check_int(
            "max_event_size", max_event_size, minimum=MIN_MAX_EVENT_SIZE
        )
        self.queue_size = check_int("queue_size", queue_size, minimum=1)
        self._closed = False
        self._published = 0
        self._lock = threading.Lock()

    async def connect(self) -> None:
        if self._closed:
            raise RuntimeError(f"{self!r} is closed; create a new bus to reconnect")

    def _check_open(self, action: str) -> None:
        if self._closed:
            raise RuntimeError(f"cannot {action} on a closed {type(self).__name__}")

    async def publish(self, topic: str, payload: dict[str, Any], *, event_type: str = "") -> None:
        self.publish_nowait(topic, payload, event_type=event_type)

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<{type(self).__name__} {state}>"


class MemoryBus(_LocalBus):
    """Publish/subscribe between the tasks and threads of one process.

    ``publish_nowait()`` may be called from any thread; a blocking
    subscription may be consumed from any thread.
    """

    def __init__(self, *, max_event_size: int = 1_048_576, queue_size: int = 1024) -> None:
        super().__init__(max_event_size=max_event_size, queue_size=queue_size)
        self._subscriptions: list[QueueSubscription | BlockingSubscription] = []
        self._retired_delivered = 0
        self._retired_dropped = 0

    def publish_nowait(self, topic: str, payload: dict[str, Any], *, event_type: str = "") -> None:
        self._check_open("publish")
        validate_topic(topic)
        data = encode_envelope(topic, payload, event_type, self.max_event_size)
        with self._lock:
            self._published += 1
            targets = [sub for sub in self._subscriptions if sub.matcher(topic)]
        if not targets:
            return
        # One decoded copy per subscriber: payload dicts are mutable, and a
        # consumer that edits its copy must not change what others see.
        for sub in targets:
            sub.deliver((decode_envelope(topic, data, self.max_event_size),))

    def subscribe(self, pattern: str) -> QueueSubscription:
        self._check_open("subscribe")
        validate_pattern(pattern)
        sub = QueueSubscription(pattern, maxsize=self.queue_size, on_close=self._forget)
        with self._lock:
            self._subscriptions.append(sub)
        return sub

    def subscribe_sync(self, pattern: str) -> BlockingSubscription:
        """A blocking subscription (see :meth:`BaseBus.subscribe_sync`): events
        published after this call returns, from any thread, are handed to it
        by the publishing thread."""
        self._check_open("subscribe")
        validate_pattern(pattern)
        sub = BlockingSubscription(pattern, maxsize=self.queue_size, on_close=self._forget)
        with self._lock:
            self._subscriptions.append(sub)
        return sub

    def _forget(self, sub: QueueSubscription | BlockingSubscription) -> None:
        with self._lock:
            if sub in self._subscriptions:
                self._subscriptions.remove(sub)
                self._retired_delivered += sub.delivered
                self._retired_dropped += sub.dropped

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with self._lock:
            subs = list(self._subscriptions)
        for sub in subs:
            sub.close_from_transport()

    def stats(self) -> BusStats:
        """Counters of this bus instance (see :class:`~shmbus.stats.BusStats`)."""
        with self._lock:
            live = list(self._subscriptions)
            delivered = self._retired_delivered + sum(s.delivered for s in live)
            dropped = self._retired_dropped + sum(s.dropped for s in live)
            return BusStats(
                published=self._published,
                delivered=delivered,
                dropped=dropped,
                corrupt=0,
                subscriptions=len(live),
            )


class NullBus(_LocalBus):
    """A bus that discards every event: for processes that must not talk.

    Publishing validates its input and then drops it (counted in ``stats()``);
    a subscription ends immediately. A blocking subscription stays open and
    never yields (``get(timeout)`` times out) until it or the bus is closed, so
    a worker thread consuming one idles rather than ending.
    """

    def __init__(self, *, max_event_size: int = 1_048_576, queue_size: int = 1024) -> None:
        super().__init__(max_event_size=max_event_size, queue_size=queue_size)
        self._blocking: list[BlockingSubscription] = []

    def publish_nowait(self, topic: str, payload: dict[str, Any], *, event_type: str = "") -> None:
        self._check_open("publish")
        validate_topic(topic)
        encode_envelope(topic, payload, event_type, self.max_event_size)
        with self._lock:
            self._published += 1

    def subscribe(self, pattern: str) -> QueueSubscription:
        self._check_open("subscribe")
        validate_pattern(pattern)
        sub = QueueSubscription(pattern, maxsize=self.queue_size)
        sub.close_from_transport()
        return sub

    def subscribe_sync(self, pattern: str) -> BlockingSubscription:
        """A blocking subscription that never yields (see the class)."""
        self._check_open("subscribe")
        validate_pattern(pattern)
        sub = BlockingSubscription(pattern, maxsize=self.queue_size, on_close=self._forget)
        with self._lock:
            self._blocking.append(sub)
        return sub

    def _forget(self, sub: BlockingSubscription) -> None:
        with self._lock:
            if sub in self._blocking:
                self._blocking.remove(sub)

    async def close(self) -> None:
        self._closed = True
        with self._lock:
            blocking, self._blocking = self._blocking, []
        for sub in blocking:
            sub.close_from_transport()

    def stats(self) -> BusStats:
        """Counters of this bus instance: only ``published`` moves."""
        return BusStats(published=self._published, delivered=0, dropped=0, corrupt=0)
