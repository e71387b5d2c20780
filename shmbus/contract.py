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
  ``payload`` (a dict). On the receiving side the topic always comes from the
  transport, never from the decoded wire bytes, so a publisher cannot make an
  event appear on a topic it did not publish to.
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
"""

from __future__ import annotations

import abc
import itertools
import os
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Self

from .stats import BusStats

if TYPE_CHECKING:  # delivery imports this module: no runtime import back
    from .delivery import QueueSubscription

__all__ = [
    "EVENT_SCHEMA_VERSION",
    "MAX_QUEUE_NAME_LENGTH",
    "MAX_TOPIC_LENGTH",
    "BaseBus",
    "Event",
    "Subscription",
    "TopicMatcher",
    "matches",
    "new_event_id",
    "validate_pattern",
    "validate_queue_name",
    "validate_topic",
]

#: Version of the envelope shape; bumped only on incompatible changes.
EVENT_SCHEMA_VERSION = 1

#: Longest topic or pattern accepted, in UTF-8 bytes.
MAX_TOPIC_LENGTH = 1024

#: Longest queue-group name accepted (``subscribe(..., queue=NAME)``), in
#: UTF-8 bytes.
MAX_QUEUE_NAME_LENGTH = 255


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
    """

    topic: str
    payload: dict[str, Any]
    type: str = ""
    v: int = EVENT_SCHEMA_VERSION
    ts: float = field(default_factory=time.time)
    id: str = field(default_factory=new_event_id)

    def to_dict(self) -> dict[str, Any]:
        """Return the wire-format dict (``v``, ``id``, ``topic``, ``type``, ``ts``, ``payload``)."""
        return {
            "v": self.v,
            "id": self.id,
            "topic": self.topic,
            "type": self.type,
            "ts": self.ts,
            "payload": self.payload,
        }

    @classmethod
    def from_dict(cls, topic: str, data: dict[str, Any]) -> Event:
        """Rebuild an event from a wire-format dict received on *topic*.

        The ``topic`` field inside *data* is ignored on purpose: the transport
        knows the subject the bytes arrived on, and trusting the wire would let
        a misbehaving publisher spoof events onto topics it did not publish to.
        Missing fields take their defaults.
        """
        event_id = data.get("id")
        return cls(
            topic=topic,
            payload=data.get("payload") or {},
            type=data.get("type") or "",
            v=int(data.get("v", EVENT_SCHEMA_VERSION)),
            ts=float(data.get("ts", time.time())),
            id=event_id if isinstance(event_id, str) and event_id else new_event_id(),
        )


# ─── Topic and pattern validation ────────────────────────────────────────────

_TOPIC_SHAPE = re.compile(r"[^\s.*>]+(?:\.[^\s.*>]+)*")
_PATTERN_TOKEN = re.compile(r"[^\s.*>]+|\*")
_VALID_TOPICS: dict[str, None] = {}
_VALID_TOPICS_LIMIT = 4096


def _check_length(kind: str, text: str) -> None:
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"{kind} {text!r} is not valid Unicode text: {exc.reason} at index {exc.start}"
        ) from None
    if size > MAX_TOPIC_LENGTH:
        raise ValueError(
            f"{kind} {text[:40]!r}... is {size} bytes long; the limit is {MAX_TOPIC_LENGTH} bytes"
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


def validate_queue_name(queue: object) -> str:
    """Return *queue* if it can name a queue group, else raise.

    Raises
    ------
    TypeError
        *queue* is not a ``str``.
    ValueError
        *queue* is empty, contains whitespace, or is longer than
        :data:`MAX_QUEUE_NAME_LENGTH` bytes in UTF-8.
    """
    if not isinstance(queue, str):
        raise TypeError(f"queue must be a str, not {type(queue).__name__} ({queue!r})")
    if not queue:
        raise ValueError("queue name must not be empty")
    try:
        size = len(queue.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"queue name {queue!r} is not valid Unicode text: {exc.reason} at index {exc.start}"
        ) from None
    if size > MAX_QUEUE_NAME_LENGTH:
        raise ValueError(
            f"queue name {queue[:40]!r}... is {size} bytes long; "
            f"the limit is {MAX_QUEUE_NAME_LENGTH} bytes"
        )
    if any(ch.isspace() for ch in queue):
        raise ValueError(f"queue name {queue!r} contains whitespace")
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
    ``publish()``, ``publish_nowait()`` and ``subscribe()`` on a closed bus
    raise :class:`RuntimeError`. ``async with bus:`` connects and closes.
    Every transport of this package implements all of it: :class:`ShmBus
    <shmbus.shm.ShmBus>`, :class:`MemoryBus <shmbus.memory.MemoryBus>`,
    :class:`NullBus <shmbus.memory.NullBus>`, :class:`NatsBus
    <shmbus.nats.NatsBus>` and :class:`FallbackBus
    <shmbus.fallback.FallbackBus>`.
    """

    @abc.abstractmethod
    async def connect(self) -> None:
        """Acquire the transport's resources. Idempotent."""

    @abc.abstractmethod
    async def publish(self, topic: str, payload: dict[str, Any], *, event_type: str = "") -> None:
        """Publish *payload* on *topic*, fire-and-forget, at most once.

        Invalid input raises; a transport failure is logged and counted,
        not raised.
        """

    @abc.abstractmethod
    def publish_nowait(self, topic: str, payload: dict[str, Any], *, event_type: str = "") -> None:
        """Publish without awaiting, from any thread (with or without an event
        loop). Same semantics and errors as :meth:`publish`; a transport that
        needs a connection made on a loop (NATS) raises :class:`RuntimeError`
        before :meth:`connect`.
        """

    @abc.abstractmethod
    def subscribe(self, pattern: str) -> QueueSubscription:
        """Return a subscription to events whose topic matches *pattern*.

        ``*`` matches one token, a final ``>`` one or more trailing tokens:
        ``decky.*.traffic``, ``topology.abc.mutation.*``, ``topology.>``.
        The subscription is a :class:`~shmbus.delivery.QueueSubscription`: a
        :class:`Subscription` with a bounded drop-oldest queue and
        :meth:`~shmbus.delivery.QueueSubscription.statistics`.
        """

    @abc.abstractmethod
    def stats(self) -> BusStats:
        """Counters of this instance since it connected (see
        :class:`~shmbus.stats.BusStats`); transports without a given notion
        report 0 for it."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release the transport's resources. Idempotent."""

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
