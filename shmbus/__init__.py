"""shmbus: brokerless publish/subscribe for the processes of one host.

Every publishing process writes msgpack envelopes into a ring of its own in
POSIX shared memory; every subscribing process follows all the rings with its
own reader and feeds asyncio subscriptions (or blocking ones, read by the
consuming thread itself). The public API is what ``__all__``
names: the bus contract (:class:`BaseBus`, :class:`Subscription`,
:class:`Event`, :func:`matches`), its transports, their counters and the
error tree rooted at :class:`ShmBusError`; plus :class:`NatsBus` and
:class:`FallbackBus` with the ``nats`` extra.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._core.leftovers import cleanup
from .codec import EnvelopeDecodeError
from .contract import EVENT_SCHEMA_VERSION, BaseBus, Event, Subscription, matches
from .delivery import BlockingSubscription, QueueSubscription, SubscriptionStatistics
from .errors import (
    BusClosedError,
    BusInUseError,
    ForeignFileError,
    ForkedBusError,
    IncompatibleSegmentError,
    MissingExtraError,
    NoFreeSlotError,
    NoRespondersError,
    RequestTimeoutError,
    SegmentCorruptError,
    SegmentError,
    SegmentSpaceError,
    ShmBusError,
    SubscriptionClosedError,
    TransportUnavailableError,
)
from .memory import MemoryBus, NullBus
from .shm import ShmBus
from .stats import BusStats, GroupStatistics, MemberStatistics
from .urls import get_bus

if TYPE_CHECKING:  # imported lazily at run time (see __getattr__)
    from .fallback import FallbackBus as FallbackBus
    from .nats import NatsBus as NatsBus

__version__ = "0.1.0"

# Everything here imports with no optional extra installed, so that
# `from shmbus import *` always works. NatsBus and FallbackBus need the `nats`
# extra (nats-py): they are attributes of the package (`shmbus.NatsBus`,
# `from shmbus import NatsBus`) imported on first use, which raises
# MissingExtraError naming the pip command when the extra is missing.
__all__ = [  # sorted() order, as tests/test_exports.py pins it
    "BaseBus",
    "BlockingSubscription",
    "BusClosedError",
    "BusInUseError",
    "BusStats",
    "EVENT_SCHEMA_VERSION",
    "EnvelopeDecodeError",
    "Event",
    "ForeignFileError",
    "ForkedBusError",
    "GroupStatistics",
    "IncompatibleSegmentError",
    "MemberStatistics",
    "MemoryBus",
    "MissingExtraError",
    "NoFreeSlotError",
    "NoRespondersError",
    "NullBus",
    "QueueSubscription",
    "RequestTimeoutError",
    "SegmentCorruptError",
    "SegmentError",
    "SegmentSpaceError",
    "ShmBus",
    "ShmBusError",
    "Subscription",
    "SubscriptionClosedError",
    "SubscriptionStatistics",
    "TransportUnavailableError",
    "cleanup",
    "get_bus",
    "matches",
]

# The NATS transports need the optional nats-py package: import them on
# first use so that `import shmbus` works without it.
_LAZY = {"NatsBus": ".nats", "FallbackBus": ".fallback"}


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'shmbus' has no attribute {name!r}")
    import importlib

    # Without nats-py this raises MissingExtraError (an ImportError).
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
