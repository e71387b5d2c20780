"""The benchmark harness (shmbus_tools.bench) in its tiny --smoke mode.

Runs every scenario for shmbus and multiprocessing.Queue for a fraction of a
second in a separate process (the harness forks its children, which a test
process running threads should not do) and checks that the outputs are
produced and well formed; then the queue-group and request/reply scenarios
(Q1, R1) for shmbus, NATS and ZeroMQ, and the iceoryx2 peer where it is
installed. No assertion is about timing or speed.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from shmbus_tools.bench.baseline import Baseline
from shmbus_tools.bench.peers.iceoryx2_peer import IceoryxDriver
from shmbus_tools.bench.report import write_markdown
from shmbus_tools.bench.runner import BenchOutcome, RunResult, derive_metrics
from shmbus_tools.bench.spec import (
    QUEUE_GROUP,
    QUEUE_WORKERS,
    SCENARIOS,
    RunSpec,
    plan,
    settings_for,
)

from shmbus import ShmBus

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SMOKE_TIMEOUT = 240


def _bench(*args: str, timeout: float = SMOKE_TIMEOUT) -> subprocess.CompletedProcess[str]:
    """Run the benchmark; the result's ``args`` end with the process's pid."""
    with subprocess.Popen(
        [sys.executable, "-m", "shmbus_tools.bench", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    ) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()
            raise
        return subprocess.CompletedProcess(
            [*process.args, str(process.pid)], process.returncode, stdout, stderr
        )


def _have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def smoke(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, subprocess.CompletedProcess[str]]:
    out = tmp_path_factory.mktemp("bench")
    done = _bench("--smoke", "--peers", "shm,mpq", "--out", str(out))
    return out, done


def test_smoke_run_succeeds_and_writes_every_output(
    smoke: tuple[Path, subprocess.CompletedProcess[str]],
) -> None:
    out, done = smoke
    assert done.returncode == 0, done.stdout + done.stderr
    for name in ("results.md", "results.json"):
        assert (out / name).is_file(), name
        assert f"wrote {out / name}" in done.stdout
    # Not a terminal: progress comes as plain lines on stderr.
    assert "[  1/" in done.stderr
    assert "\x1b[" not in done.stderr


def test_results_json_records_every_run(
    smoke: tuple[Path, subprocess.CompletedProcess[str]],
) -> None:
    out, _ = smoke
    document: dict[str, Any] = json.loads((out / "results.json").read_text())
    for key in ("generated", "command", "host", "settings", "summary", "runs", "skipped_peers"):
        assert key in document, key
    runs = document["runs"]
    # Only shmbus's queue group may be skipped (see the Q1 tests below).
    assert all(
        run["status"] == "ok"
        or (run["scenario"], run["peer"], run["status"]) == ("Q1", "shm", "skipped")
        for run in runs
    ), [r["error"] for r in runs]
    seen = {(run["scenario"], run["peer"]) for run in runs}
    for scenario in SCENARIOS:
        assert (scenario, "shm") in seen, scenario
    for scenario in ("T1", "T2", "T3", "L1", "S1"):
        assert (scenario, "mpq") in seen, scenario
    assert ("L1", "sem") in seen and ("L1", "fifo") in seen  # the reference rows
    for run in runs:
        if run["status"] == "skipped":
            continue
        metrics = run["metrics"]
        assert metrics["published"] > 0
        if run["scenario"] == "P1":
            assert metrics["us_per_call"] > 0
            continue
        if run["scenario"] == "R1":
            assert 0 < metrics["answered"] <= metrics["requests"]
            continue
        assert 0 < metrics["received"] <= metrics["should_receive"]
        # A subscriber that finished draining (rather than hitting the drain
        # bound) accounts for everything: lossless queues received it all,
        # shmbus received it or counted it as dropped.
        if metrics["ends"] == ["complete"]:
            if run["peer"] in ("mpq", "sem", "fifo"):
                assert metrics["received"] == metrics["should_receive"]
            if run["peer"] == "shm":
                assert metrics["received"] + metrics["dropped_counted"] == metrics["should_receive"]
        if run["scenario"] == "L1":
            assert run["latency_cdf_us"], "latency runs keep a CDF"
            assert metrics["p50_us"] <= metrics["p99_us"] <= metrics["max_us"]
    z1 = [run for run in runs if run["scenario"] == "Z1"]
    assert z1 and all(run["spec"]["rate"] > 0 for run in z1)


def test_results_md_has_a_table_per_scenario(
    smoke: tuple[Path, subprocess.CompletedProcess[str]],
) -> None:
    out, _ = smoke
    text = (out / "results.md").read_text()
    for scenario, title in SCENARIOS.items():
        assert f"## {scenario}: {title}" in text
    assert "multiprocessing.Queue" in text and "| blocking |" in text
    assert "| asyncio |" in text
    assert f"**Machine:** {os.cpu_count()} CPUs" in text
    assert "shmbus/peer" in text
    for line in text.splitlines():
        if line.startswith("|"):
            assert line.endswith("|"), line


def test_charts_are_png_files(smoke: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    out, _ = smoke
    if not _have_matplotlib():
        assert "matplotlib is not installed" in (out / "results.md").read_text()
        pytest.skip("matplotlib is not installed (the bench extra)")
    for name in ("throughput.png", "latency_cdf.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC), name
        assert len(data) > 1000, name
        assert f"]({name})" in (out / "results.md").read_text()


def test_smoke_run_leaves_nothing_in_dev_shm(
    smoke: tuple[Path, subprocess.CompletedProcess[str]],
) -> None:
    _, done = smoke
    assert done.returncode == 0
    # Bus files are named after the benchmark's pid; the semaphore reference
    # unlinks its semaphore at once.
    pid = done.args[-1]
    leftovers = [name for name in os.listdir("/dev/shm") if f"bench-{pid}-" in name]
    assert not leftovers


@pytest.fixture(scope="module")
def patterns(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, subprocess.CompletedProcess[str], dict[str, Any]]:
    """Q1 and R1 in smoke mode for shmbus, NATS and ZeroMQ: (out, process, results.json)."""
    out = tmp_path_factory.mktemp("bench-patterns")
    done = _bench(
        "--smoke",
        "--scenarios",
        "Q1,R1",
        "--peers",
        "shm,nats,zmq",
        "--out",
        str(out),
        "--no-charts",
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return out, done, json.loads((out / "results.json").read_text())


def _measured(document: dict[str, Any], scenario: str, peers: tuple[str, ...]) -> dict[str, Any]:
    """The runs of *scenario* by *peers*, by peer; a peer skipped as a whole
    (no nats-server here) must say why."""
    runs = {run["peer"]: run for run in document["runs"] if run["scenario"] == scenario}
    for peer in peers:
        if peer in document["skipped_peers"]:
            assert document["skipped_peers"][peer], peer
            runs.pop(peer, None)
    return runs


def _shmbus_has_queue_groups() -> bool:
    async def probe() -> bool:
        async with ShmBus(f"bench-probe-{os.getpid()}") as bus:
            try:
                bus.subscribe("decky.*.traffic", queue=QUEUE_GROUP)
            except NotImplementedError:
                return False
            return True

    return asyncio.run(probe())


def _check_queue_group_run(run: dict[str, Any]) -> None:
    assert run["status"] == "ok", run["error"]
    assert run["spec"]["queue"] == QUEUE_GROUP
    metrics = run["metrics"]
    # Each event should reach one worker, not each of them.
    assert metrics["should_receive"] == metrics["published"] > 0
    assert 0 < metrics["received"] <= metrics["published"]
    shares = [worker["received"] for worker in run["subscribers"]]
    assert len(shares) == QUEUE_WORKERS
    assert sum(shares) == metrics["received"]
    assert (metrics["worker_min"], metrics["worker_max"]) == (min(shares), max(shares))


def test_q1_spreads_the_events_over_four_workers_on_nats_and_zeromq(
    patterns: tuple[Path, subprocess.CompletedProcess[str], dict[str, Any]],
) -> None:
    _, _, document = patterns
    runs = _measured(document, "Q1", ("nats", "zmq"))
    assert "zmq" in runs  # pyzmq is a test dependency
    for peer in ("nats", "zmq"):
        if peer in runs:
            _check_queue_group_run(runs[peer])
            # Thousands of events: every member of the group gets work.
            assert runs[peer]["metrics"]["worker_min"] > 0


def test_q1_on_shmbus_runs_or_is_skipped_with_the_reason_shmbus_gives(
    patterns: tuple[Path, subprocess.CompletedProcess[str], dict[str, Any]],
) -> None:
    out, done, document = patterns
    run = _measured(document, "Q1", ("shm",))["shm"]
    if _shmbus_has_queue_groups():
        _check_queue_group_run(run)
        return
    assert run["status"] == "skipped"
    reason = run["skip_reason"]
    assert "NotImplementedError" in reason and "queue=" in reason
    assert f"skipped: {reason}" in (out / "results.md").read_text()
    assert f"Q1 shm skipped: {reason}" in done.stderr
    assert run["metrics"] == {}


def test_r1_measures_every_round_trip_on_shmbus_nats_and_zeromq(
    patterns: tuple[Path, subprocess.CompletedProcess[str], dict[str, Any]],
) -> None:
    _, _, document = patterns
    runs = _measured(document, "R1", ("shm", "nats", "zmq"))
    assert {"shm", "zmq"} <= set(runs)
    for peer, run in runs.items():
        assert run["status"] == "ok", (peer, run["error"])
        metrics = run["metrics"]
        assert metrics["requests"] == settings_for("smoke").requests, peer
        assert metrics["answered"] + metrics["timeouts"] == metrics["requests"], peer
        assert metrics["wrong_replies"] == 0, peer
        assert metrics["samples"] == metrics["answered"] > 0, peer
        assert 0 < metrics["p50_us"] <= metrics["p99_us"] <= metrics["max_us"], peer
        # The responder answered the warm-up and every measured request.
        assert run["subscribers"][0]["received"] >= metrics["answered"], peer


def test_results_md_checks_the_q1_and_r1_targets(
    patterns: tuple[Path, subprocess.CompletedProcess[str], dict[str, Any]],
) -> None:
    out, _, _ = patterns
    text = (out / "results.md").read_text()
    for scenario in ("Q1", "R1"):
        assert f"## {scenario}: {SCENARIOS[scenario]}" in text
    assert "| ZeroMQ PUSH → PULL | blocking PUSH / asyncio PULL |" in text
    assert "| shmbus `await bus.request()` / `await bus.reply()` | asyncio |" in text
    rows = {line.split(" | ")[0]: line for line in text.splitlines() if line.startswith("| ")}
    assert "| Q1 queue group delivered/s ≥ 3× ZeroMQ PUSH/PULL" in rows
    r1 = rows["| R1 request/reply p50 round trip ≤ 0.5× NATS's"]
    if "nats" not in json.loads((out / "results.json").read_text())["skipped_peers"]:
        assert "→ met |" in r1 or "→ **not met** |" in r1


def _have_iceoryx2() -> bool:
    try:
        import iceoryx2  # noqa: F401 - the bench extra, not the test one
    except ImportError:
        return False
    return True


#: The scenarios the iceoryx2 peer runs (P1, Q1, R1 and Z1 are other peers').
ICEORYX2_SCENARIOS = ("T1", "T2", "T3", "L1", "S1")


@pytest.mark.skipif(not _have_iceoryx2(), reason="iceoryx2 is not installed (the bench extra)")
def test_iceoryx2_peer_delivers_every_event_and_leaves_nothing_behind(tmp_path: Path) -> None:
    done = _bench(
        "--smoke",
        "--scenarios",
        ",".join(ICEORYX2_SCENARIOS),
        "--peers",
        "ice",
        "--out",
        str(tmp_path),
        "--no-charts",
    )
    assert done.returncode == 0, done.stdout + done.stderr
    document: dict[str, Any] = json.loads((tmp_path / "results.json").read_text())
    runs = [run for run in document["runs"] if run["peer"] == "ice"]
    assert sorted({run["scenario"] for run in runs}) == sorted(ICEORYX2_SCENARIOS)
    for run in runs:
        assert run["status"] == "ok", run["error"]
        metrics = run["metrics"]
        # Lossless, like the queues: every subscriber took its end-of-stream
        # samples, so it has every event.
        assert metrics["ends"] == ["complete"], run["scenario"]
        assert metrics["received"] == metrics["should_receive"] > 0, run["scenario"]
        if run["scenario"] == "L1":
            assert 0 < metrics["p50_us"] <= metrics["p99_us"] <= metrics["max_us"]
    assert "| iceoryx2 | blocking |" in (tmp_path / "results.md").read_text()
    # The peer's files carry the benchmark's pid, as shmbus's do.
    pid = done.args[-1]
    assert not [name for name in os.listdir("/dev/shm") if f"bench-{pid}-" in name]


def test_iceoryx2_peer_says_how_to_install_it_when_it_is_missing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "iceoryx2", None)  # import iceoryx2 -> ImportError
    assert IceoryxDriver.unavailable() == (
        "Python package iceoryx2 is not installed (pip install 'shmbus[bench]')"
    )


def test_bad_arguments_exit_2() -> None:
    done = _bench("--scenarios", "T9", timeout=60)
    assert done.returncode == 2
    assert "unknown scenario" in done.stderr
    done = _bench("--peers", "kafka", timeout=60)
    assert done.returncode == 2
    assert "unknown peer" in done.stderr
    done = _bench("--baseline", "no-such-revision-anywhere", timeout=60)
    assert done.returncode == 2
    assert "--baseline" in done.stderr


def test_shmbus_command_has_the_bench_subcommand() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "shmbus", "bench", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "--quick" in done.stdout and "--scenarios" in done.stdout


def test_plan_alternates_peers_within_each_repetition() -> None:
    runs, zero_loss = plan(settings_for("full"), ["T1", "L1", "Z1"], ["shm", "nats", "zmq"])
    first = [(r.scenario, r.peer) for r in runs if r.rep == 0]
    assert first == [
        ("T1", "shm"),
        ("T1", "nats"),
        ("T1", "zmq"),
        ("L1", "shm"),
        ("L1", "nats"),
        ("L1", "zmq"),
        ("L1", "shmll"),
        ("L1", "shmuv"),
        ("L1", "shmsync"),
        ("L1", "fifo"),
        ("L1", "sem"),
    ]
    assert [r.rep for r in runs] == sorted(r.rep for r in runs)  # repetitions outermost
    assert len(zero_loss) == 3 and {r.peer for r in zero_loss} == {"shm"}


def test_derive_metrics_definitions() -> None:
    spec = RunSpec(scenario="T1", peer="shm", rep=0, subscribers=2)
    publishers = [{"published": 1000, "start_ns": 0, "end_ns": 1_000_000_000, "cpu_s": 1.0}]
    subscribers = [
        {"received": 1000, "dropped": 0, "last_ns": 2_000_000_000, "cpu_s": 0.5, "end": "complete"},
        {
            "received": 500,
            "dropped": 500,
            "last_ns": 1_000_000_000,
            "cpu_s": 0.5,
            "end": "complete",
        },
    ]
    metrics = derive_metrics(spec, publishers, subscribers, [])
    assert metrics["published_per_s"] == 1000
    assert metrics["delivered_per_s"] == 750  # 1500 events by the last receipt, 2 s
    assert metrics["loss_pct"] == 25
    assert metrics["dropped_counted"] == 500
    assert metrics["sub_cpu_s_per_million"] == pytest.approx(1e6 / 1500)


def test_plan_runs_q1_and_r1_for_shmbus_nats_and_zeromq_only() -> None:
    settings = settings_for("quick")
    peers = ["shm", "shm@0123abc", "nats", "zmq", "mpq", "ff"]
    runs, _ = plan(settings, ["Q1", "R1"], peers)
    assert [(r.scenario, r.peer) for r in runs] == [
        ("Q1", "shm"),
        ("Q1", "nats"),
        ("Q1", "zmq"),
        ("R1", "shm"),
        ("R1", "shmll"),  # the opt-in low-latency mode at both ends
        ("R1", "nats"),
        ("R1", "zmq"),
    ]
    q1, r1 = runs[0], runs[3]
    assert (q1.publishers, q1.subscribers, q1.queue, q1.requests) == (
        1,
        QUEUE_WORKERS,
        QUEUE_GROUP,
        None,
    )
    assert (r1.publishers, r1.subscribers, r1.queue, r1.requests) == (
        1,
        1,
        None,
        settings.requests,
    )


def test_derive_metrics_of_a_queue_group_expects_each_event_once() -> None:
    spec = RunSpec(scenario="Q1", peer="nats", rep=0, subscribers=4, queue="workers")
    publishers = [{"published": 1000, "start_ns": 0, "end_ns": 1_000_000_000, "cpu_s": 1.0}]
    subscribers = [
        {"received": n, "dropped": None, "last_ns": 2_000_000_000, "cpu_s": 0.1, "end": "quiet"}
        for n in (300, 300, 250, 100)
    ]
    metrics = derive_metrics(spec, publishers, subscribers, [])
    assert metrics["should_receive"] == 1000
    assert metrics["loss_pct"] == 5
    assert metrics["delivered_per_s"] == 475  # 950 events by the last receipt, 2 s
    assert (metrics["worker_min"], metrics["worker_max"]) == (100, 300)
    assert metrics["spread"] == pytest.approx(1 / 3)


def test_derive_metrics_of_request_reply_are_the_requesters_round_trips() -> None:
    spec = RunSpec(scenario="R1", peer="shm", rep=0, requests=4)
    requester = {
        "published": 4,
        "errors": 1,
        "answered": 3,
        "wrong_replies": 0,
        "start_ns": 0,
        "end_ns": 1_000_000,
        "cpu_s": 0.001,
    }
    responder = {"received": 204, "dropped": 0, "last_ns": 0, "cpu_s": 0.002, "end": "complete"}
    metrics = derive_metrics(spec, [requester], [responder], [100_000, 200_000, 300_000])
    assert (metrics["requests"], metrics["answered"], metrics["timeouts"]) == (4, 3, 1)
    assert metrics["loss_pct"] == 25
    assert metrics["published_per_s"] == 4000  # requests/s
    assert (metrics["p50_us"], metrics["max_us"], metrics["samples"]) == (200.0, 300.0, 3)


def test_plan_runs_a_baseline_beside_shmbus() -> None:
    base = "shm@0123abc"
    runs, zero_loss = plan(settings_for("quick"), ["T1", "L1", "P1", "Z1"], ["shm", base, "mpq"])
    shape = [(r.scenario, r.variant, r.peer) for r in runs]
    assert shape[:3] == [("T1", "", "shm"), ("T1", "", base), ("T1", "", "mpq")]
    assert ("L1", "", base) in shape
    for call in ("publish", "publish_nowait"):
        assert ("P1", call, base) in shape
    assert {r.peer for r in zero_loss} == {"shm"}  # Z1 is calibrated on shm alone


_EXPORT_CHECK = textwrap.dedent(
    """
    import inspect, json, multiprocessing, os, sys
    import shmbus.shm
    from shmbus_tools.bench.baseline import bus_class, exported, resolve

    def child(queue, package):
        queue.put(inspect.getfile(bus_class(package)))

    baseline = resolve("HEAD")
    with exported(baseline) as package:
        directory = os.path.dirname(os.path.dirname(package.__file__))
        context = multiprocessing.get_context("fork")
        queue = context.Queue()
        process = context.Process(target=child, args=(queue, package))
        process.start()
        in_child = queue.get(timeout=20)
        process.join(20)
        print(json.dumps({
            "package": package.__name__,
            "directory": directory,
            "in_child": in_child,
            "current": inspect.getfile(shmbus.shm.ShmBus),
        }))
    print(json.dumps({"removed": not os.path.exists(directory)}))
    """
)


def test_baseline_is_exported_and_imported_under_its_own_name() -> None:
    root = Path(__file__).resolve().parents[1]
    if shutil.which("git") is None or not (root / ".git").exists():
        pytest.skip("needs git and the source checkout")
    done = subprocess.run(
        [sys.executable, "-c", _EXPORT_CHECK],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    inside, after = (json.loads(line) for line in done.stdout.splitlines())
    assert inside["package"].startswith("shmbus_at_")
    # A forked child gets the exported copy's ShmBus, not the work tree's.
    assert inside["in_child"].startswith(inside["directory"] + os.sep)
    assert inside["in_child"] != inside["current"]
    assert after["removed"]


def _result(scenario: str, variant: str, peer: str, **metrics: Any) -> RunResult:
    spec = RunSpec(scenario=scenario, variant=variant, peer=peer, rep=0)
    return RunResult(spec=spec, status="ok", metrics={**metrics, "ends": ["complete"]})


def _report(
    tmp_path: Path, results: list[RunResult], *, cpus: int = 2, baseline: Baseline | None = None
) -> str:
    """results.md of a benchmark that ran *results* on *cpus* CPUs."""
    outcome = BenchOutcome(
        results=results,
        skipped={},
        versions={},
        started_at=0.0,
        elapsed_s=1.0,
        zero_loss={},
        baseline=baseline,
    )
    facts = {
        "cpus": cpus,
        "cpu_model": "x",
        "kernel": "k",
        "python": "3",
        "load_average": [0.0],
        "versions": {},
    }
    path = tmp_path / "results.md"
    write_markdown(path, outcome, settings_for("quick"), facts, "bench", [], None)
    return path.read_text()


#: T2 with a publisher that slows down as subscribers are added (a target missed).
_CROWDED_T2 = [
    _result("T2", "fanout=1", "shm", published_per_s=100_000.0, delivered_per_s=100_000.0),
    _result("T2", "fanout=8", "shm", published_per_s=50_000.0, delivered_per_s=300_000.0),
    _result("T2", "fanout=1", "nats", published_per_s=70_000.0, delivered_per_s=60_000.0),
    _result("T2", "fanout=8", "nats", published_per_s=20_000.0, delivered_per_s=90_000.0),
]


def test_report_explains_a_missed_target_with_the_runs_own_figures(tmp_path: Path) -> None:
    text = _report(tmp_path, _CROWDED_T2)
    assert "published/s at 8 subscribers ≥ 0.8× at 1 | 50,000 vs 100,000 |" in text
    assert "NATS's publisher went from 70,000 to 20,000 events/s (0.29×)" in text
    assert "shmbus's aggregate delivery went from 100,000 to 300,000 events/s (3.00×)" in text


def test_report_explains_a_missed_t1_target_with_the_runs_publish_cost(tmp_path: Path) -> None:
    text = _report(
        tmp_path,
        [
            _result("T1", "", "shm", delivered_per_s=9e4, loss_pct=0.0, sub_cpu_s_per_million=2.0),
            _result("T1", "", "nats", delivered_per_s=5e4, published_per_s=9e4),
            _result("P1", "publish", "shm", us_per_call=4.2, calls_per_s=2e5),
        ],
    )
    assert "one `publish()` took 4.20 µs in P1" in text
    assert "bottleneck of NATS (it delivered 50,000 of the 90,000 events/s published)" in text


def test_report_says_processes_share_the_cpus_only_when_they_outnumber_them(
    tmp_path: Path,
) -> None:
    few = _report(tmp_path, _CROWDED_T2, cpus=2)
    many = _report(tmp_path, _CROWDED_T2, cpus=64)
    assert "9 processes (a publisher and 8 subscribers) share 2 CPUs" in few
    assert "9 processes (a publisher and 8 subscribers) ran on 64 CPUs." in many
    assert "share" not in many.split("## The targets")[1].split("## ")[0]


def test_report_compares_the_work_tree_with_the_baseline(tmp_path: Path) -> None:
    baseline = Baseline(
        rev="main", commit="0123abc" + "0" * 33, short="0123abc", subject="s", repo=tmp_path
    )
    base = baseline.peer
    results = [
        _result("P1", "publish", "shm", us_per_call=3.0, calls_per_s=1e6 / 3),
        _result("P1", "publish", base, us_per_call=4.0, calls_per_s=250_000),
        _result("T1", "", "shm", delivered_per_s=300_000.0, published_per_s=300_000.0),
        _result("T1", "", base, delivered_per_s=200_000.0, published_per_s=200_000.0),
        _result("T2", "fanout=4", "shm", delivered_per_s=100.0),
        _result("T2", "fanout=4", base, delivered_per_s=200.0),
    ]
    text = _report(tmp_path, results, baseline=baseline)
    assert "## shmbus (work tree) vs shmbus@0123abc" in text
    rows = {line.split(" | ")[0]: line for line in text.splitlines() if line.startswith("| ")}
    assert "| 0.75× | 33.3% faster |" in rows["| P1 `await bus.publish()`, µs/call"]
    assert "| 1.50× | 50.0% faster |" in rows["| T1 delivered/s"]
    assert "| 0.50× | 50.0% slower |" in rows["| T2 4 sub(s), aggregate delivered/s"]
    # The baseline also has its rows in the scenarios' own tables.
    assert "| shmbus@0123abc | asyncio | 200,000 | 200,000 |" in text
    assert "| shmbus@0123abc `await bus.publish()` | asyncio | 4.00 |" in text


def test_report_checks_the_queue_group_and_request_reply_targets(tmp_path: Path) -> None:
    text = _report(
        tmp_path,
        [
            _result("Q1", "", "shm", delivered_per_s=300_000.0),
            _result("Q1", "", "nats", delivered_per_s=90_000.0),
            _result("Q1", "", "zmq", delivered_per_s=120_000.0),
            _result("R1", "", "shm", p50_us=100.0, p99_us=300.0),
            _result("R1", "", "nats", p50_us=250.0, p99_us=400.0),
        ],
    )
    assert (
        "| Q1 queue group delivered/s ≥ 3× a NATS queue group | 300,000 vs 90,000 | 3.33× → met |"
        in text
    )
    assert (
        "| Q1 queue group delivered/s ≥ 3× ZeroMQ PUSH/PULL | 300,000 vs 120,000 "
        "| 2.50× → **not met** |" in text
    )
    assert (
        "| R1 request/reply p50 round trip ≤ 0.5× NATS's | 100.0 µs vs 250.0 µs | 0.40× → met |"
        in text
    )
    assert "| NATS `await nc.request()` / `await msg.respond()` | asyncio | 250.0 |" in text


def test_report_shows_a_skipped_run_with_its_reason_and_leaves_its_target_unmeasured(
    tmp_path: Path,
) -> None:
    skipped = RunResult(
        spec=RunSpec(scenario="Q1", peer="shm", rep=0),
        status="skipped",
        skip_reason="ShmBus.subscribe(pattern, queue=...) raised NotImplementedError: not yet",
    )
    text = _report(tmp_path, [skipped, _result("Q1", "", "nats", delivered_per_s=90_000.0)])
    assert (
        "- shmbus `subscribe(pattern, queue=...)`: skipped: ShmBus.subscribe(pattern, queue=...) "
        "raised NotImplementedError: not yet." in text
    )
    assert (
        "| Q1 queue group delivered/s ≥ 3× a NATS queue group | shmbus skipped (see Q1) vs 90,000 "
        "| not measured |" in text
    )
    assert "(1 of" not in text  # a skipped run is not a failed one


def test_report_explains_a_missed_request_reply_target_with_the_runs_one_way_latency(
    tmp_path: Path,
) -> None:
    text = _report(
        tmp_path,
        [
            _result("R1", "", "shm", p50_us=400.0),
            _result("R1", "", "nats", p50_us=500.0),
            _result("L1", "", "shm", p50_us=180.0),
            _result("L1", "", "fifo", p50_us=60.0),
            _result("L1", "", "shmll", p50_us=120.0),
        ],
    )
    assert "| 400.0 µs vs 500.0 µs | 0.80× → **not met** |" in text
    assert "The target asks for 250.0 µs; shmbus took 400.0 µs." in text
    assert (
        "In L1 of this run one delivery to a sleeping reader took 180.0 µs at p50 "
        "(60.0 µs of it the wake-up alone, the FIFO row) and one to a polling reader "
        "(the low-latency row) 120.0 µs: 300.0 µs for the two." in text
    )


def test_report_explains_a_missed_queue_group_target_with_the_publishers_ceiling(
    tmp_path: Path,
) -> None:
    text = _report(
        tmp_path,
        [
            _result("Q1", "", "shm", delivered_per_s=14_000.0, sub_cpu_s_per_million=80.0),
            _result("Q1", "", "nats", delivered_per_s=10_000.0, sub_cpu_s_per_million=60.0),
            _result("Q1", "", "zmq", delivered_per_s=25_000.0, sub_cpu_s_per_million=50.0),
            _result("P1", "publish", "shm", us_per_call=15.0, calls_per_s=60_000.0),
        ],
    )
    assert "Q1 runs 5 processes (a publisher and 4 workers) on 2 CPUs." in text
    assert (
        "Three times ZeroMQ's figure is 75,000 events/s, more than the 60,000 `publish()` "
        "calls/s one shmbus publisher made in P1" in text
    )
    assert (
        "Three times NATS's figure is 30,000 events/s: its publishes alone would take 50% of "
        "a CPU (P1: 60,000 calls/s), leaving 1.50 CPUs to the workers, 50.0 µs of CPU per "
        "event." in text
    )
    assert "shmbus's workers used 80.0 µs of CPU per event delivered (NATS's 60.0" in text


def test_report_checks_the_blocking_subscriptions_l1_p50_against_faster_fifo_and_iceoryx2(
    tmp_path: Path,
) -> None:
    text = _report(
        tmp_path,
        [
            _result("L1", "", "shmsync", p50_us=100.0, p99_us=200.0),
            _result("L1", "", "ff", p50_us=125.0, p99_us=250.0),
            _result("L1", "", "ice", p50_us=80.0, p99_us=150.0),
            _result("L1", "", "sem", p50_us=30.0, p99_us=60.0),
        ],
    )
    assert "| sync L1 p50 ≤ faster-fifo's | 100.0 µs vs 125.0 µs | 0.80× → met |" in text
    assert "| sync L1 p50 ≤ iceoryx2's | 100.0 µs vs 80.0 µs | 1.25× → **not met** |" in text
    assert (
        "the bare semaphore row (that wake-up alone, no ring or envelope) costs 30.0 µs at p50 "
        "of its 100.0 µs; the other 70.0 µs are the publish, the ring read and the decode." in text
    )


def test_report_leaves_the_iceoryx2_target_unmeasured_when_iceoryx2_did_not_run(
    tmp_path: Path,
) -> None:
    text = _report(
        tmp_path,
        [
            _result("L1", "", "shmsync", p50_us=100.0, p99_us=200.0),
            _result("L1", "", "ff", p50_us=125.0, p99_us=250.0),
        ],
    )
    assert "| sync L1 p50 ≤ iceoryx2's | 100.0 µs vs n/a µs | not measured |" in text
    assert "| sync L1 p50 ≤ faster-fifo's | 100.0 µs vs 125.0 µs | 0.80× → met |" in text


def test_report_checks_the_large_event_targets_against_faster_fifo(tmp_path: Path) -> None:
    text = _report(
        tmp_path,
        [
            _result("S1", "size=65536", "shm", mb_per_s=1500.0, envelope_bytes=65_670),
            _result("S1", "size=65536", "ff", mb_per_s=1000.0, envelope_bytes=65_670),
            _result("S1", "size=262144", "shm", mb_per_s=900.0, envelope_bytes=262_278),
            _result("S1", "size=262144", "ff", mb_per_s=1200.0, envelope_bytes=262_278),
        ],
    )
    assert (
        "| S1 64 KiB blob: MB/s delivered ≥ faster-fifo's | 1,500.0 vs 1,000.0 | 1.50× → met |"
        in text
    )
    assert (
        "| S1 256 KiB blob: MB/s delivered ≥ faster-fifo's | 900.0 vs 1,200.0 "
        "| 0.75× → **not met** |" in text
    )


def test_report_checks_request_reply_in_the_low_latency_mode_beside_the_default(
    tmp_path: Path,
) -> None:
    text = _report(
        tmp_path,
        [
            _result("R1", "", "shm", p50_us=400.0, p99_us=600.0),
            _result("R1", "", "shmll", p50_us=200.0, p99_us=300.0),
            _result("R1", "", "nats", p50_us=500.0, p99_us=800.0),
        ],
    )
    assert "| shmbus, both ends `low_latency=True` (opt-in mode) | asyncio | 200.0 |" in text
    assert (
        "| R1 low-latency mode (opt-in) p50 round trip ≤ 0.5× NATS's | 200.0 µs vs 500.0 µs "
        "| 0.40× → met |" in text
    )
    assert "| R1 request/reply p50 round trip ≤ 0.5× NATS's | 400.0 µs vs 500.0 µs" in text
