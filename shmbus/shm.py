"""The shared-memory transport: :class:`ShmBus`.

Owns the life cycle of one bus instance (new, open, closed, or abandoned in a
fork child), its own ring (created on its first publish, written by it alone)
and its reader.

Guarantees
----------
* ``publish()``/``publish_nowait()`` take no cross-process lock and never
  wait for another process: threads of the instance serialise on an
  in-process lock, copy one record into the instance's own ring and return;
  a sleeping reader costs one FIFO write, a busy one nothing.
* A subscription receives every matching event published after
  ``subscribe()`` returned, by any instance in any process, in publish order
  per publishing instance, never duplicated; what it misses is counted on it.
  Events of different publishers interleave in no promised order.
* A blocking subscription (``subscribe_sync()``) has the same semantics and
  needs no event loop: it has a reader of its own (its own slot and doorbell,
  :mod:`shmbus._core.sync_reader`), stepped by the thread that consumes it.
* A subscription made with ``queue=NAME`` is a member of the queue group of
  every subscription with that pattern and name, in any process: each
  matching event goes to exactly one member, chosen by its publisher among
  the members with room in their queue (rules in
  :mod:`shmbus._core.groups`); what a member loses, or leaves undelivered
  when it closes or dies, is counted as dropped on the group.
* The event loop never waits for another process: ``connect()`` attaches in
  a worker thread; ``publish()``, ``subscribe()`` and ``close()`` only take
  non-blocking locks.
* The last instance to close, in any process, removes the bus's files; a
  process that exits without closing closes its instances at exit.
* An instance inherited across ``fork()`` raises :class:`ForkedBusError`
  when used in the child; the parent's instance keeps working. Create a new
  bus in the child.
"""

from __future__ import annotations

import asyncio
import atexit
import grp
import logging
import os
import threading
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

from ._checks import check_int
from ._core import directory, groups
from ._core.layout import (
    DEFAULT_CAPACITY,
    DEFAULT_MAX_EVENT_SIZE,
    MAX_SLOTS,
    OFF_SLEEP_FLAGS,
    RING_OFFSET,
    SLOT_PUBLISHED,
    min_capacity,
    slot_word,
)
from ._core.ordering import full_fence
from ._core.reader import BusReader, RingKey, Target
from ._core.ring import RingWriter, crc32
from ._core.segment import Segment, SegmentOptions, check_geometry
from ._core.sync_reader import SyncReader
from ._core.wakeup import Waker
from .codec import encode_envelope
from .contract import (
    EMPTY_HEADERS,
    BaseBus,
    Event,
    validate_pattern,
    validate_queue_name,
    validate_topic,
)
from .delivery import BlockingSubscription, QueueSubscription
from .errors import BusClosedError, ForkedBusError, ShmBusError
from .inbox import BlockingReplyInbox, ReplyInbox, check_timeout, refuse_on_event_loop
from .lifecycle import LifecycleState
from .stats import BusStats, GroupStatistics

__all__ = ["ShmBus"]

log = logging.getLogger("shmbus.shm")

_NEW, _OPEN, _CLOSED, _FORKED = (
    LifecycleState.NEW,
    LifecycleState.OPEN,
    LifecycleState.CLOSED,
    LifecycleState.FORKED,
)
_SLEEP_FLAGS_END = OFF_SLEEP_FLAGS + MAX_SLOTS
_AWAKE = b"\x01"
_TOPIC_CACHE_LIMIT = 4096
#: How long an implicit connect (publish_nowait or subscribe on an unconnected
#: bus) waits for the bus's attach lock on an event loop: not at all.
_ON_LOOP_ATTACH_TIMEOUT = 0.0

#: Every connected instance, held strongly until it closes: an instance a
#: script dropped without closing is still closed at exit (its files removed).
_open_instances: set[ShmBus] = set()


