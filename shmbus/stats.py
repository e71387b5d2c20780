"""Counter snapshots returned by ``bus.stats()``, and the statistics of a
queue group.

:class:`BusStats` is a frozen record (read ``stats.dropped``) that is also a
read-only mapping (read ``stats["dropped"]``, ``dict(stats)``), so code that
expects either shape works. Every field is a count since the bus instance
connected; transports without a given notion report 0.

:class:`GroupStatistics` describes one queue group (the subscriptions with
the same pattern and queue name, in every process): what each member
delivered, and what the group dropped.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields

__all__ = ["BusStats", "GroupStatistics", "MemberStatistics"]


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
    #: Queue-group events this instance published while every member of the
    #: group was full: each went to a member with no room in its queue (it
    #: waits there, or evicts an older one, counted as dropped). A group
    #: that is too slow for its publishers shows here first.
    overcommitted: int = 0

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


@dataclass(frozen=True, slots=True)
class MemberStatistics:
    """One member of a queue group, as the bus records it."""

    #: Instance slot and process of the member's bus instance.
    slot: int
    pid: int
    #: Events the group's publishers assigned to this member.
    assigned: int
    #: Events its consumer took (``async for``).
    delivered: int
    #: Assigned events it lost (its ring reader was lapped, its queue was
    #: full); for a member whose process died, everything it did not deliver.
    dropped: int
    #: False once its process is gone (the member is then settled: its
    #: undelivered events are counted as dropped on the group).
    alive: bool


@dataclass(frozen=True, slots=True)
class GroupStatistics:
    """A queue group: every subscription on the bus with this pattern and
    queue name, in any process."""

    queue: str
    pattern: str
    #: The members now (live, or dead and not yet settled).
    members: tuple[MemberStatistics, ...]
    #: Events delivered by the group's members, the departed ones included.
    delivered: int
    #: Events assigned to the group's members and never delivered: lost by a
    #: live member, or left behind by one that closed or died.
    dropped: int
