"""The bus contract: the :class:`Event` envelope, :class:`Subscription`,
:class:`BaseBus` and the NATS-style wildcard matcher :func:`matches`.

Every transport in this package (shared memory, in-process, null, NATS)
implements this contract, so code written against it can switch transport by
changing one URL.

Contract
--------
* An :class:`Event` is a frozen, versioned envelope: ``v`` (schema version),
  ``id`` (32 lowercase hex characters, unique across processes and restarts),
  ``topic``, ``type`` (a short discriminator), ``ts`` (epoch seconds) and
  ``payload`` (a dict); optionally ``headers`` (str to str, as NATS message
  headers: the carrier of trace context such as a W3C ``traceparent``) and
  ``reply_to`` (the topic a responder answers a request on). The optional
  keys are on the wire only when set, so an envelope without them is the one
  every earlier version wrote, and a consumer that does not know them ignores
  them (:meth:`Event.from_dict` ignores unknown keys): the envelope version
  ``v`` did not change for them. On the receiving side the topic always comes
  from the transport, never from the decoded wire bytes, so a publisher cannot
  make an event appear on a topic it did not publish to.
* :meth:`BaseBus.subscribe` returns a :class:`Subscription` (every transport
  here hands out a :class:`~shmbus.delivery.QueueSubscription`, which adds
  ``statistics()``), which is both an async context manager and an async
  iterator::

      async with bus.subscribe("decky.*.traffic") as sub:
          async for event in sub:
              handle(event)

  Leaving the ``async with`` (or :meth:`Subscription.aclose`) ends the
  iteration promptly; events still buffered for it are discarded.
* ``connect()`` and ``close()`` are idempotent; ``publish()``,
  ``publish_nowait()`` or ``subscribe()`` on a closed bus raise
  :class:`RuntimeError`.
* ``publish_nowait()`` publishes without awaiting, from any thread;
  ``stats()`` returns the instance's counters as a
  :class:`~shmbus.stats.BusStats`.
* :meth:`BaseBus.request` publishes an event with a fresh ``reply_to`` and
  returns the first reply; a responder answers with :meth:`BaseBus.reply`.
  A request nobody answers raises :class:`~shmbus.errors.RequestTimeoutError`
  (:class:`~shmbus.errors.NoRespondersError` at once where the transport
  knows that nobody listens), both :class:`TimeoutError`.
  :meth:`BaseBus.request_sync` and :meth:`BaseBus.reply_nowait` are their
  forms for code without an event loop (``request_sync`` where the
  transport has blocking subscriptions).
* ``subscribe(pattern, queue="name")`` joins a queue group: each matching
  event goes to one member of the group (the subscriptions with the same
  pattern and queue name) instead of to all of them; plain subscriptions
  still get every event.
* Delivery is at-most-once and fire-and-forget: a transport failure while
  publishing is logged and counted, never raised, because losing a
  notification must not take a worker down (the database stays the source of
  truth). Invalid *input* (topic, pattern, payload, size) is the caller's bug
  and is raised.

Topics and patterns
-------------------
A topic is a dot-separated string of non-empty tokens with no whitespace and
no wildcard characters. A pattern is a topic in which a token may be ``*``
(exactly one token) and the last token may be ``>`` (one or more trailing
tokens). Patterns are validated when they are used, so ``a.>.b`` is an error,
not a silent prefix match.

Headers and queue names
-----------------------
Header names are printable ASCII without ``:`` or spaces (what a NATS header
line ``Name: value`` can carry); values are text without a line break; names
and values together take at most :data:`MAX_HEADERS_SIZE` UTF-8 bytes. A queue
name is shaped like a topic (no whitespace, no wildcards) and at most
:data:`MAX_QUEUE_NAME_LENGTH` UTF-8 bytes.
"""

from __future__ import annotations

import abc
import itertools
import os
import re
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Self

from .stats import BusStats

if TYPE_CHECKING:  # delivery imports this module: no runtime import back
    from .delivery import BlockingSubscription, QueueSubscription

__all__ = [
    "EMPTY_HEADERS",
    "EVENT_SCHEMA_VERSION",
    "MAX_HEADERS_SIZE",
    "MAX_QUEUE_NAME_LENGTH",
    "MAX_TOPIC_LENGTH",
    "BaseBus",
    "Event",
    "Subscription",
    "TopicMatcher",
    "matches",
    "new_event_id",
    "validate_headers",
    "validate_pattern",
    "validate_queue_name",
    "validate_reply_to",
    "validate_topic",
]

