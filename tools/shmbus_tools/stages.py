"""Per-stage latency of one event across two processes (issue 9, item 1).

A publisher process publishes paced events (``RATE`` per second, the first
``warmup`` dropped) to a subscriber process on the same ShmBus; both stamp
``time.monotonic_ns()`` (CLOCK_MONOTONIC, one clock for every process) at
each stage of the path into an anonymous shared mapping, indexed
``[stage][seq]``. The stamps come from wrappers installed at run time, in
the child processes only: the library is never changed for this.

Rules
-----
* A stage is stamped by the process that passes it; the subscriber keeps
  the latest stamp of each of its stages and files it under an event's
  ``seq`` when it decodes that event, then forgets it: a stage the event did
  not pass through (read during a spin, or by a recheck timer) stays 0, and
  such an event counts as "not woken by its doorbell", outside the table.
* The doorbell stage is stamped on entry to ``Waker.wake``: the subscriber
  may run before the system call that wakes it has returned to the
  publisher. The cost of that call is reported beside the chain.
* The reference rows (a bare POSIX semaphore, a FIFO watched by
  ``loop.add_reader``) run in the same way in the same run, so ratios
  compare like with like on a shared machine.
* Children are forked from a parent that holds no bus, joined with a
  deadline, killed past it; the semaphore is unlinked as soon as it exists,
  the FIFO lives in a private temporary directory, and the bus's files are
  checked to be gone from /dev/shm afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import mmap
import multiprocessing
import os
import selectors
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.synchronize import Event as MpEvent
from typing import Any

RATE = 2000.0
TOPIC = "decky.7.traffic"
PATTERN = "decky.*.traffic"
_MP = multiprocessing.get_context("fork")
_JOIN = 30.0

# The chains, in path order. Each name is the stamp taken where that stage ends.
ASYNC_STAGES = (
    ("publish entry", "publish_nowait() called"),
    ("encoded", "encode_envelope returned"),
    ("committed", "RingWriter.append returned"),
    ("doorbell", "Waker.wake entered (FIFO byte about to be written)"),
    ("woken", "subscriber's selector.select returned the FIFO"),
    ("wake callback", "BusReader._on_wake (add_reader callback) entered"),
    ("reader step", "BusReader._step entered"),
    ("ring read", "RingReader.read returned"),
    ("decoded", "decode_envelope returned"),
    ("queued", "QueueSubscription._enqueue returned (waiter woken)"),
    ("consumer", "consumer resumed after `await` (event in hand)"),
)
SYNC_STAGES = (
    ("publish entry", "publish_nowait() called"),
    ("encoded", "encode_envelope returned"),
    ("committed", "RingWriter.append returned"),
    ("doorbell", "Waker.wake entered (semaphore about to be posted)"),
    ("woken", "consuming thread's doorbell wait returned"),
    ("reader step", "SyncReader.step entered"),
    ("ring read", "RingReader.read returned"),
    ("decoded", "decode_envelope returned"),
    ("queued", "BlockingSubscription.deliver returned"),
    ("consumer", "get() returned (event in the consumer's hand)"),
)
_FIRST = 0
# Extra rows of the stamp array beyond a chain: Waker.wake's return.
_EXTRA = 1


@dataclass
class Run:
    """One row's stamps, copied out of the shared mapping."""

    label: str
    stages: tuple[str, ...]
    stamps: list[list[int]]  # [stage][seq], 0 where not stamped
    warmup: int

    def complete(self) -> list[int]:
        """The seqs after warm-up that passed every stage, in order."""
        chain = len(self.stages)
        out = []
        for seq in range(self.warmup, len(self.stamps[0])):
            values = [self.stamps[k][seq] for k in range(chain)]
            if all(values):
                out.append(seq)
        return out

    def received(self) -> list[int]:
        last = len(self.stages) - 1
        return [
            s
            for s in range(self.warmup, len(self.stamps[0]))
            if self.stamps[0][s] and self.stamps[last][s]
        ]

    def end_to_end(self) -> list[int]:
        last = len(self.stages) - 1
        return [self.stamps[last][s] - self.stamps[_FIRST][s] for s in self.received()]


