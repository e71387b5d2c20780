"""The bridge between a host's shm bus and NATS: :class:`Bridge`, and the
``shmbus bridge`` command's :func:`add_arguments` and :func:`main`.

Owns relaying in both directions between one shm bus and one NATS
connection:

* **export**: events published on the local shm bus whose topic matches an
  export pattern are published on NATS;
* **import**: events received from NATS on an import pattern are published
  on the local shm bus.

Guarantees
----------
* The envelope is preserved: a relayed event keeps its ``id``, ``ts``,
  ``type``, ``v`` and payload; its topic stays the same subject.
* No loops and no duplicates from the bridge itself: an event the bridge
  imported is never exported again (its id is remembered), the NATS
  connection is opened with ``no_echo`` so the bridge never receives its
  own exports, an event received again with an id already relayed in that
  direction (overlapping import patterns) is relayed once, and an imported
  id that the bridge itself exported is dropped. With one bridge per shm bus,
  an event published on host A reaches every other bridged host's shm bus
  exactly once and never comes back to A. The ids are remembered in bounded
  sets (``memory`` ids per direction); the guarantee holds while fewer than
  that many events pass between an import and its echo on the shm bus.
* At most once, like every transport: while NATS is down, exports are
  dropped and counted; a full queue drops the oldest events, counted in the
  buses' ``dropped``.
* :meth:`Bridge.run` returns after closing both buses when its stop event
  is set; :func:`main` sets it on SIGTERM and SIGINT and exits 0.

Needs the ``nats`` extra: without nats-py, importing this module (and so
``shmbus bridge``) fails with :class:`~shmbus.errors.MissingExtraError`, whose
message names ``pip install 'shmbus[nats]'``.

Counters (:meth:`Bridge.counters`): ``exported``, ``imported``,
``not_reexported`` (imported events seen on the shm bus and held back),
``duplicates`` (ids received twice in one direction, dropped),
``export_errors`` and ``import_errors``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Sequence

from ._checks import check_int
from .contract import Event, Subscription, TopicMatcher, validate_pattern
from .nats import DEFAULT_NATS_URL, NatsBus
from .recent import RecentIds
from .shm import ShmBus

__all__ = ["Bridge", "add_arguments", "main"]

log = logging.getLogger("shmbus.bridge")

_COUNTERS = (
    "exported",
    "imported",
    "not_reexported",
    "duplicates",
    "export_errors",
    "import_errors",
)


class Bridge:
    """Relays between *shm* and *nats* (both unconnected; the bridge
    connects and closes them).

    Parameters
    ----------
    shm, nats:
        The local bus and the NATS bus. Create the NATS bus with
        ``no_echo=True`` (as :func:`main` does); the bridge also drops
        echoes of its own exports by id.
    export:
        Patterns of local topics to publish on NATS.
    import_:
        Patterns of NATS subjects to publish on the local bus.
    memory:
        Ids remembered per direction for loop and duplicate suppression.
    """

    def __init__(
        self,
        shm: ShmBus,
        nats: NatsBus,
        *,
        export: Sequence[str] = (),
        import_: Sequence[str] = (),
        memory: int = 65_536,
    ) -> None:
        if isinstance(export, str) or isinstance(import_, str):
            raise TypeError("export and import_ must be sequences of patterns, not one str")
        self.export_patterns = [validate_pattern(p) for p in export]
        self.import_patterns = [validate_pattern(p) for p in import_]
        if not self.export_patterns and not self.import_patterns:
            raise ValueError("a bridge needs at least one export or import pattern")
        self.shm = shm
        self.nats = nats
        self._export_matchers = [TopicMatcher(p) for p in self.export_patterns]
        self._imported = RecentIds(memory)
        self._exported = RecentIds(memory)
        self._counts = dict.fromkeys(_COUNTERS, 0)
        self._ready = asyncio.Event()

    def __repr__(self) -> str:
        return (
            f"<Bridge shm={self.shm.name!r} nats={','.join(self.nats.servers)} "
            f"export={self.export_patterns} import={self.import_patterns}>"
        )

    def counters(self) -> dict[str, int]:
        """A snapshot of the bridge's counters (see the module docstring)."""
        return dict(self._counts)

    @property
    def ready(self) -> asyncio.Event:
        """Set once both sides are subscribed and NATS has acknowledged."""
        return self._ready

    # ─── Running ───

    async def run(self, stop: asyncio.Event, *, retry_interval: float = 1.0) -> None:
        """Relay until *stop* is set, then close both buses.

        Waits for NATS (retrying every *retry_interval* seconds) if it is not
        reachable at start; exports meanwhile are counted as errors.
        """
        pumps: list[asyncio.Task[None]] = []
        subscriptions: list[Subscription] = []
        try:
            await self.shm.connect()
            if self.export_patterns:
                local = self.shm.subscribe(">")
                subscriptions.append(local)
                pumps.append(asyncio.create_task(self._export_from(local)))
            for pattern in self.import_patterns:
                remote = self.nats.subscribe(pattern)
                subscriptions.append(remote)
                pumps.append(asyncio.create_task(self._import_from(remote)))
            if not await self._connect_nats(stop, retry_interval):
                return
            log.info(
                "bridge ready: shm bus %r <-> NATS %s; export %s; import %s",
                self.shm.name,
                ",".join(self.nats.servers),
                self.export_patterns or "nothing",
                self.import_patterns or "nothing",
            )
            self._ready.set()
            waiter = asyncio.create_task(stop.wait())
            done, _ = await asyncio.wait([waiter, *pumps], return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            for task in done:
                if task is waiter:
                    continue
                exc = task.exception()
                if exc is not None:
                    raise exc
                raise RuntimeError("a bridge subscription ended while the bridge was running")
        finally:
            for sub in subscriptions:
                await sub.aclose()
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            try:
                await self.nats.close()
            finally:
                await self.shm.close()
            log.info(
                "bridge stopped: %s",
                " ".join(f"{name}={value}" for name, value in self._counts.items()),
            )

    async def _connect_nats(self, stop: asyncio.Event, retry_interval: float) -> bool:
        """Connect and flush the SUBs; False if *stop* was set first."""
        warned = False
        while not stop.is_set():
            try:
                await self.nats.connect()
                await self.nats.flush()
                return True
            except ConnectionError as exc:
                if not warned:
                    log.warning("%s; retrying every %g s", exc, retry_interval)
                    warned = True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), retry_interval)
        return False

    async def _export_from(self, local: Subscription) -> None:
        matchers = self._export_matchers
        counts = self._counts
        async for event in local:
            if not any(match(event.topic) for match in matchers):
                continue
            if event.id in self._imported:
                counts["not_reexported"] += 1
                continue
            if not self._exported.add(event.id):
                counts["duplicates"] += 1
                continue
            if not self.nats.connected:
                self._error("export", event, "NATS is not connected")
                continue
            failures = self.nats.stats().publish_errors
            try:
                await self.nats.publish_event(event)
            except (TypeError, ValueError) as exc:
                self._error("export", event, str(exc))
                continue
            if self.nats.stats().publish_errors != failures:
                # NatsBus counts a transport failure instead of raising it.
                self._error("export", event, "NATS did not take it")
                continue
            counts["exported"] += 1

    async def _import_from(self, remote: Subscription) -> None:
        counts = self._counts
        async for event in remote:
            if event.id in self._exported:
                counts["duplicates"] += 1  # our own export came back
                continue
            if not self._imported.add(event.id):
                counts["duplicates"] += 1
                continue
            try:
                self.shm.republish(event)
            except (TypeError, ValueError, RuntimeError) as exc:
                self._error("import", event, str(exc))
                continue
            counts["imported"] += 1

    def _error(self, direction: str, event: Event, reason: str) -> None:
        key = f"{direction}_errors"
        self._counts[key] += 1
        level = logging.WARNING if self._counts[key] == 1 else logging.DEBUG
        log.log(level, "cannot %s event %s on %r: %s", direction, event.id, event.topic, reason)


