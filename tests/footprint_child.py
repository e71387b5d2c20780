"""Run inside a private mount namespace whose /dev/shm is a 64 MiB tmpfs (see
test_footprint.py): 16 publisher processes with default settings on one bus,
a subscriber in this process, then more publishers until /dev/shm is full.
Prints one JSON line with what happened."""

from __future__ import annotations

import asyncio
import json
import os
import sys

from shmbus_tools.children import BlockingLink, Child, ChildFailed, stop_all

from shmbus import SegmentSpaceError, ShmBus
from shmbus._core.inspection import read_bus

NAME = "footprint"


def publisher(link: BlockingLink, index: int) -> None:
    bus = ShmBus(NAME)
    try:
        bus.connect_sync()
        bus.publish_nowait("fp.event", {"publisher": index})
        link.send("published")
    except SegmentSpaceError as exc:
        link.send(("space", str(exc)))
    while link.recv() == "again":  # stay attached until told to go
        bus.publish_nowait("fp.after", {"publisher": index})
        link.send("published")
    bus.close_sync()


async def main() -> None:
    result: dict[str, object] = {}
    children: list[Child] = []
    try:
        await run(children, result)
    finally:
        exit_codes = []
        for child in children:
            child.send("go")
        for child in children:
            try:
                exit_codes.append(child.join(10))
            except ChildFailed:
                exit_codes.append(child.process.exitcode)
        stop_all(children)
        if children:
            result["exit_codes"] = exit_codes
        result["left"] = sorted(os.listdir("/dev/shm"))
        print(json.dumps(result))
        sys.stdout.flush()


async def run(children: list[Child], result: dict[str, object]) -> None:
    async with ShmBus(NAME) as subscriber:
        sub = subscriber.subscribe("fp.>")
        outcomes = []
        for index in range(24):
            child = Child(publisher, (index,), name=f"publisher-{index}").start()
            children.append(child)
            outcome = child.recv(30)
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
        children[0].send("again")
        children[0].recv()
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
