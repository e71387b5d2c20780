"""Run inside a private mount namespace whose /dev/shm is a 64 MiB tmpfs (see
test_footprint.py): 16 publisher processes with default settings on one bus,
a subscriber in this process, then more publishers until /dev/shm is full.
Prints one JSON line with what happened."""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import sys
from multiprocessing.connection import Connection

from shmbus import SegmentSpaceError, ShmBus
from shmbus._core.inspection import read_bus

NAME = "footprint"


def publisher(conn: Connection, index: int) -> None:
    bus = ShmBus(NAME)
    try:
        bus.connect_sync()
        bus.publish_nowait("fp.event", {"publisher": index})
        conn.send("published")
    except SegmentSpaceError as exc:
        conn.send(("space", str(exc)))
    while conn.recv() == "again":  # stay attached until told to go
        bus.publish_nowait("fp.after", {"publisher": index})
        conn.send("published")
    bus.close_sync()


async def main() -> None:
    ctx = multiprocessing.get_context("spawn")
    result: dict[str, object] = {}
    children: list[tuple[multiprocessing.process.BaseProcess, Connection]] = []
    try:
        await run(ctx, children, result)
    finally:
        for process, conn in children:
            try:
                conn.send("go")
            except OSError:
                pass
            process.join(10)
            if process.is_alive():
                process.kill()
            result.setdefault("exit_codes", []).append(process.exitcode)  # type: ignore[union-attr]
        result["left"] = sorted(os.listdir("/dev/shm"))
        print(json.dumps(result))
        sys.stdout.flush()


async def run(
    ctx: multiprocessing.context.SpawnContext,
    children: list[tuple[multiprocessing.process.BaseProcess, Connection]],
    result: dict[str, object],
) -> None:
    async with ShmBus(NAME) as subscriber:
        sub = subscriber.subscribe("fp.>")
        outcomes = []
        for index in range(24):
            parent, child = ctx.Pipe()
            process = ctx.Process(target=publisher, args=(child, index))
            process.start()
            if not parent.poll(30):
                raise TimeoutError(f"publisher {index} did not answer")
            outcome = parent.recv()
            children.append((process, parent))
            outcomes.append(outcome)
            if index == 15:
                result["bytes_with_16"] = read_bus(NAME).segment_size
            if outcome != "published":
                break
        received = 0
        while received < sum(1 for o in outcomes if o == "published"):
            await asyncio.wait_for(sub.__anext__(), 10)
            received += 1
        # The bus still works after the refused ring: a publisher that has
        # its ring publishes again.
        children[0][1].send("again")
        children[0][1].recv()
        after = await asyncio.wait_for(sub.__anext__(), 10)
        result.update(
            published=sum(1 for o in outcomes if o == "published"),
            refused=[o[1] for o in outcomes if o != "published"],
            received=received,
            after=after.topic,
            shm_size=os.statvfs("/dev/shm").f_blocks * os.statvfs("/dev/shm").f_frsize,
        )


if __name__ == "__main__":
    asyncio.run(main())
