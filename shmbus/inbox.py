"""Request/reply on top of publish/subscribe: :class:`ReplyInbox`, one bus
instance's inbox for the replies to its requests, and
:class:`BlockingReplyInbox`, its counterpart for code without an event loop.

The transports that have no request/reply of their own (shared memory,
in-process, the NATS fallback) build :meth:`BaseBus.request
<shmbus.contract.BaseBus.request>` on it; NATS uses its server's. The
transports with blocking subscriptions (shared memory, in-process) build
:meth:`BaseBus.request_sync <shmbus.contract.BaseBus.request_sync>` on the
blocking inbox.

Rules
-----
* **Addressing.** An inbox has a random prefix ``_INBOX.<22 hex>`` (88 bits
  from ``os.urandom``, fresh per bus instance, so no two instances in any
  process share one) and one subscription, to ``<prefix>.*``. Request *n*
  of the instance carries ``reply_to = <prefix>.<n in hex>``, its *token*.
  A responder publishes its reply on that topic (:meth:`BaseBus.reply
  <shmbus.contract.BaseBus.reply>`), an ordinary event on an ordinary
  topic, so the reply travels any transport and bridge the request did.
* **One subscription per instance.** It is opened by the first request, on
  that request's event loop, and lives until the bus closes; requests from
  another loop while that loop runs are refused (:class:`RuntimeError`), as
  a shm bus refuses subscriptions from a second loop. If that loop has
  ended, the next request opens the inbox again on its own loop.
* **Matching.** A table maps each waiting token to its future. A reply whose
  last token is waiting resolves it and leaves the table; a reply with an
  unknown token (late, duplicated, or forged) is dropped and counted in
  :attr:`ReplyInbox.late`. So each request gets at most one reply, the
  first, and concurrent requests from any number of tasks each get theirs.
* **No leaks.** A request leaves the table however it ends: reply, timeout,
  cancellation, or a failure to publish it. Nothing else is held per
  request.
* **Closing.** When the bus closes, the transport ends the inbox
  subscription; every request still waiting then fails at once with
  :class:`~shmbus.errors.BusClosedError` naming its topic.

Rules of the blocking inbox
---------------------------
* **Addressing.** A :class:`BlockingReplyInbox` is a second inbox of the
  same bus instance, with a random prefix of its own (so its tokens and the
  asyncio inbox's never meet: neither subscription matches the other's
  topics) and the same reply topic shape, so a responder cannot tell the
  two apart and answers both with :meth:`BaseBus.reply
  <shmbus.contract.BaseBus.reply>` or :meth:`BaseBus.reply_nowait
  <shmbus.contract.BaseBus.reply_nowait>`.
* **One blocking subscription per instance**, ``subscribe_sync(<prefix>.*)``,
  opened by the first blocking request before it publishes and kept until
  the bus closes (an ended one, e.g. at interpreter exit, is replaced by the
  next request). Requests never subscribe on their own.
* **Between requests: start from now.** Nobody reads the subscription
  between blocking requests. So a request that finds no other request of
  the inbox waiting (the table empty, under its lock) first has the
  subscription skip its backlog (:meth:`BlockingSubscription.skip_backlog
  <shmbus.delivery.BlockingSubscription.skip_backlog>`; on a shm bus every
  followed ring's cursor moves to its newest committed record), counting
  nothing, then enters the table and publishes. This is safe: with the
  table empty nobody holds the pump, and no wanted reply can be in flight
  (every wanted reply answers a request in the table); the request's own
  reply is committed after the request, so after the skip. What is skipped
  is other topics' events the inbox never wanted (a busy bus would have
  wrapped the rings meanwhile: without the skip those would be counted as
  lapped and dropped on the inbox, false alarms, and read through) and
  replies to requests already out of the table, which are late anyway: a
  late reply still unread at a skip is skipped uncounted; one that comes
  while a request waits, or was queued already (on an in-process bus,
  which has no backlog, every one), is counted in
  :attr:`BlockingReplyInbox.late`. A request that finds others waiting
  skips nothing (their replies may be there).
* **Matching.** A table, under one lock, maps each waiting token to its
  waiter. A reply whose token waits is put in that waiter, which leaves the
  table, and its thread is woken; a reply with an unknown token (late,
  duplicated, forged) is dropped and counted in
  :attr:`BlockingReplyInbox.late`. A waiter that gives up leaves the table
  under the same lock and takes a reply that was put there meanwhile, so a
  reply is either returned or counted, never both, never neither.
* **The pump.** No helper thread: one waiting thread at a time, the pump
  holder (recorded under the table's lock, taken only if nobody holds it),
  reads the subscription, waiting at most until its own deadline, and
  hands each reply to its waiter; the others wait on their own
  :class:`threading.Event` until their reply, their deadline or a wake-up.
  The holder stops once its own reply came (or its deadline, or the
  subscription ended), lets go of the pump and wakes every thread still
  waiting; one of them takes the pump over. A waiter clears its event
  before it looks at its reply and at the pump, so a wake-up is never
  missed. The only waits on another process are the subscription's own,
  bounded by the holder's deadline.
* **No leaks.** A request leaves the table, and lets go of the pump if it
  held it (waking the others), however it ends: reply, timeout, a failure
  to publish, or an exception a signal handler raised anywhere in the
  waiting thread (one ``finally`` around all of it).
* **Closing.** The bus closes the inbox (:meth:`BlockingReplyInbox.close`),
  and a subscription that ends does the same for its requests: every
  request still waiting fails at once with
  :class:`~shmbus.errors.BusClosedError` naming its topic; a request after
  the close is refused with it.
* **Not on an event loop.** A blocking request from a thread that runs an
  event loop is refused (:class:`RuntimeError` naming ``await
  bus.request()``): it would stop the loop while another process answers.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable

from ._checks import check_seconds
from .contract import Event
from .delivery import BlockingSubscription, QueueSubscription
from .errors import BusClosedError, RequestTimeoutError, SubscriptionClosedError

__all__ = [
    "INBOX_PREFIX",
    "BlockingReplyInbox",
    "ReplyInbox",
    "check_timeout",
    "refuse_on_event_loop",
]

log = logging.getLogger("shmbus.inbox")

#: First token of every reply topic, as in NATS.
INBOX_PREFIX = "_INBOX"

#: Longest request timeout accepted, in seconds (a day).
MAX_REQUEST_TIMEOUT = 86_400.0


def check_timeout(timeout: object) -> float:
    """A request timeout: a finite number of seconds above 0, at most
    :data:`MAX_REQUEST_TIMEOUT`."""
    return check_seconds("timeout", timeout, above=True, maximum=MAX_REQUEST_TIMEOUT)


def refuse_on_event_loop(owner: str) -> None:
    """Raise :class:`RuntimeError` if an event loop runs in this thread: a
    blocking request would stop it while another process answers."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return
    raise RuntimeError(
        f"request_sync() on {owner} would block the event loop running in this thread; "
        "use 'await bus.request(...)' there"
    )


