"""The NATS transport: :class:`NatsBus`, the bus contract over a NATS server.

Owns
----
One nats-py client connection, the mapping of shmbus subscriptions onto NATS
subscriptions (topics and patterns map 1:1 onto NATS subjects), and the
publish path into that connection, including :meth:`NatsBus.publish_nowait`
for threads that have no event loop.

Guarantees
----------
* Same wire format as every other transport (:mod:`shmbus.codec`): a
  received event keeps the publisher's ``id``, ``ts``, ``type`` and ``v``;
  its topic is the NATS subject it arrived on, never the ``topic`` field of
  the bytes.
* An envelope larger than the connected server's ``max_payload`` is the
  caller's error and raises :class:`ValueError` naming both sizes.
* At most once. A publish while the connection is down or reconnecting is
  logged and counted in ``stats().publish_errors``, never raised. Nothing
  published before an outage is delivered after it: PUBs that the client
  had buffered but not yet written when the connection dropped are
  discarded (and counted), so a reconnect never replays stale events.
* Per publishing instance, events reach the server in publish order, whether
  they were published with ``publish()`` or ``publish_nowait()``; a
  subscription opened on an instance sees every matching event that
  instance publishes afterwards. Likewise a subscription's UNSUB goes out
  before anything the instance publishes after ``aclose()`` returned, so a
  queue group's later events from that instance go to the members that
  stay. Subscribers on *other* connections see events published after
  their SUB reached the server (``await bus.flush()`` after subscribing
  makes sure it has); a member leaving is known to publishers on other
  connections once its UNSUB did (``flush()`` after ``aclose()``).
* Headers travel in the envelope, as on every transport, not as NATS message
  headers: the envelope is what the bridge and the fallback bus relay byte
  for byte, so one copy of the headers can never disagree with another, and
  a NATS client that is not shmbus cannot read the msgpack payload anyway.
* Queue groups are NATS's own (``subscribe(pattern, queue=...)`` sends the
  queue name with the SUB): the server gives each message to one member.
* Requests are NATS's own (nats-py's ``request``: one inbox subscription per
  connection, a token per request). The server answers a request nobody
  subscribes to with a no-responders status at once:
  :class:`~shmbus.errors.NoRespondersError`. A received request's
  ``reply_to`` is the NATS reply subject (else the envelope's, for a request
  relayed by a bridge). ``close()`` fails every request still waiting with
  :class:`~shmbus.errors.BusClosedError`.
* ``aclose()`` on a subscription ends its ``async for`` at once; ``close()``
  ends every subscription and the connection. Both are idempotent;
  ``publish`` and ``subscribe`` after ``close()`` raise
  :class:`~shmbus.errors.BusClosedError` (a :class:`RuntimeError`).

Threading
---------
The connection lives on the event loop that ran :meth:`NatsBus.connect` (the
*bus loop*). ``publish_nowait()``, ``subscribe()``, ``stats()`` and the
subscriptions' ``aclose()`` may be used from any thread or loop: work for the
connection is handed to the bus loop with ``call_soon_threadsafe``.

The client reconnects by itself (forever, by default: ``max_reconnect_attempts
= -1``); NATS replays the subscriptions after a reconnect.

Needs the optional nats-py package: without it, importing this module raises
:class:`~shmbus.errors.MissingExtraError`, whose message names the command
that installs it (``pip install 'shmbus[nats]'``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import inspect
import logging
import sys
import threading
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

from .errors import MissingExtraError

try:
    import nats.errors
    from nats.aio.client import Client
    from nats.aio.msg import Msg
    from nats.aio.subscription import Subscription as NatsSubscription
except ImportError as exc:  # the optional extra is not installed
    if exc.name is not None and exc.name.split(".")[0] == "nats":
        raise MissingExtraError("nats", exc.name) from exc
    raise

from ._checks import check_int, check_seconds
from .codec import EnvelopeDecodeError, decode_envelope, encode_envelope
from .contract import (
    EVENT_SCHEMA_VERSION,
    BaseBus,
    Event,
    validate_pattern,
    validate_queue_name,
    validate_topic,
)
from .delivery import QueueSubscription
from .errors import (
    BusClosedError,
    NoRespondersError,
    RequestTimeoutError,
    TransportUnavailableError,
)
from .inbox import check_timeout
from .lifecycle import LifecycleState
from .stats import BusStats

__all__ = ["DEFAULT_NATS_URL", "NATS_CONNECT_OPTIONS", "NatsBus"]

log = logging.getLogger("shmbus.nats")

#: Whether the missing-buffer warning was logged (once per process).
_warned_no_buffer = False


def client_buffer_is_reachable(client: object) -> bool:
    """True if *client* (a nats-py ``Client``) keeps the private write buffer
    that :meth:`NatsBus._discard_unsent` trims: a list ``_pending`` and its
    byte count ``_pending_data_size``. shmbus relies on these private names
    of nats-py; a test checks them against the installed version."""
    return isinstance(getattr(client, "_pending", None), list) and hasattr(
        client, "_pending_data_size"
    )

#: Server used when none is given.
DEFAULT_NATS_URL = "nats://127.0.0.1:4222"

#: Keyword options of ``nats.aio.client.Client.connect`` that NatsBus passes
#: through (``servers``, ``name`` and ``connect_timeout`` are NatsBus's own
#: parameters).
NATS_CONNECT_OPTIONS: frozenset[str] = frozenset(
    name
    for name in inspect.signature(Client.connect).parameters
    if name not in ("self", "servers", "name", "connect_timeout")
)

_CALLBACK_OPTIONS = ("error_cb", "disconnected_cb", "reconnected_cb", "closed_cb")

#: Events queued by publish_nowait() and not yet handed to the client. Past
#: this the bus is not keeping up with its publishers: further events are
#: dropped and counted as publish errors.
OUTBOX_LIMIT = 65_536

#: Connection errors the client reports on every failed (re)connect attempt;
#: logged at debug level to keep an outage from flooding the log.
_CONNECTION_ERRORS = (OSError, TimeoutError, nats.errors.StaleConnectionError)

ConnectionListener = Callable[[bool], None]


class _Route:
    """One shmbus subscription and the NATS subscription that feeds it."""

    __slots__ = ("qsub", "nats_sub", "task", "retired", "after_queued")

    def __init__(self, qsub: QueueSubscription) -> None:
        self.qsub = qsub
        self.nats_sub: NatsSubscription | None = None
        self.task: asyncio.Task[None] | None = None
        self.retired = False
        #: Envelopes queued before this subscription was made: its SUB goes
        #: out after them, so it does not receive what was published before.
        self.after_queued = 0


class NatsBus(BaseBus):
    """A publish/subscribe bus over a NATS server.

    Parameters
    ----------
    servers:
        One NATS URL (``nats://host:port``) or a list of them (a cluster).
    queue_size:
        Bound of each subscription's queue (drop-oldest when full).
    name:
        Connection name shown in the server's monitoring.
    connect_timeout:
        Seconds :meth:`connect` keeps trying before it raises
        :class:`~shmbus.errors.TransportUnavailableError` (a
        :class:`ConnectionError`; also the timeout of each attempt).
    **nats_options:
        Passed to ``nats.aio.client.Client.connect`` (see
        :data:`NATS_CONNECT_OPTIONS`), e.g. ``reconnect_time_wait``,
        ``max_reconnect_attempts`` (default here: ``-1``, never give up),
        ``no_echo``, ``user``/``password``, ``tls``. Callbacks given here are
        called after NatsBus's own.
    """

    def __init__(
        self,
        servers: str | list[str] = DEFAULT_NATS_URL,
        *,
        queue_size: int = 1024,
        name: str | None = None,
        connect_timeout: float = 2.0,
        **nats_options: Any,
    ) -> None:
        self.servers = _check_servers(servers)
        self.queue_size = check_int("queue_size", queue_size, minimum=1)
        #: Seconds connect() keeps trying; also each attempt's and flush's timeout.
        self.connect_timeout = check_seconds(
            "connect_timeout", connect_timeout, above=True, maximum=3600
        )
        if name is not None and not isinstance(name, str):
            raise TypeError(f"name must be a str or None, not {type(name).__name__}")
        unknown = sorted(set(nats_options) - NATS_CONNECT_OPTIONS)
        if unknown:
            raise ValueError(
                f"unknown NATS option(s) {', '.join(map(repr, unknown))}; "
                f"valid options: {', '.join(sorted(NATS_CONNECT_OPTIONS))}"
            )
        for option in _CALLBACK_OPTIONS:
            callback = nats_options.get(option)
            if callback is not None and not inspect.iscoroutinefunction(callback):
                raise TypeError(f"{option} must be an async function, got {callback!r}")
        nats_options.setdefault("max_reconnect_attempts", -1)
        wait = nats_options.setdefault("reconnect_time_wait", 2)
        #: Seconds between reconnect attempts to one server.
        self.reconnect_time_wait = check_seconds("reconnect_time_wait", wait)
        self.name = name
        self._nats_options = nats_options
        self._state = LifecycleState.NEW
        self._lock = threading.Lock()
        self._connect_lock: asyncio.Lock | None = None
        self._nc: Client | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._max_payload = 1_048_576
        self._routes: dict[QueueSubscription, _Route] = {}
        # SUBs and UNSUBs on their way to the client: PUBs made after them wait.
        self._pending_subs: set[asyncio.Task[None]] = set()
        self._requests: set[asyncio.Task[Msg]] = set()
        # Each queued envelope with the subscriptions that were on their way
        # when it was published: it goes out after those, not after later ones
        # (a subscription made after a publish must not receive it).
        self._outbox: collections.deque[tuple[str, bytes, frozenset[asyncio.Task[None]]]] = (
            collections.deque()
        )
        self._queued = 0  # envelopes ever put in the outbox
        self._sent = 0  # envelopes ever taken out of it (sent or counted failed)
        self._sent_waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._drainer: asyncio.Task[None] | None = None
        self._listeners: list[ConnectionListener] = []
        self._last_error: BaseException | None = None
        self._failing = False
        self._published = 0
        self._publish_errors = 0
        self._corrupt = 0
        self._retired_delivered = 0
        self._retired_dropped = 0

    def __repr__(self) -> str:
        state: str = self._state
        if self._state is LifecycleState.OPEN and not self.connected:
            state = "reconnecting"
        return f"<NatsBus {','.join(self.servers)} {state}>"

    # ─── State ───

    @property
    def connected(self) -> bool:
        """True while the bus is open and its connection is up."""
        nc = self._nc
        return self._state is LifecycleState.OPEN and nc is not None and nc.is_connected

    @property
    def max_payload(self) -> int:
        """Largest envelope the server accepts, in bytes (its ``max_payload``).

        Before the first connection it is the NATS default, 1 MiB.
        """
        return self._max_payload

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The event loop the connection lives on, once connected."""
        return self._loop

    def add_connection_listener(self, listener: ConnectionListener) -> None:
        """Call ``listener(True)`` when the connection comes up (first
        connect and every reconnect) and ``listener(False)`` when it drops
        or is closed. Listeners run on the bus loop and must not block.
        """
        self._listeners.append(listener)

    # ─── Life cycle ───

    async def connect(self) -> None:
        """Connect to the first reachable server. Idempotent.

        Keeps trying for up to ``connect_timeout`` seconds. Once connected,
        the client reconnects by itself after an outage.

        Raises
        ------
        TransportUnavailableError
            No server could be reached in time (a :class:`ConnectionError`);
            the bus stays unconnected and :meth:`connect` may be retried.
        BusClosedError
            The bus was closed.
        """
        if self._state is LifecycleState.OPEN:
            return
        self._check_not_closed("connect")
        if self._connect_lock is None:
            self._connect_lock = asyncio.Lock()
        async with self._connect_lock:
            await self._connect()

    async def _connect(self) -> None:
        """Connect, holding the connect lock; whoever held it before may have
        connected or closed the bus meanwhile."""
        if self._state is LifecycleState.OPEN:
            return
        self._check_not_closed("connect")
        nc = Client()
        options: dict[str, Any] = dict(self._nats_options)
        user_callbacks = {key: options.pop(key, None) for key in _CALLBACK_OPTIONS}
        options.update(
            error_cb=self._chain(self._on_error, user_callbacks["error_cb"]),
            disconnected_cb=self._chain(self._on_disconnected, user_callbacks["disconnected_cb"]),
            reconnected_cb=self._chain(self._on_reconnected, user_callbacks["reconnected_cb"]),
            closed_cb=self._chain(self._on_closed, user_callbacks["closed_cb"]),
        )
        self._last_error = None
        connecting = asyncio.ensure_future(
            nc.connect(
                self.servers,
                name=self.name,
                connect_timeout=self.connect_timeout,  # type: ignore[arg-type]
                **options,
            )
        )
        try:
            await asyncio.wait({connecting}, timeout=self.connect_timeout)
        except asyncio.CancelledError:
            # Cancelled mid-connect (a FallbackBus closing): leave no socket.
            await asyncio.shield(_abandon_connect(connecting, nc))
            raise
        failure: BaseException | None
        if not connecting.done():
            await _abandon_connect(connecting, nc)
            failure = TimeoutError(f"no answer within {self.connect_timeout:g} s")
        elif connecting.cancelled():
            failure = TimeoutError("the connect attempt was cancelled")
        else:
            failure = connecting.exception()
        if failure is not None:
            with contextlib.suppress(Exception):
                await nc.close()
            if not isinstance(failure, (TimeoutError, OSError, nats.errors.Error)):
                raise failure
            cause = self._last_error or failure
            raise TransportUnavailableError(
                f"cannot connect to NATS at {', '.join(self.servers)} within "
                f"{self.connect_timeout:g} s: {_describe(cause)}"
            ) from failure
        if self._state is LifecycleState.CLOSED:  # closed while we were connecting
            await nc.close()
            self._check_not_closed("connect")
        loop = asyncio.get_running_loop()
        with self._lock:
            self._nc = nc
            self._loop = loop
            self._loop_thread = threading.get_ident()
            self._max_payload = nc.max_payload
            self._state = LifecycleState.OPEN
            routes = list(self._routes.values())
        log.info(
            "connected to NATS at %s (max_payload %d bytes)",
            _url_of(nc) or ",".join(self.servers),
            self._max_payload,
        )
        for route in routes:
            self._start_route(route)
        self._notify(True)

    async def close(self) -> None:
        """End every subscription and close the connection. Idempotent.

        Events already handed to the bus are flushed to the server first if
        the connection is up (for at most ``connect_timeout`` seconds).
        """
        with self._lock:
            if self._state is LifecycleState.CLOSED:
                return
            was_open = self._state is LifecycleState.OPEN
            self._state = LifecycleState.CLOSED
            routes = list(self._routes.values())
        for route in routes:
            route.qsub.close_from_transport()
        if not was_open:
            return
        loop = self._loop
        assert loop is not None
        if loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            await self._shutdown()
        else:
            future = asyncio.run_coroutine_threadsafe(self._shutdown(), loop)
            await asyncio.wrap_future(future)

    async def _shutdown(self) -> None:
        nc = self._nc
        assert nc is not None
        for request in list(self._requests):
            request.cancel()  # the requester sees the bus closed (see request())
        drainer = self._drainer
        if drainer is not None and not drainer.done():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(drainer), self.connect_timeout)
        if nc.is_connected:
            try:
                await nc.flush(timeout=self.connect_timeout)  # type: ignore[arg-type]
            except Exception as exc:  # the events are lost either way; say so
                log.warning("could not flush to NATS before closing: %s", _describe(exc))
        for pending in list(self._pending_subs):
            pending.cancel()
        if self._drainer is not None:
            self._drainer.cancel()
        self._wake_sent_waiters(everyone=True)
        try:
            await nc.close()
        except asyncio.CancelledError:
            # nats-py cancels its own reader and flusher while closing, and
            # the stream's close waiter can come back cancelled with them: a
            # cancellation that is not ours must not escape close().
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
        except Exception:  # the connection is going away either way
            log.debug("closing the NATS connection failed", exc_info=True)
        self._notify(False)

    def _check_not_closed(self, action: str) -> None:
        if self._state is LifecycleState.CLOSED:
            raise BusClosedError(f"cannot {action}: NatsBus {','.join(self.servers)} is closed")

    # ─── Publishing ───

    async def publish(
        self,
        topic: str,
        payload: dict[str, Any],
        *,
        event_type: str = "",
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """Publish *payload* on *topic* (the NATS subject), fire-and-forget.

        Connects first if :meth:`connect` was never awaited.

        Raises
        ------
        TypeError, ValueError
            Bad topic, payload, event type or headers, or an envelope larger
            than the server's ``max_payload``.
        BusClosedError
            The bus is closed.
        """
        if self._state is not LifecycleState.OPEN:
            self._check_not_closed("publish")
            await self.connect()
        data = self.encode(topic, payload, event_type, headers=headers)
        await self._send_or_queue(topic, data)

    async def publish_event(self, event: Event) -> None:
        """Publish an already-built *event*, keeping its ``id``, ``ts``,
        ``type``, ``v``, ``headers`` and ``reply_to`` (for bridges and
        relays). Same errors as :meth:`publish`."""
        if self._state is not LifecycleState.OPEN:
            self._check_not_closed("publish")
            await self.connect()
        data = self.encode(
            event.topic,
            event.payload,
            event.type,
            event_id=event.id,
            ts=event.ts,
            v=event.v,
            headers=event.headers,
            reply_to=event.reply_to,
        )
        await self._send_or_queue(event.topic, data)

    async def request(
        self,
        topic: str,
        payload: dict[str, Any],
        *,
        timeout: float = 1.0,
        event_type: str = "",
        headers: Mapping[str, str] | None = None,
    ) -> Event:
        """Send a NATS request and return the first reply (see
        :meth:`BaseBus.request <shmbus.contract.BaseBus.request>`).

        Goes out after this instance's SUBs and PUBs so far, so a responder
        subscribed on this instance just before is there to answer.

        Raises
        ------
        NoRespondersError
            The server knows nobody subscribes to *topic* (at once).
        RequestTimeoutError
            No reply within *timeout* seconds.
        TransportUnavailableError
            The connection is down (a :class:`ConnectionError`).
        BusClosedError
            The bus is closed, or closed while the request waited.
        TypeError, ValueError
            As :meth:`publish`, or a bad *timeout*.
        """
        timeout = check_timeout(timeout)
        if self._state is not LifecycleState.OPEN:
            self._check_not_closed("request")
            await self.connect()
        data = self.encode(topic, payload, event_type, headers=headers)
        loop = self._loop
        assert loop is not None
        if asyncio.get_running_loop() is not loop:
            future = asyncio.run_coroutine_threadsafe(self._request(topic, data, timeout), loop)
            return await asyncio.wrap_future(future)
        return await self._request(topic, data, timeout)

    async def _request(self, topic: str, data: bytes, timeout: float) -> Event:
        """On the bus loop: send one encoded request and await its reply."""
        waiting = set(self._pending_subs)
        drainer = self._drainer
        if drainer is not None and not drainer.done():
            waiting.add(drainer)
        if waiting:
            # SUBs and queued PUBs of this instance go out before the request.
            await asyncio.wait(waiting, timeout=timeout)
        nc = self._nc
        if self._state is not LifecycleState.OPEN or nc is None:
            self._check_not_closed("request")
        if nc is None or not nc.is_connected:
            raise TransportUnavailableError(
                f"cannot send the request on {topic!r}: not connected to NATS at "
                f"{','.join(self.servers)}"
            )
        assert self._loop is not None
        pending = self._loop.create_task(nc.request(topic, data, timeout=timeout))
        self._requests.add(pending)
        pending.add_done_callback(self._requests.discard)
        with self._lock:
            self._published += 1
        try:
            msg = await pending
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if self._state is LifecycleState.CLOSED and not (task and task.cancelling()):
                raise BusClosedError(
                    f"NatsBus {','.join(self.servers)} was closed while the request on "
                    f"{topic!r} waited for its reply"
                ) from None
            raise
        except nats.errors.NoRespondersError:
            raise NoRespondersError(
                f"no responders for the request on {topic!r}: nobody subscribes to it on "
                f"NATS at {','.join(self.servers)}"
            ) from None
        except nats.errors.TimeoutError:
            raise RequestTimeoutError(
                f"no reply to the request on {topic!r} within {timeout:g} s "
                f"(NatsBus {','.join(self.servers)}): nobody answered in time"
            ) from None
        except nats.errors.Error as exc:
            raise TransportUnavailableError(
                f"the request on {topic!r} failed: {_describe(exc)}"
            ) from exc
        return self._decode(msg)

    def publish_nowait(
        self,
        topic: str,
        payload: dict[str, Any],
        *,
        event_type: str = "",
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """Publish from any thread, with or without a running event loop.

        The input is checked and encoded here (so bad input raises in the
        caller); the send is scheduled onto the bus loop.

        Raises
        ------
        TypeError, ValueError
            As :meth:`publish`.
        RuntimeError
            The bus is closed, or was never connected (there is no loop to
            hand the event to: await :meth:`connect` first).
        """
        self._check_ready("publish")
        self.submit_encoded(topic, self.encode(topic, payload, event_type, headers=headers))

    def encode(
        self,
        topic: str,
        payload: dict[str, Any],
        event_type: str = "",
        *,
        event_id: str | None = None,
        ts: float | None = None,
        v: int = EVENT_SCHEMA_VERSION,
        headers: Mapping[str, str] | None = None,
        reply_to: str | None = None,
    ) -> bytes:
        """Validate and encode one envelope for this bus; raise for bad input
        or an envelope over the server's ``max_payload``."""
        validate_topic(topic)
        data = encode_envelope(
            topic,
            payload,
            event_type,
            sys.maxsize,
            event_id=event_id,
            ts=ts,
            v=v,
            headers=headers,
            reply_to=reply_to,
        )
        limit = self._max_payload
        if len(data) > limit:
            raise ValueError(
                f"event on topic {topic!r} encodes to {len(data)} bytes; the NATS server's "
                f"max_payload is {limit} bytes"
            )
        return data

    def submit_encoded(self, topic: str, data: bytes) -> None:
        """Hand an envelope made by :meth:`encode` to the bus loop, from any
        thread. Transport failures are counted, not raised."""
        self._check_ready("publish")
        loop = self._loop
        assert loop is not None
        if self._loop_thread == threading.get_ident():
            self._enqueue(topic, data)
            return
        try:
            loop.call_soon_threadsafe(self._enqueue, topic, data)
        except RuntimeError:  # the bus loop is closed: nobody can send it
            self._count_error(topic, "the bus's event loop is closed")

    def _check_ready(self, action: str) -> None:
        if self._state is not LifecycleState.OPEN:
            self._check_not_closed(action)
            raise RuntimeError(
                f"cannot {action} on NatsBus {','.join(self.servers)} before connect(); "
                "await bus.connect() first"
            )

    async def send_encoded(self, topic: str, data: bytes) -> None:
        """Send an envelope made by :meth:`encode`, waiting for the client to
        take it when called on the bus loop (behind anything already queued).
        Transport failures are counted, not raised."""
        self._check_ready("publish")
        await self._send_or_queue(topic, data)

    async def _send_or_queue(self, topic: str, data: bytes) -> None:
        loop = self._loop
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:  # pragma: no cover - publish() always runs in a loop
            running = None
        if running is not loop or self._outbox or self._pending_subs:
            # Another loop, or events queued ahead of this one: keep the order.
            self.submit_encoded(topic, data)
            return
        await self._send(topic, data)

    def _enqueue(self, topic: str, data: bytes) -> None:
        """On the bus loop: queue one envelope behind the ones already queued."""
        if self._state is not LifecycleState.OPEN:
            return  # closed meanwhile: close() raced this publish
        if not self.connected:
            self._count_error(topic, "not connected to NATS")
            return
        if len(self._outbox) >= OUTBOX_LIMIT:
            self._count_error(topic, f"{OUTBOX_LIMIT} events are already waiting to be sent")
            return
        self._outbox.append((topic, data, frozenset(self._pending_subs)))
        self._queued += 1
        if self._drainer is None or self._drainer.done():
            assert self._loop is not None
            self._drainer = self._loop.create_task(self._drain())

    async def _drain(self) -> None:
        outbox = self._outbox
        while outbox:
            topic, data, before = outbox[0]
            waiting = {task for task in before if not task.done()}
            if waiting:
                await asyncio.wait(waiting)
            outbox.popleft()
            await self._send(topic, data, ())
            self._sent += 1
            self._wake_sent_waiters()

    def _wake_sent_waiters(self, everyone: bool = False) -> None:
        keep = []
        for target, future in self._sent_waiters:
            if everyone or self._sent >= target:
                if not future.done():
                    future.set_result(None)
            else:
                keep.append((target, future))
        self._sent_waiters = keep

    async def _send(
        self, topic: str, data: bytes, after: Iterable[asyncio.Task[None]] | None = None
    ) -> None:
        """On the bus loop: hand one envelope to the client, after the NATS
        subscriptions *after* (default: those on their way now)."""
        nc = self._nc
        if nc is None or not nc.is_connected:
            self._count_error(topic, "not connected to NATS")
            return
        waiting = {task for task in (self._pending_subs if after is None else after)}
        if waiting:
            # SUBs of this instance go out before PUBs that follow them.
            await asyncio.wait(waiting)
        try:
            await nc.publish(topic, data)
        except Exception as exc:
            self._count_error(topic, _describe(exc))
            return
        with self._lock:
            self._published += 1
            self._failing = False

    def _count_error(self, topic: str, reason: str) -> None:
        with self._lock:
            self._publish_errors += 1
            first = not self._failing
            self._failing = True
        if first:
            log.warning(
                "publish on %r failed (%s); event dropped (counted in publish_errors; further "
                "failures are logged at debug level until a publish succeeds)",
                topic,
                reason,
            )
        else:
            log.debug("publish on %r failed (%s); event dropped", topic, reason)

    async def flush(self, timeout: float | None = None) -> None:
        """Wait until this instance's SUBs and PUBs so far reached the server.

        Raises :class:`~shmbus.errors.TransportUnavailableError` (a
        :class:`ConnectionError`) if the server does not answer within
        *timeout* seconds (default ``connect_timeout``) or the connection is
        down.
        """
        self._check_ready("flush")
        timeout = self.connect_timeout if timeout is None else timeout
        loop = self._loop
        assert loop is not None and self._nc is not None
        if asyncio.get_running_loop() is not loop:
            future = asyncio.run_coroutine_threadsafe(self.flush(timeout), loop)
            await asyncio.wrap_future(future)
            return
        if self._pending_subs:
            await asyncio.wait(set(self._pending_subs), timeout=timeout)
        drainer = self._drainer
        if drainer is not None and not drainer.done():
            await asyncio.wait({drainer}, timeout=timeout)
        if not self._nc.is_connected:
            raise TransportUnavailableError(f"NatsBus {','.join(self.servers)} is not connected")
        try:
            await self._nc.flush(timeout=timeout)  # type: ignore[arg-type]
        except nats.errors.Error as exc:
            raise TransportUnavailableError(f"NATS flush failed: {_describe(exc)}") from exc

    # ─── Subscribing ───

    def subscribe(self, pattern: str, *, queue: str | None = None) -> QueueSubscription:
        """Subscribe to events whose topic matches *pattern* (a NATS subject
        with ``*``/``>`` wildcards, validated by shmbus's rules); with
        *queue*, as a member of that NATS queue group.

        May be called before :meth:`connect` (the NATS subscription is made
        on connect) and from any thread.
        """
        validate_pattern(pattern)
        if queue is not None:
            validate_queue_name(queue)
        self._check_not_closed("subscribe")
        qsub = QueueSubscription(
            pattern, maxsize=self.queue_size, on_close=self._forget, queue=queue
        )
        route = _Route(qsub)
        with self._lock:
            self._check_not_closed("subscribe")
            self._routes[qsub] = route
            is_open = self._state is LifecycleState.OPEN
        if is_open:
            self._call_on_loop(self._start_route, route)
        return qsub

    def _start_route(self, route: _Route) -> None:
        """On the bus loop: make the NATS subscription for *route*."""
        if route.retired or route.task is not None or self._state is not LifecycleState.OPEN:
            return
        assert self._loop is not None
        route.after_queued = self._queued
        task = self._loop.create_task(self._subscribe_nats(route))
        route.task = task
        self._pending_subs.add(task)
        task.add_done_callback(self._pending_subs.discard)

    async def _subscribe_nats(self, route: _Route) -> None:
        if self._sent < route.after_queued:
            assert self._loop is not None
            ready = self._loop.create_future()
            self._sent_waiters.append((route.after_queued, ready))
            await ready
        nc = self._nc
        if nc is None:
            return
        callback = functools.partial(self._on_message, route.qsub)
        try:
            nats_sub = await nc.subscribe(
                route.qsub.pattern, queue=route.qsub.queue or "", cb=callback
            )
        except Exception as exc:
            log.error("cannot subscribe to %r on NATS: %s", route.qsub.pattern, _describe(exc))
            route.qsub.close_from_transport()
            return
        route.nats_sub = nats_sub
        if route.retired:
            await _unsubscribe(nats_sub)

    def _decode(self, msg: Msg) -> Event:
        """The event *msg* carries; an undecodable one is counted as corrupt
        and raises :class:`~shmbus.codec.EnvelopeDecodeError`."""
        try:
            return decode_envelope(
                msg.subject,
                msg.data,
                max(self._max_payload, len(msg.data)),
                reply_to=msg.reply or None,
            )
        except EnvelopeDecodeError:
            with self._lock:
                self._corrupt += 1
            raise

    async def _on_message(self, qsub: QueueSubscription, msg: Msg) -> None:
        try:
            event = self._decode(msg)
        except EnvelopeDecodeError as exc:
            log.debug("dropping undecodable message on %r: %s", msg.subject, exc)
            return
        qsub.deliver((event,))

    def _forget(self, qsub: QueueSubscription) -> None:
        """The subscription closed (any thread): stop feeding it."""
        with self._lock:
            route = self._routes.pop(qsub, None)
            if route is None:
                return
            route.retired = True
            self._retired_delivered += qsub.delivered
            self._retired_dropped += qsub.dropped
            is_open = self._state is LifecycleState.OPEN
        if is_open:
            self._call_on_loop(self._stop_route, route)

    def _stop_route(self, route: _Route) -> None:
        """On the bus loop: drop the NATS subscription of a retired route."""
        if route.nats_sub is not None and self._state is LifecycleState.OPEN:
            assert self._loop is not None
            # In flight like a SUB, so that PUBs made after the close go out
            # after the UNSUB: otherwise the server can still hand a queue
            # group's events to the member that left, which drops them.
            task = self._loop.create_task(_unsubscribe(route.nats_sub))
            self._pending_subs.add(task)
            task.add_done_callback(self._pending_subs.discard)
        # A subscribe still in flight unsubscribes itself when it finishes.

    # ─── Accounting ───

    def stats(self) -> BusStats:
        """Counters of this instance (see :class:`~shmbus.stats.BusStats`).

        ``corrupt`` counts received messages that were not shmbus envelopes;
        ``publish_errors`` counts events dropped because the connection was
        down, the send failed, or the outbox was full.
        """
        with self._lock:
            live = [route.qsub for route in self._routes.values()]
            return BusStats(
                published=self._published,
                delivered=self._retired_delivered + sum(sub.delivered for sub in live),
                dropped=self._retired_dropped + sum(sub.dropped for sub in live),
                corrupt=self._corrupt,
                publish_errors=self._publish_errors,
                subscriptions=len(live),
            )

    # ─── Connection events (on the bus loop) ───

    def _chain(
        self,
        own: Callable[..., Awaitable[None]],
        user: Callable[..., Awaitable[None]] | None,
    ) -> Callable[..., Awaitable[None]]:
        if user is None:
            return own

        async def both(*args: Any) -> None:
            await own(*args)
            await user(*args)

        return both

    async def _on_error(self, exc: Exception) -> None:
        self._last_error = exc
        if self._state is LifecycleState.CLOSED:
            return
        if isinstance(exc, _CONNECTION_ERRORS):
            log.debug("NATS connection error: %s", _describe(exc))
        else:
            log.warning("NATS error: %s", _describe(exc))

    async def _on_disconnected(self) -> None:
        if self._state is not LifecycleState.OPEN:
            return
        dropped = self._discard_unsent()
        log.warning(
            "disconnected from NATS at %s; reconnecting (publishes are dropped and counted "
            "until then%s)",
            ",".join(self.servers),
            f"; {dropped} unsent event(s) discarded" if dropped else "",
        )
        self._notify(False)

    async def _on_reconnected(self) -> None:
        nc = self._nc
        if self._state is not LifecycleState.OPEN or nc is None:
            return
        self._max_payload = nc.max_payload
        with self._lock:
            self._failing = False
        log.info("reconnected to NATS at %s", _url_of(nc) or ",".join(self.servers))
        self._notify(True)

    async def _on_closed(self) -> None:
        if self._state is LifecycleState.OPEN:
            log.error(
                "NATS connection to %s closed for good (reconnect attempts exhausted: %s); "
                "publishes are dropped and counted",
                ",".join(self.servers),
                _describe(self._last_error) if self._last_error else "no error reported",
            )
            self._notify(False)

    def _discard_unsent(self) -> int:
        """Drop the PUBs the client buffered but never wrote, so a reconnect
        does not deliver events from before the outage (at-most-once, and the
        fallback bus has re-sent them elsewhere). Returns how many."""
        nc = self._nc
        if not client_buffer_is_reachable(nc):
            global _warned_no_buffer
            if not _warned_no_buffer:
                _warned_no_buffer = True
                log.warning(
                    "this nats-py client has no '_pending' buffer shmbus knows how to trim: "
                    "events buffered during an outage may be delivered after the reconnect"
                )
            return 0
        pending = nc._pending  # type: ignore[union-attr]
        keep = [cmd for cmd in pending if not bytes(cmd[:5]).startswith((b"PUB ", b"HPUB "))]
        dropped = len(pending) - len(keep)
        if dropped:
            pending[:] = keep
            nc._pending_data_size = sum(len(cmd) for cmd in keep)  # type: ignore[union-attr]
            with self._lock:
                self._publish_errors += dropped
                self._published -= dropped
        return dropped

    def _notify(self, connected: bool) -> None:
        for listener in list(self._listeners):
            try:
                listener(connected)
            except Exception:
                log.exception("connection listener %r failed", listener)

    # ─── Helpers ───

    def _call_on_loop(self, function: Callable[..., None], *args: Any) -> None:
        loop = self._loop
        if loop is None:
            return
        if self._loop_thread == threading.get_ident():
            function(*args)
            return
        with contextlib.suppress(RuntimeError):  # loop closed: nothing left to do
            loop.call_soon_threadsafe(function, *args)


#: How long a connect that was given up on may take to unwind, in seconds.
_ABANDON_TIMEOUT = 5.0


async def _abandon_connect(connecting: asyncio.Future[None], nc: Client) -> None:
    """Stop a ``Client.connect()`` that is still retrying and close its client.

    nats-py's connect loop swallows a cancellation that lands while it tidies
    up after a failed attempt (and then tries again), so one ``cancel()`` is
    not enough: cancel until it ends, for at most :data:`_ABANDON_TIMEOUT`
    seconds, then close the client whatever happened.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + _ABANDON_TIMEOUT
    while not connecting.done() and loop.time() < deadline:
        connecting.cancel()
        await asyncio.wait({connecting}, timeout=0.05)
    if connecting.done():
        if not connecting.cancelled():
            connecting.exception()  # retrieved: it is reported by the caller, not by asyncio
    else:
        log.warning("a NATS connect attempt did not stop when cancelled; leaving it behind")
    with contextlib.suppress(Exception):
        await nc.close()


async def _unsubscribe(nats_sub: NatsSubscription) -> None:
    with contextlib.suppress(nats.errors.Error):
        await nats_sub.unsubscribe()


def _check_servers(servers: str | Iterable[str]) -> list[str]:
    if isinstance(servers, str):
        result = [servers]
    elif isinstance(servers, (list, tuple)):
        result = list(servers)
    else:
        raise TypeError(f"servers must be a URL or a list of URLs, not {type(servers).__name__}")
    if not result:
        raise ValueError("servers must name at least one NATS server")
    for server in result:
        if not isinstance(server, str) or not server.strip():
            raise ValueError(f"NATS server URL {server!r} is not a non-empty string")
        scheme = server.split("://", 1)[0] if "://" in server else "nats"
        if scheme not in ("nats", "tls", "ws", "wss"):
            raise ValueError(
                f"NATS server URL {server!r} has scheme {scheme!r}; "
                "valid schemes: nats, tls, ws, wss"
            )
    return result


def _url_of(nc: Client) -> str | None:
    url = nc.connected_url
    return url.geturl() if url is not None else None


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
