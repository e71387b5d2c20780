"""In-process transports: :class:`MemoryBus` (real pub/sub inside one process)
and :class:`NullBus` (publishes vanish, subscriptions end at once).

``MemoryBus`` is the test double for code written against the contract, so it
is strict in the same ways as the shared-memory bus: it validates topics,
patterns and payloads, enforces ``max_event_size``, and round-trips every
envelope through the wire codec so a payload that would not survive msgpack
fails here too. Events are routed to subscriptions on their home loops with
bounded drop-oldest queues, and handed to blocking subscriptions
(``subscribe_sync()``) under their lock, from whichever thread publishes.

Queue groups (MemoryBus)
------------------------
The members of a group are the open subscriptions of the bus with the same
pattern and queue name. Each matching event goes to exactly one member: the
first, in round-robin order from the member after the last one chosen, whose
queue has room; if none has room, the next in round-robin order (which then
drops its oldest event, counted on it). Plain subscriptions get every event
as before.

Requests (MemoryBus)
--------------------
The bus knows every subscription, so a request whose topic no subscription
matches raises :class:`~shmbus.errors.NoRespondersError` at once; replies
come back through a :class:`~shmbus.inbox.ReplyInbox` (to ``request_sync()``,
a :class:`~shmbus.inbox.BlockingReplyInbox`). NullBus answers every request,
blocking or not, with :class:`~shmbus.errors.NoRespondersError`: nobody ever
listens there.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import Any

from ._checks import check_int
from ._core.layout import MIN_MAX_EVENT_SIZE
from .codec import decode_envelope, encode_envelope
from .contract import (
    BaseBus,
    Event,
    TopicMatcher,
    validate_pattern,
    validate_queue_name,
    validate_topic,
)
from .delivery import BlockingSubscription, QueueSubscription
from .errors import NoRespondersError
from .inbox import BlockingReplyInbox, ReplyInbox, check_timeout, refuse_on_event_loop
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

    async def publish(
        self,
        topic: str,
        payload: dict[str, Any],
        *,
        event_type: str = "",
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.publish_nowait(topic, payload, event_type=event_type, headers=headers)

    def _check_subscribe(self, pattern: str, queue: str | None) -> None:
        self._check_open("subscribe")
        validate_pattern(pattern)
        if queue is not None:
            validate_queue_name(queue)

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<{type(self).__name__} {state}>"


class _Group:
    """The members of one queue group of a MemoryBus and its round-robin
    position."""

    __slots__ = ("matcher", "members", "next")

    def __init__(self, pattern: str) -> None:
        self.matcher = TopicMatcher(pattern)
        self.members: list[QueueSubscription] = []
        self.next = 0

    def choose(self) -> QueueSubscription:
        """The member to get the next event (see the module docstring)."""
        members = self.members
        count = len(members)
        start = self.next % count
        chosen = start
        for step in range(count):
            index = (start + step) % count
            if members[index].has_room():
                chosen = index
                break
        self.next = chosen + 1
        return members[chosen]


class MemoryBus(_LocalBus):
    """Publish/subscribe between the tasks and threads of one process.

    ``publish_nowait()`` may be called from any thread; a blocking
    subscription may be consumed from any thread.
    """

    def __init__(self, *, max_event_size: int = 1_048_576, queue_size: int = 1024) -> None:
        super().__init__(max_event_size=max_event_size, queue_size=queue_size)
        self._subscriptions: list[QueueSubscription | BlockingSubscription] = []
        self._groups: dict[tuple[str, str], _Group] = {}
        self._retired_delivered = 0
        self._retired_dropped = 0
        self._inbox = ReplyInbox(self.subscribe, "MemoryBus")
        self._sync_inbox = BlockingReplyInbox(self.subscribe_sync, "MemoryBus")

    def publish_nowait(
        self,
        topic: str,
        payload: dict[str, Any],
        *,
        event_type: str = "",
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self._check_open("publish")
        validate_topic(topic)
        data = encode_envelope(topic, payload, event_type, self.max_event_size, headers=headers)
        self._route(topic, data, request=False)

    def _route(self, topic: str, data: bytes, *, request: bool) -> None:
        """Hand one envelope to every plain subscription and to one member of
        every queue group that matches; a request nobody matches raises."""
        with self._lock:
            targets = [
                sub for sub in self._subscriptions if sub.queue is None and sub.matcher(topic)
            ]
            for group in self._groups.values():
                if group.matcher(topic):
                    targets.append(group.choose())
            if request and not targets:
                raise NoRespondersError(
                    f"no subscription on this MemoryBus matches the request topic {topic!r}"
                )
            self._published += 1
        # One decoded copy per subscriber: payload dicts are mutable, and a
        # consumer that edits its copy must not change what others see.
        for sub in targets:
            sub.deliver((decode_envelope(topic, data, self.max_event_size),))

    def subscribe(self, pattern: str, *, queue: str | None = None) -> QueueSubscription:
        self._check_subscribe(pattern, queue)
        sub = QueueSubscription(
            pattern, maxsize=self.queue_size, on_close=self._forget, queue=queue
        )
        with self._lock:
            self._check_open("subscribe")
            self._subscriptions.append(sub)
            if queue is not None:
                group = self._groups.get((pattern, queue))
                if group is None:
                    group = self._groups[pattern, queue] = _Group(pattern)
                group.members.append(sub)
        return sub

    async def request(
        self,
        topic: str,
        payload: dict[str, Any],
        *,
        timeout: float = 1.0,
        event_type: str = "",
        headers: Mapping[str, str] | None = None,
    ) -> Event:
        """Publish a request and return the first reply (see
        :meth:`BaseBus.request <shmbus.contract.BaseBus.request>`); raises
        :class:`~shmbus.errors.NoRespondersError` at once if no subscription
        matches *topic*."""
        self._check_open("request")
        validate_topic(topic)
        timeout = check_timeout(timeout)
        send = self._request_sender(topic, payload, event_type, headers)
        return await self._inbox.request(topic, timeout, send)

    def request_sync(
        self,
        topic: str,
        payload: dict[str, Any],
        *,
        timeout: float = 1.0,
        event_type: str = "",
        headers: Mapping[str, str] | None = None,
    ) -> Event:
        """:meth:`request` for code without an event loop (see
        :meth:`BaseBus.request_sync <shmbus.contract.BaseBus.request_sync>`),
        from any number of threads; raises
        :class:`~shmbus.errors.NoRespondersError` at once if no subscription
        matches *topic*."""
        self._check_open("request")
        validate_topic(topic)
        timeout = check_timeout(timeout)
        send = self._request_sender(topic, payload, event_type, headers)
        return self._sync_inbox.request(topic, timeout, send)

    def _request_sender(
        self,
        topic: str,
        payload: dict[str, Any],
        event_type: str,
        headers: Mapping[str, str] | None,
    ) -> Callable[[str], None]:
        """What an inbox calls to publish the request with its ``reply_to``:
        routed as a request, so nobody subscribed raises NoRespondersError."""

        def send(reply_to: str) -> None:
            data = encode_envelope(
                topic, payload, event_type, self.max_event_size, headers=headers, reply_to=reply_to
            )
            self._route(topic, data, request=True)

        return send

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
            if sub.queue is not None:
                key = (sub.pattern, sub.queue)
                group = self._groups.get(key)
                if group is not None and sub in group.members:
                    group.members.remove(sub)
                    if not group.members:
                        del self._groups[key]

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with self._lock:
            subs = list(self._subscriptions)
        self._sync_inbox.close()
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

    def publish_nowait(
        self,
        topic: str,
        payload: dict[str, Any],
        *,
        event_type: str = "",
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self._check_open("publish")
        validate_topic(topic)
        encode_envelope(topic, payload, event_type, self.max_event_size, headers=headers)
        with self._lock:
            self._published += 1

    def subscribe(self, pattern: str, *, queue: str | None = None) -> QueueSubscription:
        self._check_subscribe(pattern, queue)
        sub = QueueSubscription(pattern, maxsize=self.queue_size, queue=queue)
        sub.close_from_transport()
        return sub

    async def request(
        self,
        topic: str,
        payload: dict[str, Any],
        *,
        timeout: float = 1.0,
        event_type: str = "",
        headers: Mapping[str, str] | None = None,
    ) -> Event:
        """Check the request as a publish would, then raise
        :class:`~shmbus.errors.NoRespondersError`: nobody listens on a
        NullBus."""
        self._check_open("request")
        validate_topic(topic)
        check_timeout(timeout)
        encode_envelope(topic, payload, event_type, self.max_event_size, headers=headers)
        raise NoRespondersError(f"nobody answers requests on a NullBus (topic {topic!r})")

    def request_sync(
        self,
        topic: str,
        payload: dict[str, Any],
        *,
        timeout: float = 1.0,
        event_type: str = "",
        headers: Mapping[str, str] | None = None,
    ) -> Event:
        """As :meth:`request`, without an event loop: check the request as a
        publish would, then raise :class:`~shmbus.errors.NoRespondersError`."""
        self._check_open("request")
        validate_topic(topic)
        check_timeout(timeout)
        refuse_on_event_loop("NullBus")
        encode_envelope(topic, payload, event_type, self.max_event_size, headers=headers)
        raise NoRespondersError(f"nobody answers requests on a NullBus (topic {topic!r})")

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