def quantile(values: Sequence[int], q: float) -> float:
    """The *q* quantile of *values* (ns) in µs; NaN for none."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1000.0


# ─── The shared stamp array ───


class _Stamps:
    def __init__(self, rows: int, n: int) -> None:
        self.rows, self.n = rows, n
        self._mapping = mmap.mmap(-1, 8 * rows * n)  # anonymous, shared across fork
        self.view = memoryview(self._mapping).cast("q")

    def copy(self) -> list[list[int]]:
        return [self.view[r * self.n : (r + 1) * self.n].tolist() for r in range(self.rows)]

    def close(self) -> None:
        self.view.release()
        self._mapping.close()


def _patch(owner: object, name: str, replacement: object) -> None:
    """Replace *owner*'s attribute *name* (a child process's copy only)."""
    setattr(owner, name, replacement)


def _original(owner: object, name: str) -> Any:
    return getattr(owner, name)


def _payload(seq: int) -> dict[str, Any]:
    return {"seq": seq, **{f"field{i}": i * 1000 for i in range(7)}}


def _paced(n: int, send: Callable[[int], None]) -> None:
    period = 1e9 / RATE
    base = time.monotonic_ns()
    for seq in range(n):
        delay = (base + seq * period - time.monotonic_ns()) / 1e9
        if delay > 0:
            time.sleep(delay)
        send(seq)


def _run_children(
    targets: Sequence[tuple[Callable[..., None], tuple[Any, ...]]], deadline: float
) -> None:
    procs = [_MP.Process(target=fn, args=args, daemon=True) for fn, args in targets]
    try:
        for proc in procs:
            proc.start()
        end = time.monotonic() + deadline
        for proc in procs:
            proc.join(max(0.1, end - time.monotonic()))
        for proc in procs:
            if proc.exitcode not in (0, None):
                raise RuntimeError(f"profile child {proc.name} exited with {proc.exitcode}")
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
                proc.join(3)
            if proc.is_alive():
                proc.kill()
                proc.join()


# ─── shmbus: the publisher ───


def _publisher(
    name: str, n: int, view: memoryview, ready: MpEvent, instrument: bool, chain: int
) -> None:
    from shmbus import ShmBus
    from shmbus import shm as shm_module
    from shmbus._core.ring import RingWriter
    from shmbus._core.wakeup import Waker

    mono = time.monotonic_ns
    current = [-1]  # the seq being published; -1 for the warm-up event
    if instrument:
        encode = _original(shm_module, "encode_envelope")
        append, wake = RingWriter.append, Waker.wake

        def encode_stamped(*args: Any, **kwargs: Any) -> bytes:
            body: bytes = encode(*args, **kwargs)
            if current[0] >= 0:
                view[1 * n + current[0]] = mono()
            return body

        def append_stamped(self: RingWriter, *args: Any) -> int:
            result = append(self, *args)
            if current[0] >= 0:
                view[2 * n + current[0]] = mono()
            return result

        def wake_stamped(self: Waker, slot: int) -> bool:
            seq = current[0]
            if seq >= 0:
                view[3 * n + seq] = mono()
            result = wake(self, slot)
            if seq >= 0:
                view[chain * n + seq] = mono()
            return result

        _patch(shm_module, "encode_envelope", encode_stamped)
        _patch(RingWriter, "append", append_stamped)
        _patch(Waker, "wake", wake_stamped)

    bus = ShmBus(name)
    bus.connect_sync()
    try:
        if not ready.wait(_JOIN):
            return
        bus.publish_nowait("warm.up", {})  # the first publish creates the ring
        time.sleep(0.05)

        def send(seq: int) -> None:
            payload = _payload(seq)
            current[0] = seq
            view[seq] = mono()
            bus.publish_nowait(TOPIC, payload)

        _paced(n, send)
        time.sleep(0.2)
    finally:
        bus.close_sync()


# ─── shmbus: the subscribers ───


def _wrap_subscriber_common(
    n: int, view: memoryview, latest: dict[str, int], index: dict[str, int], step_cls: Any
) -> None:
    from shmbus._core import reader as reader_module
    from shmbus._core.ring import RingReader

    mono = time.monotonic_ns
    read, decode = RingReader.read, _original(reader_module, "decode_envelope")
    step = step_cls._step if hasattr(step_cls, "_step") else step_cls.step
    step_name = "_step" if hasattr(step_cls, "_step") else "step"

    def step_stamped(self: Any, *args: Any, **kwargs: Any) -> Any:
        latest["reader step"] = mono()
        return step(self, *args, **kwargs)

    def read_stamped(self: Any, *args: Any) -> Any:
        batch = read(self, *args)
        latest["ring read"] = mono()
        return batch

    def decode_stamped(*args: Any) -> Any:
        event = decode(*args)
        now = mono()
        seq = event.payload.get("seq", -1) if isinstance(event.payload, dict) else -1
        if 0 <= seq < n:
            for stage, row in index.items():
                if stage in latest:
                    view[row * n + seq] = latest[stage]
                    latest[stage] = 0
            view[index["decoded"] * n + seq] = now
        return event

    _patch(step_cls, step_name, step_stamped)
    _patch(RingReader, "read", read_stamped)
    _patch(reader_module, "decode_envelope", decode_stamped)


def _async_subscriber(
    name: str, n: int, view: memoryview, ready: MpEvent, instrument: bool, timeout: float
) -> None:
    from shmbus import ShmBus
    from shmbus._core.reader import BusReader
    from shmbus.delivery import QueueSubscription

    mono = time.monotonic_ns
    index = {stage: k for k, (stage, _) in enumerate(ASYNC_STAGES)}
    latest = {"woken": 0, "wake callback": 0, "reader step": 0, "ring read": 0}
    last = len(ASYNC_STAGES) - 1
    if instrument:
        stamp_index = {k: index[k] for k in latest}
        stamp_index["decoded"] = index["decoded"]
        _wrap_subscriber_common(n, view, latest, stamp_index, BusReader)
        on_wake, enqueue = BusReader._on_wake, QueueSubscription._enqueue

        def on_wake_stamped(self: BusReader) -> None:
            latest["wake callback"] = mono()
            on_wake(self)

        def enqueue_stamped(self: QueueSubscription, events: Any) -> None:
            events = list(events)
            enqueue(self, events)
            now = mono()
            for event in events:
                seq = event.payload.get("seq", -1)
                if 0 <= seq < n:
                    view[index["queued"] * n + seq] = now

        _patch(BusReader, "_on_wake", on_wake_stamped)
        _patch(QueueSubscription, "_enqueue", enqueue_stamped)

    async def consume() -> None:
        bus = ShmBus(name)
        await bus.connect()
        try:
            sub = bus.subscribe(PATTERN)
            loop = asyncio.get_running_loop()
            if instrument:
                selector: selectors.BaseSelector = loop._selector  # type: ignore[attr-defined]
                select = selector.select

                def select_stamped(timeout: float | None = None) -> Any:
                    ready_fds = select(timeout)
                    if ready_fds:
                        latest["woken"] = mono()
                    return ready_fds

                _patch(selector, "select", select_stamped)
            # Ends the iteration if the last event never comes (at-most-once).
            loop.call_later(timeout, sub.close_from_transport)
            ready.set()
            async for event in sub:
                now = mono()
                seq = event.payload.get("seq", -1)
                if 0 <= seq < n:
                    view[last * n + seq] = now
                    if seq == n - 1:
                        break
        finally:
            await bus.close()

    asyncio.run(consume())


def _sync_subscriber(
    name: str, n: int, view: memoryview, ready: MpEvent, instrument: bool, timeout: float
) -> None:
    from shmbus import ShmBus
    from shmbus._core.sync_reader import SyncReader
    from shmbus._core.wakeup import Doorbell, FifoBell
    from shmbus.delivery import BlockingSubscription

    mono = time.monotonic_ns
    index = {stage: k for k, (stage, _) in enumerate(SYNC_STAGES)}
    latest = {"woken": 0, "reader step": 0, "ring read": 0}
    last = len(SYNC_STAGES) - 1
    if instrument:
        stamp_index = {k: index[k] for k in latest}
        stamp_index["decoded"] = index["decoded"]
        _wrap_subscriber_common(n, view, latest, stamp_index, SyncReader)
        deliver = BlockingSubscription.deliver

        def deliver_stamped(self: BlockingSubscription, events: Any) -> None:
            events = list(events)
            deliver(self, events)
            now = mono()
            for event in events:
                seq = event.payload.get("seq", -1)
                if 0 <= seq < n:
                    view[index["queued"] * n + seq] = now

        _patch(BlockingSubscription, "deliver", deliver_stamped)
        for bell_cls in (Doorbell, FifoBell):
            wait = bell_cls.wait

            def wait_stamped(self: Any, seconds: float, _wait: Any = wait) -> bool:
                rung = bool(_wait(self, seconds))
                if rung:
                    latest["woken"] = mono()
                return rung

            _patch(bell_cls, "wait", wait_stamped)

    bus = ShmBus(name)
    bus.connect_sync()
    try:
        with bus.subscribe_sync(PATTERN) as sub:
            ready.set()
            end = time.monotonic() + timeout
            while (remaining := end - time.monotonic()) > 0:
                try:
                    event = sub.get(timeout=remaining)
                except TimeoutError:
                    break
                now = mono()
                seq = event.payload.get("seq", -1)
                if 0 <= seq < n:
                    view[last * n + seq] = now
                    if seq == n - 1:
                        break
    finally:
        bus.close_sync()


def run_shmbus(name: str, n: int, warmup: int, *, sync: bool, instrument: bool, label: str) -> Run:
    stages = SYNC_STAGES if sync else ASYNC_STAGES
    chain = len(stages)
    stamps = _Stamps(chain + _EXTRA, n)
    try:
        ready = _MP.Event()
        budget = n / RATE + 15.0
        subscriber = _sync_subscriber if sync else _async_subscriber
        _run_children(
            [
                (subscriber, (name, n, stamps.view, ready, instrument, budget)),
                (_publisher, (name, n, stamps.view, ready, instrument, chain)),
            ],
            budget + 10.0,
        )
        return Run(label, tuple(s for s, _ in stages), stamps.copy(), warmup)
    finally:
        stamps.close()


# ─── References ───


def run_semaphore(n: int, warmup: int) -> Run:
    """A bare POSIX semaphore posted by one process, waited on by another."""
    import posix_ipc

    stamps = _Stamps(2, n)
    sem = posix_ipc.Semaphore(f"/shmbus-profile-{os.getpid()}", posix_ipc.O_CREX)
    sem.unlink()  # nothing in /dev/shm from here on, whatever happens
    view = stamps.view

    def waiter() -> None:
        for seq in range(n):
            try:
                sem.acquire(n / RATE + 10.0)
            except posix_ipc.BusyError:
                return
            view[n + seq] = time.monotonic_ns()

    def poster() -> None:
        time.sleep(0.1)

        def send(seq: int) -> None:
            view[seq] = time.monotonic_ns()
            sem.release()

        _paced(n, send)

    try:
        _run_children([(waiter, ()), (poster, ())], n / RATE + 20.0)
        return Run("bare POSIX semaphore", ("post", "woken"), stamps.copy(), warmup)
    finally:
        sem.close()
        stamps.close()


def run_fifo(n: int, warmup: int) -> Run:
    """A FIFO byte per event, the reader on ``loop.add_reader`` resuming a
    consumer through an ``asyncio.Queue`` (shmbus's wake-up alone)."""
    stamps = _Stamps(2, n)
    directory = tempfile.mkdtemp(prefix="shmbus-profile-")
    path = os.path.join(directory, "fifo")
    os.mkfifo(path, 0o600)
    ready = _MP.Event()
    view = stamps.view

    def reader() -> None:
        async def consume() -> None:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
            loop = asyncio.get_running_loop()
            queue: asyncio.Queue[int] = asyncio.Queue()
            taken = 0

            def readable() -> None:
                nonlocal taken
                with contextlib.suppress(BlockingIOError):
                    for _ in os.read(fd, 4096):
                        queue.put_nowait(taken)
                        taken += 1

            loop.add_reader(fd, readable)
            ready.set()
            try:
                for _ in range(n):
                    seq = await asyncio.wait_for(queue.get(), n / RATE + 10.0)
                    view[n + seq] = time.monotonic_ns()
            finally:
                loop.remove_reader(fd)
                os.close(fd)

        with contextlib.suppress(TimeoutError):
            asyncio.run(consume())

    def writer() -> None:
        if not ready.wait(_JOIN):
            return
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)

        def send(seq: int) -> None:
            view[seq] = time.monotonic_ns()
            os.write(fd, b"\x01")

        try:
            _paced(n, send)
        finally:
            os.close(fd)

    try:
        _run_children([(reader, ()), (writer, ())], n / RATE + 20.0)
        return Run("FIFO + loop.add_reader", ("write", "consumer"), stamps.copy(), warmup)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
        stamps.close()


