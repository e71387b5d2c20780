"""The wire codec: encode_envelope validates the caller's input, decode_envelope
trusts nothing it reads (shmbus.codec)."""

from __future__ import annotations

import time

import msgpack
import pytest

from shmbus.codec import EnvelopeDecodeError, decode_envelope, encode_envelope
from shmbus.contract import EVENT_SCHEMA_VERSION
from shmbus.errors import ShmBusError

LIMIT = 64 * 1024
#: Marks a field to leave out of a hand-made envelope.
_MISSING = object()


def envelope(**fields: object) -> bytes:
    """Raw msgpack of a well-formed envelope, with *fields* overridden."""
    base: dict[str, object] = {
        "v": 1,
        "id": "a" * 32,
        "topic": "wire.topic",
        "type": "t",
        "ts": 1.5,
        "payload": {"k": 1},
    }
    base.update(fields)
    return msgpack.packb({k: v for k, v in base.items() if v is not _MISSING})


# ─── Round trip ──────────────────────────────────────────────────────────────


def test_encode_decode_round_trip_keeps_every_field():
    payload = {"s": "é", "i": -3, "f": 0.25, "b": b"\x00\xff", "l": [1, [2]], "d": {"x": None}}
    data = encode_envelope("a.b", payload, "thing.done", LIMIT, event_id="0" * 32, ts=12.5)
    event = decode_envelope("a.b", data, LIMIT)
    assert event.topic == "a.b"
    assert event.payload == payload
    assert event.type == "thing.done"
    assert event.v == EVENT_SCHEMA_VERSION
    assert event.ts == 12.5
    assert event.id == "0" * 32


def test_encode_fills_in_a_fresh_id_and_the_current_time():
    before = time.time()
    first = decode_envelope("a", encode_envelope("a", {}, "", LIMIT), LIMIT)
    second = decode_envelope("a", encode_envelope("a", {}, "", LIMIT), LIMIT)
    after = time.time()
    assert first.id != second.id
    assert len(first.id) == 32
    assert before <= first.ts <= second.ts <= after


def test_encode_accepts_an_empty_payload():
    assert decode_envelope("a", encode_envelope("a", {}, "", LIMIT), LIMIT).payload == {}


def test_decode_takes_the_topic_from_the_argument_not_the_wire():
    data = encode_envelope("spoofed.topic", {"k": 1}, "", LIMIT)
    assert decode_envelope("real.topic", data, LIMIT).topic == "real.topic"


def test_decode_accepts_a_memoryview():
    data = encode_envelope("a", {"k": 1}, "", LIMIT)
    assert decode_envelope("a", memoryview(data), LIMIT).payload == {"k": 1}


def test_decode_accepts_an_integer_timestamp_as_float():
    event = decode_envelope("a", envelope(ts=7), LIMIT)
    assert event.ts == 7.0
    assert isinstance(event.ts, float)


def test_decode_defaults_missing_type_and_version():
    event = decode_envelope("a", envelope(type=_MISSING, v=_MISSING), LIMIT)
    assert event.type == ""
    assert event.v == EVENT_SCHEMA_VERSION


# ─── encode: the caller's mistakes ───────────────────────────────────────────


@pytest.mark.parametrize("payload", [[1, 2], "text", None, 1, (("a", 1),), b"x"])
def test_encode_rejects_a_payload_that_is_not_a_dict(payload):
    with pytest.raises(TypeError, match=type(payload).__name__):
        encode_envelope("a.b", payload, "", LIMIT)


@pytest.mark.parametrize(
    "payload",
    [{"o": object()}, {"s": {1, 2}}, {"big": 2**64}, {"small": -(2**63) - 1}, {"n": [1, object()]}],
    ids=["object", "set", "int-too-large", "int-too-small", "nested-object"],
)
def test_encode_rejects_an_unserialisable_payload_naming_the_topic(payload):
    with pytest.raises(TypeError) as info:
        encode_envelope("orders.created", payload, "", LIMIT)
    assert "'orders.created'" in str(info.value)


