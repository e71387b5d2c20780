"""The wire encoding of an event envelope: msgpack, validated on the way in,
untrusted on the way out.

Owns
----
* :func:`encode_envelope`: topic, payload and type in, envelope bytes out,
  raising for the caller's mistakes (a payload that is not a dict or not
  msgpack-serialisable is a :class:`TypeError`; an envelope over the size limit
  is a :class:`ValueError`).
* :func:`decode_envelope`: envelope bytes and the topic the transport saw in,
  :class:`~shmbus.contract.Event` out, raising :class:`EnvelopeDecodeError` for
  anything that is not a well-formed envelope. Decoding never trusts the
  ``topic`` inside the bytes.

Every transport uses these two functions, so the in-process bus rejects the
same payloads that the shared-memory and NATS transports do.

Envelope keys
-------------
``v``, ``id``, ``topic``, ``type``, ``ts``, ``payload`` always; ``headers``
(a map of str to str) and ``reply_to`` (a topic) only when the event has
them. An envelope without the optional keys is byte for byte what earlier
versions wrote, and keys a decoder does not know are ignored, so adding
optional keys does not change ``v``. A received ``headers`` or ``reply_to``
is checked as a publish checks it; one that fails makes the envelope
undecodable.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import msgpack

from .contract import (
    EMPTY_HEADERS,
    EVENT_SCHEMA_VERSION,
    Event,
    new_event_id,
    validate_headers,
    validate_reply_to,
)
from .errors import ShmBusError

__all__ = ["EnvelopeDecodeError", "decode_envelope", "encode_envelope", "make_event"]


class EnvelopeDecodeError(ShmBusError, ValueError):
    """Bytes that should hold an envelope do not (corrupt or foreign data).

    A :class:`~shmbus.errors.ShmBusError` (the fault is in the bytes, not in
    the caller) and, as before, a :class:`ValueError`."""


_packers = threading.local()
_now = time.time


def _packer() -> msgpack.Packer:
    # A Packer reuses its internal buffer, which makes it ~25% faster than
    # msgpack.packb; it is not thread-safe, hence one per thread.
    try:
        packer: msgpack.Packer = _packers.packer
    except AttributeError:
        packer = _packers.packer = msgpack.Packer()
    return packer


def encode_envelope(
    topic: str,
    payload: dict[str, Any],
    event_type: str,
    max_event_size: int,
    *,
    event_id: str | None = None,
    ts: float | None = None,
    v: int = EVENT_SCHEMA_VERSION,
    headers: Mapping[str, str] | None = None,
    reply_to: str | None = None,
) -> bytes:
    """Return the msgpack envelope for one event.

    *topic* must already be validated. *event_id* and *ts* default to a fresh
    id and the current time; bridges pass them through to preserve the
    original envelope. *headers* and *reply_to* are checked here
    (:func:`~shmbus.contract.validate_headers`,
    :func:`~shmbus.contract.validate_reply_to`) and written only if set.

    Raises
    ------
    TypeError
        *payload* is not a dict, *event_type* is not a str, the payload
        holds a value msgpack cannot encode, or *headers* or *reply_to* has
        the wrong type.
    ValueError
        The encoded envelope is larger than *max_event_size* bytes, or a
        header or *reply_to* is not valid.
    """
    if payload.__class__ is not dict and not isinstance(payload, dict):
        raise TypeError(f"payload must be a dict, not {type(payload).__name__}")
    try:
        "".join(payload)  # the cheapest check that every key is a str
    except TypeError:
        bad = next(key for key in payload if not isinstance(key, str))
        raise TypeError(
            f"payload keys must be str; payload for topic {topic!r} has key {bad!r} "
            f"of type {type(bad).__name__}"
        ) from None
    if event_type.__class__ is not str and not isinstance(event_type, str):
        raise TypeError(f"event_type must be a str, not {type(event_type).__name__}")
    envelope = {
        "v": v,
        "id": event_id if event_id is not None else new_event_id(),
        "topic": topic,
        "type": event_type,
        "ts": _now() if ts is None else ts,
        "payload": payload,
    }
    if headers:
        envelope["headers"] = validate_headers(headers)
    elif headers is not None and not isinstance(headers, Mapping):
        validate_headers(headers)  # raises the TypeError
    if reply_to is not None:
        envelope["reply_to"] = validate_reply_to(reply_to)
    try:
        packer: msgpack.Packer = _packers.packer
    except AttributeError:
        packer = _packer()
    try:
        data: bytes = packer.pack(envelope)
    except (TypeError, ValueError, OverflowError) as exc:
        # A failed pack leaves the reused buffer half-filled.
        packer.reset()
        raise TypeError(f"payload for topic {topic!r} is not msgpack-serialisable: {exc}") from None
    if len(data) > max_event_size:
        raise ValueError(
            f"event on topic {topic!r} encodes to {len(data)} bytes; "
            f"max_event_size is {max_event_size} bytes"
        )
    return data


# Slot descriptors of the frozen Event: setting through them skips the frozen
# dataclass __setattr__ guard, which makes building a received event about
# twice as fast. Only this module builds events that way, and only fully.
def _slot_setter(name: str) -> Callable[[Event, Any], None]:
    setter: Callable[[Event, Any], None] = vars(Event)[name].__set__
    return setter


_SET_TOPIC = _slot_setter("topic")
_SET_PAYLOAD = _slot_setter("payload")
_SET_TYPE = _slot_setter("type")
_SET_V = _slot_setter("v")
_SET_TS = _slot_setter("ts")
_SET_ID = _slot_setter("id")
_SET_HEADERS = _slot_setter("headers")
_SET_REPLY_TO = _slot_setter("reply_to")
_new_event = object.__new__
#: Keys of an envelope without optional keys: a longer map has some.
_PLAIN_KEYS = 6


def make_event(
    topic: str,
    payload: dict[str, Any],
    type: str,
    v: int,
    ts: float,
    id: str,
    headers: Mapping[str, str] = EMPTY_HEADERS,
    reply_to: str | None = None,
) -> Event:
    """Build an :class:`Event` from already-checked fields (the fast path)."""
    event: Event = _new_event(Event)
    _SET_TOPIC(event, topic)
    _SET_PAYLOAD(event, payload)
    _SET_TYPE(event, type)
    _SET_V(event, v)
    _SET_TS(event, ts)
    _SET_ID(event, id)
    _SET_HEADERS(event, headers)
    _SET_REPLY_TO(event, reply_to)
    return event


def decode_envelope(
    topic: str,
    data: bytes | memoryview,
    max_event_size: int,
    *,
    reply_to: str | None = None,
) -> Event:
    """Decode envelope bytes received on *topic* into an :class:`Event`.

    *reply_to*, if given, is the reply address the transport itself carried
    (a NATS message's reply subject) and wins over the envelope's.

    Raises :class:`EnvelopeDecodeError` if *data* is not a msgpack map with
    the envelope's fields of the right types.
    """
    if len(data) > max_event_size:
        raise EnvelopeDecodeError(f"envelope of {len(data)} bytes exceeds {max_event_size}")
    try:
        envelope = msgpack.unpackb(data, strict_map_key=False)
    except Exception as exc:  # msgpack raises a zoo of types for bad input
        raise EnvelopeDecodeError(f"undecodable envelope on {topic!r}: {exc!r}") from None
    try:
        payload = envelope["payload"]
        ts = envelope["ts"]
        event_id = envelope["id"]
        event_type = envelope.get("type", "")
        v = envelope.get("v", EVENT_SCHEMA_VERSION)
    except (KeyError, TypeError, AttributeError):
        raise EnvelopeDecodeError(
            f"envelope on {topic!r} is a {type(envelope).__name__} without payload, ts and id"
        ) from None
    if (
        payload.__class__ is not dict
        or event_id.__class__ is not str
        or event_type.__class__ is not str
        or v.__class__ is not int
    ):
        raise EnvelopeDecodeError(f"envelope on {topic!r} has fields of the wrong type")
    if ts.__class__ is not float:
        if ts.__class__ is not int:
            raise EnvelopeDecodeError(f"envelope on {topic!r} has a ts of type {type(ts).__name__}")
        ts = float(ts)
    headers: Mapping[str, str] = EMPTY_HEADERS
    if len(envelope) > _PLAIN_KEYS:
        headers, wire_reply_to = _optional_keys(topic, envelope)
        if reply_to is None:
            reply_to = wire_reply_to
    # make_event(), inlined: this runs once per delivered event.
    event: Event = _new_event(Event)
    _SET_TOPIC(event, topic)
    _SET_PAYLOAD(event, payload)
    _SET_TYPE(event, event_type)
    _SET_V(event, v)
    _SET_TS(event, ts)
    _SET_ID(event, event_id)
    _SET_HEADERS(event, headers)
    _SET_REPLY_TO(event, reply_to)
    return event


def _optional_keys(topic: str, envelope: dict[Any, Any]) -> tuple[Mapping[str, str], str | None]:
    """The checked ``headers`` and ``reply_to`` of a received envelope."""
    raw_headers = envelope.get("headers")
    raw_reply_to = envelope.get("reply_to")
    try:
        headers = validate_headers(raw_headers) if raw_headers else EMPTY_HEADERS
        reply_to = validate_reply_to(raw_reply_to) if raw_reply_to is not None else None
    except (TypeError, ValueError) as exc:
        raise EnvelopeDecodeError(f"envelope on {topic!r} has a bad optional key: {exc}") from None
    return headers, reply_to