#: Version of the envelope shape; bumped only on incompatible changes.
EVENT_SCHEMA_VERSION = 1

#: Longest topic or pattern accepted, in UTF-8 bytes.
MAX_TOPIC_LENGTH = 1024

#: Most UTF-8 bytes an event's header names and values may take together
#: (W3C trace context and baggage fit with room to spare).
MAX_HEADERS_SIZE = 16_384

#: Longest queue group name accepted, in UTF-8 bytes.
MAX_QUEUE_NAME_LENGTH = 255

#: The headers of an event published without any (shared, read-only).
EMPTY_HEADERS: Mapping[str, str] = MappingProxyType({})


# ─── Event ids ───────────────────────────────────────────────────────────────
#
# An id is a per-process random 64-bit prefix followed by a 64-bit counter:
# unique across processes and restarts (the prefix is fresh random bytes in
# every process, including after fork) and about 8x cheaper than uuid4().hex.

_id_prefix = ""
_id_counter: itertools.count[int] = itertools.count()


def _reseed_event_ids() -> None:
    global _id_prefix, _id_counter
    _id_prefix = os.urandom(8).hex()
    _id_counter = itertools.count(int.from_bytes(os.urandom(4), "little"))


_reseed_event_ids()
os.register_at_fork(after_in_child=_reseed_event_ids)


def new_event_id() -> str:
    """Return a fresh event id: 32 lowercase hexadecimal characters."""
    # next() on an itertools.count is atomic under the GIL, so threads never
    # draw the same number.
    return f"{_id_prefix}{next(_id_counter) & 0xFFFFFFFFFFFFFFFF:016x}"


# ─── Event ───────────────────────────────────────────────────────────────────