def _timeout_error(topic: str, timeout: float, owner: str) -> RequestTimeoutError:
    return RequestTimeoutError(
        f"no reply to the request on {topic!r} within {timeout:g} s "
        f"({owner}): nobody answered in time"
    )


def _closed_error(topic: str, owner: str) -> BusClosedError:
    return BusClosedError(
        f"{owner} was closed while the request on {topic!r} waited for its reply"
    )


class ReplyInbox:
    """The reply inbox of one bus instance (see the module docstring).

    Parameters
    ----------
    subscribe:
        The bus's ``subscribe``: called once per event loop with the inbox
        pattern.
    owner:
        How error messages name the bus.
    """

    def __init__(self, subscribe: Callable[[str], QueueSubscription], owner: str) -> None:
        self.prefix = f"{INBOX_PREFIX}.{os.urandom(11).hex()}"
        self._subscribe = subscribe
        self._owner = owner
        self._sub: QueueSubscription | None = None
        self._pump: asyncio.Task[None] | None = None
        #: token -> (the future its reply resolves, the request's topic)
        self._waiting: dict[str, tuple[asyncio.Future[Event], str]] = {}
        self._tokens = itertools.count(1)
        #: Replies that found no waiting request (late, duplicate, unknown).
        self.late = 0

    @property
    def waiting(self) -> int:
        """Requests waiting for their reply now."""
        return len(self._waiting)

    async def request(
        self, topic: str, timeout: float, send: Callable[[str], Awaitable[None] | None]
    ) -> Event:
        """Send a request with ``send(reply_to)`` and return its first reply.

        *send* publishes the request event (it may raise, e.g. for bad input
        or :class:`~shmbus.errors.NoRespondersError`); *timeout* is already
        checked and counts from this call.
        """
        loop = asyncio.get_running_loop()
        self._open(loop)
        token = f"{next(self._tokens):x}"
        future: asyncio.Future[Event] = loop.create_future()
        self._waiting[token] = (future, topic)
        try:
            async with asyncio.timeout(timeout):
                sent = send(f"{self.prefix}.{token}")
                if sent is not None:
                    await sent
                return await future
        except RequestTimeoutError:
            raise  # raised by send (no responders), not by the deadline
        except TimeoutError:
            raise _timeout_error(topic, timeout, self._owner) from None
        finally:
            self._waiting.pop(token, None)

    def _open(self, loop: asyncio.AbstractEventLoop) -> None:
        pump = self._pump
        if pump is not None and not pump.done():
            if pump.get_loop() is loop:
                return
            if not pump.get_loop().is_closed():
                raise RuntimeError(
                    f"{self._owner} answers requests on the event loop of its first request; "
                    "use one bus instance per event loop"
                )
        if self._sub is not None:
            self._sub.close_from_transport()
        sub = self._sub = self._subscribe(f"{self.prefix}.*")
        self._pump = loop.create_task(self._route(sub), name=f"shmbus-inbox-{self.prefix}")

    async def _route(self, sub: QueueSubscription) -> None:
        start = len(self.prefix) + 1
        try:
            async for event in sub:
                entry = self._waiting.pop(event.topic[start:], None)
                if entry is None or entry[0].done():
                    self.late += 1
                    log.debug("dropping a reply on %r: no request waits for it", event.topic)
                    continue
                entry[0].set_result(event)
        finally:
            if sub is self._sub:
                self._fail_waiting()

    def _fail_waiting(self) -> None:
        """The inbox subscription ended (the bus closed): fail every waiting
        request at once."""
        waiting, self._waiting = self._waiting, {}
        for future, topic in waiting.values():
            if not future.done():
                future.set_exception(_closed_error(topic, self._owner))


