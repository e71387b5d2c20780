"""The ``shmbus`` command, driven as a user would: ``python -m shmbus ...`` in
child processes. Argument checks that need no bus run ``cli.main`` in-process.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import textwrap
from pathlib import Path

import pytest
from awaiting import wait_until as async_wait_until
from cli_support import (
    DEADLINE,
    LineReader,
    crashed_bus,
    has_subscriber,
    run_shmbus,
    shmbus_command,
    started,
    wait_until,
)
from conftest import SMALL_RING

from shmbus import MissingExtraError, ShmBus, cli
from shmbus._core.inspection import read_bus
from shmbus._core.layout import BUS_SEGMENT_SIZE, ring_file_size
from shmbus._core.shmfiles import bus_file_paths

# ─── pub and sub ─────────────────────────────────────────────────────────────


def test_sub_json_prints_each_event_published_by_pub(bus_name: str) -> None:
    with started(
        shmbus_command("sub", "orders.>", "--json", "--count", "2", "--bus", bus_name)
    ) as sub:
        wait_until(lambda: has_subscriber(bus_name, sub.pid), "the subscriber")
        pub = run_shmbus(
            "pub",
            "orders.created",
            '{"id": 7}',
            "--type",
            "order.new",
            "--count",
            "2",
            "--bus",
            bus_name,
        )
        assert pub.returncode == 0, pub.stderr
        out, err = sub.communicate(timeout=DEADLINE)
    assert sub.returncode == 0, err
    events = [json.loads(line) for line in out.splitlines()]
    assert len(events) == 2
    for event in events:
        assert set(event) == {"v", "id", "topic", "type", "ts", "payload"}
        assert event["topic"] == "orders.created"
        assert event["type"] == "order.new"
        assert event["payload"] == {"id": 7}
    assert events[0]["id"] != events[1]["id"]


def test_sub_prints_time_topic_type_and_payload_per_line(bus_name: str) -> None:
    with started(shmbus_command("sub", "a.*", "--count", "1", "--bus", bus_name)) as sub:
        wait_until(lambda: has_subscriber(bus_name, sub.pid), "the subscriber")
        assert (
            run_shmbus("pub", "a.b", '{"x": 1}', "--type", "t.1", "--bus", bus_name).returncode == 0
        )
        out, err = sub.communicate(timeout=DEADLINE)
    assert sub.returncode == 0, err
    stamp, topic, event_type, payload = out.strip().split(" ", 3)
    assert len(stamp) == len("12:34:56.789") and stamp[2] == ":" and stamp[8] == "."
    assert (topic, event_type, json.loads(payload)) == ("a.b", "t.1", {"x": 1})


def test_pub_without_payload_publishes_one_event_per_stdin_line(bus_name: str) -> None:
    with started(shmbus_command("sub", "n", "--json", "--count", "3", "--bus", bus_name)) as sub:
        wait_until(lambda: has_subscriber(bus_name, sub.pid), "the subscriber")
        pub = run_shmbus(
            "pub", "n", "--bus", bus_name, stdin_text='{"n": 1}\n\n{"n": 2}\n{"n": 3}\n'
        )
        assert pub.returncode == 0, pub.stderr
        out, err = sub.communicate(timeout=DEADLINE)
    assert [json.loads(line)["payload"] for line in out.splitlines()] == [
        {"n": 1},
        {"n": 2},
        {"n": 3},
    ]


def test_pub_reports_the_stdin_line_that_is_not_a_json_object(bus_name: str) -> None:
    result = run_shmbus("pub", "n", "--bus", bus_name, stdin_text='{"n": 1}\n[2]\n')
    assert result.returncode == 1
    assert "line 2" in result.stderr and "JSON object" in result.stderr
    assert "Traceback" not in result.stderr


async def test_pub_stopped_by_a_bad_stdin_line_says_how_many_events_went_out(
    bus_name: str,
) -> None:
    bus = ShmBus(bus_name, **SMALL_RING)
    await bus.connect()
    try:
        async with bus.subscribe("n") as sub:
            result = run_shmbus(
                "pub", "n", "--bus", bus_name, stdin_text='{"n": 1}\n{"n": 2}\nnot json\n{"n": 4}\n'
            )
            received = [(await asyncio.wait_for(anext(sub), DEADLINE)).payload for _ in range(2)]
    finally:
        await bus.close()
    assert result.returncode == 1
    assert "line 3 is not valid JSON" in result.stderr
    assert "stopped there: 2 event(s) from the lines before it were published" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert received == [{"n": 1}, {"n": 2}]


def test_pub_stopped_by_the_first_stdin_line_says_nothing_was_published(bus_name: str) -> None:
    result = run_shmbus("pub", "n", "--bus", bus_name, stdin_text="7\n")
    assert result.returncode == 1
    assert "line 1 is a JSON number" in result.stderr
    assert "nothing was published" in result.stderr


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["sigint", "sigterm"])
def test_sub_stops_with_exit_0_and_no_traceback_on_signal(bus_name: str, stop: int) -> None:
    with started(shmbus_command("sub", ">", "--bus", bus_name)) as sub:
        wait_until(lambda: has_subscriber(bus_name, sub.pid), "the subscriber")
        sub.send_signal(stop)
        out, err = sub.communicate(timeout=DEADLINE)
    assert sub.returncode == 0, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert bus_file_paths(bus_name) == []  # closed cleanly: last one out removed the bus


# ─── ls and stat ─────────────────────────────────────────────────────────────


async def test_ls_shows_a_live_bus_with_its_instance_and_readers(bus_name: str) -> None:
    """A row per bus: state, the size of all its files (segment and rings),
    instances and readers; --json has the same and its rings."""
    bus = ShmBus(bus_name, **SMALL_RING)
    await bus.connect()
    try:
        async with bus.subscribe("x.>"):
            bus.publish_nowait("x.y", {})  # the instance's ring file
            table = run_shmbus("ls")
            listing = run_shmbus("ls", "--json")
    finally:
        await bus.close()
    assert table.returncode == 0, table.stderr
    (row,) = [line for line in table.stdout.splitlines() if line.startswith(bus_name + " ")]
    files = BUS_SEGMENT_SIZE + ring_file_size(SMALL_RING["capacity"])
    assert row.split()[1:4] == ["live", *cli._size(files).split()]  # state, size
    assert row.split()[-2:] == ["1", "1"]  # instances, readers
    assert f"pid {os.getpid()}" in table.stdout
    (entry,) = [item for item in json.loads(listing.stdout) if item["name"] == bus_name]
    assert entry["live"] is True and entry["readers"] == 1
    assert entry["segment_size"] == files
    assert [slot["pid"] for slot in entry["instances"]] == [os.getpid()]
    assert [(ring["writer_pid"], ring["published"]) for ring in entry["rings"]] == [
        (os.getpid(), 1)
    ]


async def test_stat_counters_move_as_events_flow(bus_name: str) -> None:
    bus = ShmBus(bus_name, **SMALL_RING)
    await bus.connect()
    try:
        async with bus.subscribe("m.>") as sub:
            before = run_shmbus("stat", bus_name, "--json", "--sample", "0")
            for i in range(20):
                bus.publish_nowait("m.x", {"i": i})
            for _ in range(20):
                await anext(aiter(sub))
            # The reader writes its slot's counters once its consumers ran.
            await async_wait_until(
                lambda: read_bus(bus_name).instances[0].delivered == 20, what="the counters"
            )
            after = run_shmbus("stat", bus_name, "--json", "--sample", "0")
            table = run_shmbus("stat", bus_name)
    finally:
        await bus.close()
    assert before.returncode == after.returncode == table.returncode == 0, after.stderr
    first, second = json.loads(before.stdout), json.loads(after.stdout)
    assert second["published"] - first["published"] == 20
    (mine,) = [s for s in second["instances"] if s["pid"] == os.getpid()]
    assert mine["delivered"] == 20 and mine["published"] == 20 and mine["lag_bytes"] == 0
    assert mine["alive"] is True
    (ring_line,) = [line for line in table.stdout.splitlines() if line.startswith("  ring ")]
    assert f"writer pid {os.getpid()}" in ring_line and "20 events" in ring_line
    header = next(line for line in table.stdout.splitlines() if line.lstrip().startswith("SLOT"))
    for column in ("PID", "LAG_BYTES", "DELIVERED", "DROPPED", "CORRUPT", "LAPPED", "PUBLISHED"):
        assert column in header
    assert "/s)" in table.stdout  # the sampled publish rate


async def test_stat_shows_each_queue_group_and_its_members(bus_name: str) -> None:
    bus = ShmBus(bus_name, **SMALL_RING)
    await bus.connect()
    try:
        async with bus.subscribe("jobs.>", queue="workers") as sub:
            for i in range(4):
                bus.publish_nowait("jobs.x", {"i": i})
            for _ in range(4):
                await anext(aiter(sub))
            table = run_shmbus("stat", bus_name, "--sample", "0")
            as_json = run_shmbus("stat", bus_name, "--json", "--sample", "0")
    finally:
        await bus.close()
    assert table.returncode == as_json.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert "  group workers on jobs.>: 1 live member(s), delivered 4, dropped 0" in lines
    (member,) = [line for line in lines if line.startswith("    member ")]
    assert f"pid {os.getpid()}" in member and "alive" in member
    assert "assigned 4, delivered 4, dropped 0" in member
    (group,) = json.loads(as_json.stdout)["groups"]
    assert (group["queue"], group["pattern"], group["delivered"]) == ("workers", "jobs.>", 4)
    assert [m["pid"] for m in group["members"]] == [os.getpid()]


async def test_stat_watch_prints_a_sample_per_interval_until_interrupted(bus_name: str) -> None:
    bus = ShmBus(bus_name, **SMALL_RING)
    await bus.connect()
    try:
        with started(shmbus_command("stat", bus_name, "--watch", "0.1", "--json")) as watch:
            assert watch.stdout is not None
            lines = LineReader(watch.stdout)
            samples = [json.loads(lines.next_line()) for _ in range(3)]
            watch.send_signal(signal.SIGINT)
            _, err = watch.communicate(timeout=DEADLINE)
    finally:
        await bus.close()
    assert watch.returncode == 0, err
    assert "Traceback" not in err
    assert all(sample["name"] == bus_name for sample in samples)
    assert samples[0]["publish_rate"] is None and samples[2]["publish_rate"] == 0


# ─── clean ───────────────────────────────────────────────────────────────────


async def test_clean_refuses_a_live_bus_without_force(bus_name: str) -> None:
    bus = ShmBus(bus_name, **SMALL_RING)
    await bus.connect()
    try:
        result = run_shmbus("clean", bus_name)
        assert f"/dev/shm/shmbus.{bus_name}" in bus_file_paths(bus_name)
    finally:
        await bus.close()
    assert result.returncode == 1
    assert "live" in result.stderr and "--force" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_clean_removes_a_dead_bus_and_lists_what_it_removed(bus_name: str) -> None:
    with crashed_bus(bus_name) as left:
        result = run_shmbus("clean", bus_name)
        assert result.returncode == 0, result.stderr
        assert sorted(result.stdout.splitlines()) == sorted(f"removed {path}" for path in left)
        assert bus_file_paths(bus_name) == []


def test_clean_dry_run_lists_what_it_would_remove_and_removes_nothing(bus_name: str) -> None:
    with crashed_bus(bus_name) as left:
        result = run_shmbus("clean", bus_name, "--dry-run")
        assert result.returncode == 0, result.stderr
        assert sorted(result.stdout.splitlines()) == sorted(f"would remove {p}" for p in left)
        assert sorted(bus_file_paths(bus_name)) == sorted(left)


async def test_clean_dry_run_of_a_live_bus_says_clean_would_refuse_it(bus_name: str) -> None:
    bus = ShmBus(bus_name, **SMALL_RING)
    await bus.connect()
    try:
        before = bus_file_paths(bus_name)
        result = run_shmbus("clean", bus_name, "--dry-run")
        assert bus_file_paths(bus_name) == before
    finally:
        await bus.close()
    assert result.returncode == 1
    assert "live" in result.stderr and "--force" in result.stderr
    assert "nothing was removed" in result.stderr


# ─── Exit codes and errors ───────────────────────────────────────────────────


def test_bad_arguments_exit_2_with_a_message_naming_the_value(bus_name: str) -> None:
    result = run_shmbus("pub", "a.b", "{not json", "--bus", bus_name)
    assert result.returncode == 2
    assert "{not json" in result.stderr and "not valid JSON" in result.stderr


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["pub", "a b"], "whitespace"),
        (["pub", "a.b", "[1, 2]"], "must be an object"),
        (["pub", "a.b", "42"], "'42' is a JSON number; it must be an object"),
        (["pub", "a.b", "--count", "0"], "at least 1, got 0"),
        (["sub", "a.>.b"], "a.>.b"),
        (["sub", ">", "--bus", "bad/name"], "may only contain"),
        (["stat", "x", "--watch", "-1"], "-1"),
        (["stat", "x", "--watch", "0"], "the interval must be above 0 seconds, got 0.0"),
        (["stat", "x", "--sample", "nan"], "the sample time must be a finite number of seconds"),
        (["sub", ">", "--count", "two"], "the count must be a whole number, got 'two'"),
        (["metrics", "--listen", "localhost"], "HOST:PORT"),
        (["metrics", "--listen", "127.0.0.1:70000"], "65535"),
        (["no-such-command"], "invalid choice"),
    ],
)
def test_bad_arguments_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_runtime_failure_exits_1_with_one_line_and_no_traceback(bus_name: str) -> None:
    path = f"/dev/shm/shmbus.{bus_name}"
    with open(path, "wb") as f:
        f.write(b"\x5a" * BUS_SEGMENT_SIZE)
    try:
        quiet = run_shmbus("stat", bus_name)
        verbose = run_shmbus("-v", "stat", bus_name)
    finally:
        os.unlink(path)
    assert quiet.returncode == 1
    assert quiet.stderr.startswith("shmbus: error: ") and "not a shmbus segment" in quiet.stderr
    assert len(quiet.stderr.splitlines()) == 1
    assert verbose.returncode == 1 and "Traceback" in verbose.stderr


def test_stat_of_a_missing_bus_exits_1_naming_it(bus_name: str) -> None:
    result = run_shmbus("stat", bus_name)
    assert result.returncode == 1
    assert f"no bus {bus_name!r}" in result.stderr


@pytest.mark.parametrize("command", ["pub", "sub", "ls", "stat", "clean", "metrics"])
def test_each_subcommand_help_has_an_example(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0
    assert "examples:" in capsys.readouterr().out


# ─── Subcommands of other modules ────────────────────────────────────────────


@pytest.fixture
def plugin_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_plugin_subcommand_gets_its_arguments_and_exit_code(
    plugin_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (plugin_dir / "fake_plugin_ok.py").write_text(
        textwrap.dedent(
            """
            def add_arguments(parser):
                parser.add_argument("--rounds", type=int, required=True)

            def main(args):
                return args.rounds
            """
        )
    )
    monkeypatch.setitem(cli.PLUGINS, "bench", ("fake_plugin_ok", "fake bench"))
    assert cli.main(["bench", "--rounds", "3"]) == 3


def test_plugin_with_a_missing_dependency_is_not_available(
    plugin_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (plugin_dir / "fake_plugin_dep.py").write_text("import no_such_dependency_xyz\n")
    monkeypatch.setitem(cli.PLUGINS, "bridge", ("fake_plugin_dep", "fake bridge"))
    assert cli.main(["bridge", "--anything"]) == 1
    err = capsys.readouterr().err
    assert "bridge: not available" in err and "no_such_dependency_xyz" in err


def test_missing_plugin_module_is_not_available_and_others_still_work(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(cli.PLUGINS, "demo", ("shmbus.no_such_module", "fake demo"))
    assert cli.main(["demo"]) == 1
    assert "demo: not available" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    assert "demo" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("command", "module", "extra"),
    [
        (["bridge", "--export", "a.>"], "nats", "nats"),
        (["metrics"], "prometheus_client", "metrics"),
    ],
    ids=["bridge", "metrics"],
)
def test_a_command_without_its_extra_says_so_with_the_pip_command(
    command: list[str], module: str, extra: str
) -> None:
    """The same MissingExtraError message as the library raises, one line, exit 1."""
    code = (
        f"import sys; sys.modules[{module!r}] = None\n"
        "from shmbus.cli import main\n"
        f"sys.exit(main({command!r}))\n"
    )
    with started([sys.executable, "-c", code]) as process:
        out, err = process.communicate(timeout=DEADLINE)
    assert process.returncode == 1, err
    message = str(MissingExtraError(extra))
    assert err == f"shmbus: error: {command[0]}: not available: {message}\n"
    assert f"pip install 'shmbus[{extra}]'" in message


def test_console_script_runs_the_same_command() -> None:
    script = os.path.join(os.path.dirname(sys.executable), "shmbus")
    if not os.path.exists(script):
        pytest.skip("the console script is not installed in this environment")
    with started([script, "--help"]) as process:
        out, _ = process.communicate(timeout=DEADLINE)
    assert process.returncode == 0 and "pub" in out and "metrics" in out


# ─── request, reply, headers and queue groups ────────────────────────────────

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def test_request_prints_the_fixed_reply_of_a_reply_command(bus_name: str) -> None:
    with started(
        shmbus_command("reply", "svc.>", '{"now": "noon"}', "--count", "1", "--bus", bus_name)
    ) as responder:
        wait_until(lambda: has_subscriber(bus_name, responder.pid), "the responder")
        request = run_shmbus(
            "request", "svc.time", '{"q": 1}', "--timeout", "30", "--bus", bus_name
        )
        out, err = responder.communicate(timeout=DEADLINE)
    assert request.returncode == 0, request.stderr
    assert json.loads(request.stdout) == {"now": "noon"}
    assert responder.returncode == 0, err
    stamp, topic, event_type, payload = out.strip().split(" ", 3)  # the request it answered
    assert (topic, event_type, json.loads(payload)) == ("svc.time", "-", {"q": 1})


def test_reply_without_json_echoes_each_requests_payload(bus_name: str) -> None:
    with started(
        shmbus_command("reply", "echo", "--count", "2", "--json", "--bus", bus_name)
    ) as responder:
        wait_until(lambda: has_subscriber(bus_name, responder.pid), "the responder")
        first = run_shmbus("request", "echo", '{"n": 1}', "--timeout", "30", "--bus", bus_name)
        second = run_shmbus("request", "echo", '{"n": 2}', "--timeout", "30", "--bus", bus_name)
        out, err = responder.communicate(timeout=DEADLINE)
    assert [json.loads(r.stdout) for r in (first, second)] == [{"n": 1}, {"n": 2}]
    requests = [json.loads(line) for line in out.splitlines()]
    assert [r["payload"] for r in requests] == [{"n": 1}, {"n": 2}]
    assert all(r["reply_to"].startswith("_INBOX.") for r in requests)


def test_reply_skips_events_that_are_not_requests(bus_name: str) -> None:
    with started(
        shmbus_command("reply", "mixed", "--count", "1", "--json", "--bus", bus_name)
    ) as responder:
        wait_until(lambda: has_subscriber(bus_name, responder.pid), "the responder")
        assert run_shmbus("pub", "mixed", '{"plain": 1}', "--bus", bus_name).returncode == 0
        request = run_shmbus(
            "request", "mixed", '{"asked": 2}', "--timeout", "30", "--bus", bus_name
        )
        out, err = responder.communicate(timeout=DEADLINE)
    assert request.returncode == 0, request.stderr
    assert [json.loads(line)["payload"] for line in out.splitlines()] == [{"asked": 2}]


def test_request_json_prints_the_whole_reply_with_the_responders_headers(bus_name: str) -> None:
    with started(
        shmbus_command(
            "reply", "traced", "--count", "1", "-H", f"traceparent:{TRACEPARENT}", "--bus", bus_name
        )
    ) as responder:
        wait_until(lambda: has_subscriber(bus_name, responder.pid), "the responder")
        request = run_shmbus(
            "request", "traced", "--json", "--timeout", "30", "--type", "ask", "--bus", bus_name
        )
        responder.communicate(timeout=DEADLINE)
    assert request.returncode == 0, request.stderr
    reply = json.loads(request.stdout)
    assert reply["headers"] == {"traceparent": TRACEPARENT}
    assert reply["topic"].startswith("_INBOX.") and reply["payload"] == {}


def test_request_with_nobody_answering_exits_1_with_one_line(bus_name: str) -> None:
    result = run_shmbus("request", "nobody.home", "{}", "--timeout", "0.2", "--bus", bus_name)
    assert result.returncode == 1
    assert result.stdout == ""
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("shmbus: error: no reply to the request on 'nobody.home' within 0.2 s")
    assert bus_file_paths(bus_name) == []


def test_pub_headers_reach_a_json_subscriber(bus_name: str) -> None:
    with started(shmbus_command("sub", "h", "--json", "--count", "1", "--bus", bus_name)) as sub:
        wait_until(lambda: has_subscriber(bus_name, sub.pid), "the subscriber")
        pub = run_shmbus(
            "pub", "h", "{}", "-H", f"traceparent: {TRACEPARENT}", "-H", "x-id:7", "--bus", bus_name
        )
        assert pub.returncode == 0, pub.stderr
        out, err = sub.communicate(timeout=DEADLINE)
    assert json.loads(out)["headers"] == {"traceparent": TRACEPARENT, "x-id": "7"}


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["sub", "x", "--queue", "two words"], ["--queue", "queue name 'two words'", "whitespace"]),
        (["reply", "x", "--queue", ""], ["--queue", "must not be empty"]),
        (["request", "x", "--timeout", "0"], ["--timeout", "above 0"]),
        (["request", "x", "--timeout", "1e9"], ["--timeout", "at most 86400"]),
        (["request", "x", "[1]"], ["JSON payload", "array"]),
        (["pub", "x", "-H", "no-colon"], ["-H/--header", "NAME:VALUE"]),
        (["request", "x", "-H", "bad name:v"], ["-H/--header", "header name 'bad name'"]),
    ],
)
def test_bad_request_reply_and_queue_arguments_exit_2_naming_the_problem(
    argv: list[str], words: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2
    assert all(word in err for word in words), err


def test_sub_queue_members_in_two_processes_share_the_events(bus_name: str) -> None:
    argv = ["sub", "jobs.*", "--queue", "workers", "--json", "--bus", bus_name]
    with started(shmbus_command(*argv)) as first, started(shmbus_command(*argv)) as second:
        for member in (first, second):
            wait_until(lambda m=member: has_subscriber(bus_name, m.pid) or m.poll(), "a member")
        pub = run_shmbus("pub", "jobs.run", "{}", "--count", "20", "--bus", bus_name)
        assert pub.returncode == 0, pub.stderr
        members = (first.pid, second.pid)
        wait_until(
            lambda: sum(s.delivered for s in read_bus(bus_name).instances if s.pid in members)
            >= 20,
            "the members to receive every event",
        )
        outs = []
        for member in (first, second):
            member.send_signal(signal.SIGTERM)
            outs.append(member.communicate(timeout=DEADLINE)[0])
    ids = [json.loads(line)["id"] for out in outs for line in out.splitlines()]
    assert len(ids) == len(set(ids)) == 20