@dataclass(frozen=True, slots=True)
class Event:
    """One notification on the bus.

    Attributes
    ----------
    topic:
        Where the event was published. On receipt it is the topic the
        transport delivered the event on.
    payload:
        The event's data, a dict of msgpack/JSON-compatible values.
    type:
        Short discriminator such as ``"mutation.applied"``, for consumers
        that subscribe broadly and dispatch in Python.
    v:
        Envelope schema version (:data:`EVENT_SCHEMA_VERSION`).
    ts:
        Publication time, epoch seconds.
    id:
        32 lowercase hex characters, unique per event; lets a consumer de-dupe
        should it ever see an event twice (at-most-once makes that unexpected).
    headers:
        Per-event metadata, str to str, as NATS message headers (trace
        context such as ``traceparent``, a message id); empty by default.
    reply_to:
        On a request (see :meth:`BaseBus.request`), the topic the reply goes
        to; None on an ordinary event. Answer with :meth:`BaseBus.reply`.
    """

    topic: str
    payload: dict[str, Any]
    type: str = ""
    v: int = EVENT_SCHEMA_VERSION
    ts: float = field(default_factory=time.time)
    id: str = field(default_factory=new_event_id)
    headers: Mapping[str, str] = field(default_factory=lambda: EMPTY_HEADERS)
    reply_to: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Return the wire-format dict (``v``, ``id``, ``topic``, ``type``, ``ts``,
        ``payload``, and ``headers`` and ``reply_to`` when the event has them)."""
        data = {
            "v": self.v,
            "id": self.id,
            "topic": self.topic,
            "type": self.type,
            "ts": self.ts,
            "payload": self.payload,
        }
        if self.headers:
            data["headers"] = dict(self.headers)
        if self.reply_to:
            data["reply_to"] = self.reply_to
        return data

    @classmethod
    def from_dict(cls, topic: str, data: dict[str, Any]) -> Event:
        """Rebuild an event from a wire-format dict received on *topic*.

        The ``topic`` field inside *data* is ignored on purpose: the transport
        knows the subject the bytes arrived on, and trusting the wire would let
        a misbehaving publisher spoof events onto topics it did not publish to.
        Missing fields take their defaults; keys it does not know are
        ignored. ``headers`` and ``reply_to`` are checked as a publish checks
        them (:func:`validate_headers`, :func:`validate_reply_to`).
        """
        event_id = data.get("id")
        headers = data.get("headers")
        reply_to = data.get("reply_to")
        return cls(
            topic=topic,
            payload=data.get("payload") or {},
            type=data.get("type") or "",
            v=int(data.get("v", EVENT_SCHEMA_VERSION)),
            ts=float(data.get("ts", time.time())),
            id=event_id if isinstance(event_id, str) and event_id else new_event_id(),
            headers=validate_headers(headers) if headers else EMPTY_HEADERS,
            reply_to=validate_reply_to(reply_to) if reply_to else None,
        )


# ─── Topic and pattern validation ────────────────────────────────────────────

_TOPIC_SHAPE = re.compile(r"[^\s.*>]+(?:\.[^\s.*>]+)*")
_PATTERN_TOKEN = re.compile(r"[^\s.*>]+|\*")
_VALID_TOPICS: dict[str, None] = {}
_VALID_TOPICS_LIMIT = 4096


def _check_length(kind: str, text: str, limit: int = MAX_TOPIC_LENGTH) -> None:
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"{kind} {text!r} is not valid Unicode text: {exc.reason} at index {exc.start}"
        ) from None
    if size > limit:
        raise ValueError(
            f"{kind} {text[:40]!r}... is {size} bytes long; the limit is {limit} bytes"
        )


def validate_topic(topic: object) -> str:
    """Return *topic* if it is a valid topic, else raise.

    Raises
    ------
    TypeError
        *topic* is not a ``str``.
    ValueError
        *topic* is empty, has an empty token, contains whitespace or a
        wildcard (``*``, ``>``), or is longer than :data:`MAX_TOPIC_LENGTH`.
    """
    if topic.__class__ is str and topic in _VALID_TOPICS:
        return topic  # the class check above narrows it to str
    if not isinstance(topic, str):
        raise TypeError(f"topic must be a str, not {type(topic).__name__} ({topic!r})")
    if not topic:
        raise ValueError("topic must not be empty")
    _check_length("topic", topic)
    if _TOPIC_SHAPE.fullmatch(topic) is None:
        raise ValueError(_topic_problem(topic))
    if len(_VALID_TOPICS) >= _VALID_TOPICS_LIMIT:
        _VALID_TOPICS.clear()
    _VALID_TOPICS[topic] = None
    return topic


def _topic_problem(topic: str) -> str:
    if any(ch.isspace() for ch in topic):
        return f"topic {topic!r} contains whitespace"
    if "*" in topic or ">" in topic:
        return f"topic {topic!r} contains a wildcard ('*' or '>'); wildcards belong in patterns"
    return f"topic {topic!r} has an empty token (tokens are separated by single dots)"


def validate_pattern(pattern: object) -> str:
    """Return *pattern* if it is a valid subscription pattern, else raise.

    Raises
    ------
    TypeError
        *pattern* is not a ``str``.
    ValueError
        *pattern* is empty, has an empty token or whitespace, uses ``>``
        anywhere but as the whole last token, mixes ``*`` into a token, or is
        longer than :data:`MAX_TOPIC_LENGTH`.
    """
    if not isinstance(pattern, str):
        raise TypeError(f"pattern must be a str, not {type(pattern).__name__} ({pattern!r})")
    if not pattern:
        raise ValueError("pattern must not be empty")
    _check_length("pattern", pattern)
    tokens = pattern.split(".")
    for index, token in enumerate(tokens):
        if token == ">":
            if index != len(tokens) - 1:
                raise ValueError(
                    f"pattern {pattern!r} uses '>' as token {index + 1} of {len(tokens)}; "
                    "'>' is only allowed as the last token"
                )
        elif _PATTERN_TOKEN.fullmatch(token) is None:
            if not token:
                raise ValueError(f"pattern {pattern!r} has an empty token at position {index + 1}")
            if any(ch.isspace() for ch in token):
                raise ValueError(f"pattern {pattern!r} contains whitespace")
            raise ValueError(
                f"pattern {pattern!r} has token {token!r}: '*' and '>' must be whole tokens"
            )
    return pattern


def validate_reply_to(reply_to: object) -> str:
    """Return *reply_to* if it is a valid reply topic (a topic: see
    :func:`validate_topic`), else raise :class:`TypeError` or
    :class:`ValueError` naming it as ``reply_to``."""
    if not isinstance(reply_to, str):
        raise TypeError(f"reply_to must be a str, not {type(reply_to).__name__} ({reply_to!r})")
    try:
        return validate_topic(reply_to)
    except ValueError as exc:
        raise ValueError(f"reply_to: {exc}") from None


# ─── Headers and queue names ─────────────────────────────────────────────────

# A NATS header line is "Name: value\r\n": a name is printable ASCII without
# ':' (and without spaces, which would end it), a value anything but a break.
_HEADER_NAME = re.compile(r"[!-9;-~]+")
_LINE_BREAK = re.compile(r"[\r\n]")


def validate_headers(headers: object) -> dict[str, str]:
    """Return a copy of *headers* as a plain dict if it is a valid header
    mapping, else raise. None gives an empty dict.

    Raises
    ------
    TypeError
        *headers* is not a mapping, or a name or a value is not a ``str``.
    ValueError
        A name is empty or not printable ASCII without ``:`` and spaces, a
        value holds a line break, or names and values take more than
        :data:`MAX_HEADERS_SIZE` UTF-8 bytes together.
    """
    if headers is None:
        return {}
    if not isinstance(headers, Mapping):
        raise TypeError(
            f"headers must be a mapping of str to str, not {type(headers).__name__} ({headers!r})"
        )
    copy: dict[str, str] = {}
    size = 0
    for name, value in headers.items():
        if not isinstance(name, str):
            raise TypeError(f"header names must be str, not {type(name).__name__} ({name!r})")
        if not isinstance(value, str):
            raise TypeError(
                f"header {name!r} must have a str value, not {type(value).__name__} ({value!r})"
            )
        if _HEADER_NAME.fullmatch(name) is None:
            raise ValueError(
                f"header name {name!r} is not allowed: a name is printable ASCII "
                "without ':' or spaces, at least one character (as in NATS headers)"
            )
        if _LINE_BREAK.search(value) is not None:
            raise ValueError(f"header {name!r} has a value with a line break: {value[:40]!r}")
        try:
            size += len(name) + len(value.encode("utf-8"))
        except UnicodeEncodeError as exc:
            raise ValueError(
                f"header {name!r} has a value that is not valid Unicode text: "
                f"{exc.reason} at index {exc.start}"
            ) from None
        copy[name] = value
    if size > MAX_HEADERS_SIZE:
        raise ValueError(
            f"headers take {size} bytes (names and values, UTF-8); "
            f"the limit is {MAX_HEADERS_SIZE} bytes"
        )
    return copy


def validate_queue_name(queue: object) -> str:
    """Return *queue* if it is a valid queue group name, else raise.

    Raises
    ------
    TypeError
        *queue* is not a ``str``.
    ValueError
        *queue* is empty, contains whitespace or a wildcard, has an empty
        token, or is longer than :data:`MAX_QUEUE_NAME_LENGTH` UTF-8 bytes.
    """
    if not isinstance(queue, str):
        raise TypeError(f"queue must be a str or None, not {type(queue).__name__} ({queue!r})")
    if not queue:
        raise ValueError("queue name must not be empty")
    _check_length("queue name", queue, MAX_QUEUE_NAME_LENGTH)
    if _TOPIC_SHAPE.fullmatch(queue) is None:
        problem = _topic_problem(queue).removeprefix("topic ")
        raise ValueError(f"queue name {problem.replace('; wildcards belong in patterns', '')}")
    return queue


# ─── Wildcard matching ───────────────────────────────────────────────────────


def _tokens_match(pattern_tokens: list[str], topic_tokens: list[str]) -> bool:
    last = len(pattern_tokens) - 1
    for index, token in enumerate(pattern_tokens):
        if token == ">" and index == last:
            return index < len(topic_tokens)
        if index >= len(topic_tokens):
            return False
        if token == "*":
            if not topic_tokens[index]:
                return False  # '*' stands for exactly one non-empty token
        elif token != topic_tokens[index]:
            return False
    return len(pattern_tokens) == len(topic_tokens)


def matches(pattern: str, topic: str) -> bool:
    """Return True iff *topic* matches *pattern* under NATS wildcard rules.

    ``*`` matches exactly one token; ``>`` as the last token matches one or
    more trailing tokens (``a.>`` matches ``a.b`` and ``a.b.c`` but not
    ``a``). Raises :class:`ValueError` for an invalid pattern (see
    :func:`validate_pattern`) rather than guessing what it meant.
    """
    validate_pattern(pattern)
    return _tokens_match(pattern.split("."), topic.split("."))


class TopicMatcher:
    """A compiled pattern with a bounded per-topic cache of answers.

    Matching the same topic again costs one dict lookup, which matters on the
    delivery path where a few topics repeat millions of times.
    """

    __slots__ = ("pattern", "_tokens", "_cache", "_cache_limit")

    def __init__(self, pattern: str, cache_limit: int = 4096) -> None:
        self.pattern = validate_pattern(pattern)
        self._tokens = pattern.split(".")
        self._cache: dict[str, bool] = {}
        self._cache_limit = cache_limit

    def __call__(self, topic: str) -> bool:
        answer = self._cache.get(topic)
        if answer is None:
            answer = _tokens_match(self._tokens, topic.split("."))
            if len(self._cache) >= self._cache_limit:
                self._cache.clear()
            self._cache[topic] = answer
        return answer

    def __repr__(self) -> str:
        return f"TopicMatcher({self.pattern!r})"


# ─── Subscription and bus interfaces ─────────────────────────────────────────


def _reply_topic_of(request: object) -> str:
    if not isinstance(request, Event):
        raise TypeError(f"request must be an Event, not {type(request).__name__}")
    if not request.reply_to:
        raise ValueError(
            f"event {request.id} on {request.topic!r} is not a request: it has no reply_to"
        )
    return request.reply_to


class Subscription(abc.ABC):
    """An open subscription: an async context manager and an async iterator.

    Obtain one from :meth:`BaseBus.subscribe`; transports subclass it and
    implement :meth:`__anext__` and :meth:`_aclose`. :meth:`aclose` is
    idempotent and ends a pending ``async for`` promptly.
    """

    def __init__(self, pattern: str) -> None:
        self.pattern = pattern
        self._closed = False

    @property
    def closed(self) -> bool:
        """True once :meth:`aclose` has been called (or the bus closed)."""
        return self._closed

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __aiter__(self) -> AsyncIterator[Event]:
        return self

    async def aclose(self) -> None:
        """Stop receiving. Idempotent."""
        if self._closed:
            return
        self._closed = True
        await self._aclose()

    @abc.abstractmethod
    async def __anext__(self) -> Event:
        """Return the next matching event; ``StopAsyncIteration`` once closed."""

    @abc.abstractmethod
    async def _aclose(self) -> None:
        """Release the transport's resources for this subscription."""


