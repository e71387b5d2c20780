"""NATS with a shared-memory fallback: :class:`FallbackBus`.

Owns the choice of transport for each publish (NATS while it is connected,
the host's shm bus otherwise), the re-sending and double-sending around a
switch that keeps local subscribers from missing events, and the merging of
both transports into one de-duplicated subscription.

Start-up does not wait for NATS: :meth:`FallbackBus.connect` returns once the
shm bus is attached and connects to NATS in the background, so a worker is
usable at once when NATS is down or slow, and switches to NATS when it
answers (the usual shm → NATS switch, with its overlap).

Requests go through a :class:`~shmbus.inbox.ReplyInbox` whose subscription is
a FallbackBus subscription like any other: the request and its reply each
travel whichever transport is up, and arrive once.

Queue groups are passed on to both transports, and each picks one member of
the group for its copy of an event. A member that leaves gets nothing this
bus publishes after its ``aclose()`` on either (NatsBus sends its UNSUB
ahead of later PUBs). An event that travels on both (sent on both during an
overlap, or re-sent on shm after NATS went down) may be picked by a
different member on each:

* The members of one group on one FallbackBus (same pattern, queue name and
  event loop) share one memory of delivered ids, so of them only the member
  that the first copy reaches delivers it.
* Members on different FallbackBus instances (other processes) can each
  deliver it: the shm bus and the NATS server choose independently, and
  nothing tells one member what another received. Telling members to ignore
  shm copies while they are on NATS would lose the event in the very case the
  overlap is for (members whose SUB the server does not have yet).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import sys
import threading
import time
from collections.abc import Mapping
from typing import Any

from ._checks import check_int, check_seconds
from .codec import encode_envelope
from .contract import (
    EMPTY_HEADERS,
    BaseBus,
    Event,
    validate_pattern,
    validate_queue_name,
    validate_topic,
)
from .delivery import QueueSubscription
from .errors import BusClosedError
from .inbox import ReplyInbox, check_timeout
from .lifecycle import LifecycleState
from .nats import NatsBus
from .recent import RecentIds
from .shm import ShmBus
from .stats import BusStats

__all__ = ["FallbackBus"]

log = logging.getLogger("shmbus.fallback")

#: A queue group as seen by one FallbackBus: pattern, queue name, and the
#: event loop its members' feeds run on.
_GroupKey = tuple[str, str, asyncio.AbstractEventLoop]


class _Merged:
    """One subscription handed out, fed by one subscription per transport."""

    __slots__ = ("out", "inner", "pumps", "seen", "group", "duplicates")

    def __init__(
        self,
        out: QueueSubscription,
        inner: list[QueueSubscription],
        seen: RecentIds,
        group: _GroupKey | None,
    ) -> None:
        self.out = out
        self.inner = inner
        self.pumps: list[asyncio.Task[None]] = []
        #: Ids delivered: this subscription's own, or, for a queue group
        #: member, those of every member of its group on this bus.
        self.seen = seen
        self.group = group
        self.duplicates = 0


class FallbackBus(BaseBus):
    """Publish over NATS while it is connected and over the host's shm bus
    while it is not; subscribe to both.

    Every process of a host configured the same way (same NATS servers, same
    shm bus name) keeps receiving the events published on that host through
    a NATS outage, and goes back to NATS when it returns.

    Guarantees
    ----------
    * **Each event at most once per subscription**, whichever transports
      carried it: a subscription listens on both and drops an event whose id
      it has already delivered. The ids are remembered in a bounded set of
      ``dedupe_size`` per subscription (per queue group for its members on
      this bus: an event goes to one of them).
    * **No loss for subscribers on this host across a switch**, provided
      they run a FallbackBus with the same configuration:

      - NATS → shm: a publish goes to NATS only while the client reports the
        connection up. Events handed to NATS in the last ``overlap`` seconds
        before it reports the connection down may have died with it, so they
        are re-sent, with their ids, on the shm bus at that moment.
      - shm → NATS: the publisher may reconnect before a subscriber in
        another process does. For ``overlap`` seconds after the reconnect
        each event goes to both transports.

      The duplicates that this (and a bridge relaying NATS onto the same shm
      bus) produces are what the de-duplication removes; they arrive within
      about ``overlap`` seconds of the original, so the guarantee holds while
      fewer than ``dedupe_size`` events reach one subscription in such a
      window.
    * Not guaranteed: one member per event for a queue group whose members
      are on several FallbackBus instances, for the events sent on both
      transports (see the module docstring); order across a switch (a
      re-sent event can arrive after newer ones; per transport, per
      publisher order is kept);
      delivery to other hosts of events published while NATS was down (they
      only went to this host's shm bus) or of events lost in NATS in the
      instant before the failure; no loss when a failure takes longer than
      ``overlap`` seconds to be noticed (a silent network partition is only
      noticed by NATS's pings) or when a subscriber reconnects more than
      ``overlap`` seconds after the publisher.
    * Bad input raises (the size limit is the smaller of the shm bus's
      ``max_event_size`` and the NATS server's ``max_payload``, so it does
      not depend on which transport is in use); transport failures are
      counted, not raised. :meth:`connect` does not wait for NATS: the bus
      starts on shm and connects to NATS in the background, retrying until
      it answers.

    Parameters
    ----------
    primary:
        The NATS bus (not yet connected).
    fallback:
        The host's shm bus (not yet connected).
    queue_size:
        Bound of each subscription's queue; default the NATS bus's.
    overlap:
        Seconds of re-sending/double-sending around a switch; default
        ``2 * reconnect_time_wait + 2`` of the NATS bus, which covers a
        subscriber whose client retries one ``reconnect_time_wait`` later.
    dedupe_size:
        Ids remembered per subscription or queue group (and events kept for
        re-sending).
    retry_interval:
        Seconds between connection attempts while NATS has never been
        reached; default the NATS bus's ``reconnect_time_wait`` (at least
        0.1).
    """

    def __init__(
        self,
        primary: NatsBus,
        fallback: ShmBus,
        *,
        queue_size: int | None = None,
        overlap: float | None = None,
        dedupe_size: int = 16_384,
        retry_interval: float | None = None,
    ) -> None:
        if not isinstance(primary, NatsBus):
            raise TypeError(f"primary must be a NatsBus, not {type(primary).__name__}")
        if not isinstance(fallback, ShmBus):
            raise TypeError(f"fallback must be a ShmBus, not {type(fallback).__name__}")
        if queue_size is None:
            queue_size = primary.queue_size
        if overlap is None:
            overlap = 2 * primary.reconnect_time_wait + 2
        if retry_interval is None:
            retry_interval = max(0.1, primary.reconnect_time_wait)
        self.primary = primary
        self.fallback = fallback
        self.queue_size = check_int("queue_size", queue_size, minimum=1)
        self.overlap = check_seconds("overlap", overlap)
        self.dedupe_size = check_int("dedupe_size", dedupe_size, minimum=1)
        self.retry_interval = check_seconds("retry_interval", retry_interval, above=True)
        self._state = LifecycleState.NEW
        self._lock = threading.RLock()
        self._nats_up = False
        self._dual_until = 0.0
        # (monotonic time, event) of the events handed to NATS lately.
        self._recent: collections.deque[tuple[float, Event]] = collections.deque(maxlen=dedupe_size)
        self._merged: dict[QueueSubscription, _Merged] = {}
        # Each queue group's shared ids and its number of members here.
        self._group_seen: dict[_GroupKey, tuple[RecentIds, int]] = {}
        self._retry: asyncio.Task[None] | None = None
        self._published = 0
        self._via_nats = 0
        self._via_shm = 0
        self._resent = 0
        self._duplicates = 0
        self._retired_delivered = 0
        self._retired_dropped = 0
        self._inbox = ReplyInbox(self.subscribe, f"FallbackBus shm={fallback.name!r}")
        primary.add_connection_listener(self._on_nats_state)

    def __repr__(self) -> str:
        route = "nats" if self._nats_up else "shm"
        servers = ",".join(self.primary.servers)
        return f"<FallbackBus nats={servers} shm={self.fallback.name!r} {self._state} via={route}>"

    # ─── State ───

    @property
    def using_nats(self) -> bool:
        """True while publishes go to NATS (possibly to shm as well)."""
        return self._state is LifecycleState.OPEN and self._nats_up

    @property
    def double_sending(self) -> bool:
        """True during the ``overlap`` seconds after NATS came up, while
        publishes go to both transports."""
        return self.using_nats and time.monotonic() < self._dual_until

    @property
    def max_event_size(self) -> int:
        """Largest envelope accepted: the smaller of the two transports' limits."""
        return min(self.fallback.max_event_size, self.primary.max_payload)

    # ─── Life cycle ───

    async def connect(self) -> None:
        """Attach the shm bus and start connecting to NATS. Idempotent.

        Returns as soon as the shm bus is attached, without waiting for
        NATS: publishes go to shm until NATS answers, then switch to it
        (:attr:`using_nats`). If NATS cannot be reached, logs a warning and
        keeps trying every ``retry_interval`` seconds. Raises what
        ``ShmBus.connect`` raises, and :class:`BusClosedError` on a closed
        bus.
        """
        if self._state is LifecycleState.OPEN:
            return
        self._check_not_closed("connect")
        await self.fallback.connect()
        self._state = LifecycleState.OPEN
        self._retry = asyncio.get_running_loop().create_task(
            self._keep_connecting(), name="shmbus-fallback-connect"
        )

    async def _keep_connecting(self) -> None:
        """Connect to NATS, retrying until it answers; once connected, the
        NATS client reconnects by itself."""
        warned = False
        while self._state is LifecycleState.OPEN and self.primary.loop is None:
            try:
                await self.primary.connect()
                return
            except ConnectionError as exc:
                if warned:
                    log.debug("NATS still unreachable: %s", exc)
                else:
                    warned = True
                    log.warning(
                        "%s; publishing on shm bus %r and retrying every %g s",
                        exc,
                        self.fallback.name,
                        self.retry_interval,
                    )
            except BusClosedError:
                return
            await asyncio.sleep(self.retry_interval)  # back off between attempts

    async def close(self) -> None:
        """End every subscription and close both transports. Idempotent."""
        with self._lock:
            if self._state is LifecycleState.CLOSED:
                return
            self._state = LifecycleState.CLOSED
            merged = list(self._merged.values())
        retry = self._retry
        if retry is not None and not retry.done():
            retry.cancel()
            # Wait for it to unwind: a connect cut short must not outlive us.
            if retry.get_loop() is asyncio.get_running_loop():
                await asyncio.gather(retry, return_exceptions=True)
        for entry in merged:
            entry.out.close_from_transport()
        try:
            await self.primary.close()
        finally:
            await self.fallback.close()

    def _is_closed(self) -> bool:
        """The state now (a call, so that a type checker does not assume it
        is still what an earlier check found)."""
        return self._state is LifecycleState.CLOSED

    def _check_not_closed(self, action: str) -> None:
        if self._is_closed():
            raise BusClosedError(f"cannot {action}: {self!r} is closed")

    # ─── Publishing ───

    async def publish(
        self,
        topic: str,
        payload: dict[str, Any],
        *,
        event_type: str = "",
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """Publish on NATS or shm (see the class docstring); connects first if
        needed. Waits for the NATS client to take the event when called on
        the NATS bus's loop. Same errors as :meth:`publish_nowait`."""
        if self._state is not LifecycleState.OPEN:
            self._check_not_closed("publish")
            await self.connect()
        event, body = self._encode(topic, payload, event_type, headers)
        if self._dispatch(event):
            await self.primary.send_encoded(topic, body)

    async def request(
        self,
        topic: str,
        payload: dict[str, Any],
        *,
        timeout: float = 1.0,
        event_type: str = "",
        headers: Mapping[str, str] | None = None,
    ) -> Event:
        """Publish a request on whichever transport is up and return the
        first reply (see :meth:`BaseBus.request
        <shmbus.contract.BaseBus.request>`). Whether anyone listens on shm
        is not known, so a request nobody answers raises
        :class:`~shmbus.errors.RequestTimeoutError` after *timeout* seconds."""
        validate_topic(topic)
        timeout = check_timeout(timeout)
        if self._state is not LifecycleState.OPEN:
            self._check_not_closed("request")
            await self.connect()

        async def send(reply_to: str) -> None:
            event, body = self._encode(topic, payload, event_type, headers, reply_to)
            if self._dispatch(event):
                await self.primary.send_encoded(topic, body)

        return await self._inbox.request(topic, timeout, send)

    def publish_nowait(
        self,
        topic: str,
        payload: dict[str, Any],
        *,
        event_type: str = "",
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """Publish from any thread, with or without an event loop.

        Raises
        ------
        TypeError, ValueError
            Bad topic, payload or event type, or an envelope over
            :attr:`max_event_size`.
        RuntimeError
            The bus is closed or was never connected.
        """
        if self._state is not LifecycleState.OPEN:
            self._check_not_closed("publish")
            raise RuntimeError(f"cannot publish on {self!r} before connect(); await connect()")
        event, body = self._encode(topic, payload, event_type, headers)
        if self._dispatch(event):
            self.primary.submit_encoded(topic, body)

    def _encode(
        self,
        topic: str,
        payload: dict[str, Any],
        event_type: str,
        headers: Mapping[str, str] | None,
        reply_to: str | None = None,
    ) -> tuple[Event, bytes]:
        """The new event and its envelope; raises for bad input or size."""
        validate_topic(topic)
        event = Event(
            topic,
            payload,
            event_type,
            headers=EMPTY_HEADERS if headers is None else headers,
            reply_to=reply_to,
        )
        body = encode_envelope(
            topic,
            payload,
            event_type,
            sys.maxsize,
            event_id=event.id,
            ts=event.ts,
            headers=headers,
            reply_to=reply_to,
        )
        limit = self.max_event_size
        if len(body) > limit:
            raise ValueError(
                f"event on topic {topic!r} encodes to {len(body)} bytes; the limit is {limit} "
                f"bytes (the smaller of shm bus {self.fallback.name!r}'s max_event_size "
                f"{self.fallback.max_event_size} and the NATS server's max_payload "
                f"{self.primary.max_payload})"
            )
        return event, body

    def _dispatch(self, event: Event) -> bool:
        """Pick the route, publish on shm if it is one, remember the event
        for re-sending if NATS is; return True if the caller must hand the
        event to NATS (after this returns: a failure there is covered by the
        re-send on the switch to shm)."""
        with self._lock:
            if self._state is not LifecycleState.OPEN:
                self._check_not_closed("publish")
            up = self.primary.connected
            if up != self._nats_up:
                self._switch(up)
            now = time.monotonic()
            via_nats = self._nats_up
            via_shm = not via_nats or now < self._dual_until
            if via_nats:
                recent = self._recent
                while recent and now - recent[0][0] > self.overlap:
                    recent.popleft()
                recent.append((now, event))
                self._via_nats += 1
            if via_shm:
                self.fallback.republish(event)
                self._via_shm += 1
            self._published += 1
            return via_nats

    def _on_nats_state(self, connected: bool) -> None:
        """NATS connection listener (on the NATS bus loop)."""
        with self._lock:
            if self._state is LifecycleState.OPEN and connected != self._nats_up:
                self._switch(connected)

    def _switch(self, up: bool) -> None:
        """Change route; the caller holds the lock."""
        now = time.monotonic()
        self._nats_up = up
        if up:
            self._dual_until = now + self.overlap
            log.info(
                "NATS is up: publishing there (and on shm bus %r for %g s more)",
                self.fallback.name,
                self.overlap,
            )
            return
        resend = [event for t, event in self._recent if now - t <= self.overlap]
        self._recent.clear()
        for event in resend:
            try:
                self.fallback.republish(event)
            except RuntimeError:  # shm bus closed under us: we are closing
                return
        self._resent += len(resend)
        log.warning(
            "NATS is down: publishing on shm bus %r (re-sent the %d event(s) of the last %g s)",
            self.fallback.name,
            len(resend),
            self.overlap,
        )

    # ─── Subscribing ───

    def subscribe(self, pattern: str, *, queue: str | None = None) -> QueueSubscription:
        """Subscribe on both transports; each event is delivered once. With
        *queue*, the subscription is a member of that queue group on both.

        Must be called with an event loop running (it runs the forwarding
        from both transports) on a connected bus.
        """
        validate_pattern(pattern)
        if queue is not None:
            validate_queue_name(queue)
        if self._state is not LifecycleState.OPEN:
            self._check_not_closed("subscribe")
            raise RuntimeError(f"cannot subscribe on {self!r} before connect(); await connect()")
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            raise RuntimeError(
                "FallbackBus.subscribe() must be called from a running event loop"
            ) from None
        out = QueueSubscription(
            pattern, maxsize=self.queue_size, on_close=self._forget, queue=queue
        )
        shm_sub = self.fallback.subscribe(pattern, queue=queue)
        try:
            nats_sub = self.primary.subscribe(pattern, queue=queue)
        except BaseException:
            shm_sub.close_from_transport()
            raise
        inner = [shm_sub, nats_sub]
        group: _GroupKey | None = None if queue is None else (pattern, queue, loop)
        with self._lock:
            if group is None:
                seen = RecentIds(self.dedupe_size)
            else:
                # One filter for the group's members on this bus: an event
                # sent on both transports (overlap, re-send) can be given to
                # one member by each, and only the first copy may be kept.
                seen, members = self._group_seen.get(group) or (RecentIds(self.dedupe_size), 0)
                self._group_seen[group] = (seen, members + 1)
            entry = _Merged(out, inner, seen, group)
            entry.pumps = [loop.create_task(self._pump(entry, source)) for source in inner]
            self._merged[out] = entry
        if self._is_closed():  # closed meanwhile, by another thread
            out.close_from_transport()
        return out

    async def _pump(self, entry: _Merged, source: QueueSubscription) -> None:
        seen = entry.seen
        out = entry.out
        async for event in source:
            if seen.add(event.id):
                out.deliver((event,))
            else:
                entry.duplicates += 1

    def _forget(self, out: QueueSubscription) -> None:
        """The subscription closed (any thread): stop both feeds."""
        with self._lock:
            entry = self._merged.pop(out, None)
            if entry is None:
                return
            self._retired_delivered += out.delivered
            self._retired_dropped += out.dropped + _inner_dropped(entry)
            self._duplicates += entry.duplicates
            if entry.group is not None:
                seen, members = self._group_seen.pop(entry.group)
                if members > 1:
                    self._group_seen[entry.group] = (seen, members - 1)
        for source in entry.inner:
            source.close_from_transport()
        for pump in entry.pumps:
            with contextlib.suppress(RuntimeError):  # its loop is closed: nothing runs it
                pump.get_loop().call_soon_threadsafe(pump.cancel)

    # ─── Accounting ───

    @property
    def duplicates(self) -> int:
        """Events dropped by subscriptions because they had them already."""
        with self._lock:
            return self._duplicates + sum(e.duplicates for e in self._merged.values())

    @property
    def resent(self) -> int:
        """Events re-sent on shm when NATS went down."""
        return self._resent

    def routes(self) -> dict[str, int]:
        """Publishes per transport: ``{"nats": n, "shm": m}`` (an event sent
        on both during an overlap counts in both)."""
        with self._lock:
            return {"nats": self._via_nats, "shm": self._via_shm}

    def stats(self) -> BusStats:
        """Counters of this instance (see :class:`~shmbus.stats.BusStats`).

        ``published`` counts events accepted by this bus once each, whatever
        carried them; ``publish_errors``, ``corrupt`` and ``lapped`` are
        those of the two transports added up; ``dropped`` includes events
        lost in either transport's per-subscription queue.
        """
        nats_stats = self.primary.stats()
        shm_stats = self.fallback.stats()
        with self._lock:
            live = list(self._merged.values())
            return BusStats(
                published=self._published,
                delivered=self._retired_delivered + sum(e.out.delivered for e in live),
                dropped=self._retired_dropped
                + sum(e.out.dropped + _inner_dropped(e) for e in live),
                corrupt=nats_stats.corrupt + shm_stats.corrupt,
                lapped=shm_stats.lapped,
                publish_errors=nats_stats.publish_errors + shm_stats.publish_errors,
                subscriptions=len(live),
                overcommitted=nats_stats.overcommitted + shm_stats.overcommitted,
            )


def _inner_dropped(entry: _Merged) -> int:
    return sum(s.dropped for s in entry.inner)