@pytest.mark.parametrize("event_type", [None, 1, b"t"])
def test_encode_rejects_an_event_type_that_is_not_a_str(event_type):
    with pytest.raises(TypeError):
        encode_envelope("a", {}, event_type, LIMIT)


def test_encode_rejects_an_envelope_over_the_limit_naming_both_sizes():
    payload = {"blob": "x" * 300}
    size = len(encode_envelope("a.b", payload, "", LIMIT, event_id="0" * 32, ts=0.0))
    with pytest.raises(ValueError) as info:
        encode_envelope("a.b", payload, "", size - 1, event_id="0" * 32, ts=0.0)
    message = str(info.value)
    assert str(size) in message
    assert str(size - 1) in message
    assert "'a.b'" in message


def test_encode_accepts_an_envelope_of_exactly_the_limit():
    payload = {"blob": "x" * 300}
    size = len(encode_envelope("a.b", payload, "", LIMIT, event_id="0" * 32, ts=0.0))
    data = encode_envelope("a.b", payload, "", size, event_id="0" * 32, ts=0.0)
    assert len(data) == size


def test_a_failed_encode_does_not_corrupt_the_next_envelope():
    """The encoder reuses a buffer; a payload that fails half-way through must
    not leave bytes behind in it."""
    with pytest.raises(TypeError):
        encode_envelope("a", {"first": "ok", "then": object()}, "", LIMIT)
    data = encode_envelope("a", {"k": 1}, "", LIMIT)
    assert decode_envelope("a", data, LIMIT).payload == {"k": 1}
    assert msgpack.unpackb(data)["payload"] == {"k": 1}


# ─── decode: untrusted bytes ─────────────────────────────────────────────────


@pytest.mark.parametrize(
    "data",
    [b"", b"\xc1", b"\x92\x01", b"\xdf\xff\xff\xff\xff", b"garbage that is not msgpack \xc1"],
    ids=["empty", "reserved-byte", "truncated-array", "truncated-map", "text"],
)
def test_decode_rejects_garbage(data):
    with pytest.raises(EnvelopeDecodeError):
        decode_envelope("a", data, LIMIT)


@pytest.mark.parametrize("caught", [ShmBusError, ValueError], ids=lambda cls: cls.__name__)
def test_a_decode_error_is_caught_as_a_shmbus_error_and_as_a_value_error(caught):
    """The fault is in the bytes, not the caller's: part of the shmbus error
    tree, and still the ValueError it always was."""
    with pytest.raises(caught):
        decode_envelope("a", b"\xc1", LIMIT)


def test_decode_rejects_trailing_bytes_after_the_envelope():
    with pytest.raises(EnvelopeDecodeError):
        decode_envelope("a", envelope() + b"\x00", LIMIT)


@pytest.mark.parametrize("value", [[1, 2], "text", 1, None, b"bytes"])
def test_decode_rejects_a_non_map(value):
    with pytest.raises(EnvelopeDecodeError):
        decode_envelope("a", msgpack.packb(value), LIMIT)


@pytest.mark.parametrize(
    "fields",
    [
        {"payload": [1]},
        {"payload": None},
        {"payload": _MISSING},
        {"type": 1},
        {"type": None},
        {"v": "1"},
        {"v": 1.0},
        {"v": True},
        {"ts": "now"},
        {"ts": None},
        {"ts": _MISSING},
        {"id": 123},
        {"id": None},
        {"id": _MISSING},
    ],
    ids=lambda fields: "-".join(f"{k}={v!r}" for k, v in fields.items()),
)
def test_decode_rejects_fields_of_the_wrong_type(fields):
    with pytest.raises(EnvelopeDecodeError):
        decode_envelope("a", envelope(**fields), LIMIT)


def test_decode_rejects_data_longer_than_the_limit():
    data = envelope(payload={"blob": "x" * 200})
    with pytest.raises(EnvelopeDecodeError):
        decode_envelope("a", data, len(data) - 1)


