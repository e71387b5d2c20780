"""The bus contract itself: the Event envelope, event ids, topic and pattern
validation, NATS-style wildcard matching (shmbus.contract), that every
transport implements all of BaseBus, and the lifecycle states they share."""

from __future__ import annotations

import dataclasses
import inspect
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shmbus import MemoryBus, NullBus, QueueSubscription, ShmBus, lifecycle
from shmbus.contract import (
    EVENT_SCHEMA_VERSION,
    MAX_TOPIC_LENGTH,
    BaseBus,
    Event,
    Subscription,
    matches,
    new_event_id,
    validate_pattern,
    validate_topic,
)
from shmbus.lifecycle import TRANSITIONS, LifecycleState

EVENT_ID = re.compile(r"[0-9a-f]{32}")


# ─── Event ───────────────────────────────────────────────────────────────────


def test_event_is_frozen():
    event = Event("a.b", {"k": 1})
    with pytest.raises(dataclasses.FrozenInstanceError):
        event.topic = "c.d"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        event.payload = {}  # type: ignore[misc]


def test_event_defaults():
    before = time.time()
    event = Event("a.b", {"k": 1})
    after = time.time()
    assert event.type == ""
    assert event.v == EVENT_SCHEMA_VERSION == 1
    assert before <= event.ts <= after
    assert EVENT_ID.fullmatch(event.id)


def test_to_dict_has_exactly_the_wire_fields():
    event = Event("a.b", {"k": [1, 2]}, type="thing.done", v=1, ts=12.5, id="f" * 32)
    assert event.to_dict() == {
        "v": 1,
        "id": "f" * 32,
        "topic": "a.b",
        "type": "thing.done",
        "ts": 12.5,
        "payload": {"k": [1, 2]},
    }


def test_to_dict_from_dict_round_trip_gives_an_equal_event():
    event = Event("a.b.c", {"k": {"nested": [1, "x", None]}}, type="t")
    assert Event.from_dict(event.topic, event.to_dict()) == event


def test_from_dict_takes_the_topic_from_the_argument_not_the_wire():
    wire = Event("spoofed.topic", {"k": 1}).to_dict()
    event = Event.from_dict("real.topic", wire)
    assert event.topic == "real.topic"


def test_from_dict_ignores_a_missing_wire_topic():
    event = Event.from_dict("real.topic", {"payload": {"k": 1}})
    assert event.topic == "real.topic"
    assert event.payload == {"k": 1}


def test_from_dict_fills_every_missing_field_with_its_default():
    before = time.time()
    event = Event.from_dict("a.b", {})
    after = time.time()
    assert event.payload == {}
    assert event.type == ""
    assert event.v == EVENT_SCHEMA_VERSION
    assert before <= event.ts <= after
    assert EVENT_ID.fullmatch(event.id)


@pytest.mark.parametrize("bad_id", [None, "", 123, b"f" * 32])
def test_from_dict_replaces_an_unusable_id_with_a_fresh_one(bad_id):
    event = Event.from_dict("a.b", {"id": bad_id})
    assert EVENT_ID.fullmatch(event.id)


def test_from_dict_keeps_the_wire_fields_it_is_given():
    event = Event.from_dict(
        "a.b", {"payload": {"k": 1}, "type": "t", "v": 3, "ts": 7, "id": "0" * 32}
    )
    assert (event.payload, event.type, event.v, event.ts, event.id) == (
        {"k": 1},
        "t",
        3,
        7.0,
        "0" * 32,
    )
    assert isinstance(event.ts, float)


# ─── Event ids ───────────────────────────────────────────────────────────────


def test_event_ids_are_32_lowercase_hex_characters():
    for _ in range(1000):
        assert EVENT_ID.fullmatch(new_event_id())


def test_event_ids_are_unique_across_many_calls():
    ids = [new_event_id() for _ in range(100_000)]
    assert len(set(ids)) == len(ids)


def test_default_event_ids_are_unique():
    ids = {Event("a", {}).id for _ in range(10_000)}
    assert len(ids) == 10_000


def test_event_ids_are_unique_across_threads():
    results: list[list[str]] = [[] for _ in range(4)]

    def draw(out: list[str]) -> None:
        out.extend(new_event_id() for _ in range(20_000))

    threads = [threading.Thread(target=draw, args=(out,)) for out in results]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    ids = [i for out in results for i in out]
    assert len(set(ids)) == len(ids) == 80_000


