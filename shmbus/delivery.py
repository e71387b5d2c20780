"""Local delivery: the bounded, drop-oldest queue behind every subscription.

Owns
----
:class:`QueueSubscription`, the :class:`~shmbus.contract.Subscription` that all
transports in this package hand out (exported as ``shmbus.QueueSubscription``;
:meth:`BaseBus.subscribe <shmbus.contract.BaseBus.subscribe>` is typed to
return it), :class:`BlockingSubscription`, what
:meth:`BaseBus.subscribe_sync <shmbus.contract.BaseBus.subscribe_sync>` hands
out, and their counters (:class:`SubscriptionStatistics`).

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

Blocking subscriptions
----------------------
* A :class:`BlockingSubscription` is consumed from any thread, no event loop
  needed: ``get(timeout)``, ``get_nowait()``, iteration, ``close()``. Its
  queue has the same bound, eviction and counters as above, under a lock
  (publishing threads of an in-process bus hand events over directly).
* A transport may give it a *pump* (:class:`Pump`): then the consuming thread
  feeds the queue itself, in ``get()``: it steps the pump before it looks at
  the queue (so the queue holds the newest events, as a reader running all
  along would have left it) and sleeps in the pump when there is nothing.
  One thread at a time holds the pump; others calling ``get()`` meanwhile
  wait on the queue and take the pump over when it is free.
* ``get()`` waits until an event is queued, the timeout passes
  (``TimeoutError``) or the subscription is closed
  (:class:`~shmbus.errors.SubscriptionClosedError`, after which iteration
  stops). ``close()`` and a closing bus end every wait at once, from any
  thread, and never wait for anything but a thread of this process leaving
  the pump (it is woken first; a signal handler that closes the subscription
  it interrupted does not wait at all).
* The pump is closed exactly once, by whoever holds it: so a thread sleeping
  in it never has its resources closed under it.
* Its owner may give up what the pump has not read yet
  (:meth:`BlockingSubscription.skip_backlog`, for the blocking reply inbox
  between requests): the calling thread takes the pump as ``get()`` does,
  only if nobody holds it, and skips nothing otherwise. Nothing skipped is
  counted (the caller declined it) and the queue is left as it is. Without
  a pump (the in-process buses deliver straight into the queue) there is no
  backlog: it does nothing.
* Blocking subscriptions still open when the interpreter shuts down are
  closed before it waits for its threads, so a thread iterating one ends.
"""

from __future__ import annotations

import asyncio
import collections
import math
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Final, Protocol, Self

from .contract import Event, Subscription, TopicMatcher
from .errors import SubscriptionClosedError
from .stats import GroupStatistics