# ─── The whole measurement and its table ───


@dataclass
class StageReport:
    n: int
    warmup: int
    runs: dict[str, Run]
    leftovers: list[str]


def measure(n: int = 4000, warmup: int = 500, name: str | None = None) -> StageReport:
    """Every row, in one run; *name* is the bus's name (one per row is
    derived from it)."""
    from shmbus._core.shmfiles import bus_file_paths

    base = name or f"profile-stages-{os.getpid()}"
    runs: dict[str, Run] = {}
    leftovers: list[str] = []
    rows = [
        ("async", True, False, "shmbus asyncio, instrumented"),
        ("sync", True, True, "shmbus subscribe_sync, instrumented"),
        ("async-bare", False, False, "shmbus asyncio, not instrumented"),
        ("sync-bare", False, True, "shmbus subscribe_sync, not instrumented"),
    ]
    runs["semaphore"] = run_semaphore(n, warmup)
    runs["fifo"] = run_fifo(n, warmup)
    for key, instrument, sync, label in rows:
        bus_name = f"{base}-{key}"
        runs[key] = run_shmbus(bus_name, n, warmup, sync=sync, instrument=instrument, label=label)
        leftovers += [p for p in bus_file_paths(bus_name) if os.path.exists(p)]
    return StageReport(n, warmup, runs, leftovers)


