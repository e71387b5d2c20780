"""A bounded memory of recently seen event ids: :class:`RecentIds`.

Owns the one de-duplication primitive that the fallback bus (per
subscription) and the bridge (per direction) use. It remembers the last
``maxlen`` ids added and forgets the oldest first, so memory stays bounded
however long the process runs; an id seen again after ``maxlen`` newer ones
is not recognised any more. Not thread-safe: use each instance from one
event loop.
"""

from __future__ import annotations

import collections

from ._checks import check_int

__all__ = ["RecentIds"]


class RecentIds:
    """The last *maxlen* distinct ids added, oldest forgotten first."""

    __slots__ = ("maxlen", "_ids")

    def __init__(self, maxlen: int) -> None:
        self.maxlen = check_int("maxlen", maxlen, minimum=1)
        self._ids: collections.OrderedDict[str, None] = collections.OrderedDict()

    def add(self, event_id: str) -> bool:
        """Remember *event_id*; return False if it was already remembered."""
        ids = self._ids
        if event_id in ids:
            return False
        ids[event_id] = None
        if len(ids) > self.maxlen:
            ids.popitem(last=False)
        return True

    def __contains__(self, event_id: object) -> bool:
        return event_id in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def __repr__(self) -> str:
        return f"<RecentIds {len(self._ids)}/{self.maxlen}>"
