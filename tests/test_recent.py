"""RecentIds: the bounded id memory behind de-duplication."""

from __future__ import annotations

import pytest

from shmbus.recent import RecentIds


def test_an_id_added_twice_is_reported_as_seen() -> None:
    ids = RecentIds(4)
    assert ids.add("a") is True
    assert ids.add("a") is False


def test_the_oldest_id_is_forgotten_past_the_bound() -> None:
    ids = RecentIds(2)
    for event_id in ("a", "b", "c"):
        ids.add(event_id)
    assert ("a" in ids, "b" in ids, "c" in ids, len(ids)) == (False, True, True, 2)


@pytest.mark.parametrize("maxlen", [0, -1])
def test_a_bound_below_one_raises_value_error_naming_it_and_the_limit(maxlen: int) -> None:
    with pytest.raises(ValueError, match=f"maxlen must be at least 1, got {maxlen}"):
        RecentIds(maxlen)


@pytest.mark.parametrize("maxlen", [1.5, True, "8"])
def test_a_bound_that_is_not_an_int_raises_type_error_naming_it(maxlen: int) -> None:
    with pytest.raises(TypeError, match="maxlen must be an int"):
        RecentIds(maxlen)
