"""A short soak (shmbus_tools.soak, the logic behind ``tools/soak``): four
publisher processes (one ring each), three subscriber processes with
different patterns (one deliberately slow), events of random sizes up to
max_event_size; meanwhile a publisher is SIGKILLed and replaced about every
2 s (every other time in the middle of a record), a publisher is SIGSTOPped
for 0.2-2 s about every 1.5 s, and so is a subscriber. The soak runs once for
the module; each test checks one property of its books, and the first tests
check that the faults really happened."""

from __future__ import annotations

from collections.abc import Iterator

import figures
import pytest
from conftest import new_bus_name
from shmbus_tools.children import stop_resource_tracker
from shmbus_tools.soak import SoakConfig, SoakTally, run_soak
from shmbus_tools.soak import main as soak_main

#: A publish that waited for a stopped publisher would be blocked until that
#: one is continued (stops last 0.2-2 s); a publish on its own takes
#: microseconds to a few milliseconds of work.
DELAY_BOUND_S = 0.2


@pytest.fixture(scope="module")
def soak() -> Iterator[SoakTally]:
    try:
        config = SoakConfig(
            name=new_bus_name("soak"),
            # Periods are drawn from 0.5-1.5x these: even the longest draws
            # give two kills (one mid-record) and two stops of each kind.
            seconds=8.0,
            kill_every_s=2.0,
            stop_every_s=1.5,
            stop_subscribers=True,
        )
        print(f"soak seed {config.seed}")
        tally = run_soak(config)
        data = tally.as_dict()
        figures.record(
            "soak[short]",
            {
                k: v
                for k, v in data.items()
                if k not in ("subscriptions", "faults", "slowest_publishes")
            },
        )
        print(tally.render())
        for at, what, details in tally.faults:
            print(f"  {at:7.3f} s  {what:<5} {details}")
        yield tally
    finally:
        stop_resource_tracker()


# ─── The faults happened ───


def test_soak_kills_publishers_and_replaces_them(soak: SoakTally) -> None:
    """Publishers really were SIGKILLed (the soak would pass trivially if
    the kill schedule never fired)."""
    assert soak.publisher_kills >= 2, soak.faults


def test_soak_kills_a_publisher_between_a_records_bytes_and_its_commit(soak: SoakTally) -> None:
    assert soak.kills_mid_record >= 1, soak.faults


def test_soak_stops_publishers(soak: SoakTally) -> None:
    assert soak.publisher_stops >= 2, soak.faults


def test_soak_stops_subscribers(soak: SoakTally) -> None:
    assert soak.subscriber_stops >= 2, soak.faults


# ─── The books ───


def test_soak_subscriptions_matching_everything_account_for_every_event_exactly(
    soak: SoakTally,
) -> None:
    """received + dropped == events committed by all publishers, killed ones
    included, for both the fast and the slow catch-all subscription."""
    everything = [books for books in soak.subscriptions if books.matches_everything]
    assert len(everything) == 2
    for books in everything:
        assert books.expected == soak.published > 0
        assert books.received + books.dropped == soak.published, books


def test_soak_every_gap_of_a_partial_subscription_is_counted(soak: SoakTally) -> None:
    """For the subscription to a subset of the topics, the events missing
    from the publishers' sequences are covered by its dropped count."""
    partial = [books for books in soak.subscriptions if not books.matches_everything]
    assert len(partial) == 1
    assert partial[0].expected > 0
    assert partial[0].missing <= partial[0].dropped, partial[0]


def test_soak_delivers_no_event_twice(soak: SoakTally) -> None:
    assert soak.duplicates == 0


def test_soak_delivers_each_publishers_events_in_order(soak: SoakTally) -> None:
    assert soak.order_violations == 0


def test_soak_delivers_only_intact_events_that_were_committed(soak: SoakTally) -> None:
    """Every payload is what its publisher wrote, and no subscriber got an
    event beyond what its publisher's ring committed (the record a killed
    publisher left half-written is never delivered)."""
    assert soak.delivered > 0
    assert soak.bad_payloads == 0
    assert soak.phantoms == 0


def test_soak_publishes_never_fail(soak: SoakTally) -> None:
    assert soak.published > 0
    assert soak.publish_errors == 0


def test_soak_killed_publishers_rings_hold_what_their_publish_calls_returned(
    soak: SoakTally,
) -> None:
    """Nothing ``publish()`` returned for is lost when its publisher is
    killed, and a record killed before its commit is not committed; a live
    publisher's ring holds exactly what it published."""
    assert soak.publisher_books_errors == 0, [f for f in soak.faults if f[1] in ("kill", "books")]


def test_soak_rings_of_killed_publishers_are_reclaimed(soak: SoakTally) -> None:
    assert soak.killed_rings >= 2
    assert soak.rings_reclaimed == soak.killed_rings


def test_soak_the_slow_subscriber_loses_events_and_counts_them(soak: SoakTally) -> None:
    """The deliberately slow subscriber falls behind: it loses events, and
    every one of them is counted."""
    slow = [books for books in soak.subscriptions if books.slow]
    assert len(slow) == 1 and slow[0].dropped > 0
    assert slow[0].uncounted == slow[0].overcounted == 0, slow[0]


def test_soak_a_stopped_or_killed_publisher_delays_no_other_publish(soak: SoakTally) -> None:
    """No publish call spent anywhere near a stop working or blocked, except
    those of the publisher that was stopped (its own stop windows are left
    out). Time its thread waited for a CPU is not counted: on a busy machine
    the scheduler alone can hold a publish for tens of milliseconds (the wall
    time, ``max_publish_s``, is reported, not asserted)."""
    assert soak.publishes_timed > 0
    assert soak.publisher_stops > 0
    assert soak.max_publish_not_runnable_s < DELAY_BOUND_S, soak.slowest_publishes


def test_soak_leaves_no_uncounted_loss(soak: SoakTally) -> None:
    assert soak.uncounted == 0
    assert soak.overcounted == 0
    assert soak.ok


# ─── Its options ───


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--publishers", "0"], "--publishers must be at least 1, got 0"),
        (["--seconds", "0"], "--seconds must be above 0 seconds, got 0.0"),
        (["--kill-every", "soon"], "--kill-every must be a number of seconds, got 'soon'"),
        (["--rate", "-5"], "--rate must be at least 0 events/s, got -5.0"),
    ],
)
def test_a_bad_soak_option_exits_2_naming_it_the_value_and_the_limit(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        soak_main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"publishers": 0}, ValueError, "publishers must be at least 1, got 0"),
        ({"publishers": True}, TypeError, "publishers must be an int"),
        ({"stop_max_s": 0.1}, ValueError, "stop_max_s must be at least 0.2 seconds, got 0.1"),
    ],
)
def test_a_bad_soak_config_raises_naming_the_field_and_the_limit(
    options: dict[str, object], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        SoakConfig(**options)  # type: ignore[arg-type]