# ─── Command line ───


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``shmbus bridge`` options to *parser*."""
    parser.add_argument(
        "--bus",
        default="default",
        metavar="NAME",
        help="local shm bus: a name or a shm:// URL (default: %(default)s)",
    )
    parser.add_argument(
        "--nats",
        default=DEFAULT_NATS_URL,
        metavar="URL",
        help="NATS server(s): nats://HOST:PORT[,HOST:PORT...][?options] (default: %(default)s)",
    )
    parser.add_argument(
        "--export",
        dest="export_patterns",
        nargs="+",
        action="extend",
        default=[],
        metavar="PATTERN",
        help="publish local events matching PATTERN on NATS (repeatable)",
    )
    parser.add_argument(
        "--import",
        dest="import_patterns",
        nargs="+",
        action="extend",
        default=[],
        metavar="PATTERN",
        help="publish NATS events matching PATTERN on the local bus (repeatable)",
    )
    parser.add_argument(
        "--queue-size",
        type=int,
        default=8192,
        metavar="N",
        help="bound of each subscription queue of the bridge (default: %(default)s)",
    )
    parser.add_argument(
        "--memory",
        type=int,
        default=65_536,
        metavar="N",
        help="event ids remembered per direction against loops (default: %(default)s)",
    )
    parser.add_argument(
        "--stats-interval",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="log the counters every SECONDS (default: only at exit)",
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        help="logging level (default: %(default)s)",
    )


def main(args: argparse.Namespace) -> int:
    """Run the bridge until SIGTERM or SIGINT; return the exit status.

    0 after a clean stop, 2 for bad arguments, 1 if the bridge failed.
    """
    logging.basicConfig(
        level=getattr(logging, args.log_level, logging.INFO),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    try:
        bridge = _build(args)
    except (TypeError, ValueError) as exc:
        log.error("bad bridge configuration: %s", exc)
        return 2
    try:
        asyncio.run(_serve(bridge, args.stats_interval))
    except Exception as exc:
        # One line, as every shmbus command; the traceback at DEBUG level.
        log.error("bridge failed: %s", exc, exc_info=log.isEnabledFor(logging.DEBUG))
        return 1
    return 0


def _build(args: argparse.Namespace) -> Bridge:
    from .urls import get_bus

    check_int("--queue-size", args.queue_size, minimum=1)
    check_int("--memory", args.memory, minimum=1)
    bus = args.bus
    if "://" in bus:
        shm = get_bus(bus, queue_size=args.queue_size)
    else:
        shm = ShmBus.for_existing(bus, queue_size=args.queue_size)
    if not isinstance(shm, ShmBus):
        raise ValueError(f"--bus must name a shm bus (shm://NAME), got {bus!r}")
    if not args.nats.startswith("nats://"):
        raise ValueError(f"--nats must be a nats:// URL, got {args.nats!r}")
    # no_echo: the server never sends the bridge its own exports back.
    nats = get_bus(args.nats, queue_size=args.queue_size, no_echo=True, name="shmbus-bridge")
    if not isinstance(nats, NatsBus):
        raise ValueError(f"--nats must be a nats:// URL, got {args.nats!r}")
    return Bridge(
        shm,
        nats,
        export=args.export_patterns,
        import_=args.import_patterns,
        memory=args.memory,
    )


async def _serve(bridge: Bridge, stats_interval: float) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    reporter = None
    if stats_interval > 0:
        reporter = asyncio.create_task(_report(bridge, stats_interval))
    try:
        await bridge.run(stop)
    finally:
        if reporter is not None:
            reporter.cancel()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)


async def _report(bridge: Bridge, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)  # the reporting period, not synchronisation
        log.info(
            "bridge counters: %s",
            " ".join(f"{name}={value}" for name, value in bridge.counters().items()),
        )


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(
        prog="python -m shmbus.bridge", description="Relay events between a shm bus and NATS."
    )
    add_arguments(_parser)
    sys.exit(main(_parser.parse_args()))