class ShmBus(BaseBus):
    """A publish/subscribe bus shared by the processes of one host.

    Parameters
    ----------
    name:
        Bus name: letters, digits, ``_``, ``-``, ``.``. Every instance with
        the same name, in any process, is on the same bus.
    capacity:
        Bytes of this instance's own ring, reserved in ``/dev/shm`` on its
        first publish. Bigger rings let readers fall further behind before
        they are lapped. None: the bus's (3 MiB unless its creator chose).
    max_event_size:
        Largest msgpack envelope this instance publishes, in bytes. None:
        the bus's (1 MiB unless its creator chose).
    queue_size:
        Bound of each subscription's queue (drop-oldest when full).
    mode:
        Permission bits of the bus's files if this instance creates the bus
        (default owner only).
    group:
        Group name or id to own the bus's files, to share it with a group
        (use with ``mode=0o660``).
    low_latency:
        Opt-in: this instance's reader polls the rings for a short adaptive
        window (50 µs to 2 ms) before it sleeps, trading CPU while events
        flow for lower latency. See ``docs/DESIGN.md``.
    spin_for_replies:
        While a :meth:`request` of this instance awaits its reply, its reader
        polls the rings for an adaptive window (the one of ``low_latency``,
        from 50 µs to 2 ms, and 50 µs once replies take longer than that)
        before it sleeps: a round trip then costs one asyncio wake-up, the
        responder's, instead of two. False: requests wait like any
        subscription.
    """

    #: Test hook: called with "mid-record" after the record's bytes are
    #: written but before the commit. Lets fault-injection tests stop or kill
    #: a publisher exactly there.
    _critical_section_hook: ClassVar[Callable[[str], None] | None] = None

    def __init__(
        self,
        name: str = "default",
        *,
        capacity: int | None = None,
        max_event_size: int | None = None,
        queue_size: int = 1024,
        mode: int = 0o600,
        group: str | int | None = None,
        low_latency: bool = False,
        spin_for_replies: bool = True,
    ) -> None:
        self._options = SegmentOptions(
            name=name,
            capacity=capacity,
            max_event_size=max_event_size,
            mode=mode,
            gid=_resolve_group(group),
        )
        check_int("queue_size", queue_size, minimum=1)
        self.name = name
        #: Geometry of this instance's ring: as asked, else the defaults until
        #: ``connect()`` adopts the bus's.
        self.capacity: int = capacity if capacity is not None else DEFAULT_CAPACITY
        self.max_event_size: int = (
            max_event_size if max_event_size is not None else DEFAULT_MAX_EVENT_SIZE
        )
        self.queue_size = queue_size
        self.low_latency = bool(low_latency)
        self.spin_for_replies = bool(spin_for_replies)
        self._state = _NEW
        self._thread_lock = threading.Lock()
        self._segment: Segment | None = None
        self._ring: directory.OwnRing | None = None
        self._writer: RingWriter | None = None
        self._waker: Waker | None = None
        self._assigner: groups.Assigner | None = None
        self._reader: BusReader | None = None
        self._published = 0
        self._retired = {
            "delivered": 0,
            "dropped": 0,
            "corrupt": 0,
            "lapped": 0,
            "overcommitted": 0,
        }
        self._members: set[groups.MemberSubscription] = set()
        self._topic_keys: dict[str, tuple[bytes, int]] = {}
        self._published_word = 0
        self._subscriptions: set[QueueSubscription | BlockingSubscription] = set()
        self._sync_readers: dict[BlockingSubscription, SyncReader] = {}
        self._inbox = ReplyInbox(self.subscribe, f"ShmBus {name!r}")
        self._sync_inbox = BlockingReplyInbox(self.subscribe_sync, f"ShmBus {name!r}")

    @classmethod
    def for_existing(cls, name: str, **options: Any) -> ShmBus:
        """An unconnected bus on *name* for tools that join whatever bus is
        there (the CLI, the bridge): an instance that does not ask for a ring
        geometry adopts the bus's, so this is the constructor."""
        return cls(name, **options)

    def __repr__(self) -> str:
        slot = self._segment.slot if self._segment is not None else None
        return f"<ShmBus {self.name!r} {self._state} slot={slot}>"

    # ─── Life cycle ───

    async def connect(self) -> None:
        """Create or attach the bus's shared resources. Idempotent.

        The attach runs in a worker thread: it may wait for another process
        that is creating or removing the bus, and the event loop must not.
        Raises :class:`RuntimeError` if the bus was closed, and the errors of
        :meth:`Segment.attach <shmbus._core.segment.Segment.attach>` if the bus
        cannot be used.
        """
        if self._state is _OPEN:
            return
        self._check_not_ended("connect")
        await asyncio.to_thread(self._connect)

    def connect_sync(self, timeout: float = 10.0) -> None:
        """:meth:`connect` for code without an event loop (blocks up to *timeout* s)."""
        self._connect(timeout)

    def _connect(self, timeout: float = 10.0) -> None:
        if self._state is _OPEN:
            return
        with self._thread_lock:
            if self._state is _OPEN:
                return
            self._check_not_ended("connect")
            segment = Segment.attach(self._options, timeout)
            try:
                asked = self._options
                capacity = asked.capacity if asked.capacity is not None else segment.capacity
                max_event_size = (
                    asked.max_event_size
                    if asked.max_event_size is not None
                    else segment.max_event_size
                )
                if asked.capacity is None:
                    capacity = max(capacity, min_capacity(max_event_size))
                check_geometry(capacity, max_event_size)
                waker = Waker(segment)
            except BaseException:
                # (also an exception a signal handler raised here: nothing
                # stays attached, and a retried connect starts afresh)
                segment.detach()
                raise
            self.capacity = capacity
            self.max_event_size = max_event_size
            self._waker = waker
            self._published_word = slot_word(segment.slot, SLOT_PUBLISHED)
            self._segment = segment
            self._state = _OPEN
            _open_instances.add(self)
        try:
            directory.reclaim_dead(segment)
            groups.settle_dead(segment)
        except (ShmBusError, OSError) as exc:
            log.debug("bus %r: reclaiming dead rings failed: %s", self.name, exc)

    async def close(self) -> None:
        """End every subscription and leave the bus. Idempotent; never waits
        for another process.

        The last instance to close, in any process, removes the bus's files
        from ``/dev/shm``.
        """
        self.close_sync()

    def close_sync(self) -> None:
        """:meth:`close` for code without an event loop.

        Every step runs even if an earlier one raised (a signal handler can
        raise anywhere): the instance is detached, and so closed, whatever
        happens; the exception is then raised.
        """
        with self._thread_lock:
            if self._state is not _OPEN:
                self._state = _CLOSED
                return
            subscriptions = list(self._subscriptions)
            segment = self._segment
            assert segment is not None
            try:
                try:
                    self._leave_groups(segment)
                finally:
                    self._stop_reader()
            finally:
                try:
                    ring, self._ring, self._writer = self._ring, None, None
                    assigner, self._assigner = self._assigner, None
                    if assigner is not None:
                        self._retired["corrupt"] += assigner.corrupt
                        self._retired["overcommitted"] += assigner.overcommitted
                        assigner.release()
                    if ring is not None:
                        directory.retire_ring(segment, ring)
                finally:
                    try:
                        if self._waker is not None:
                            self._waker.close()
                        directory.reclaim_dead(segment)
                        groups.settle_dead(segment)
                    finally:
                        try:
                            segment.detach()
                        finally:
                            self._segment = None
                            self._state = _CLOSED
                            _open_instances.discard(self)
        try:
            self._sync_inbox.close()
        finally:
            for sub in subscriptions:
                sub.close_from_transport()

    def _check_not_ended(self, action: str) -> None:
        if self._state is _CLOSED:
            raise BusClosedError(f"cannot {action}: ShmBus {self.name!r} is closed")
        if self._state is _FORKED:
            raise ForkedBusError(
                f"cannot {action}: this ShmBus {self.name!r} was connected in parent process "
                f"and inherited by fork(); create and connect a new ShmBus in the child"
            )

    def _ensure_open(self, action: str) -> None:
        """Connect implicitly: briefly if an event loop runs in this thread
        (it must not wait for another process), else as :meth:`connect_sync`."""
        if self._state is not _OPEN:
            self._check_not_ended(action)
            try:
                asyncio.get_running_loop()
            except RuntimeError:
                self._connect()
                return
            try:
                self._connect(_ON_LOOP_ATTACH_TIMEOUT)
            except ShmBusError as exc:
                raise type(exc)(f"{exc}; use 'await bus.connect()' before {action}") from None

    # ─── Publishing ───

    async def publish(
        self,
        topic: str,
        payload: dict[str, Any],
        *,
        event_type: str = "",
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """Publish *payload* on *topic*, fire-and-forget (see :meth:`publish_nowait`)."""
        if self._state is not _OPEN:
            await self.connect()
        self.publish_nowait(topic, payload, event_type=event_type, headers=headers)

    def publish_nowait(
        self,
        topic: str,
        payload: dict[str, Any],
        *,
        event_type: str = "",
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """Publish without an event loop; safe to call from any thread.

        *headers* ride in the envelope (the ring's records are unchanged).

        Raises
        ------
        TypeError, ValueError
            Bad topic, payload, event type or headers, or an envelope over
            ``max_event_size`` (the bus is unaffected).
        SegmentSpaceError
            The first publish of this instance found no room in ``/dev/shm``
            for its ring (the message names both sizes).
        RuntimeError
            The bus is closed (or inherited across fork).
        """
        if self._state is not _OPEN:
            self._ensure_open("publish")
        topic_key = self._topic_keys.get(topic)
        if topic_key is None:
            topic_key = self._topic_key(topic)
        body = encode_envelope(topic, payload, event_type, self.max_event_size, headers=headers)
        self._commit(topic_key, body)

    def republish(self, event: Event) -> None:
        """Publish *event* keeping its whole envelope (``id``, ``ts``, ``type``,
        ``v``, ``headers``, ``reply_to``), for bridges and fallbacks that relay
        events between transports. Safe from any thread; raises like
        :meth:`publish_nowait`.
        """
        if self._state is not _OPEN:
            self._ensure_open("publish")
        topic = event.topic
        topic_key = self._topic_keys.get(topic)
        if topic_key is None:
            topic_key = self._topic_key(topic)
        body = encode_envelope(
            topic,
            event.payload,
            event.type,
            self.max_event_size,
            event_id=event.id,
            ts=event.ts,
            v=event.v,
            headers=event.headers,
            reply_to=event.reply_to,
        )
        self._commit(topic_key, body)

    async def request(
        self,
        topic: str,
        payload: dict[str, Any],
        *,
        timeout: float = 1.0,
        event_type: str = "",
        headers: Mapping[str, str] | None = None,
    ) -> Event:
        """Publish a request and return the first reply (see
        :meth:`BaseBus.request <shmbus.contract.BaseBus.request>`).

        The request is an ordinary event with a ``reply_to`` in its
        envelope; the reply comes back through this instance's inbox
        subscription (:mod:`shmbus.inbox`). Whether anyone listens is not
        known here, so a request nobody answers raises
        :class:`~shmbus.errors.RequestTimeoutError` after *timeout* seconds.
        """
        validate_topic(topic)
        timeout = check_timeout(timeout)
        if self._state is not _OPEN:
            await self.connect()
        request_sender = self._request_sender(topic, payload, event_type, headers)
        # With spin_for_replies, a hold is taken just before the request is
        # published, when the inbox's subscription (and so the reader)
        # exists, and given back however the request ends.
        held: list[BusReader] = []

        def send(reply_to: str) -> None:
            reader = self._reader
            if self.spin_for_replies and reader is not None and not held:
                reader.hold_spin()
                held.append(reader)
            request_sender(reply_to)

        try:
            return await self._inbox.request(topic, timeout, send)
        finally:
            for reader in held:
                reader.release_spin()

    def request_sync(
        self,
        topic: str,
        payload: dict[str, Any],
        *,
        timeout: float = 1.0,
        event_type: str = "",
        headers: Mapping[str, str] | None = None,
    ) -> Event:
        """:meth:`request` for code without an event loop, from any number of
        threads at once (see :meth:`BaseBus.request_sync
        <shmbus.contract.BaseBus.request_sync>`).

        The replies come through this instance's blocking inbox, one
        blocking subscription (a slot of the bus) opened by the first call;
        the waiting threads take turns reading it (:mod:`shmbus.inbox`).
        Connects the bus first if needed, as :meth:`connect_sync` does. A
        request nobody answers raises
        :class:`~shmbus.errors.RequestTimeoutError` after *timeout* seconds.
        """
        validate_topic(topic)
        timeout = check_timeout(timeout)
        refuse_on_event_loop(f"ShmBus {self.name!r}")
        if self._state is not _OPEN:
            self._ensure_open("request")
        send = self._request_sender(topic, payload, event_type, headers)
        return self._sync_inbox.request(topic, timeout, send)

    def _request_sender(
        self,
        topic: str,
        payload: dict[str, Any],
        event_type: str,
        headers: Mapping[str, str] | None,
    ) -> Callable[[str], None]:
        """What an inbox calls to publish the request with its ``reply_to``."""

        def send(reply_to: str) -> None:
            self.republish(
                Event(
                    topic,
                    payload,
                    event_type,
                    headers=EMPTY_HEADERS if headers is None else headers,
                    reply_to=reply_to,
                )
            )

        return send

    def _commit(self, topic_key: tuple[bytes, int], body: bytes) -> None:
        """Append one encoded envelope to this instance's ring and wake
        sleeping readers."""
        raw_topic, topic_crc = topic_key
        checksum = crc32(body, topic_crc)
        with self._thread_lock:
            if self._state is not _OPEN:
                self._check_not_ended("publish")
            writer = self._writer
            if writer is None:
                writer = self._open_ring()
            segment = self._segment
            waker = self._waker
            assert segment is not None and waker is not None
            if ShmBus._critical_section_hook is not None:
                self._arm_test_hook(writer)
            assigner = self._assigner
            assert assigner is not None
            block = assigner.assign(raw_topic)
            if block:
                before = writer.commit_point
                try:
                    writer.append(raw_topic, body, checksum, block)
                finally:
                    assigner.finish(writer.commit_point != before)
            else:
                writer.append(raw_topic, body, checksum)
            # The commit before the loads of the sleep flags (shmbus._core.wakeup).
            full_fence()
            mm = segment.mm
            flag = mm.find(_AWAKE, OFF_SLEEP_FLAGS, _SLEEP_FLAGS_END)
            while flag >= 0:
                mm[flag] = 0
                waker.wake(flag - OFF_SLEEP_FLAGS)
                flag = mm.find(_AWAKE, flag + 1, _SLEEP_FLAGS_END)
            # A counter, not part of the protocol: after the wake-ups, which
            # are on the subscribers' latency path.
            published = self._published = self._published + 1
            segment.words[self._published_word] = published

    def _open_ring(self) -> RingWriter:
        """First publish: create this instance's ring (the caller holds the
        thread lock)."""
        segment = self._segment
        assert segment is not None
        ring = directory.install_ring(segment, self.capacity, self.max_event_size)
        self._ring = ring
        self._assigner = groups.Assigner(segment, ring.entry, ring.words)
        writer = self._writer = RingWriter(
            ring.mm, ring.words, RING_OFFSET, ring.capacity, ring.max_event_size
        )
        return writer

    def _own_ring_key(self) -> RingKey | None:
        ring = self._ring
        return (ring.entry, ring.gen) if ring is not None else None

    @staticmethod
    def _arm_test_hook(writer: RingWriter) -> None:
        hook = ShmBus._critical_section_hook
        if hook is not None:
            writer.before_commit = lambda: hook("mid-record")

    def _topic_key(self, topic: str) -> tuple[bytes, int]:
        """Validate *topic* and cache its bytes and their CRC (see ring.content_checksum)."""
        validate_topic(topic)
        raw = topic.encode("utf-8")
        if len(self._topic_keys) >= _TOPIC_CACHE_LIMIT:
            self._topic_keys.clear()
        key = self._topic_keys[topic] = (raw, crc32(raw))
        return key

    # ─── Subscribing ───

    def subscribe(self, pattern: str, *, queue: str | None = None) -> QueueSubscription:
        """Subscribe to events whose topic matches *pattern*.

        Must be called with an event loop running (that loop runs the
        instance's reader), the same loop for every subscription of the
        instance while any is open: use one instance per event loop. The
        subscription sees every matching event published after this call
        returns. Takes no lock another process could hold.

        With *queue*, the subscription joins the queue group of every
        subscription on the bus with this pattern and queue name, in any
        process: each matching event is delivered to one member only (one
        with room in its queue: ``queue_size`` is how many events a member
        may hold undelivered). Queue names are non-empty, without
        whitespace, at most :data:`~shmbus.contract.MAX_QUEUE_NAME_LENGTH`
        bytes. Raises :class:`~shmbus.errors.NoFreeSlotError` if the bus
        holds its maximum of members.
        """
        validate_pattern(pattern)
        if queue is not None:
            validate_queue_name(queue)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            raise RuntimeError(
                "ShmBus.subscribe() must be called from a running event loop; "
                "the loop runs the bus's reader"
            ) from None
        if self._state is not _OPEN:
            self._ensure_open("subscribe")
        sub: QueueSubscription
        if queue is None:
            sub = QueueSubscription(pattern, maxsize=self.queue_size, on_close=self._forget)
        else:
            sub = groups.MemberSubscription(
                pattern, queue, maxsize=self.queue_size, on_close=self._forget
            )
        orphans: list[Target] = []
        with self._thread_lock:
            self._check_not_ended("subscribe")
            segment = self._segment
            assert segment is not None
            reader = self._reader
            if reader is not None and reader.loop.is_closed():
                # Subscriptions left on a loop that has since closed can
                # never be consumed; end them and start over on this loop.
                orphans = reader.subscriptions
                self._stop_reader()
                reader = None
            if reader is not None and reader.loop is not loop:
                # One reader per instance runs on one loop; were that loop to
                # end first, this subscription would silently stop receiving.
                raise RuntimeError(
                    f"ShmBus {self.name!r} already runs its reader on another event loop "
                    "(another thread); use one ShmBus instance per event loop"
                )
            if reader is None:
                reader = self._reader = BusReader(
                    segment, loop, self._own_ring_key, low_latency=self.low_latency
                )
            reader.add(sub)
            if isinstance(sub, groups.MemberSubscription):
                self._join(segment, reader, sub)
            self._subscriptions.add(sub)
        for orphan in orphans:
            if isinstance(orphan, QueueSubscription):
                orphan.close_from_transport()
        return sub

    def subscribe_sync(self, pattern: str) -> BlockingSubscription:
        """Subscribe to events whose topic matches *pattern*, for code without
        an event loop: a :class:`~shmbus.delivery.BlockingSubscription`,
        consumed with ``for event in sub`` or ``sub.get(timeout)`` from any
        thread.

        It sees every matching event published after this call returns, like
        :meth:`subscribe`. It has a reader of its own (a slot of the bus and
        a doorbell in ``/dev/shm``), run by the thread that consumes it; any
        number of threads may each consume one. Connects the bus first if
        needed (waiting as :meth:`connect_sync` does, when no event loop runs
        in this thread).

        Raises
        ------
        TypeError, ValueError
            Bad pattern.
        RuntimeError
            The bus is closed (or inherited across fork).
        NoFreeSlotError
            Every slot of the bus is in use (each blocking subscription takes
            one; a bus has 128).
        """
        validate_pattern(pattern)
        if self._state is not _OPEN:
            self._ensure_open("subscribe")
        with self._thread_lock:
            self._check_not_ended("subscribe")
            segment = self._segment
            assert segment is not None
            st = os.fstat(segment.fd)
        # Attaching a slot makes system calls: not under the lock publishers take.
        reader = SyncReader(self._options, (st.st_dev, st.st_ino))
        try:
            sub = BlockingSubscription(
                pattern, maxsize=self.queue_size, on_close=self._forget, pump=reader
            )
            reader.add(sub)
            with self._thread_lock:
                self._check_not_ended("subscribe")
                self._subscriptions.add(sub)
                self._sync_readers[sub] = reader
        except BaseException:
            reader.close()
            raise
        return sub


    def _join(
        self, segment: Segment, reader: BusReader, sub: groups.MemberSubscription
    ) -> None:
        """Make *sub* a member of its group: after reader.add (groups rule J1)."""
        own = self._own_ring_key()
        try:
            membership = groups.join(
                segment,
                sub.group_queue,
                sub.pattern,
                self.queue_size,
                held={member.membership.index for member in self._members if member.membership},
                own_ring=own[0] if own else -1,
            )
        except BaseException:
            reader.remove(sub)
            if not reader.subscriptions:
                self._stop_reader()
            raise
        sub.bind(membership, segment, lambda: self._group_of(membership))
        self._members.add(sub)

    def _leave(self, segment: Segment, sub: groups.MemberSubscription) -> None:
        """*sub*'s membership ends (groups rule M4). The caller holds the thread lock."""
        self._members.discard(sub)
        membership = sub.unbind()
        if membership is not None:
            own = self._own_ring_key()
            groups.leave(segment, membership, sub.delivered, own[0] if own else -1)

    def _leave_groups(self, segment: Segment) -> None:
        """Every membership of this instance ends; each step runs even if one raised."""
        members = list(self._members)
        try:
            for sub in members:
                self._leave(segment, sub)
        finally:
            for sub in members:
                sub.unbind()
            self._members.clear()

    def _forget(self, sub: QueueSubscription | BlockingSubscription) -> None:
        with self._thread_lock:
            self._subscriptions.discard(sub)
            if (
                isinstance(sub, groups.MemberSubscription)
                and self._state is _OPEN
                and self._segment is not None
            ):
                self._leave(self._segment, sub)
            self._retired["delivered"] += sub.delivered
            if isinstance(sub, BlockingSubscription):
                self._retired["dropped"] += sub.dropped
                sync_reader = self._sync_readers.pop(sub, None)
                if sync_reader is not None:
                    self._retired["corrupt"] += sync_reader.follower.corrupt
                    self._retired["lapped"] += sync_reader.follower.lapped
                return
            reader = self._reader
            if reader is None:
                self._retired["dropped"] += sub.dropped
                return
            reader.remove(sub)
            self._retired["dropped"] += sub.dropped
            if not reader.subscriptions:
                self._stop_reader()

    def _stop_reader(self) -> None:
        reader = self._reader
        if reader is None:
            return
        self._reader = None
        try:
            for sub in reader.subscriptions:
                reader.remove(sub)
            self._retired["corrupt"] += reader.corrupt
            self._retired["lapped"] += reader.lapped
        finally:
            reader.stop()

    # ─── Accounting ───

    def stats(self) -> BusStats:
        """Counters of this instance since it connected (see :class:`BusStats`)."""
        with self._thread_lock:
            live = list(self._subscriptions)
            reader = self._reader
            retired = dict(self._retired)
            followers = [sync.follower for sync in self._sync_readers.values()]
            if reader is not None:
                followers.append(reader.follower)
            return BusStats(
                published=self._published,
                delivered=retired["delivered"] + sum(sub.delivered for sub in live),
                dropped=retired["dropped"] + sum(sub.dropped for sub in live),
                corrupt=retired["corrupt"]
                + sum(f.corrupt for f in followers)
                + (self._assigner.corrupt if self._assigner else 0),
                lapped=retired["lapped"] + sum(f.lapped for f in followers),
                publish_errors=0,  # an append into one's own ring cannot fail
                subscriptions=len(live),
                overcommitted=retired["overcommitted"]
                + (self._assigner.overcommitted if self._assigner else 0),
            )

    def group_statistics(self) -> list[GroupStatistics]:
        """Every queue group on the bus (members in every process), by queue
        name and pattern: what each member delivered, what the group dropped.
        Raises :class:`RuntimeError` if the bus is closed."""
        return self._read_groups(None)

    def _read_groups(self, only: tuple[str, str] | None) -> list[GroupStatistics]:
        with self._thread_lock:
            if self._state is not _OPEN:
                self._check_not_ended("read group statistics")
                return []
            segment = self._segment
            assert segment is not None
            held = {sub.membership.index for sub in self._members if sub.membership is not None}
            return groups.group_statistics(segment.mm, segment.words, segment.fd, held, only)

    def _group_of(self, membership: groups.Membership) -> GroupStatistics | None:
        try:
            found = self._read_groups((membership.queue, membership.pattern))
        except RuntimeError:
            return None
        return found[0] if found else None

    # ─── fork() and exit ───

    def _abandon_after_fork(self) -> None:
        """In a fork child: let go of the parent's attachment untouched."""
        if self._state is not _OPEN:
            return
        self._state = _FORKED
        self._thread_lock = threading.Lock()  # may have been held at fork time
        if self._reader is not None:
            self._reader.abandon()
            self._reader = None
        if self._ring is not None:
            self._ring.close()
            self._ring = None
            self._writer = None
            self._assigner = None
        for member in self._members:
            member.unbind()
        self._members.clear()
        if self._segment is not None:
            self._segment.abandon()
        if self._waker is not None:
            self._waker.close()  # the child's copies of the FIFO descriptors
            self._waker = None
        for blocking, sync_reader in self._sync_readers.items():
            sync_reader.abandon()
            blocking.abandon()
        for sub in list(self._subscriptions):
            sub.close_from_transport()
        self._subscriptions.clear()


def _after_fork_in_child() -> None:
    for bus in list(_open_instances):
        bus._abandon_after_fork()
    _open_instances.clear()


def _close_at_exit() -> None:
    """A process that exits without closing its buses leaves nothing behind."""
    for bus in list(_open_instances):
        try:
            bus.close_sync()
        except Exception as exc:  # exiting: report, never raise
            log.debug("closing %r at exit failed: %s", bus, exc)


os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(_close_at_exit)


def _resolve_group(group: str | int | None) -> int | None:
    if group is None:
        return None
    if isinstance(group, bool):
        raise TypeError(f"group must be a group name or id, not {group!r}")
    if isinstance(group, str):
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise ValueError(f"group {group!r} does not exist on this host") from None
    elif isinstance(group, int):
        gid = group
        if not 0 <= gid < 0xFFFFFFFF:
            raise ValueError(f"group id {gid} is out of range (0 to {0xFFFFFFFF - 1})")
    else:
        raise TypeError(f"group must be a group name or id, not {type(group).__name__}")
    if os.geteuid() != 0 and gid != os.getegid() and gid not in os.getgroups():
        raise ValueError(
            f"group {group!r} (gid {gid}) is not one of this process's groups "
            f"{sorted({os.getegid(), *os.getgroups()})}; only its members may share a bus with it"
        )
    return gid
