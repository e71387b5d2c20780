"""A short soak (shmbus.soak, the logic behind ``tools/soak``): four
publisher processes, three subscriber processes with different patterns (one
deliberately slow), events of random sizes up to max_event_size, a publisher
SIGKILLed and replaced every few seconds. The soak runs once for the module;
each test checks one property of its books."""

from __future__ import annotations

from collections.abc import Iterator

import figures
import pytest
from conftest import new_bus_name
from spawn import stop_resource_tracker

from shmbus.soak import SoakConfig, SoakTally, run_soak

SECONDS = 12.0


@pytest.fixture(scope="module")
def soak() -> Iterator[SoakTally]:
    try:
        config = SoakConfig(name=new_bus_name("soak"), seconds=SECONDS, kill_every_s=3.0)
        print(f"soak seed {config.seed}")
        tally = run_soak(config)
        data = tally.as_dict()
        figures.record("soak[short]", {k: v for k, v in data.items() if k != "subscriptions"})
        print(tally.render())
        yield tally
    finally:
        stop_resource_tracker()


def test_soak_subscriptions_get_no_duplicate_and_keep_per_publisher_order(
    soak: SoakTally,
) -> None:
    assert soak.order_violations == 0


def test_soak_every_delivered_event_is_intact(soak: SoakTally) -> None:
    assert soak.bad_payloads == 0
    assert soak.delivered > 0


def test_soak_subscriptions_matching_everything_account_for_every_event_exactly(
    soak: SoakTally,
) -> None:
    """received + dropped == sequence numbers handed out, for both the fast
    and the slow catch-all subscription."""
    everything = [books for books in soak.subscriptions if books.matches_everything]
    assert len(everything) == 2
    for books in everything:
        assert books.received + books.dropped == soak.issued, books


def test_soak_every_gap_of_a_partial_subscription_is_counted(soak: SoakTally) -> None:
    """For the subscription to a subset of the topics, the events missing
    from the publishers' sequences are covered by its dropped count."""
    partial = [books for books in soak.subscriptions if not books.matches_everything]
    assert len(partial) == 1
    assert partial[0].missing <= partial[0].dropped, partial[0]
    assert partial[0].expected > 0


def test_soak_publishers_count_what_the_bus_issued(soak: SoakTally) -> None:
    """Publishers that ran to the end never failed a publish, and the events
    they report published match the sequence numbers the bus handed out (up
    to one in flight per killed publisher)."""
    assert soak.publish_errors == 0
    assert soak.published <= soak.issued <= soak.published + soak.publisher_kills


def test_soak_the_slow_subscriber_loses_events_and_counts_them(soak: SoakTally) -> None:
    """The deliberately slow subscriber falls behind: it loses events, and
    every one of them is counted (it receives + drops exactly what was
    issued)."""
    slow = [books for books in soak.subscriptions if books.slow]
    assert len(slow) == 1 and slow[0].dropped > 0
    assert slow[0].uncounted == 0


def test_soak_leaves_no_uncounted_loss(soak: SoakTally) -> None:
    assert soak.uncounted == 0
    assert soak.ok