def test_event_ids_in_a_forked_child_differ_from_the_parents():
    """The child must not continue the parent's id sequence (same prefix and
    counter would give duplicate ids)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 1
        try:
            os.close(read_end)
            ids = [new_event_id() for _ in range(1000)]
            os.write(write_end, "\n".join(ids).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    chunks = []
    with os.fdopen(read_end, "rb") as pipe:
        while chunk := pipe.read():
            chunks.append(chunk)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    child_ids = b"".join(chunks).decode().split("\n")
    parent_ids = [new_event_id() for _ in range(1000)]
    assert len(child_ids) == 1000
    assert all(EVENT_ID.fullmatch(i) for i in child_ids)
    assert not set(child_ids) & set(parent_ids)
    assert {i[:16] for i in child_ids}.isdisjoint({i[:16] for i in parent_ids})


def test_event_ids_in_a_new_interpreter_differ_from_ours():
    code = "from shmbus.contract import new_event_id\nfor _ in range(1000): print(new_event_id())"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    child_ids = result.stdout.split()
    ours = [new_event_id() for _ in range(1000)]
    assert len(child_ids) == 1000
    assert all(EVENT_ID.fullmatch(i) for i in child_ids)
    assert not set(child_ids) & set(ours)


# ─── matches(): the NATS semantics table ─────────────────────────────────────

MATCH_TABLE = [
    # literal tokens
    ("a", "a", True),
    ("a", "b", False),
    ("a", "a.b", False),
    ("a.b", "a", False),
    ("a.b", "a.b", True),
    ("a.b", "a.c", False),
    ("ab", "a", False),
    ("a", "ab", False),
    ("A", "a", False),
    ("é.x", "é.x", True),
    # '*' is exactly one token
    ("*", "a", True),
    ("*", "a.b", False),
    ("a.*", "a.b", True),
    ("a.*", "a", False),
    ("a.*", "a.b.c", False),
    ("*.b", "a.b", True),
    ("*.b", "a.c", False),
    ("*.*", "a.b", True),
    ("*.*", "a", False),
    ("a.*.c", "a.x.c", True),
    ("a.*.c", "a.x.y.c", False),
    ("a.*.c", "a.c", False),
    # '>' is one or more trailing tokens
    (">", "a", True),
    (">", "a.b.c", True),
    ("a.>", "a", False),
    ("a.>", "a.b", True),
    ("a.>", "a.b.c", True),
    ("a.>", "b.c", False),
    ("a.>", "ab.c", False),
    ("a.b.>", "a.b.c.d.e", True),
    ("a.b.>", "a.b", False),
    ("*.>", "a", False),
    ("*.>", "a.b", True),
    ("a.*.>", "a.b", False),
    ("a.*.>", "a.b.c", True),
    ("a.*.>", "a.b.c.d", True),
]


@pytest.mark.parametrize(("pattern", "topic", "expected"), MATCH_TABLE)
def test_matches_follows_nats_wildcard_semantics(pattern, topic, expected):
    assert matches(pattern, topic) is expected


@pytest.mark.parametrize(
    "pattern",
    ["", "a.>.b", ">.a", "a..b", ".a", "a.", "a b", "a\tb", "a*", "*a", "a.b*", "a>", "a.>>", "**"],
)
def test_matches_rejects_an_invalid_pattern(pattern):
    with pytest.raises(ValueError):
        matches(pattern, "a.b")


@pytest.mark.parametrize("pattern", [None, b"a.b", 1, ["a"]])
def test_matches_rejects_a_non_str_pattern(pattern):
    with pytest.raises(TypeError):
        matches(pattern, "a.b")


@pytest.mark.parametrize(("pattern", "topic"), [("a.*", "a."), ("*", ""), ("*.b", ".b")])
def test_star_never_matches_an_empty_token(pattern, topic):
    try:
        result = matches(pattern, topic)
    except ValueError:
        return  # rejecting the invalid topic is fine too
    assert result is False


# ─── matches() against a reference implementation ────────────────────────────


def reference_matches(pattern: str, topic: str) -> bool:
    """NATS semantics as a regular expression, for valid patterns and topics."""
    parts = []
    for token in pattern.split("."):
        if token == "*":
            parts.append(r"[^.]+")
        elif token == ">":
            parts.append(r"[^.]+(?:\.[^.]+)*")
        else:
            parts.append(re.escape(token))
    return re.fullmatch(r"\.".join(parts), topic) is not None


TOKENS = st.sampled_from(["a", "b", "c", "ab", "é", "x-1", "_", "0"])
TOPICS = st.lists(TOKENS, min_size=1, max_size=5).map(".".join)


@st.composite
def patterns(draw: st.DrawFn) -> str:
    tokens = draw(st.lists(st.one_of(TOKENS, st.just("*")), min_size=0, max_size=5))
    if not tokens or draw(st.booleans()):
        tokens.append(">")
    return ".".join(tokens)


@st.composite
def patterns_like(draw: st.DrawFn, topic: str) -> str:
    """A pattern derived from *topic*, so that many examples do match."""
    tokens = ["*" if draw(st.booleans()) else token for token in topic.split(".")]
    if draw(st.booleans()):
        cut = draw(st.integers(min_value=0, max_value=len(tokens)))
        tokens = [*tokens[:cut], ">"]
    return ".".join(tokens)


@settings(max_examples=300, deadline=None)
@given(pattern=patterns(), topic=TOPICS)
def test_matches_agrees_with_reference_for_random_patterns(pattern, topic):
    assert matches(pattern, topic) is reference_matches(pattern, topic)


@settings(max_examples=300, deadline=None)
@given(data=st.data(), topic=TOPICS, other=TOPICS)
def test_matches_agrees_with_reference_for_patterns_near_the_topic(data, topic, other):
    pattern = data.draw(patterns_like(topic))
    assert matches(pattern, topic) is reference_matches(pattern, topic)
    assert matches(pattern, other) is reference_matches(pattern, other)


@given(topic=TOPICS)
def test_every_topic_matches_itself_and_gt(topic):
    assert matches(topic, topic)
    assert matches(">", topic)


# ─── validate_topic ──────────────────────────────────────────────────────────


@pytest.mark.parametrize("topic", ["a", "a.b", "a-b_c.0.é", "x" * MAX_TOPIC_LENGTH, "é" * 512])
def test_validate_topic_returns_a_valid_topic(topic):
    assert validate_topic(topic) == topic


@pytest.mark.parametrize(
    "topic", ["a..b", ".a", "a.", "a b", " a", "a\n", "a.*", "a.>", "*", ">", "a*b", "a>b"]
)
def test_validate_topic_rejects_a_bad_value_and_names_it(topic):
    with pytest.raises(ValueError) as info:
        validate_topic(topic)
    assert repr(topic) in str(info.value)


def test_validate_topic_rejects_an_empty_topic():
    with pytest.raises(ValueError, match="empty"):
        validate_topic("")


@pytest.mark.parametrize("topic", ["x" * (MAX_TOPIC_LENGTH + 1), "é" * 513])
def test_validate_topic_limit_is_in_utf8_bytes_and_the_message_names_it(topic):
    with pytest.raises(ValueError) as info:
        validate_topic(topic)
    message = str(info.value)
    assert str(MAX_TOPIC_LENGTH) in message
    assert str(len(topic.encode())) in message
    assert repr(topic[:20])[:-1] in message  # the (possibly shortened) value


@pytest.mark.parametrize("topic", [None, b"a.b", 1, ["a"]])
def test_validate_topic_rejects_a_non_str_with_type_error_naming_the_type(topic):
    with pytest.raises(TypeError, match=type(topic).__name__):
        validate_topic(topic)


def test_validate_topic_checks_str_subclasses_too():
    """The cache of valid topics must not make a bad value look valid."""

    class Topic(str):
        pass

    validate_topic("cached.topic")
    assert validate_topic(Topic("cached.topic")) == "cached.topic"
    with pytest.raises(ValueError):
        validate_topic(Topic("bad..topic"))


def test_validate_topic_rejects_a_topic_that_is_not_valid_unicode():
    with pytest.raises(ValueError):
        validate_topic("a.\ud800")


def reference_valid_topic(text: str) -> bool:
    if not text or len(text.encode("utf-8")) > MAX_TOPIC_LENGTH:
        return False
    return all(
        token and not any(ch.isspace() or ch in "*>" for ch in token) for token in text.split(".")
    )


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from("ab.*> \t\u00a0\u2003é"), max_size=12) | st.text())
def test_validate_topic_accepts_exactly_the_reference_topics(text):
    if reference_valid_topic(text):
        assert validate_topic(text) == text
    else:
        with pytest.raises(ValueError):
            validate_topic(text)


# ─── validate_pattern ────────────────────────────────────────────────────────


@pytest.mark.parametrize(
    "pattern", ["a", ">", "*", "a.*", "a.>", "*.*.>", "a.*.c", "x" * MAX_TOPIC_LENGTH]
)
def test_validate_pattern_returns_a_valid_pattern(pattern):
    assert validate_pattern(pattern) == pattern


@pytest.mark.parametrize(
    "pattern", ["a.>.b", ">.a", "a..b", ".a", "a.", "a b", " a", "a*", "*a", "a>", "a.b>"]
)
def test_validate_pattern_rejects_a_bad_value_and_names_it(pattern):
    with pytest.raises(ValueError) as info:
        validate_pattern(pattern)
    assert repr(pattern) in str(info.value)


def test_validate_pattern_rejects_an_empty_pattern():
    with pytest.raises(ValueError, match="empty"):
        validate_pattern("")


def test_validate_pattern_length_message_names_the_limit():
    pattern = "x" * (MAX_TOPIC_LENGTH + 1)
    with pytest.raises(ValueError) as info:
        validate_pattern(pattern)
    assert str(MAX_TOPIC_LENGTH) in str(info.value)
    assert str(MAX_TOPIC_LENGTH + 1) in str(info.value)


@pytest.mark.parametrize("pattern", [None, b"a.>", 1.5, ("a",)])
def test_validate_pattern_rejects_a_non_str_with_type_error_naming_the_type(pattern):
    with pytest.raises(TypeError, match=type(pattern).__name__):
        validate_pattern(pattern)


@given(pattern=patterns())
def test_generated_patterns_are_valid(pattern):
    assert validate_pattern(pattern) == pattern


@given(topic=TOPICS)
def test_every_valid_topic_is_also_a_valid_pattern(topic):
    assert validate_topic(topic) == validate_pattern(topic) == topic


def test_the_contracts_topic_limit_is_the_one_the_segment_layout_reserves_room_for():
    from shmbus._core.layout import MAX_TOPIC_BYTES

    assert MAX_TOPIC_LENGTH == MAX_TOPIC_BYTES


# ─── Every transport implements the whole contract ───────────────────────────


def _transports() -> list[type[BaseBus]]:
    from shmbus.fallback import FallbackBus
    from shmbus.nats import NatsBus

    return [ShmBus, MemoryBus, NullBus, NatsBus, FallbackBus]


def _parameters(function: Callable[..., object]) -> list[tuple[str, object, object]]:
    """Name, kind and default of each parameter (annotations aside)."""
    signature = inspect.signature(function)
    return [(p.name, p.kind, p.default) for p in signature.parameters.values()]


def test_the_bus_contract_declares_publish_nowait_stats_and_request():
    assert BaseBus.__abstractmethods__ == {
        "connect",
        "publish",
        "publish_nowait",
        "subscribe",
        "request",
        "stats",
        "close",
    }


def test_reply_is_one_method_of_the_contract_that_no_transport_overrides():
    assert not getattr(BaseBus.reply, "__isabstractmethod__", False)
    assert all(transport.reply is BaseBus.reply for transport in _transports())


@pytest.mark.parametrize("method", sorted(BaseBus.__abstractmethods__))
@pytest.mark.parametrize("transport", _transports(), ids=lambda cls: cls.__name__)
def test_every_transport_implements_each_contract_method_with_its_signature(transport, method):
    implementation = getattr(transport, method)
    assert not getattr(implementation, "__isabstractmethod__", False)
    assert _parameters(implementation) == _parameters(getattr(BaseBus, method))


def test_subscribe_is_typed_to_return_the_exported_subscription_type():
    import typing

    import shmbus.contract

    hints = typing.get_type_hints(
        BaseBus.subscribe, {**vars(shmbus.contract), "QueueSubscription": QueueSubscription}
    )
    assert hints["return"] is QueueSubscription
    assert issubclass(QueueSubscription, Subscription)
    assert callable(QueueSubscription.statistics)


# ─── Life cycle ──────────────────────────────────────────────────────────────


def test_the_lifecycle_docstring_table_lists_exactly_the_allowed_transitions():
    table = re.findall(r"^``(\w+)``\s+``(\w+)``", lifecycle.__doc__ or "", re.MULTILINE)
    assert table, "no transition table in shmbus.lifecycle's docstring"
    documented = {(LifecycleState[a], LifecycleState[b]) for a, b in table}
    allowed = {(a, b) for a, targets in TRANSITIONS.items() for b in targets}
    assert documented == allowed
    assert set(TRANSITIONS) == set(LifecycleState)


def test_a_lifecycle_state_reads_as_its_name_in_text():
    assert [str(state) for state in LifecycleState] == ["new", "open", "closed", "forked"]
    assert f"{LifecycleState.OPEN}" == "open"


async def test_the_shm_bus_goes_new_open_closed_through_the_lifecycle_states(bus_name):
    bus = ShmBus(bus_name, capacity=1 << 20, max_event_size=64 * 1024)
    seen = [bus._state]
    await bus.connect()
    seen.append(bus._state)
    await bus.close()
    seen.append(bus._state)
    assert seen == [LifecycleState.NEW, LifecycleState.OPEN, LifecycleState.CLOSED]
    assert all(type(state) is LifecycleState for state in seen)


async def test_the_nats_transports_use_the_lifecycle_states(bus_name):
    from shmbus.fallback import FallbackBus
    from shmbus.nats import NatsBus

    bus = FallbackBus(NatsBus(), ShmBus(bus_name))
    before = (bus._state, bus.primary._state)
    await bus.close()  # never connected: NEW -> CLOSED, no server needed
    after = (bus._state, bus.primary._state)
    assert before == (LifecycleState.NEW, LifecycleState.NEW)
    assert after == (LifecycleState.CLOSED, LifecycleState.CLOSED)
    assert all(type(state) is LifecycleState for state in before + after)
