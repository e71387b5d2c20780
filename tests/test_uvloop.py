"""The transport contract on uvloop: every test of tests/test_transports.py
that takes the ``bus`` fixture (shm, memory and NATS) again, on uvloop's
event loop. uvloop is optional (the ``uvloop`` extra); without it this module
is skipped.

The loop comes from overriding pytest-asyncio's ``event_loop_policy`` fixture
for this module (its loop-factory hook applies per folder of conftests, and
these tests import ``conftest`` by name, so they cannot live in a folder of
their own)."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Iterator

import pytest

uvloop = pytest.importorskip("uvloop", reason="uvloop is not installed (the uvloop extra)")

import test_transports  # noqa: E402  (after the skip: only with uvloop)

pytestmark = pytest.mark.filterwarnings(
    'ignore:Overriding the "event_loop_policy" fixture is deprecated'
)


@pytest.fixture(scope="module")
def event_loop_policy() -> Iterator[asyncio.AbstractEventLoopPolicy]:
    yield uvloop.EventLoopPolicy()


def _takes_bus(function: object) -> bool:
    return callable(function) and "bus" in inspect.signature(function).parameters  # type: ignore[arg-type]


for _name, _test in vars(test_transports).items():
    if _name.startswith("test_") and _takes_bus(_test):
        globals()[_name] = _test


async def test_the_running_loop_is_uvloops() -> None:
    """The tests above really run on uvloop."""
    assert isinstance(asyncio.get_running_loop(), uvloop.Loop)