class _Waiter:
    """One blocking request waiting for its reply."""

    __slots__ = ("topic", "reply", "closed", "woken")

    def __init__(self, topic: str) -> None:
        self.topic = topic
        self.reply: Event | None = None
        self.closed = False
        self.woken = threading.Event()


class BlockingReplyInbox:
    """The blocking reply inbox of one bus instance (see "Rules of the
    blocking inbox" in the module docstring).

    Parameters
    ----------
    subscribe_sync:
        The bus's ``subscribe_sync``: called with the inbox pattern by the
        first request (and again only if that subscription ended).
    owner:
        How error messages name the bus.
    """

    def __init__(self, subscribe_sync: Callable[[str], BlockingSubscription], owner: str) -> None:
        self.prefix = f"{INBOX_PREFIX}.{os.urandom(11).hex()}"
        self._subscribe_sync = subscribe_sync
        self._owner = owner
        self._lock = threading.Lock()
        #: The waiter whose thread reads the subscription now, if any.
        self._pumper: _Waiter | None = None
        self._sub: BlockingSubscription | None = None
        self._closed = False
        self._waiting: dict[str, _Waiter] = {}
        self._tokens = itertools.count(1)
        #: Replies that found no waiting request (late, duplicate, unknown).
        self.late = 0

    @property
    def waiting(self) -> int:
        """Requests waiting for their reply now."""
        return len(self._waiting)

    @property
    def subscription(self) -> BlockingSubscription | None:
        """The inbox subscription, once the first request opened it."""
        return self._sub

    def request(self, topic: str, timeout: float, send: Callable[[str], None]) -> Event:
        """Send a request with ``send(reply_to)`` and return its first reply,
        blocking this thread.

        *send* publishes the request event (it may raise, e.g. for bad input
        or :class:`~shmbus.errors.NoRespondersError`); *timeout* is already
        checked and counts from this call.
        """
        deadline = time.monotonic() + timeout
        refuse_on_event_loop(self._owner)
        sub = self._open(topic)
        waiter = _Waiter(topic)
        with self._lock:
            if self._closed:
                raise _closed_error(topic, self._owner)
            if not self._waiting:
                # Nobody else waits: nothing unread can be wanted, and the
                # reply to this request will come after this point.
                sub.skip_backlog()
            token = f"{next(self._tokens):x}"
            self._waiting[token] = waiter
        try:
            send(f"{self.prefix}.{token}")
            return self._wait(token, waiter, sub, deadline, timeout)
        finally:
            # However the request ends (even by an exception a signal handler
            # raised anywhere above): out of the table, and the pump let go.
            with self._lock:
                self._waiting.pop(token, None)
                held = self._pumper is waiter
                if held:
                    self._pumper = None
            if held:
                self._wake_all()

    def close(self) -> None:
        """The bus closed: fail every waiting request, refuse new ones, end
        the subscription. Idempotent, from any thread."""
        with self._lock:
            self._closed = True
            sub = self._sub
        self._fail_waiting()
        if sub is not None:
            sub.close_from_transport()

    def _open(self, topic: str) -> BlockingSubscription:
        with self._lock:
            if self._closed:
                raise _closed_error(topic, self._owner)
            sub = self._sub
            if sub is not None and not sub.closed:
                return sub
            # Subscribing may make system calls (a slot of its own on a shm
            # bus) and may raise: done under the table's lock so that two
            # first requests open one subscription, not two.
            sub = self._sub = self._subscribe_sync(f"{self.prefix}.*")
            return sub

    def _wait(
        self,
        token: str,
        waiter: _Waiter,
        sub: BlockingSubscription,
        deadline: float,
        timeout: float,
    ) -> Event:
        while True:
            waiter.woken.clear()
            if waiter.reply is not None:
                return waiter.reply
            if waiter.closed:
                raise _closed_error(waiter.topic, self._owner)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                with self._lock:
                    # Leaving the table under the lock the pump hands replies
                    # out under: a reply is either here now or will be late.
                    self._waiting.pop(token, None)
                    reply = waiter.reply
                if reply is not None:
                    return reply
                raise _timeout_error(waiter.topic, timeout, self._owner)
            with self._lock:
                mine = self._pumper is None
                if mine:
                    self._pumper = waiter
            if mine:
                self._read(sub, waiter, deadline)
                with self._lock:
                    self._pumper = None
                self._wake_all()
                continue
            waiter.woken.wait(remaining)

    def _read(self, sub: BlockingSubscription, waiter: _Waiter, deadline: float) -> None:
        """Holding the pump: hand out replies until *waiter*'s own came, its
        deadline passed, or the subscription ended."""
        start = len(self.prefix) + 1
        while waiter.reply is None and not waiter.closed:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            try:
                event = sub.get(remaining)
            except SubscriptionClosedError:
                self._fail_waiting()
                return
            except TimeoutError:
                return
            with self._lock:
                other = self._waiting.pop(event.topic[start:], None)
                if other is None:
                    self.late += 1
                else:
                    other.reply = event
            if other is None:
                log.debug("dropping a reply on %r: no request waits for it", event.topic)
            elif other is not waiter:
                other.woken.set()

    def _wake_all(self) -> None:
        """The pump was let go of: whoever still waits may take it over."""
        with self._lock:
            waiters = list(self._waiting.values())
        for each in waiters:
            each.woken.set()

    def _fail_waiting(self) -> None:
        """The inbox subscription ended or the bus closed: fail every waiting
        request at once."""
        with self._lock:
            waiting, self._waiting = self._waiting, {}
            for each in waiting.values():
                each.closed = True
        for each in waiting.values():
            each.woken.set()