def _fmt(value: float) -> str:
    return "n/a" if value != value else f"{value:.1f}"


def stage_rows(run: Run, descriptions: Sequence[tuple[str, str]]) -> list[tuple[str, float, float]]:
    """(label, p50 µs, p99 µs) of each stage's delta over complete events."""
    seqs = run.complete()
    rows = []
    for k in range(1, len(run.stages)):
        deltas = [run.stamps[k][s] - run.stamps[k - 1][s] for s in seqs]
        label = f"{run.stages[k - 1]} → {run.stages[k]}"
        rows.append((label, quantile(deltas, 0.5), quantile(deltas, 0.99)))
    return rows


def report(result: StageReport) -> str:
    runs, n, warmup = result.runs, result.n, result.warmup
    sem = runs["semaphore"].end_to_end()
    sem50, sem99 = quantile(sem, 0.5), quantile(sem, 0.99)
    out = [
        "## Per-stage latency across two processes",
        "",
        f"{n:,} events at {RATE:,.0f}/s from a publisher process to a subscriber process, "
        f"the first {warmup:,} dropped; every stamp is `time.monotonic_ns()`, taken by "
        "wrappers installed in the child processes only (`tools/shmbus_tools/stages.py`). "
        "All rows come from this one run, one after the other.",
        "",
        "### End to end",
        "",
        "| row | events | p50 µs | p99 µs | p50 / semaphore | p99 / semaphore |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for run in runs.values():
        e2e = run.end_to_end()
        p50, p99 = quantile(e2e, 0.5), quantile(e2e, 0.99)
        out.append(
            f"| {run.label} | {len(e2e):,} | {_fmt(p50)} | {_fmt(p99)} | "
            f"{p50 / sem50:.2f} | {p99 / sem99:.2f} |"
        )
    for key, stages in (("async", ASYNC_STAGES), ("sync", SYNC_STAGES)):
        run = runs[key]
        seqs = run.complete()
        chain = len(stages)
        syscall = [run.stamps[chain][s] - run.stamps[3][s] for s in seqs]
        total = [run.stamps[chain - 1][s] - run.stamps[0][s] for s in seqs]
        out += [
            "",
            f"### Stages: {run.label}",
            "",
            f"{len(seqs):,} of {len(run.received()):,} events received passed every stage "
            "(the others were read without a doorbell: by a spin, a recheck or in a batch).",
            "",
            "| stage | p50 µs | p99 µs |",
            "|---|---:|---:|",
        ]
        out += [
            f"| {label} | {_fmt(p50)} | {_fmt(p99)} |"
            for label, p50, p99 in stage_rows(run, stages)
        ]
        out += [
            f"| **end to end** (these events) | **{_fmt(quantile(total, 0.5))}** | "
            f"**{_fmt(quantile(total, 0.99))}** |",
            f"| *beside the chain:* the doorbell's system call in the publisher "
            f"(`Waker.wake` entry → return) | {_fmt(quantile(syscall, 0.5))} | "
            f"{_fmt(quantile(syscall, 0.99))} |",
            "",
            "Stamps: " + "; ".join(f"*{stage}*: {what}" for stage, what in stages) + ".",
        ]
    out += ["", "### Where the time goes", "", _where(result)]
    if result.leftovers:
        out += ["", "**Left in /dev/shm:** " + ", ".join(result.leftovers)]
    return "\n".join(out) + "\n"


def _where(result: StageReport) -> str:
    """A paragraph on this run's figures."""
    runs = result.runs
    rows = dict((label, p50) for label, p50, _ in stage_rows(runs["async"], ASYNC_STAGES))
    sem50 = quantile(runs["semaphore"].end_to_end(), 0.5)
    fifo50 = quantile(runs["fifo"].end_to_end(), 0.5)
    bare50 = quantile(runs["async-bare"].end_to_end(), 0.5)
    inst50 = quantile(runs["async"].end_to_end(), 0.5)
    sync50 = quantile(runs["sync-bare"].end_to_end(), 0.5)
    publisher = sum(
        rows[f"{a} → {b}"]
        for a, b in (
            ("publish entry", "encoded"),
            ("encoded", "committed"),
            ("committed", "doorbell"),
        )
    )
    wake = (
        rows["doorbell → woken"]
        + rows["woken → wake callback"]
        + rows["wake callback → reader step"]
    )
    reader = rows["reader step → ring read"] + rows["ring read → decoded"]
    handoff = rows["decoded → queued"] + rows["queued → consumer"]
    return (
        f"In this run (p50s, µs): the bare semaphore wakes another process in {_fmt(sem50)} and "
        f"a FIFO watched by `add_reader` resumes an asyncio consumer in {_fmt(fifo50)}; "
        f"shmbus takes {_fmt(bare50)} on asyncio and {_fmt(sync50)} with `subscribe_sync` "
        f"(not instrumented). Along the instrumented asyncio chain, the publisher spends "
        f"{_fmt(publisher)} before ringing (encoding alone "
        f"{_fmt(rows['publish entry → encoded'])}, "
        f"several times its tight-loop cost in the per-event table: a paced publisher runs "
        f"with cold caches after each sleep), the wake-up up to the reader's step costs "
        f"{_fmt(wake)} (the FIFO alone: {_fmt(fifo50)} to an awaiting consumer), reading and "
        f"decoding {_fmt(reader)}, and handing the event to the awaiting consumer "
        f"{_fmt(handoff)}. The wrappers themselves add {_fmt(inst50 - bare50)} to the asyncio "
        f"p50 (instrumented against not); the stages compare with each other, the "
        f"uninstrumented rows with the references."
    )