__all__ = ["BlockingSubscription", "Pump", "QueueSubscription", "SubscriptionStatistics"]


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
    #: The queue group the subscription is a member of, or None. A member's
    #: ``delivered`` and ``dropped`` are its share of the group's events.
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
    queue:
        The queue group this subscription is a member of (a validated
        name), or None for a plain subscription.
    """

    def __init__(
        self,
        pattern: str,
        *,
        maxsize: int,
        on_close: Callable[[QueueSubscription], None] | None = None,
        queue: str | None = None,
    ) -> None:
        super().__init__(pattern)
        if maxsize < 1:
            raise ValueError(f"queue size must be at least 1, got {maxsize}")
        self.matcher = TopicMatcher(pattern)
        #: The queue group this subscription belongs to, or None.
        self.queue = queue
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
            queue=self.queue,
        )

    def has_room(self) -> bool:
        """True if the queue is below its bound now (events on their way
        from another thread aside): a queue group prefers such members."""
        return not self._closed and len(self._items) + len(self._pending) < self.maxsize

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        group = f" queue={self.queue!r}" if self.queue is not None else ""
        return (
            f"<{type(self).__name__} {self.pattern!r}{group} {state} delivered={self.delivered} "
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


# ─── Blocking subscriptions ──────────────────────────────────────────────────

#: Longest a thread waits on the queue before it looks again (a safety net:
#: arrivals, a freed pump and closing all notify it).
_WAIT_SLICE: Final = 0.25
#: Longest close() waits for another thread to leave the pump (it was woken
#: first, so this is never reached unless that thread cannot run).
_RELEASE_WAIT: Final = 5.0


class Pump(Protocol):
    """What feeds a :class:`BlockingSubscription` from the consuming thread
    (ShmBus's blocking reader). Only the thread holding the pump calls
    :meth:`step`, :meth:`skip_backlog`, :meth:`sleep` and :meth:`close`."""

    def step(self) -> None:
        """Read what is there now, handing it to the subscription's
        :meth:`~BlockingSubscription.deliver`; never waits."""

    def sleep(self, deadline: float | None) -> None:
        """Wait until something may be there, at most until *deadline*
        (``time.monotonic()``; None: no limit); may return early."""

    def skip_backlog(self) -> None:
        """Move to now: what was published before this call and not read
        yet is never handed over, nor counted; never waits."""

    def interrupt(self) -> None:
        """Make a :meth:`sleep` return now; from any thread, never waits."""

    def close(self) -> None:
        """Release the pump's resources (called once)."""


class BlockingSubscription:
    """A subscription for code without an event loop: a context manager and
    an iterator, consumed with blocking calls from any thread.

    Obtain one from :meth:`BaseBus.subscribe_sync
    <shmbus.contract.BaseBus.subscribe_sync>`::

        with bus.subscribe_sync("orders.*.created") as sub:
            for event in sub:          # ends when sub or the bus is closed
                handle(event)

    It has the semantics of the asyncio :class:`QueueSubscription`: it sees the
    matching events published after ``subscribe_sync()`` returned, keeps at most
    ``maxsize`` of them (the oldest is dropped and counted when it is full),
    and counts every event it should have had and did not get in
    :meth:`statistics`.

    Parameters
    ----------
    pattern:
        A validated wildcard pattern.
    maxsize:
        Bound of the queue; the oldest event is dropped when it is full.
    on_close:
        Called once, with the subscription, when :meth:`close` is called.
    pump:
        What feeds the queue from the consuming thread (see :class:`Pump`);
        None for a transport that calls :meth:`deliver` itself.
    """

    #: Blocking subscriptions are never members of a queue group.
    queue: str | None = None

    def __init__(
        self,
        pattern: str,
        *,
        maxsize: int,
        on_close: Callable[[BlockingSubscription], None] | None = None,
        pump: Pump | None = None,
    ) -> None:
        if maxsize < 1:
            raise ValueError(f"queue size must be at least 1, got {maxsize}")
        self.pattern = pattern
        self.matcher = TopicMatcher(pattern)
        self.maxsize = maxsize
        self.delivered = 0
        self.evicted = 0
        self.lost = 0
        self._items: collections.deque[Event] = collections.deque()
        # Reentrant: close() from a signal handler may interrupt this thread
        # while it holds the lock.
        self._lock = threading.RLock()
        self._arrived = threading.Condition(self._lock)
        #: Threads waiting on _arrived (notifying nobody costs nothing then).
        self._waiting = 0
        self._closed = False
        self._on_close = on_close
        self._pump = pump
        self._pump_held = threading.Lock()
        self._pumper: int | None = None
        _open_blocking.add(self)

    # ─── Counters ───

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called or the bus closed."""
        return self._closed

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
            queued=0 if self._closed else len(self._items),
            maxsize=self.maxsize,
        )

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return (
            f"<{type(self).__name__} {self.pattern!r} {state} delivered={self.delivered} "
            f"dropped={self.dropped} queued={len(self._items)}>"
        )

    # ─── Transport side ───

    def deliver(self, events: Iterable[Event]) -> None:
        """Queue *events* (which match this subscription), from any thread."""
        with self._lock:
            if self._closed:
                return
            items = self._items
            items.extend(events)
            overflow = len(items) - self.maxsize
            if overflow > 0:
                for _ in range(overflow):
                    items.popleft()
                self.evicted += overflow
            if self._waiting:
                self._arrived.notify(len(items))

    def count_lost(self, count: int) -> None:
        """Record *count* events the transport lost before they reached us."""
        if count > 0 and not self._closed:
            self.lost += count

    def close_from_transport(self) -> None:
        """End the subscription because the bus closed (from any thread)."""
        self._end()

    def abandon(self) -> None:
        """In a fork child: end the subscription without touching its pump,
        whose resources the transport let go of (a thread of the parent may
        have held it when the process forked)."""
        self._pump = None
        # Only this thread survived the fork: locks another thread held
        # then would stay held forever.
        self._lock = threading.RLock()
        self._arrived = threading.Condition(self._lock)
        self._pump_held = threading.Lock()
        self._waiting = 0
        self._end()

    # ─── Consumer side ───

    def get(self, timeout: float | None = None) -> Event:
        """Return the next event, waiting for one up to *timeout* seconds
        (None: as long as it takes).

        Raises
        ------
        TimeoutError
            No event came within *timeout* seconds.
        SubscriptionClosedError
            The subscription is closed (by :meth:`close`, by its bus closing,
            or at interpreter exit), before or while waiting.
        TypeError, ValueError
            *timeout* is not a number of seconds, or is negative.
        """
        deadline = None if timeout is None else _deadline(timeout)
        while True:
            if self._closed:
                raise self._closed_error()
            pump = self._pump
            if pump is not None and self._pump_held.acquire(blocking=False):
                self._pumper = threading.get_ident()
                try:
                    event = self._pump_until(pump, deadline)
                finally:
                    self._pumper = None
                    self._pump_held.release()
                    self._after_pumping()
                if event is not None:
                    return event
                if self._closed:
                    raise self._closed_error()
                raise self._timeout_error(timeout)
            with self._arrived:
                if self._closed:
                    raise self._closed_error()
                if self._items:
                    self.delivered += 1
                    return self._items.popleft()
                wait = _WAIT_SLICE
                if deadline is not None:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise self._timeout_error(timeout)
                    wait = min(wait, remaining)
                # Counted before looking at the pump: a holder that lets go
                # of it after this look sees the count and wakes us.
                self._waiting += 1
                try:
                    if pump is not None and not self._pump_held.locked():
                        continue  # the pump was let go of meanwhile: take it
                    self._arrived.wait(wait)
                finally:
                    self._waiting -= 1

    def skip_backlog(self) -> bool:
        """Give up the events published before this call that the pump has
        not read yet: they are never delivered and not counted as dropped
        (the caller declined them; events already queued stay queued).
        Events published after it returns are delivered as usual.

        Only if nobody holds the pump (no thread in :meth:`get`); returns
        whether the backlog was skipped. A subscription without a pump has
        no backlog (True); a closed one skips nothing (False).
        """
        if self._closed:
            return False
        if self._pump is None:
            return True
        if not self._pump_held.acquire(blocking=False):
            return False
        self._pumper = threading.get_ident()
        try:
            pump = self._pump
            if pump is None or self._closed:
                return False
            pump.skip_backlog()
            return True
        finally:
            self._pumper = None
            self._pump_held.release()
            self._after_pumping()

    def get_nowait(self) -> Event:
        """Return an event if one is there now: :meth:`get` with a timeout of 0
        (raises ``TimeoutError`` if none is)."""
        return self.get(0)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __iter__(self) -> Self:
        return self

    def __next__(self) -> Event:
        try:
            return self.get()
        except SubscriptionClosedError:
            raise StopIteration from None

    def close(self) -> None:
        """Stop receiving, from any thread; idempotent. A thread waiting in
        :meth:`get` returns at once (``SubscriptionClosedError``; iteration
        stops). Events still queued are discarded."""
        if self._closed:
            return
        self._end()
        if self._on_close is not None:
            on_close, self._on_close = self._on_close, None
            on_close(self)

    # ─── Internals ───

    def _end(self) -> None:
        if self._closed:
            return
        self._closed = True
        _open_blocking.discard(self)
        pump = self._pump
        if pump is not None:
            pump.interrupt()
        with self._arrived:
            self._arrived.notify_all()
        self._release_pump(wait=True)

    def _pump_until(self, pump: Pump, deadline: float | None) -> Event | None:
        """Holding the pump: step it until an event is queued; None once
        closed or past *deadline*."""
        while True:
            if self._closed:
                return None
            pump.step()
            with self._lock:
                if self._closed:
                    return None
                if self._items:
                    self.delivered += 1
                    return self._items.popleft()
            if deadline is not None and time.monotonic() >= deadline:
                return None
            pump.sleep(deadline)

    def _after_pumping(self) -> None:
        if self._closed:
            self._release_pump(wait=False)
        elif self._waiting:
            with self._arrived:
                self._arrived.notify()  # a waiting thread may take the pump over

    def _release_pump(self, *, wait: bool) -> None:
        """Close the pump if nobody holds it (or, with *wait*, once its holder
        in another thread leaves it); otherwise its holder does, on its way
        out of :meth:`get`."""
        if self._pump is None:
            return
        if wait and self._pumper is not None and self._pumper != threading.get_ident():
            taken = self._pump_held.acquire(timeout=_RELEASE_WAIT)
        else:
            taken = self._pump_held.acquire(blocking=False)
        if not taken:
            return
        try:
            pump, self._pump = self._pump, None
            if pump is not None:
                pump.close()
        finally:
            self._pump_held.release()

    def _closed_error(self) -> SubscriptionClosedError:
        return SubscriptionClosedError(f"the blocking subscription to {self.pattern!r} is closed")

    def _timeout_error(self, timeout: float | None) -> TimeoutError:
        return TimeoutError(f"no event on {self.pattern!r} within {timeout:g} s")


def _deadline(timeout: object) -> float | None:
    """The ``time.monotonic()`` instant *timeout* seconds from now (None: none)."""
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, int | float):
        raise TypeError(
            f"timeout must be a number of seconds or None, not {type(timeout).__name__} "
            f"({timeout!r})"
        )
    if math.isnan(timeout) or timeout < 0:
        raise ValueError(f"timeout must be 0 or more seconds (None: no limit), got {timeout!r}")
    return time.monotonic() + timeout


#: Blocking subscriptions not closed yet, closed when the interpreter shuts down.
_open_blocking: weakref.WeakSet[BlockingSubscription] = weakref.WeakSet()


def _close_blocking_at_shutdown() -> None:
    for sub in list(_open_blocking):
        try:
            sub.close_from_transport()
        except Exception:  # shutting down: never raise
            pass


# Before the interpreter joins its non-daemon threads (private, but stable
# since Python 3.9: concurrent.futures uses it), so that a thread iterating a
# blocking subscription ends instead of keeping the process alive.
_register = getattr(threading, "_register_atexit", None)
if _register is not None:
    _register(_close_blocking_at_shutdown)
