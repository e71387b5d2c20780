"""The child-process harness every cross-process test, the soak, the bench and
the demo share (shmbus_tools.children), across real processes."""

from __future__ import annotations

import asyncio
import signal
import time

import pytest
from shmbus_tools.children import (
    EOF,
    Agent,
    AsyncLink,
    BlockingLink,
    Child,
    ChildFailed,
    running,
    stop_all,
    wait_all,
)

#: A hang guard, never a timing claim.
FINISH = 30.0


pytestmark = pytest.mark.usefixtures("no_resource_tracker_left")


# ─── Child-side behaviours ───


def echo(link: BlockingLink) -> None:
    """Answer every message with ("echo", message) until "stop" or EOF."""
    link.send("ready")
    while (message := link.recv()) not in ("stop", EOF):
        link.send(("echo", message))


def raises(link: BlockingLink, text: str) -> None:
    raise ValueError(text)


def silent(link: BlockingLink) -> None:
    """Say nothing, and ignore SIGTERM, until killed."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    link.send("ready")
    while True:
        time.sleep(1)


def watches_on_a_loop(link: BlockingLink) -> None:
    """On an event loop: report what arrives until "stop" or EOF."""

    async def main() -> None:
        inbox = AsyncLink(link)
        link.send("ready")
        seen = []
        while (message := await inbox.recv()) not in ("stop", EOF):
            seen.append(message)
        await inbox.wait_stop(0)
        inbox.close()
        link.send(("seen", seen, inbox.stopped.is_set()))

    asyncio.run(main())


# ─── The tests ───


def test_a_child_answers_over_its_link() -> None:
    child = Agent(echo)
    with running(child):
        child.expect("ready", FINISH)
        child.send(("drain", 3))
        assert child.recv(FINISH) == ("echo", ("drain", 3))


def test_a_child_that_raises_fails_the_parents_next_receive_with_its_traceback() -> None:
    child = Agent(raises, "boom 42")
    with running(child), pytest.raises(ChildFailed) as failure:
        child.recv(FINISH)
    assert "ValueError: boom 42" in failure.value.summary
    assert "raise ValueError(text)" in failure.value.trace
    assert child.process.exitcode == 1


def test_a_child_that_sends_nothing_fails_the_receive_at_its_deadline() -> None:
    child = Agent(silent)
    with running(child):
        child.expect("ready", FINISH)
        with pytest.raises(ChildFailed, match=r"silent \(pid \d+\) sent nothing within 0.2 s"):
            child.recv(0.2)


def test_an_unexpected_message_fails_expect_naming_both() -> None:
    child = Agent(echo)
    with running(child), pytest.raises(ChildFailed, match=r"sent 'ready', expected 'go'"):
        child.expect("go", FINISH)


def test_a_child_on_an_event_loop_sees_every_message_then_the_stop() -> None:
    child = Agent(watches_on_a_loop)
    with running(child):
        child.expect("ready", FINISH)
        for message in ("a", ("b", 1), {"c": 2}):
            child.send(message)
        child.send("stop")
        assert child.recv(FINISH) == ("seen", ["a", ("b", 1), {"c": 2}], True)
        assert child.join(FINISH) == 0


def test_a_child_whose_parent_closes_the_pipe_reads_eof_and_exits() -> None:
    child = Agent(echo)
    with running(child):
        child.expect("ready", FINISH)
        child.link.conn.close()
        assert child.join(FINISH) == 0


def test_stop_all_kills_a_child_that_ignores_stop_and_sigterm() -> None:
    child = Child(silent, name="stubborn", method="fork").start()
    child.expect("ready", FINISH)
    stop_all([child], grace=0.2)
    assert child.process.exitcode == -signal.SIGKILL
    assert child.link.conn.closed


def test_running_leaves_no_child_alive_when_the_test_raises() -> None:
    children = (Agent(silent), Agent(echo))
    with pytest.raises(RuntimeError), running(*children):
        for child in children:
            child.expect("ready", FINISH)
        raise RuntimeError("the test failed here")
    assert [child.process.exitcode for child in children] == [-signal.SIGKILL] * 2


def test_wait_all_reads_every_childs_latest_message_of_a_kind() -> None:
    children = [Child(echo, name=f"echo-{i}", method="fork") for i in range(3)]
    with running(*children):
        wait_all(children, lambda c: "ready" in c.latest, time.monotonic() + FINISH, "ready")
        for i, child in enumerate(children):
            child.send(i)
        wait_all(children, lambda c: "echo" in c.latest, time.monotonic() + FINISH, "echoes")
        assert [child.latest["echo"] for child in children] == [0, 1, 2]


def test_wait_all_fails_naming_a_child_that_ends_first() -> None:
    child = Child(raises, ("early",), method="fork")
    with running(child), pytest.raises(ChildFailed, match="raised ValueError: early"):
        wait_all([child], lambda c: "ready" in c.latest, time.monotonic() + FINISH, "ready")
