"""Per-event headers on every transport: what a publisher sets, each
subscriber reads; bad headers are refused with a clear error and leave the
bus working. (The wire side is in tests/test_codec.py, the bridge in
tests/test_bridge.py.)"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

import pytest
from awaiting import take
from every_transport import ready

from shmbus import BaseBus, Event
from shmbus.contract import EMPTY_HEADERS, MAX_HEADERS_SIZE, validate_headers

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


async def test_a_subscriber_reads_the_traceparent_the_publisher_set(transport: BaseBus) -> None:
    async with transport.subscribe("traced.>") as sub:
        await ready(transport)
        await transport.publish("traced.call", {"n": 1}, headers={"traceparent": TRACEPARENT})
        [event] = await take(sub, 1)
    assert dict(event.headers) == {"traceparent": TRACEPARENT}
    assert event.payload == {"n": 1}


async def test_every_subscriber_gets_every_header(transport: BaseBus) -> None:
    headers = {"traceparent": TRACEPARENT, "tracestate": "congo=t61rcWkgMzE", "X-Tenant": "é 1"}
    first, second = transport.subscribe("h.*"), transport.subscribe("h.>")
    await ready(transport)
    await transport.publish("h.one", {}, headers=headers)
    [a], [b] = await take(first, 1), await take(second, 1)
    assert dict(a.headers) == dict(b.headers) == headers
    await first.aclose()
    await second.aclose()


async def test_an_event_published_without_headers_has_empty_headers(transport: BaseBus) -> None:
    async with transport.subscribe("plain") as sub:
        await ready(transport)
        await transport.publish("plain", {})
        [event] = await take(sub, 1)
    assert dict(event.headers) == {}
    assert event.reply_to is None


async def test_publish_nowait_from_a_thread_carries_headers(transport: BaseBus) -> None:
    async with transport.subscribe("threaded") as sub:
        await ready(transport)
        thread = threading.Thread(
            target=transport.publish_nowait,
            args=("threaded", {"t": 1}),
            kwargs={"headers": {"traceparent": TRACEPARENT}},
        )
        thread.start()
        [event] = await take(sub, 1)
        thread.join()
    assert event.headers == {"traceparent": TRACEPARENT}


async def test_headers_of_the_size_limit_are_delivered(transport: BaseBus) -> None:
    value = "v" * (MAX_HEADERS_SIZE - len("big"))
    async with transport.subscribe("big.headers") as sub:
        await ready(transport)
        await transport.publish("big.headers", {}, headers={"big": value})
        [event] = await take(sub, 1)
    assert event.headers == {"big": value}


async def test_headers_may_be_any_mapping(transport: BaseBus) -> None:
    class Headers(Mapping[str, str]):
        def __getitem__(self, key: str) -> str:
            if key != "k":
                raise KeyError(key)
            return "v"

        def __iter__(self):  # type: ignore[no-untyped-def]
            return iter(["k"])

        def __len__(self) -> int:
            return 1

    async with transport.subscribe("mapping") as sub:
        await ready(transport)
        await transport.publish("mapping", {}, headers=Headers())
        [event] = await take(sub, 1)
    assert event.headers == {"k": "v"}


# ─── Bad headers ─────────────────────────────────────────────────────────────


BAD_TYPES: list[tuple[Any, list[str]]] = [
    ([("traceparent", TRACEPARENT)], ["headers must be a mapping", "list"]),
    ("traceparent", ["headers must be a mapping", "str"]),
    ({1: "x"}, ["header names must be str", "int", "1"]),
    ({b"name": "x"}, ["header names must be str", "bytes"]),
    ({"n": 1}, ["header 'n'", "str value", "int"]),
    ({"n": None}, ["header 'n'", "str value", "NoneType"]),
    ({"n": ["a", "b"]}, ["header 'n'", "str value", "list"]),
]

BAD_VALUES: list[tuple[dict[str, str], list[str]]] = [
    ({"": "x"}, ["header name ''", "printable ASCII", "at least one character"]),
    ({"a:b": "x"}, ["header name 'a:b'", "without ':'"]),
    ({"a b": "x"}, ["header name 'a b'", "spaces"]),
    ({"naïve": "x"}, ["header name 'naïve'", "ASCII"]),
    ({"tab\t": "x"}, ["header name 'tab\\t'"]),
    ({"n": "line\r\nX-Injected: 1"}, ["header 'n'", "line break"]),
    ({"n": "end\n"}, ["header 'n'", "line break"]),
    ({"big": "v" * MAX_HEADERS_SIZE}, [f"{MAX_HEADERS_SIZE + 3} bytes", f"{MAX_HEADERS_SIZE}"]),
    ({"n": "\udcff"}, ["header 'n'", "not valid Unicode"]),
]


@pytest.mark.parametrize(("headers", "words"), BAD_TYPES)
async def test_headers_of_the_wrong_type_raise_type_error_naming_them(
    with_null: BaseBus, headers: Any, words: list[str]
) -> None:
    with pytest.raises(TypeError) as info:
        await with_null.publish("topic", {}, headers=headers)
    assert all(word in str(info.value) for word in words), str(info.value)
    with pytest.raises(TypeError):
        with_null.publish_nowait("topic", {}, headers=headers)


@pytest.mark.parametrize(("headers", "words"), BAD_VALUES)
async def test_bad_header_names_or_values_raise_value_error_naming_the_rule(
    with_null: BaseBus, headers: dict[str, str], words: list[str]
) -> None:
    with pytest.raises(ValueError) as info:
        await with_null.publish("topic", {}, headers=headers)
    assert all(word in str(info.value) for word in words), str(info.value)


async def test_a_rejected_header_publishes_nothing_and_the_bus_keeps_working(
    transport: BaseBus,
) -> None:
    async with transport.subscribe("after.*") as sub:
        await ready(transport)
        with pytest.raises(ValueError):
            await transport.publish("after.bad", {}, headers={"bad name": "x"})
        await transport.publish("after.good", {}, headers={"ok": "1"})
        [event] = await take(sub, 1)
    assert (event.topic, dict(event.headers)) == ("after.good", {"ok": "1"})


# ─── The contract's helpers ──────────────────────────────────────────────────


def test_validate_headers_returns_a_plain_copy() -> None:
    given = {"a": "1"}
    copy = validate_headers(given)
    given["b"] = "2"
    assert copy == {"a": "1"} and type(copy) is dict


def test_validate_headers_takes_none_as_no_headers() -> None:
    assert validate_headers(None) == {}


def test_the_limit_counts_utf8_bytes_of_names_and_values() -> None:
    fits = {"k": "é" * ((MAX_HEADERS_SIZE - 1) // 2)}
    assert validate_headers(fits) == fits
    with pytest.raises(ValueError, match=f"the limit is {MAX_HEADERS_SIZE} bytes"):
        validate_headers({"k": "é" * ((MAX_HEADERS_SIZE - 1) // 2 + 1)})


def test_an_events_default_headers_are_empty_and_read_only() -> None:
    event = Event("a", {})
    assert event.headers is EMPTY_HEADERS
    with pytest.raises(TypeError):
        event.headers["x"] = "y"  # type: ignore[index]


def test_to_dict_carries_headers_and_reply_to_only_when_set() -> None:
    plain = Event("a", {}, ts=1.0, id="0" * 32)
    rich = Event("a", {}, ts=1.0, id="0" * 32, headers={"k": "v"}, reply_to="_INBOX.x.1")
    assert set(plain.to_dict()) == {"v", "id", "topic", "type", "ts", "payload"}
    assert rich.to_dict() == {**plain.to_dict(), "headers": {"k": "v"}, "reply_to": "_INBOX.x.1"}


def test_from_dict_round_trips_headers_and_reply_to() -> None:
    event = Event("a.b", {"k": 1}, headers={"traceparent": TRACEPARENT}, reply_to="_INBOX.r.2")
    assert Event.from_dict("a.b", event.to_dict()) == event


def test_from_dict_ignores_keys_it_does_not_know() -> None:
    event = Event("a.b", {"k": 1})
    assert Event.from_dict("a.b", {**event.to_dict(), "future_key": [1, 2]}) == event


def test_from_dict_refuses_bad_headers_as_a_publish_would() -> None:
    with pytest.raises(ValueError, match="header name 'a b'"):
        Event.from_dict("a", {"headers": {"a b": "x"}})
