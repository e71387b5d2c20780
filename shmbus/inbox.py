"""Request/reply on top of publish/subscribe: :class:`ReplyInbox`, one bus
instance's inbox for the replies to its requests.

The transports that have no request/reply of their own (shared memory,
in-process, the NATS fallback) build :meth:`BaseBus.request
<shmbus.contract.BaseBus.request>` on it; NATS uses its server's.

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
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
from collections.abc import Awaitable, Callable

from ._checks import check_seconds
from .contract import Event
from .delivery import QueueSubscription
from .errors import BusClosedError, RequestTimeoutError

__all__ = ["INBOX_PREFIX", "ReplyInbox", "check_timeout"]

log = logging.getLogger("shmbus.inbox")

#: First token of every reply topic, as in NATS.
INBOX_PREFIX = "_INBOX"

#: Longest request timeout accepted, in seconds (a day).
MAX_REQUEST_TIMEOUT = 86_400.0


def check_timeout(timeout: object) -> float:
    """A request timeout: a finite number of seconds above 0, at most
    :data:`MAX_REQUEST_TIMEOUT`."""
    return check_seconds("timeout", timeout, above=True, maximum=MAX_REQUEST_TIMEOUT)


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
            raise RequestTimeoutError(
                f"no reply to the request on {topic!r} within {timeout:g} s "
                f"({self._owner}): nobody answered in time"
            ) from None
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
                future.set_exception(
                    BusClosedError(
                        f"{self._owner} was closed while the request on {topic!r} "
                        "waited for its reply"
                    )
                )
