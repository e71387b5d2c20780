"""shmbus: brokerless publish/subscribe for the processes of one host.

Publishers write msgpack envelopes into a ring in POSIX shared memory;
every subscribing process follows the ring with its own reader and feeds
asyncio subscriptions. The public API is the bus contract (:class:`BaseBus`,
:class:`Subscription`, :class:`Event`, :func:`matches`) and its transports.
"""

from __future__ import annotations

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
from .leftovers import cleanup
from .memory import MemoryBus, NullBus
from .shm import ShmBus
from .stats import BusStats
from .urls import get_bus

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
    "FallbackBus",
    "NatsBus",
    "ShmBus",
    "ShmBusError",
    "Subscription",
    "SubscriptionStatistics",
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

    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value