class BaseBus(abc.ABC):
    """The publish/subscribe transport contract.

    ``connect()`` and ``close()`` may be awaited any number of times.
    ``publish()``, ``publish_nowait()``, ``subscribe()``, ``request()`` and
    ``request_sync()`` on a closed bus raise :class:`RuntimeError`. ``async with bus:`` connects
    and closes. Every transport of this package implements all of it:
    :class:`ShmBus <shmbus.shm.ShmBus>`, :class:`MemoryBus
    <shmbus.memory.MemoryBus>`, :class:`NullBus <shmbus.memory.NullBus>`,
    :class:`NatsBus <shmbus.nats.NatsBus>` and :class:`FallbackBus
    <shmbus.fallback.FallbackBus>`.
    """

    @abc.abstractmethod
    async def connect(self) -> None:
        """Acquire the transport's resources. Idempotent."""

    @abc.abstractmethod
    async def publish(
        self,
        topic: str,
        payload: dict[str, Any],
        *,
        event_type: str = "",
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """Publish *payload* on *topic*, fire-and-forget, at most once.

        *headers* (str to str, see :func:`validate_headers`) travel with the
        event and are its :attr:`Event.headers` on every subscriber. Invalid
        input raises; a transport failure is logged and counted, not raised.
        """

    @abc.abstractmethod
    def publish_nowait(
        self,
        topic: str,
        payload: dict[str, Any],
        *,
        event_type: str = "",
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """Publish without awaiting, from any thread (with or without an event
        loop). Same semantics and errors as :meth:`publish`; a transport that
        needs a connection made on a loop (NATS) raises :class:`RuntimeError`
        before :meth:`connect`.
        """

    @abc.abstractmethod
    def subscribe(self, pattern: str, *, queue: str | None = None) -> QueueSubscription:
        """Return a subscription to events whose topic matches *pattern*.

        ``*`` matches one token, a final ``>`` one or more trailing tokens:
        ``decky.*.traffic``, ``topology.abc.mutation.*``, ``topology.>``.
        The subscription is a :class:`~shmbus.delivery.QueueSubscription`: a
        :class:`Subscription` with a bounded drop-oldest queue and
        :meth:`~shmbus.delivery.QueueSubscription.statistics`.

        With *queue* (a name, see :func:`validate_queue_name`) the
        subscription is a member of that queue group: every matching event
        goes to exactly one member of the group, the group being the
        subscriptions with the same pattern and queue name, instead of to
        each of them.
        """

    @abc.abstractmethod
    async def request(
        self,
        topic: str,
        payload: dict[str, Any],
        *,
        timeout: float = 1.0,
        event_type: str = "",
        headers: Mapping[str, str] | None = None,
    ) -> Event:
        """Publish a request on *topic* and return the first reply.

        The request is an event whose :attr:`Event.reply_to` names a topic
        of this bus instance's reply inbox (``_INBOX.<random>.<token>``); a
        responder answers it with :meth:`reply`. Any number of requests may
        wait at once, from any number of tasks; each gets its own reply.

        Raises
        ------
        NoRespondersError
            Nobody subscribes to *topic*, where the transport knows it at
            once (in-process buses, NATS). A :class:`RequestTimeoutError`.
        RequestTimeoutError
            No reply came within *timeout* seconds (a :class:`TimeoutError`).
        BusClosedError
            The bus is closed, or was closed while the request waited.
        TypeError, ValueError
            Bad input, as for :meth:`publish`, or a *timeout* that is not a
            positive number of seconds.
        """

    async def reply(
        self,
        request: Event,
        payload: dict[str, Any],
        *,
        event_type: str = "",
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """Answer *request* (an event received with a ``reply_to``): publish
        *payload* on its reply topic, fire-and-forget like :meth:`publish`.

        Raises :class:`ValueError` if *request* has no ``reply_to`` (it was
        published, not requested), and what :meth:`publish` raises.
        """
        reply_to = _reply_topic_of(request)
        await self.publish(reply_to, payload, event_type=event_type, headers=headers)

    def reply_nowait(
        self,
        request: Event,
        payload: dict[str, Any],
        *,
        event_type: str = "",
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """:meth:`reply` without awaiting, from any thread (with or without an
        event loop), as :meth:`publish_nowait` publishes: the answer of a
        worker consuming a blocking subscription.

        Raises :class:`ValueError` if *request* has no ``reply_to``, and what
        :meth:`publish_nowait` raises.
        """
        reply_to = _reply_topic_of(request)
        self.publish_nowait(reply_to, payload, event_type=event_type, headers=headers)

    def request_sync(
        self,
        topic: str,
        payload: dict[str, Any],
        *,
        timeout: float = 1.0,
        event_type: str = "",
        headers: Mapping[str, str] | None = None,
    ) -> Event:
        """:meth:`request` for code without an event loop: publish a request
        on *topic* and block this thread until the first reply, which it
        returns.

        Usable from any thread that runs no event loop, from any number of
        threads at once (each gets its own reply). The replies come through
        a blocking inbox of this bus instance (one blocking subscription,
        opened by the first call and kept until the bus closes). Raises what
        :meth:`request` raises, and :class:`RuntimeError` if an event loop
        runs in this thread (use ``await bus.request(...)`` there).

        A transport whose client needs an event loop raises
        :class:`NotImplementedError` naming the alternative.
        """
        raise NotImplementedError(
            f"{type(self).__name__} has no blocking requests: its client runs on asyncio. "
            "Use 'await bus.request(topic, payload)' on an event loop (asyncio.run() in a "
            "thread of its own), or use ShmBus or MemoryBus"
        )

    @abc.abstractmethod
    def stats(self) -> BusStats:
        """Counters of this instance since it connected (see
        :class:`~shmbus.stats.BusStats`); transports without a given notion
        report 0 for it."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release the transport's resources. Idempotent."""

    def subscribe_sync(self, pattern: str) -> BlockingSubscription:
        """Return a blocking subscription to events whose topic matches
        *pattern*, for code without an event loop (threads, WSGI workers,
        scripts): a :class:`~shmbus.delivery.BlockingSubscription`, a context
        manager and an iterator, consumed from any thread with ``for event in
        sub`` or ``sub.get(timeout)``. Same semantics as :meth:`subscribe`:
        events published after it returns, the same queue bound, oldest
        dropped and counted, ``statistics()``.

        A transport whose client needs an event loop raises
        :class:`NotImplementedError` naming the alternative.
        """
        raise NotImplementedError(
            f"{type(self).__name__} has no blocking subscriptions: its client runs on "
            "asyncio. Consume with 'async for event in bus.subscribe(pattern)' on an event "
            "loop (asyncio.run() in a thread of its own), or use ShmBus or MemoryBus"
        )

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
