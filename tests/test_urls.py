"""get_bus(): bus URLs, their options and their errors."""

from __future__ import annotations

import pytest

from shmbus import MemoryBus, NullBus, ShmBus
from shmbus.fallback import FallbackBus
from shmbus.nats import NatsBus
from shmbus.urls import get_bus


def test_shm_url_builds_an_unconnected_shm_bus_with_its_options() -> None:
    bus = get_bus("shm://orders?capacity=2097152&max_event_size=4096&mode=0o660&queue_size=7")
    assert isinstance(bus, ShmBus)
    assert (bus.name, bus.max_event_size, bus.queue_size) == ("orders", 4096, 7)
    assert bus._options.capacity == 2097152 and bus._options.mode == 0o660
    assert "new" in repr(bus)


def test_shm_url_takes_low_latency_as_a_boolean() -> None:
    on = get_bus("shm://orders?low_latency=true")
    off = get_bus("shm://orders?low_latency=0")
    assert isinstance(on, ShmBus) and on.low_latency is True
    assert isinstance(off, ShmBus) and off.low_latency is False


def test_shm_url_takes_spin_for_replies_as_a_boolean_on_by_default() -> None:
    default = get_bus("shm://orders")
    off = get_bus("shm://orders?spin_for_replies=false")
    assert isinstance(default, ShmBus) and default.spin_for_replies is True
    assert isinstance(off, ShmBus) and off.spin_for_replies is False


def test_shm_url_refuses_the_removed_lock_timeout_option() -> None:
    """Publishing takes no cross-process lock any more: lock_timeout is an
    unknown option, refused naming it."""
    with pytest.raises(ValueError, match=r"'lock_timeout'.*valid options"):
        get_bus("shm://orders?lock_timeout=1")


def test_shm_mode_is_octal_without_prefix_too() -> None:
    bus = get_bus("shm://orders?mode=640")
    assert isinstance(bus, ShmBus) and bus._options.mode == 0o640


def test_default_url_is_shm_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SHMBUS_URL", raising=False)
    bus = get_bus()
    assert isinstance(bus, ShmBus) and bus.name == "default"


def test_url_comes_from_shmbus_url_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHMBUS_URL", "memory://?queue_size=3")
    bus = get_bus()
    assert isinstance(bus, MemoryBus) and bus.queue_size == 3


def test_argument_wins_over_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHMBUS_URL", "memory://")
    assert isinstance(get_bus("null://"), NullBus)


def test_null_url_builds_a_null_bus_with_its_options() -> None:
    bus = get_bus("null://?max_event_size=1024&queue_size=4")
    assert isinstance(bus, NullBus)
    assert (bus.max_event_size, bus.queue_size) == (1024, 4)


def test_keyword_options_override_url_options() -> None:
    bus = get_bus("memory://?queue_size=3", queue_size=9)
    assert isinstance(bus, MemoryBus) and bus.queue_size == 9


def test_nats_url_with_several_servers_builds_a_nats_bus() -> None:
    bus = get_bus("nats://127.0.0.1:4222,127.0.0.1:4223?name=worker&reconnect_time_wait=0.5")
    assert isinstance(bus, NatsBus)
    assert bus.servers == ["nats://127.0.0.1:4222", "nats://127.0.0.1:4223"]
    assert (bus.name, bus.reconnect_time_wait) == ("worker", 0.5)


def test_nats_keyword_options_accept_any_client_option_and_pass_it_on() -> None:
    bus = get_bus("nats://127.0.0.1:4222", no_echo=True, pending_size=1024)
    assert isinstance(bus, NatsBus)
    # what NatsBus.connect() hands to nats-py's Client.connect()
    assert bus._nats_options["no_echo"] is True
    assert bus._nats_options["pending_size"] == 1024


def test_nats_url_with_shm_fallback_builds_a_fallback_bus() -> None:
    bus = get_bus("nats://127.0.0.1:4222", fallback="shm://local?queue_size=5", overlap=1.5)
    assert isinstance(bus, FallbackBus)
    assert (bus.fallback.name, bus.fallback.queue_size, bus.overlap) == ("local", 5, 1.5)


def test_unknown_scheme_raises_value_error_listing_valid_schemes() -> None:
    with pytest.raises(ValueError, match=r"'redis'.*valid schemes: shm, memory, null, nats"):
        get_bus("redis://localhost")


def test_url_without_scheme_raises_value_error() -> None:
    with pytest.raises(ValueError, match="no scheme"):
        get_bus("orders")


def test_unknown_url_option_raises_value_error_listing_valid_options() -> None:
    with pytest.raises(ValueError, match=r"'capacty'.*valid options.*capacity.*max_event_size"):
        get_bus("shm://orders?capacty=1024")


def test_unknown_keyword_option_raises_value_error_listing_valid_options() -> None:
    with pytest.raises(ValueError, match=r"'capacity'.*valid options: max_event_size, queue_size"):
        get_bus("memory://", capacity=1)


def test_unknown_nats_url_option_raises_value_error_listing_valid_options() -> None:
    with pytest.raises(ValueError, match=r"'timeout'.*valid options.*connect_timeout"):
        get_bus("nats://127.0.0.1:4222?timeout=1")


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("shm://orders?capacity=big", "bad value 'big' for option 'capacity'"),
        ("shm://orders?mode=999", "bad value '999' for option 'mode'"),
        ("nats://127.0.0.1:4222?no_echo=maybe", "bad value 'maybe' for option 'no_echo'"),
        ("shm://orders?queue_size=1&queue_size=2", "given twice"),
        ("shm://orders?capacity", "malformed query"),
        ("memory://name", "take no name"),
        ("nats://", "names no server"),
        ("shm://orders/extra", "has a path"),
    ],
)
def test_malformed_url_raises_value_error_naming_the_problem(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        get_bus(url)


def test_fallback_with_non_nats_url_raises_value_error() -> None:
    with pytest.raises(ValueError, match="only to nats://"):
        get_bus("shm://orders", fallback="shm://local")


def test_fallback_that_is_not_shm_raises_value_error() -> None:
    with pytest.raises(ValueError, match="must use the shm:// scheme"):
        get_bus("nats://127.0.0.1:4222", fallback="memory://")


def test_url_that_is_not_a_string_raises_type_error() -> None:
    with pytest.raises(TypeError, match="must be a str"):
        get_bus(42)  # type: ignore[arg-type]


@pytest.mark.parametrize("url", ["nats://127.0.0.1:abc", "nats://h:0", "nats://h:99999"])
def test_a_nats_url_with_a_bad_port_is_a_value_error_naming_it(url: str) -> None:
    with pytest.raises(ValueError, match="port"):
        get_bus(url)
