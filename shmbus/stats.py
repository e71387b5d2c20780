"""Counter snapshots returned by ``bus.stats()``.

:class:`BusStats` is a frozen record (read ``stats.dropped``) that is also a
read-only mapping (read ``stats["dropped"]``, ``dict(stats)``), so code that
expects either shape works. Every field is a count since the bus instance
connected; transports without a given notion report 0.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields

__all__ = ["BusStats"]


@dataclass(frozen=True, slots=True)
class BusStats(Mapping[str, int]):
    """Counters of one bus instance."""

    #: Events this instance published.
    published: int
    #: Events handed to this instance's subscribers by ``async for``.
    delivered: int
    #: Events a local subscription should have received but did not: evicted
    #: from its full queue, or overrun in the ring before the reader got to
    #: them (counted whole, once per subscription that was open).
    dropped: int
    #: Records rejected as unreadable (bad length, checksum, or envelope).
    corrupt: int
    #: Records the reader skipped because writers lapped it, counted once per
    #: record whatever the subscriptions (their topics are gone).
    lapped: int = 0
    #: Publishes that failed in the transport (logged, not raised).
    publish_errors: int = 0
    #: Subscriptions open now.
    subscriptions: int = 0

    def __getitem__(self, key: str) -> int:
        if key not in _FIELD_NAMES:
            raise KeyError(key)
        value: int = getattr(self, key)
        return value

    def __iter__(self) -> Iterator[str]:
        return iter(_FIELD_NAMES)

    def __len__(self) -> int:
        return len(_FIELD_NAMES)


_FIELD_NAMES: tuple[str, ...] = tuple(f.name for f in fields(BusStats))
