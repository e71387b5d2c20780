"""Per-event cost of shmbus's publish and delivery paths, piece by piece.

Run with ``./tools/profile`` (or ``.venv/bin/python tools/profile_paths.py``).
Every figure is the minimum over several repetitions of a tight loop in one
process (minimum, because on a shared machine noise only ever adds), with the
bench workload: topic ``decky.<id>.traffic``, a 9-field payload stamped with
``time.monotonic_ns()``. Prints a markdown report; ``--out FILE`` writes it.
A cProfile of each whole path follows the table, to show nothing is missing.

Then (the default; ``--stages`` alone, ``--no-stages`` without) the latency
of one event across two processes, stage by stage, beside a bare semaphore
and a FIFO wake-up measured in the same run (:mod:`shmbus_tools.stages`).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import os
import platform
import pstats
import sys
import time
import timeit
import zlib
from collections.abc import Callable

from shmbus import ShmBus
from shmbus._core.ordering import full_fence
from shmbus.codec import decode_envelope, encode_envelope
from shmbus.contract import Event, TopicMatcher, new_event_id, validate_topic
from shmbus_tools import stages

PAYLOAD = {f"field{i}": i * 1000 for i in range(8)}
TOPIC = "decky.12.traffic"
N = 100_000


def cost(fn: Callable[[], object], number: int = N, repeat: int = 5) -> float:
    """Minimum µs per call of *fn* over *repeat* loops of *number* calls."""
    return min(timeit.repeat(fn, number=number, repeat=repeat)) / number * 1e6


def stamped() -> dict[str, int]:
    return {**PAYLOAD, "t": time.monotonic_ns()}


async def measure() -> tuple[list[tuple[str, float]], list[tuple[str, float]], str, str]:
    name = f"profile-{os.getpid()}"
    body = encode_envelope(TOPIC, stamped(), "", 1 << 20)
    raw = TOPIC.encode()
    matcher = TopicMatcher("decky.*.traffic")
    publish_rows = [
        ("build the payload dict (benchmark workload, not shmbus)", cost(stamped)),
        ("validate the topic (cached)", cost(lambda: validate_topic(TOPIC))),
        ("new event id", cost(new_event_id)),
        ("time.time() for ts", cost(time.time)),
        (
            "encode the envelope (dict + msgpack, includes id and ts)",
            cost(lambda: encode_envelope(TOPIC, PAYLOAD, "", 1 << 20)),
        ),
        ("crc32 of the body", cost(lambda: zlib.crc32(body, 12345))),
    ]
    delivery_rows = [
        ("wildcard match (cached per topic)", cost(lambda: matcher(TOPIC))),
        ("crc32 check of topic + body", cost(lambda: zlib.crc32(body, zlib.crc32(raw)))),
        ("decode the envelope into an Event", cost(lambda: decode_envelope(TOPIC, body, 1 << 20))),
        (
            "Event(...) via the dataclass constructor, for comparison",
            cost(lambda: Event(TOPIC, PAYLOAD, "", 1, 1.0, "0" * 32)),
        ),
    ]
    async with (
        ShmBus(name, capacity=256 << 20, queue_size=2_000_000) as sub_bus,
        ShmBus(name, capacity=256 << 20) as bus,
    ):
        key = bus._topic_key(TOPIC)  # noqa: SLF001 - profiling the pieces of publish
        bus.publish_nowait(TOPIC, PAYLOAD)  # the first publish creates the instance's ring
        writer = bus._writer  # noqa: SLF001
        assert writer is not None

        publish_rows += [
            ("full fence (the commit before the sleep-flag loads)", cost(full_fence)),
            (
                "ring append (reclaim, header, copy, commit)",
                cost(lambda: writer.append(key[0], body, 0)),
            ),
            ("whole publish_nowait()", cost(lambda: bus.publish_nowait(TOPIC, PAYLOAD))),
        ]

        async def publish_loop() -> None:
            for _ in range(N):
                await bus.publish(TOPIC, PAYLOAD)

        started = time.perf_counter()
        await publish_loop()
        publish_rows.append(("whole `await publish()`", (time.perf_counter() - started) / N * 1e6))
        profile_publish = cProfile.Profile()
        profile_publish.enable()
        for _ in range(N):
            bus.publish_nowait(TOPIC, PAYLOAD)
        profile_publish.disable()

        # Delivery: fill the ring for a subscription, then drain it through
        # async-for, which is what a user's consumer does.
        sub = sub_bus.subscribe("decky.*.traffic")
        total = N
        for i in range(total):
            bus.publish_nowait(f"decky.{i % 64}.traffic", stamped())
        profile_delivery = cProfile.Profile()
        received = 0
        cpu = time.process_time()
        profile_delivery.enable()
        async for _event in sub:
            received += 1
            if received == total:
                break
        profile_delivery.disable()
        delivery_rows.append(
            (
                "whole delivery: ring read, route, decode, queue, async-for (under cProfile)",
                (time.process_time() - cpu) / total * 1e6,
            )
        )
        await sub.aclose()
        sub2 = sub_bus.subscribe("decky.*.traffic")
        for i in range(total):
            bus.publish_nowait(f"decky.{i % 64}.traffic", stamped())
        received = 0
        cpu = time.process_time()
        async for _event in sub2:
            received += 1
            if received == total:
                break
        delivery_rows.append(
            (
                "whole delivery: ring read, route, decode, queue, async-for",
                (time.process_time() - cpu) / total * 1e6,
            )
        )
    return publish_rows, delivery_rows, _top(profile_publish), _top(profile_delivery)


def _top(profile: cProfile.Profile, lines: int = 14) -> str:
    out = io.StringIO()
    pstats.Stats(profile, stream=out).sort_stats("tottime").print_stats(lines)
    text = out.getvalue()
    return text[text.index("ncalls") :].rstrip() if "ncalls" in text else text


Rows = list[tuple[str, float]]


def report(publish: Rows, delivery: Rows, publish_profile: str, delivery_profile: str) -> str:
    def table(rows: Rows) -> str:
        lines = ["| piece | µs per event |", "|---|---|"]
        lines += [f"| {label} | {value:.2f} |" for label, value in rows]
        return "\n".join(lines)

    return f"""# Where the time goes