def test_envelope_decode_error_is_a_value_error():
    assert issubclass(EnvelopeDecodeError, ValueError)


# ─── Optional keys: headers and reply_to ─────────────────────────────────────

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def test_an_envelope_without_headers_or_reply_to_has_exactly_the_six_keys():
    """What every earlier version wrote, byte for byte: the envelope version
    did not change for the optional keys."""
    data = encode_envelope("a", {"k": 1}, "t", LIMIT, event_id="0" * 32, ts=1.5, headers={})
    assert data == msgpack.packb(
        {"v": 1, "id": "0" * 32, "topic": "a", "type": "t", "ts": 1.5, "payload": {"k": 1}}
    )


def test_headers_and_reply_to_are_added_as_keys_and_the_six_keys_stay_as_they_were():
    data = encode_envelope(
        "a",
        {"k": 1},
        "t",
        LIMIT,
        event_id="0" * 32,
        ts=1.5,
        headers={"traceparent": TRACEPARENT},
        reply_to="_INBOX.abc.1",
    )
    wire = msgpack.unpackb(data)
    assert wire.pop("headers") == {"traceparent": TRACEPARENT}
    assert wire.pop("reply_to") == "_INBOX.abc.1"
    assert wire == {
        "v": 1,
        "id": "0" * 32,
        "topic": "a",
        "type": "t",
        "ts": 1.5,
        "payload": {"k": 1},
    }


def test_encode_decode_round_trip_keeps_headers_and_reply_to():
    data = encode_envelope(
        "a", {}, "", LIMIT, headers={"traceparent": TRACEPARENT}, reply_to="_INBOX.abc.1"
    )
    event = decode_envelope("a", data, LIMIT)
    assert (dict(event.headers), event.reply_to) == ({"traceparent": TRACEPARENT}, "_INBOX.abc.1")


def test_a_reply_to_given_by_the_transport_wins_over_the_envelopes():
    data = encode_envelope("a", {}, "", LIMIT, reply_to="_INBOX.wire.1")
    assert decode_envelope("a", data, LIMIT, reply_to="_INBOX.nats.2").reply_to == "_INBOX.nats.2"


def test_decode_ignores_keys_it_does_not_know():
    event = decode_envelope("a", envelope(future={"x": [1]}, also=2), LIMIT)
    assert (event.payload, dict(event.headers), event.reply_to) == ({"k": 1}, {}, None)


@pytest.mark.parametrize(
    "fields",
    [
        {"headers": [["k", "v"]]},
        {"headers": {"k": 1}},
        {"headers": {1: "v"}},
        {"headers": {"bad name": "v"}},
        {"headers": {"k": "line\nbreak"}},
        {"headers": {"k": "v" * 20_000}},
        {"reply_to": 7},
        {"reply_to": "has space"},
        {"reply_to": "_INBOX.*"},
        {"reply_to": ""},
    ],
    ids=lambda fields: "-".join(f"{k}={str(v)[:20]!r}" for k, v in fields.items()),
)
def test_decode_rejects_bad_optional_keys(fields):
    with pytest.raises(EnvelopeDecodeError, match="bad optional key"):
        decode_envelope("a", envelope(**fields), LIMIT)


@pytest.mark.parametrize("reply_to", [7, "two words", "a.>"])
def test_encode_rejects_a_bad_reply_to_naming_it(reply_to):
    with pytest.raises((TypeError, ValueError), match="reply_to"):
        encode_envelope("a", {}, "", LIMIT, reply_to=reply_to)


def test_the_headers_count_in_the_size_limit():
    plain = len(encode_envelope("a", {}, "", LIMIT, event_id="0" * 32, ts=0.0))
    with pytest.raises(ValueError, match=f"max_event_size is {plain + 10} bytes"):
        encode_envelope(
            "a", {}, "", plain + 10, event_id="0" * 32, ts=0.0, headers={"k": "v" * 20}
        )
