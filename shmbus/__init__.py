"""shmbus: brokerless publish/subscribe for the processes of one host.

Publishers write msgpack envelopes into a ring in POSIX shared memory;
every subscribing process follows the ring with its own reader and feeds
asyncio subscriptions. The public API is the bus contract (:class:`BaseBus`,
:class:`Subscription`, :class:`Event`, :func:`matches`) and its transports.
"""

from __future__ import annotations

from .leftovers import cleanup
from .contract import EVENT_SCHEMA_VERSION, BaseBus, Event, Subscription, matches
from .delivery import SubscriptionStatistics
from .errors import (
    BusClosedError,
    BusInUseError,
    ForkedBusError,
    IncompatibleSegmentError,
    NoFreeSlotError,
    SegmentCorruptError,
    SegmentError,
    SegmentSpaceError,
    ShmBusError,
)
from .memory import MemoryBus, NullBus
from .shm import ShmBus
from .stats import BusStats

__version__ = "0.1.0"

__all__ = [
    "EVENT_SCHEMA_VERSION",
    "BaseBus",
    "BusClosedError",
    "BusInUseError",
    "BusStats",
    "Event",
    "ForkedBusError",
    "IncompatibleSegmentError",
    "MemoryBus",
    "NoFreeSlotError",
    "NullBus",
    "SegmentCorruptError",
    "SegmentError",
    "SegmentSpaceError",
    "ShmBus",
    "ShmBusError",
    "Subscription",
    "SubscriptionStatistics",
    "cleanup",
    "matches",
]