Measured by `./tools/profile` on {platform.node()} ({os.cpu_count()} cores,
Python {platform.python_version()}), {time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}.
Each piece is the minimum over 5 loops of {N:,} calls in one process; the
machine is shared, so compare pieces with each other, not with other runs.

## Publish path (`publish_nowait`)

{table(publish)}

## Delivery path (subscriber process: ring to `async for`)

{table(delivery)}

## cProfile of {N:,} `publish_nowait()` calls

```
{publish_profile}
```

## cProfile of draining {N:,} events through `async for`

```
{delivery_profile}
```
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the markdown report to this file")
    which = parser.add_mutually_exclusive_group()
    which.add_argument(
        "--stages", action="store_true", help="only the per-stage latency across two processes"
    )
    which.add_argument("--no-stages", action="store_true", help="only the per-event costs")
    parser.add_argument("--events", type=int, default=4000, help="paced events per stage row")
    parser.add_argument("--warmup", type=int, default=500, help="events dropped at the start")
    parser.add_argument("--bus-name", help="bus name prefix of the stage rows")
    args = parser.parse_args()
    if args.events < 2 or not 0 <= args.warmup < args.events:
        parser.error(
            f"need --events >= 2 and 0 <= --warmup < --events, got {args.events}, {args.warmup}"
        )
    text = ""
    leftovers: list[str] = []
    if not args.no_stages:
        # First: the children are forked from a parent that has held no bus.
        result = stages.measure(args.events, args.warmup, args.bus_name)
        text = stages.report(result)
        leftovers = result.leftovers
        if leftovers:
            sys.stderr.write(f"files left in /dev/shm: {result.leftovers}\n")
    if not args.stages:
        text = report(*asyncio.run(measure())) + ("\n" + text if text else "")
    else:
        text = "# Where the time goes\n\n" + text
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text)
    sys.stdout.write(text)
    return 1 if leftovers else 0


if __name__ == "__main__":
    sys.exit(main())
