"""Local delivery: the bounded, drop-oldest queue behind every subscription.

Owns
----
:class:`QueueSubscription`, the :class:`~shmbus.contract.Subscription` that all
transports in this package hand out (exported as ``shmbus.QueueSubscription``;
:meth:`BaseBus.subscribe <shmbus.contract.BaseBus.subscribe>` is typed to
return it), and its counters (:class:`SubscriptionStatistics`).

Invariants
----------
* The queue lives on one event loop, the subscription's *home loop* (the loop
  running when :meth:`~BaseBus.subscribe` was called, or else the first loop
  that iterates it). Only code running on that loop touches the deque; other
  threads hand events over with ``call_soon_threadsafe``.
* The queue never holds more than ``maxsize`` events: when full, the oldest
  event is evicted and counted in ``dropped``. Transports also add events the
  subscription should have received but never reached it (a lapped ring
  reader) through :meth:`QueueSubscription.count_lost`.
* ``enqueued == delivered + evicted + queued`` at every instant on the home
  loop, so ``delivered + dropped`` accounts for every event the transport
  attributed to this subscription.
* After :meth:`~Subscription.aclose`, a pending ``async for`` ends at once and
  buffered events are discarded (the caller asked to stop).
"""

from __future__ import annotations

import asyncio
import collections
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from .contract import Event, Subscription, TopicMatcher
from .stats import GroupStatistics

__all__ = ["QueueSubscription", "SubscriptionStatistics"]


@dataclass(frozen=True, slots=True)
class SubscriptionStatistics:
    """A snapshot of one subscription's counters."""

    #: The pattern the subscription was opened with.
    pattern: str
    #: Events handed to the consumer by ``async for`` / ``__anext__``.
    delivered: int
    #: Events this subscription should have received but did not: evicted from
    #: a full queue, or skipped by the transport (ring overrun).
    dropped: int
    #: Events waiting in the queue now.
    queued: int
    #: The queue's bound.
    maxsize: int
    #: The queue group the subscription is a member of (None: a plain one).
    queue: str | None = None
    #: That group's statistics, every member's in every process, where the
    #: transport keeps them (None otherwise).
    group: GroupStatistics | None = None


class QueueSubscription(Subscription):
    """A subscription fed by a transport through :meth:`deliver`.

    Parameters
    ----------
    pattern:
        A validated wildcard pattern.
    maxsize:
        Bound of the queue; the oldest event is dropped when it is full.
    on_close:
        Called once, with the subscription, when it closes, so the transport
        can stop routing to it.
    """

    def __init__(
        self,
        pattern: str,
        *,
        maxsize: int,
        on_close: Callable[[QueueSubscription], None] | None = None,
    ) -> None:
        super().__init__(pattern)
        if maxsize < 1:
            raise ValueError(f"queue size must be at least 1, got {maxsize}")
        self.matcher = TopicMatcher(pattern)
        self.maxsize = maxsize
        self.delivered = 0
        self.evicted = 0
        self.lost = 0
        self._items: collections.deque[Event] = collections.deque()
        # Usually one task iterates a subscription, but several may; each
        # waits on its own future and all are woken to re-check.
        self._waiters: list[asyncio.Future[None]] = []
        self._on_close = on_close
        self._pending_lock = threading.Lock()
        self._pending: list[Event] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        try:
            self._bind(asyncio.get_running_loop())
        except RuntimeError:
            pass  # bound by the first loop that iterates it

    # ─── Counters ───

    @property
    def dropped(self) -> int:
        """Events this subscription should have received but did not."""
        return self.evicted + self.lost

    def statistics(self) -> SubscriptionStatistics:
        """Return a snapshot of this subscription's counters."""
        return SubscriptionStatistics(
            pattern=self.pattern,
            delivered=self.delivered,
            dropped=self.dropped,
            queued=len(self._items),
            maxsize=self.maxsize,
        )

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return (
            f"<{type(self).__name__} {self.pattern!r} {state} delivered={self.delivered} "
            f"dropped={self.dropped} queued={len(self._items)}>"
        )

    # ─── Transport side ───

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The home loop, or None until one iterates the subscription."""
        return self._loop

    def deliver(self, events: Iterable[Event]) -> None:
        """Queue *events* (which match this subscription), from any thread."""
        if self._closed:
            return
        if self._loop_thread == threading.get_ident():
            self._enqueue(events)
            return
        with self._pending_lock:
            loop = self._loop
            if loop is None:
                # Not yet bound: keep them until a loop adopts us, bounded
                # and counted the same way as the queue.
                self._pending.extend(events)
                overflow = len(self._pending) - self.maxsize
                if overflow > 0:
                    del self._pending[:overflow]
                    self.evicted += overflow
                return
        batch = list(events)
        try:
            loop.call_soon_threadsafe(self._enqueue, batch)
        except RuntimeError:
            # The home loop is closed: nobody can consume these any more.
            self.evicted += len(batch)

    def count_lost(self, count: int) -> None:
        """Record *count* events the transport lost before they reached us."""
        if count > 0 and not self._closed:
            self.lost += count

    def close_from_transport(self) -> None:
        """End the subscription because the bus closed (from any thread)."""
        if self._closed:
            return
        self._closed = True
        self._notify_closed()

    # ─── Consumer side ───

    async def __anext__(self) -> Event:
        if self._closed:
            raise StopAsyncIteration
        items = self._items
        if items:
            self.delivered += 1
            return items.popleft()
        if self._loop is None:
            self._bind(asyncio.get_running_loop())
            return await self.__anext__()
        while not items:
            if self._closed:
                raise StopAsyncIteration
            waiter = self._loop.create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
        if self._closed:
            raise StopAsyncIteration
        self.delivered += 1
        return items.popleft()

    async def _aclose(self) -> None:
        self._notify_closed()

    # ─── Internals ───

    def _bind(self, loop: asyncio.AbstractEventLoop) -> None:
        with self._pending_lock:
            self._loop = loop
            self._loop_thread = threading.get_ident()
            pending, self._pending = self._pending, []
        if pending:
            self._enqueue(pending)

    def _enqueue(self, events: Iterable[Event]) -> None:
        if self._closed:
            return
        items = self._items
        items.extend(events)
        overflow = len(items) - self.maxsize
        if overflow > 0:
            for _ in range(overflow):
                items.popleft()
            self.evicted += overflow
        if self._waiters and items:
            self._wake()

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _notify_closed(self) -> None:
        self._items.clear()
        if self._on_close is not None:
            on_close, self._on_close = self._on_close, None
            on_close(self)
        loop = self._loop
        if loop is None:
            return
        if self._loop_thread == threading.get_ident():
            self._wake()
        else:
            try:
                loop.call_soon_threadsafe(self._wake)
            except RuntimeError:
                pass  # loop closed: nobody is waiting any more
