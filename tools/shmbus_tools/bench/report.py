"""The benchmark's outputs: results.json, results.md and the PNG charts.

Owns
----
* :func:`host_facts`: what the report says about the machine and the
  software measured.
* :func:`summarise`: the median of every figure over a (scenario, variant,
  peer)'s successful runs.
* :func:`write_json` (every run, raw children's reports included),
  :func:`write_markdown` (one table per scenario, with each peer's API style
  and the shmbus/peer ratios; with ``--baseline``, a table of the work
  tree's figures against the baseline revision's, current/baseline; Q1's
  and R1's tables show a run a peer could not do as skipped, with its
  reason) and
  :func:`write_charts` (``throughput.png``
  bars and ``latency_cdf.png``, drawn with matplotlib's Agg backend; without
  matplotlib the charts are skipped and the report says so).
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from .baseline import Baseline, is_baseline
from .harness import QUIET_S
from .runner import BenchOutcome, RunResult
from .spec import (
    FANIN_PUBLISHERS,
    LATENCY_RATE,
    PEERS,
    QUEUE_GROUP,
    QUEUE_WORKERS,
    REFERENCE_PEERS,
    REQUEST_TIMEOUT,
    REQUEST_WARMUP,
    SCENARIOS,
    ZERO_LOSS_FRACTION,
    Settings,
    peer_info,
    settings_for,
)
from .workload import envelope_size, median

__all__ = ["host_facts", "summarise", "write_charts", "write_json", "write_markdown"]

Key = tuple[str, str, str]

#: Order and colours of the peers in tables and charts.
PEER_ORDER = (
    "shm",
    "nats",
    "zmq",
    "mpq",
    "ff",
    "ice",
    "redis",
    "shmll",
    "shmuv",
    "shmsync",
    "fifo",
    "sem",
    "loop",
)
COLOURS = {
    "shm": "#d62728",
    "nats": "#1f77b4",
    "zmq": "#2ca02c",
    "mpq": "#9467bd",
    "ff": "#ff7f0e",
    "ice": "#393b79",
    "redis": "#8c564b",
    "fifo": "#17becf",
    "shmll": "#ff7f0e",
    "shmuv": "#e377c2",
    "shmsync": "#98df8a",
    "sem": "#7f7f7f",
    "loop": "#bcbd22",
}
#: Baselines (``shm@<rev>``): a paler shmbus red.
BASELINE_COLOUR = "#ff9896"


def _colour(peer: str) -> str | None:
    return BASELINE_COLOUR if is_baseline(peer) else COLOURS.get(peer)


def _in_order(names: Iterable[str]) -> list[str]:
    """*names* in :data:`PEER_ORDER`, baselines right after shmbus."""
    present = set(names)
    baselines = sorted(name for name in present if is_baseline(name))
    ordered: list[str] = []
    for name in PEER_ORDER:
        if name in present:
            ordered.append(name)
        if name == "shm":
            ordered.extend(baselines)
    return ordered


# ─── Facts and summaries ─────────────────────────────────────────────────────


def host_facts() -> dict[str, Any]:
    """The machine and the versions of everything measured."""
    versions: dict[str, str] = {}
    packages = ("shmbus", "msgpack", "pyzmq", "nats-py", "faster-fifo", "iceoryx2", "redis")
    for package in (*packages, "matplotlib"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    try:
        import zmq

        versions["libzmq"] = zmq.zmq_version()
    except ImportError:
        pass
    return {
        "cpus": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "kernel": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "versions": versions,
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def summarise(results: Iterable[RunResult]) -> dict[Key, dict[str, Any]]:
    """Median of each numeric figure per (scenario, variant, peer), over the
    successful runs; ``runs``, ``failed`` and ``skipped`` count them
    (``skip_reasons`` says why)."""
    grouped: dict[Key, list[RunResult]] = {}
    for result in results:
        grouped.setdefault(result.spec.key, []).append(result)
    summary: dict[Key, dict[str, Any]] = {}
    for key, runs in grouped.items():
        ok = [r for r in runs if r.ok]
        figures: dict[str, Any] = {
            "runs": len(ok),
            "failed": sum(1 for r in runs if r.failed),
            "skipped": sum(1 for r in runs if r.status == "skipped"),
        }
        reasons = sorted({r.skip_reason for r in runs if r.skip_reason is not None})
        if reasons:
            figures["skip_reasons"] = reasons
        names = {name for r in ok for name, value in r.metrics.items() if _is_number(value)}
        for name in sorted(names):
            figures[name] = median([_number(r.metrics.get(name)) for r in ok])
        figures["ends"] = sorted({str(end) for r in ok for end in r.metrics.get("ends") or []})
        errors = [r.error for r in runs if r.error]
        if errors:
            figures["errors"] = errors
        samples = sorted(s for r in ok for s in r.samples)
        figures["_samples"] = samples
        summary[key] = figures
    return summary


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, (int, float)) else None


# ─── results.json ────────────────────────────────────────────────────────────


def write_json(
    path: Path, outcome: BenchOutcome, settings: Settings, facts: dict[str, Any], command: str
) -> None:
    summary = summarise(outcome.results)
    document = {
        "generated": _utc(outcome.started_at),
        "command": command,
        "elapsed_s": round(outcome.elapsed_s, 1),
        "host": facts,
        "server_versions": outcome.versions,
        "settings": {
            **settings.__dict__,
            "latency_rate": LATENCY_RATE,
            "fanin_publishers": FANIN_PUBLISHERS,
            "zero_loss_fraction": ZERO_LOSS_FRACTION,
            "queue_workers": QUEUE_WORKERS,
            "request_warmup": REQUEST_WARMUP,
            "request_timeout_s": REQUEST_TIMEOUT,
            "envelope_bytes": envelope_size(None),
        },
        "skipped_peers": outcome.skipped,
        "baseline": outcome.baseline.to_json() if outcome.baseline is not None else None,
        "zero_loss_calibration": outcome.zero_loss,
        "summary": [
            {"scenario": k[0], "variant": k[1], "peer": k[2]}
            | {name: value for name, value in v.items() if not name.startswith("_")}
            for k, v in summary.items()
        ],
        "runs": [result.to_json() for result in outcome.results],
    }
    path.write_text(json.dumps(document, indent=1, default=str) + "\n")


def _utc(timestamp: float) -> str:
    moment = datetime.datetime.fromtimestamp(timestamp, datetime.UTC)
    return moment.strftime("%Y-%m-%d %H:%M UTC")


# ─── results.md ──────────────────────────────────────────────────────────────


def _fmt(value: Any, digits: int = 0) -> str:
    if value is None:
        return "n/a"
    if digits == 0:
        return f"{value:,.0f}"
    return f"{value:,.{digits}f}"


def _ratio(ours: Any, theirs: Any) -> str:
    if ours is None or theirs is None or not theirs:
        return "n/a"
    return f"{ours / theirs:.2f}×"


_ENDS = {
    "complete": "all accounted for",
    "quiet": f"quiet {QUIET_S * 1000:g} ms",
    "deadline": "drain bound",
}


def _ends(figures: dict[str, Any]) -> str:
    """How the runs' subscribers finished, in words (see the method note)."""
    return "; ".join(_ENDS.get(end, end) for end in figures.get("ends", [])) or "n/a"


def _runs_note(figures: dict[str, Any]) -> str:
    if figures.get("failed"):
        return f" ({figures['failed']} of {figures['failed'] + figures['runs']} runs failed)"
    return ""


class _Table:
    """A markdown table; the first *text_columns* columns are left-aligned text."""

    def __init__(self, *headers: str, text_columns: int = 2) -> None:
        self.lines = [
            "| " + " | ".join(headers) + " |",
            "|"
            + "|".join("---" if i < text_columns else "---:" for i in range(len(headers)))
            + "|",
        ]

    def row(self, *cells: str) -> None:
        self.lines.append("| " + " | ".join(cells) + " |")

    def text(self) -> str:
        return "\n".join(self.lines)


def write_markdown(
    path: Path,
    outcome: BenchOutcome,
    settings: Settings,
    facts: dict[str, Any],
    command: str,
    charts: list[str],
    chart_note: str | None,
) -> None:
    summary = summarise(outcome.results)
    peers = [p for p in _in_order(k[2] for k in summary) if p in PEERS or is_baseline(p)]
    references = [p for p in REFERENCE_PEERS if any(k[2] == p for k in summary)]
    ran = [s for s in SCENARIOS if any(k[0] == s for k in summary)]
    out: list[str] = ["# shmbus benchmark results", ""]
    reps = settings.reps
    out.append(
        f"`{command}`, {_utc(outcome.started_at)}: {len(outcome.results)} runs in "
        f"{outcome.elapsed_s / 60:.1f} min ({settings.mode} mode)."
    )
    out.append("")
    out.append(
        f"**Machine:** {facts['cpus']} CPUs ({facts['cpu_model']}), {facts['kernel']}, "
        f"Python {facts['python']}; load average {facts['load_average'][0]} when it started. "
        "Absolute numbers depend on the machine and on whatever else ran on it meanwhile: "
        "read the ratios, which come from runs interleaved in time "
        "(every repetition runs each scenario for every peer back to back, "
        "round-robin), so such noise hits all peers alike."
    )
    out.append("")
    if reps > 1:
        runs_text = f"Every figure is the median of {reps} runs."
    else:
        runs_text = (
            f"One run per figure ({settings.mode} mode: no median; "
            f"the full benchmark takes the median of {settings_for('full').reps})."
        )
    out.append(
        f"**Method:** {runs_text} Throughput runs publish for {settings.throughput_s:g} s as fast "
        f"as the publisher can; the workload is `decky.<id>.traffic` over 64 ids, one subscriber "
        f"pattern `decky.*.traffic` per subscriber process, a 9-field payload stamped with "
        f"`time.monotonic_ns()` ({envelope_size(None)} bytes as a msgpack envelope). Every "
        "subscriber ends with a frozen `shmbus.Event` per event: peers other than shmbus carry "
        "the same msgpack envelope and decode it with `shmbus.codec.decode_envelope`. "
        "Subscribers drain for up to "
        f"{settings.drain_s:g} s after the publishers stop. *delivered/s* = events received by "
        "all subscribers / time from the first publish to the last receipt; *loss* = events a "
        "subscriber should have received but had not by the end of its run: dropped by the "
        "transport, or (lossless queues, client-side buffers) still queued when the drain "
        "bound passed; *run ended* says which: *all accounted for* (everything received, or "
        f"counted as dropped by shmbus), *{_ENDS['quiet']}* (a peer that does not count its drops "
        "stopped delivering), *drain bound* (still delivering when the bound passed); *sub CPU* = "
        "user+system CPU of the subscriber processes per million events delivered. Ratios are "
        "shmbus/peer of the column named"
        + (
            f" (for the {outcome.baseline.label} rows: this work tree / that revision)."
            if outcome.baseline is not None
            else "."
        )
    )
    out.append("")
    out.append("## Peers")
    out.append("")
    table = _Table("peer", "API style", "how it is driven", text_columns=3)
    for name in [*peers, *references]:
        info = peer_info(name)
        table.row(info.label, info.api, info.what)
    out.append(table.text())
    out.append("")
    if outcome.skipped:
        for name, reason in outcome.skipped.items():
            out.append(f"- **{peer_info(name).label}: skipped**: {reason}.")
        out.append("")
    versions = {**facts["versions"], **outcome.versions}
    out.append("Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()) + ".")
    out.append("")

    if outcome.baseline is not None:
        out.extend(_versus_baseline(summary, outcome.baseline))
    out.extend(_targets(summary, int(facts.get("cpus") or 1)))
    for scenario in ran:
        out.append(f"## {scenario}: {SCENARIOS[scenario]}")
        out.append("")
        writer = _SECTIONS[scenario]
        out.extend(writer(summary, peers))
        out.append("")
    if charts:
        out.append("## Charts")
        out.append("")
        for chart in charts:
            out.append(f"![{chart}]({chart})")
            out.append("")
    if chart_note:
        out.append(f"Charts: {chart_note}")
        out.append("")
    path.write_text("\n".join(out))


def _section_flow(
    scenario: str, variant: str, summary: dict[Key, dict[str, Any]], peers: list[str]
) -> list[str]:
    table = _Table(
        "peer",
        "API",
        "published/s",
        "delivered/s",
        "loss %",
        "sub CPU s / 1M delivered",
        "shmbus/peer delivered/s",
        "run ended",
    )
    ours = summary.get((scenario, variant, "shm"), {})
    for peer in peers:
        figures = summary.get((scenario, variant, peer))
        if figures is None:
            continue
        table.row(
            peer_info(peer).label + _runs_note(figures),
            peer_info(peer).api,
            _fmt(figures.get("published_per_s")),
            _fmt(figures.get("delivered_per_s")),
            _fmt(figures.get("loss_pct"), 2),
            _fmt(figures.get("sub_cpu_s_per_million"), 2),
            "—"
            if peer == "shm"
            else _ratio(ours.get("delivered_per_s"), figures.get("delivered_per_s")),
            _ends(figures),
        )
    return [table.text()]


def _t1(summary: dict[Key, dict[str, Any]], peers: list[str]) -> list[str]:
    return _section_flow("T1", "", summary, peers)


def _t3(summary: dict[Key, dict[str, Any]], peers: list[str]) -> list[str]:
    return _section_flow("T3", "", summary, peers)


def _t2(summary: dict[Key, dict[str, Any]], peers: list[str]) -> list[str]:
    variants = sorted({k[1] for k in summary if k[0] == "T2"}, key=lambda v: int(v.split("=")[1]))
    table = _Table(
        "subscribers",
        "peer",
        "API",
        "published/s",
        "aggregate delivered/s",
        "loss %",
        "shmbus/peer delivered/s",
        "run ended",
    )
    for variant in variants:
        ours = summary.get(("T2", variant, "shm"), {})
        for peer in peers:
            figures = summary.get(("T2", variant, peer))
            if figures is None:
                continue
            table.row(
                variant.split("=")[1],
                peer_info(peer).label + _runs_note(figures),
                peer_info(peer).api,
                _fmt(figures.get("published_per_s")),
                _fmt(figures.get("delivered_per_s")),
                _fmt(figures.get("loss_pct"), 2),
                "—"
                if peer == "shm"
                else _ratio(ours.get("delivered_per_s"), figures.get("delivered_per_s")),
                _ends(figures),
            )
    return [table.text()]


def _l1(summary: dict[Key, dict[str, Any]], peers: list[str]) -> list[str]:
    table = _Table(
        "peer",
        "API",
        "p50 µs",
        "p99 µs",
        "p99.9 µs",
        "max µs",
        "samples",
        "loss %",
        "shmbus/peer p50",
        "shmbus/peer p99",
    )
    ours = summary.get(("L1", "", "shm"), {})
    for peer in [*peers, "shmll", "shmuv", "shmsync", "fifo", "sem"]:
        figures = summary.get(("L1", "", peer))
        if figures is None:
            continue
        table.row(
            peer_info(peer).label + _runs_note(figures),
            peer_info(peer).api,
            _fmt(figures.get("p50_us"), 1),
            _fmt(figures.get("p99_us"), 1),
            _fmt(figures.get("p999_us"), 1),
            _fmt(figures.get("max_us"), 1),
            _fmt(figures.get("samples")),
            _fmt(figures.get("loss_pct"), 2),
            "—" if peer == "shm" else _ratio(ours.get("p50_us"), figures.get("p50_us")),
            "—" if peer == "shm" else _ratio(ours.get("p99_us"), figures.get("p99_us")),
        )
    return [
        "Latency ratios below 1 mean shmbus is faster. The low_latency row is shmbus's opt-in "
        "mode (its reader polls before it sleeps). Two reference rows, measured in the "
        "same run: the bare semaphore is the floor of a cross-process wake-up on this machine "
        "(blocking `sem_wait`, no event loop, no envelope); the FIFO row is shmbus's own "
        "wake-up mechanism alone, in asyncio, so shmbus minus FIFO is what its publish, "
        "reader and delivery path add.",
        "",
        table.text(),
    ]


def _s1(summary: dict[Key, dict[str, Any]], peers: list[str]) -> list[str]:
    variants = sorted({k[1] for k in summary if k[0] == "S1"}, key=lambda v: int(v.split("=")[1]))
    table = _Table(
        "payload blob",
        "peer",
        "API",
        "envelope bytes",
        "delivered/s",
        "MB/s delivered",
        "loss %",
        "shmbus/peer MB/s",
        "run ended",
    )
    for variant in variants:
        ours = summary.get(("S1", variant, "shm"), {})
        size = int(variant.split("=")[1])
        for peer in peers:
            figures = summary.get(("S1", variant, peer))
            if figures is None:
                continue
            table.row(
                _size(size),
                peer_info(peer).label + _runs_note(figures),
                peer_info(peer).api,
                _fmt(figures.get("envelope_bytes")),
                _fmt(figures.get("delivered_per_s")),
                _fmt(figures.get("mb_per_s"), 1),
                _fmt(figures.get("loss_pct"), 2),
                "—" if peer == "shm" else _ratio(ours.get("mb_per_s"), figures.get("mb_per_s")),
                _ends(figures),
            )
    return [
        "One publisher, one subscriber; the payload is `seq`, `t_ns` and a binary blob of "
        "the size shown (MB = 10^6 bytes of envelope).",
        "",
        table.text(),
    ]


def _size(size: int) -> str:
    if size >= 1024 and size % 1024 == 0:
        return f"{size // 1024} KiB"
    return f"{size} B"


_P1_LABELS = {
    ("shm", "publish"): ("shmbus `await bus.publish()`", "asyncio"),
    ("shm", "publish_nowait"): ("shmbus `bus.publish_nowait()`", "blocking (sync call)"),
    ("nats", "publish"): ("NATS `await nc.publish()` (+ envelope encode)", "asyncio"),
    ("zmq", "send_multipart"): ("ZeroMQ `sock.send_multipart()` (+ envelope encode)", "blocking"),
    ("redis", "publish"): ("Redis `await r.publish()` (+ envelope encode)", "asyncio"),
    ("loop", "build payload"): ("loop overhead: payload dict + stamp only (reference)", "-"),
}


def _p1_rows(peers: list[str]) -> list[tuple[tuple[str, str], tuple[str, str]]]:
    """The rows of the P1 table: :data:`_P1_LABELS`, baselines after shmbus."""
    rows: list[tuple[tuple[str, str], tuple[str, str]]] = []
    for (peer, variant), words in _P1_LABELS.items():
        rows.append(((peer, variant), words))
        if (peer, variant) == ("shm", "publish_nowait"):
            for baseline in (p for p in peers if is_baseline(p)):
                label = peer_info(baseline).label
                rows.append(((baseline, "publish"), (f"{label} `await bus.publish()`", "asyncio")))
                rows.append(
                    (
                        (baseline, "publish_nowait"),
                        (f"{label} `bus.publish_nowait()`", "blocking (sync call)"),
                    )
                )
    return rows


def _p1(summary: dict[Key, dict[str, Any]], peers: list[str]) -> list[str]:
    table = _Table(
        "call", "API", "µs/call", "calls/s", "shmbus publish()/this", "shmbus publish_nowait()/this"
    )
    publish = summary.get(("P1", "publish", "shm"), {}).get("us_per_call")
    nowait = summary.get(("P1", "publish_nowait", "shm"), {}).get("us_per_call")
    for (peer, variant), (label, api) in _p1_rows(peers):
        figures = summary.get(("P1", variant, peer))
        if figures is None:
            continue
        us = figures.get("us_per_call")
        table.row(
            label + _runs_note(figures),
            api,
            _fmt(us, 2),
            _fmt(figures.get("calls_per_s")),
            _ratio(publish, us),
            _ratio(nowait, us),
        )
    return [
        "One process publishing in a tight loop, no subscriber; each iteration builds the "
        "payload (as in the other scenarios) and publishes it. shmbus encodes the envelope "
        "inside `publish()`; for the others the loop encodes it with "
        "`shmbus.codec.encode_envelope`, so every row does the same work. Ratios below 1 "
        "mean the shmbus call is cheaper. ZeroMQ with no subscriber connected discards "
        "the message inside the socket.",
        "",
        table.text(),
    ]


#: The comparison with the baseline: (scenario, variant, figure, words, higher is better).
_VERSUS: tuple[tuple[str, str, str, str, bool], ...] = (
    ("P1", "publish", "us_per_call", "P1 `await bus.publish()`, µs/call", False),
    ("P1", "publish_nowait", "us_per_call", "P1 `bus.publish_nowait()`, µs/call", False),
    ("T1", "", "delivered_per_s", "T1 delivered/s", True),
    ("T1", "", "published_per_s", "T1 published/s", True),
    ("T3", "", "delivered_per_s", f"T3 delivered/s ({FANIN_PUBLISHERS} publishers)", True),
    ("L1", "", "p50_us", "L1 p50 µs", False),
    ("L1", "", "p99_us", "L1 p99 µs", False),
)


def _versus_rows(summary: dict[Key, dict[str, Any]]) -> list[tuple[str, str, str, str, bool]]:
    """:data:`_VERSUS` with T2's fan-outs and S1's sizes as run, in reading order."""
    fanouts = sorted({k[1] for k in summary if k[0] == "T2"}, key=lambda v: int(v.split("=")[1]))
    sizes = sorted({k[1] for k in summary if k[0] == "S1"}, key=lambda v: int(v.split("=")[1]))
    rows = list(_VERSUS[:4])
    for variant in fanouts:
        n = variant.split("=")[1]
        rows.append(
            ("T2", variant, "delivered_per_s", f"T2 {n} sub(s), aggregate delivered/s", True)
        )
    rows.extend(_VERSUS[4:])
    for variant in sizes:
        size = _size(int(variant.split("=")[1]))
        rows.append(("S1", variant, "mb_per_s", f"S1 {size} blob, MB/s delivered", True))
    return rows


def _change(current: float | None, base: float | None, higher_is_better: bool) -> str:
    """'12.3% faster' / '4.0% slower' of the work tree against the baseline."""
    if current is None or base is None or not current or not base:
        return "n/a"
    speed = current / base if higher_is_better else base / current
    if abs(speed - 1) < 0.0005:
        return "same"
    return f"{abs(speed - 1) * 100:.1f}% {'faster' if speed > 1 else 'slower'}"


def _versus_baseline(summary: dict[Key, dict[str, Any]], baseline: Baseline) -> list[str]:
    """The work tree's shmbus against the baseline revision's, figure by figure."""
    peer = baseline.peer
    table = _Table(
        "figure",
        "shmbus (work tree)",
        baseline.label,
        "current/baseline",
        "work tree is",
        text_columns=1,
    )
    for scenario, variant, name, words, higher in _versus_rows(summary):
        ours = summary.get((scenario, variant, "shm"))
        theirs = summary.get((scenario, variant, peer))
        if ours is None and theirs is None:
            continue
        current = _figure(summary, (scenario, variant, "shm"), name)
        base = _figure(summary, (scenario, variant, peer), name)
        digits = (
            2 if name == "us_per_call" else 1 if name.endswith("_us") or name == "mb_per_s" else 0
        )
        notes = _runs_note(ours or {}) + _runs_note(theirs or {})
        table.row(
            words + notes,
            _fmt(current, digits),
            _fmt(base, digits),
            _ratio(current, base),
            _change(current, base, higher),
        )
    return [
        f"## shmbus (work tree) vs {baseline.label}",
        "",
        f"The baseline is `--baseline {baseline.rev}`: commit `{baseline.commit}` "
        f'("{baseline.subject}"), its `shmbus/` exported with `git archive` into a private '
        f"directory and imported as package `{baseline.package}`, driven by the same workers as "
        "the work tree's shmbus (only the API both versions share) in the same run, the two "
        "back to back in every round. *current/baseline* divides the work tree's figure by the "
        "baseline's: above 1 is better for rates, below 1 is better for µs/call and latency; "
        "*work tree is* says which way in words. Single runs vary with whatever else runs on "
        "the machine: trust a difference only if it holds over several repetitions (`--reps`, "
        "or the full mode), and compare it with an A/A run (`--baseline HEAD` on a work tree "
        "without changes to `shmbus/`), whose ratios are noise alone."
        + (
            " **This run is such an A/A run:** the work tree's `shmbus/` (its bench aside) is "
            "identical to the baseline's, so every difference below is noise."
            if baseline.same_as_work_tree
            else ""
        ),
        "",
        table.text(),
        "",
    ]


def _z1(summary: dict[Key, dict[str, Any]], peers: list[str]) -> list[str]:
    figures = summary.get(("Z1", "", "shm"))
    if figures is None:
        return ["Not run."]
    table = _Table(
        "T1 capacity (delivered/s)",
        "paced at",
        "published/s",
        "events published",
        "delivered",
        "dropped (counted)",
        "loss %",
        "zero loss",
    )
    loss = figures.get("loss_pct")
    table.row(
        _fmt(
            figures.get("target_rate", 0) / ZERO_LOSS_FRACTION
            if figures.get("target_rate")
            else None
        ),
        _fmt(figures.get("target_rate")),
        _fmt(figures.get("published_per_s")),
        _fmt(figures.get("published")),
        _fmt(figures.get("received")),
        _fmt(figures.get("dropped_counted")),
        _fmt(loss, 3),
        "n/a" if loss is None else ("yes" if loss == 0 else "**no**"),
    )
    text = [
        f"shmbus only: one publisher paced at {ZERO_LOSS_FRACTION:.0%} of the delivered/s "
        "that shmbus reached in T1 in this same benchmark, one subscriber, default queue "
        f"size. Medians over {figures['runs']} run(s).",
    ]
    t1 = summary.get(("T1", "", "shm"), {})
    if t1.get("loss_pct") == 0:
        text.append(
            "In T1 shmbus's subscriber kept up with its publisher (no loss), so that "
            "capacity is the publisher's rate: a lower bound of what the subscriber can take."
        )
    return [" ".join(text), "", table.text()]


def _figure(summary: dict[Key, dict[str, Any]], key: Key, name: str) -> float | None:
    value = _number(summary.get(key, {}).get(name))
    return None if value is None else float(value)


def _check(ours: float | None, theirs: float | None, bound: float, *, at_most: bool) -> str:
    """'2.41× → met' style verdict of ours/theirs against *bound*."""
    if ours is None or theirs is None or theirs == 0:
        return "not measured"
    ratio = ours / theirs
    met = ratio <= bound if at_most else ratio >= bound
    return f"{ratio:.2f}× → {'met' if met else '**not met**'}"


def _widest_fanout(summary: dict[Key, dict[str, Any]]) -> int:
    """The most subscribers shmbus ran T2 with (1 if T2 did not run)."""
    return max(
        (int(k[1].split("=")[1]) for k in summary if k[0] == "T2" and k[2] == "shm"), default=1
    )


def _times(ours: float | None, theirs: float | None) -> str:
    """ours/theirs as '0.25×', or 'not measured'."""
    return f"{ours / theirs:.2f}×" if ours is not None and theirs else "not measured"


def _why_t1(summary: dict[Key, dict[str, Any]], cpus: int) -> str:
    """Why shmbus's T1 throughput is what it is, in this run's figures."""
    t1 = summary.get(("T1", "", "shm"), {})
    loss = t1.get("loss_pct")
    cpu = _figure(summary, ("T1", "", "shm"), "sub_cpu_s_per_million")
    nats_cpu = _figure(summary, ("T1", "", "nats"), "sub_cpu_s_per_million")
    publish = _figure(summary, ("P1", "publish", "shm"), "us_per_call")
    if loss == 0:
        text = (
            "In T1 shmbus's subscriber kept up with its publisher (loss 0, "
            f"{_times(cpu, nats_cpu)} NATS's subscriber CPU per event), so T1 measures the "
            f"*publisher*: one `publish()` took {_fmt(publish, 2)} µs in P1 (envelope "
            "encoding, ring append, checksum and bookkeeping; see `docs/bench/profile.md`)."
        )
    else:
        text = (
            f"In T1 shmbus's subscriber lost {_fmt(loss, 2)} % of the events "
            f"({_times(cpu, nats_cpu)} NATS's subscriber CPU per event); one `publish()` "
            f"took {_fmt(publish, 2)} µs in P1."
        )
    behind = []
    for peer, label in (("nats", "NATS"), ("zmq", "ZeroMQ")):
        published = _figure(summary, ("T1", "", peer), "published_per_s")
        delivered = _figure(summary, ("T1", "", peer), "delivered_per_s")
        if published and delivered is not None and delivered < 0.95 * published:
            behind.append(
                f"{label} (it delivered {_fmt(delivered)} of the {_fmt(published)} events/s "
                "published)"
            )
    if behind:
        text += f" The subscriber was the bottleneck of {' and '.join(behind)}."
    return text


def _why_p1(summary: dict[Key, dict[str, Any]], cpus: int) -> str:
    """Why a shmbus publish costs more than a client library's."""
    return (
        "A NATS or ZeroMQ publish only appends bytes to a client-side buffer; the "
        "network write and the server's work happen later, elsewhere. A shmbus publish "
        "returns with the event committed into its ring, visible to every subscriber: the "
        "whole delivery, not a hand-off. Both encode the same envelope."
    )


def _why_l1(summary: dict[Key, dict[str, Any]], cpus: int) -> str:
    """Where L1's latency goes, in this run's reference rows."""
    fifo = _fmt(_figure(summary, ("L1", "", "fifo"), "p50_us"), 1)
    sem = _fmt(_figure(summary, ("L1", "", "sem"), "p50_us"), 1)
    low = _fmt(_figure(summary, ("L1", "", "shmll"), "p50_us"), 1)
    return (
        "The floor here is the wake-up of an asyncio event loop, not of a process: the "
        f"FIFO reference row (the mechanism alone, no ring or envelope) costs {fifo} µs at "
        f"p50 against {sem} µs for the bare semaphore, which wakes a thread blocked in "
        "`sem_wait` with no event loop. The low-latency mode never sleeps at this rate, so "
        f"its {low} µs is the rest of the path with no wake-up at all: a paced publish "
        "(envelope, ring, checksum), one ring read, one decode, one task switch, with caches "
        f"cold after each {1e6 / LATENCY_RATE:,.0f} µs gap between events."
    )


def _why_sync_l1(summary: dict[Key, dict[str, Any]], cpus: int) -> str:
    """How much of the blocking subscription's L1 latency is its wake-up."""
    sync = _figure(summary, ("L1", "", "shmsync"), "p50_us")
    sem = _figure(summary, ("L1", "", "sem"), "p50_us")
    text = (
        "The blocking subscription's consumer sleeps on a POSIX semaphore, its doorbell: "
        f"the bare semaphore row (that wake-up alone, no ring or envelope) costs {_fmt(sem, 1)} "
        f"µs at p50 of its {_fmt(sync, 1)} µs"
    )
    if sync is not None and sem is not None:
        rest = _fmt(sync - sem, 1)
        text += f"; the other {rest} µs are the publish, the ring read and the decode"
    return text + "."


def _why_t2_publisher(summary: dict[Key, dict[str, Any]], cpus: int) -> str:
    """What happened to every publisher as T2's subscribers were added."""
    widest = _widest_fanout(summary)
    processes = widest + 1
    if processes > cpus:
        text = (
            f"{processes} processes (a publisher and {widest} subscribers) share {cpus} "
            "CPUs: the publisher waits for one, whatever the transport."
        )
    else:
        text = f"{processes} processes (a publisher and {widest} subscribers) ran on {cpus} CPUs."
    moves = []
    for peer, label in (("nats", "NATS"), ("zmq", "ZeroMQ")):
        one = _figure(summary, ("T2", "fanout=1", peer), "published_per_s")
        many = _figure(summary, ("T2", f"fanout={widest}", peer), "published_per_s")
        if one is not None and many is not None:
            moves.append(
                f"{label}'s publisher went from {_fmt(one)} to {_fmt(many)} events/s "
                f"({_times(many, one)})"
            )
    if moves:
        text += f" In the same run {' and '.join(moves)}."
    one = _figure(summary, ("T2", "fanout=1", "shm"), "delivered_per_s")
    many = _figure(summary, ("T2", f"fanout={widest}", "shm"), "delivered_per_s")
    if one is not None and many is not None:
        text += (
            f" shmbus's aggregate delivery went from {_fmt(one)} to {_fmt(many)} events/s "
            f"({_times(many, one)})."
        )
    return text


def _why_r1(summary: dict[Key, dict[str, Any]], cpus: int) -> str:
    """What a shmbus round trip is made of, in this run's figures."""
    ours = _figure(summary, ("R1", "", "shm"), "p50_us")
    nats = _figure(summary, ("R1", "", "nats"), "p50_us")
    text = (
        "A shmbus round trip is two deliveries: the request to the responder's reader, "
        "asleep since the last request, and the reply to the requester's reader, which polls "
        "while a request waits (spin_for_replies, the default), whose inbox hands it to the "
        "waiting request. Only the first costs a wake-up. The target asks for "
        f"{_fmt(nats * 0.5 if nats else None, 1)} µs; shmbus took {_fmt(ours, 1)} µs."
    )
    one_way = _figure(summary, ("L1", "", "shm"), "p50_us")
    polled = _figure(summary, ("L1", "", "shmll"), "p50_us")
    fifo = _figure(summary, ("L1", "", "fifo"), "p50_us")
    if one_way is not None:
        text += f" In L1 of this run one delivery to a sleeping reader took {_fmt(one_way, 1)} µs"
        if fifo is not None:
            text += f" at p50 ({_fmt(fifo, 1)} µs of it the wake-up alone, the FIFO row)"
        if polled is not None:
            text += (
                f" and one to a polling reader (the low-latency row) {_fmt(polled, 1)} µs: "
                f"{_fmt(one_way + polled, 1)} µs for the two"
            )
        text += "."
    else:
        text += " (L1 did not run: no one-way figure of this run to compare with.)"
    return text


def _why_q1(summary: dict[Key, dict[str, Any]], cpus: int) -> str:
    """What bounds shmbus's queue-group throughput, in this run's figures."""
    processes = QUEUE_WORKERS + 1
    text = (
        f"Q1 runs {processes} processes (a publisher and {QUEUE_WORKERS} workers) "
        f"on {cpus} CPUs."
    )
    ceiling = _figure(summary, ("P1", "publish", "shm"), "calls_per_s")
    for peer, label in (("zmq", "ZeroMQ's"), ("nats", "NATS's")):
        theirs = _figure(summary, ("Q1", "", peer), "delivered_per_s")
        if theirs is None or ceiling is None:
            continue
        needed = 3 * theirs
        if needed > ceiling:
            text += (
                f" Three times {label} figure is {_fmt(needed)} events/s, more than the "
                f"{_fmt(ceiling)} `publish()` calls/s one shmbus publisher made in P1 alone on "
                "a CPU with no subscriber: out of reach for one publisher, whatever its workers do."
            )
        else:
            left = cpus - needed / ceiling
            text += (
                f" Three times {label} figure is {_fmt(needed)} events/s: its publishes alone "
                f"would take {needed / ceiling:.0%} of a CPU (P1: {_fmt(ceiling)} calls/s), "
                f"leaving {left:.2f} CPUs to the workers, {_fmt(left / needed * 1e6, 1)} µs "
                "of CPU per event."
            )
    cpu = {
        peer: _figure(summary, ("Q1", "", peer), "sub_cpu_s_per_million")
        for peer in ("shm", "nats", "zmq")
    }
    if cpu["shm"] is not None:
        text += (
            f" shmbus's workers used {_fmt(cpu['shm'], 1)} µs of CPU per event delivered"
            + (
                f" (NATS's {_fmt(cpu['nats'], 1)}, ZeroMQ's {_fmt(cpu['zmq'], 1)})"
                if cpu["nats"] is not None and cpu["zmq"] is not None
                else ""
            )
            + ": every member's reader walks every record of the group's topics to find the "
            "ones assigned to it, where a broker or a PUSH socket hands each worker only its own."
        )
    return text


#: Why a target can be missed: each text is made of the run's own figures.
_SHORTFALLS: dict[str, Callable[[dict[Key, dict[str, Any]], int], str]] = {
    "T1": _why_t1,
    "P1": _why_p1,
    "L1": _why_l1,
    "L1sync": _why_sync_l1,
    "T2pub": _why_t2_publisher,
    "R1": _why_r1,
    "Q1": _why_q1,
}


def _targets(summary: dict[Key, dict[str, Any]], cpus: int) -> list[str]:
    """The performance issue's targets, each checked against this run (on
    *cpus* CPUs)."""
    rows = _Table("target", "measured in this run", "verdict", text_columns=3)
    shm_t1 = _figure(summary, ("T1", "", "shm"), "delivered_per_s")
    missed: list[str] = []

    def add(target: str, measured: str, verdict: str, why: str | None = None) -> None:
        rows.row(target, measured, verdict)
        if "not met" in verdict and why:
            text = _SHORTFALLS[why](summary, cpus)
            if text not in missed:
                missed.append(text)

    for peer, label in (("nats", "NATS"), ("zmq", "ZeroMQ")):
        theirs = _figure(summary, ("T1", "", peer), "delivered_per_s")
        add(
            f"T1 delivered/s ≥ 4× {label}",
            f"{_fmt(shm_t1)} vs {_fmt(theirs)}",
            _check(shm_t1, theirs, 4.0, at_most=False),
            "T1",
        )
    z1 = summary.get(("Z1", "", "shm"), {})
    if z1:
        loss = z1.get("loss_pct")
        add(
            "zero loss paced at 80% of capacity",
            f"loss {_fmt(loss, 3)} %",
            "met" if loss == 0 else "**not met**",
        )
    t2 = _figure(summary, ("T2", "fanout=4", "shm"), "delivered_per_s")
    for peer, label in (("nats", "NATS"), ("zmq", "ZeroMQ")):
        theirs = _figure(summary, ("T2", "fanout=4", peer), "delivered_per_s")
        add(
            f"T2 aggregate delivered/s at 4 subscribers ≥ 3.5× {label}",
            f"{_fmt(t2)} vs {_fmt(theirs)}",
            _check(t2, theirs, 3.5, at_most=False),
            "T1",
        )
    pub1 = _figure(summary, ("T2", "fanout=1", "shm"), "published_per_s")
    widest = _widest_fanout(summary)
    pub_n = _figure(summary, ("T2", f"fanout={widest}", "shm"), "published_per_s")
    if widest > 1:
        add(
            f"published/s at {widest} subscribers ≥ 0.8× at 1",
            f"{_fmt(pub_n)} vs {_fmt(pub1)}",
            _check(pub_n, pub1, 0.8, at_most=False),
            "T2pub",
        )
    sem = summary.get(("L1", "", "sem"), {})
    shm_l1 = summary.get(("L1", "", "shm"), {})
    ll = summary.get(("L1", "", "shmll"), {})
    for name, bound in (("p50_us", 1.5), ("p99_us", 2.0)):
        add(
            f"L1 default mode {name[:-3]} ≤ {bound}× the bare semaphore",
            f"{_fmt(shm_l1.get(name), 1)} µs vs {_fmt(sem.get(name), 1)} µs",
            _check(shm_l1.get(name), sem.get(name), bound, at_most=True),
            "L1",
        )
    for name, limit in (("p50_us", 15.0), ("p99_us", 50.0)):
        value = ll.get(name)
        add(
            f"L1 low-latency mode {name[:-3]} ≤ {limit:g} µs",
            f"{_fmt(value, 1)} µs",
            "not measured" if value is None else ("met" if value <= limit else "**not met**"),
            "L1",
        )
    sync = _figure(summary, ("L1", "", "shmsync"), "p50_us")
    for peer, label in (("ff", "faster-fifo"), ("ice", "iceoryx2")):
        theirs = _figure(summary, ("L1", "", peer), "p50_us")
        add(
            f"sync L1 p50 ≤ {label}'s",
            f"{_fmt(sync, 1)} µs vs {_fmt(theirs, 1)} µs",
            _check(sync, theirs, 1.0, at_most=True),
            "L1sync",
        )
    for size, label in ((64 << 10, "64 KiB"), (256 << 10, "256 KiB")):
        key = f"size={size}"
        ours = _figure(summary, ("S1", key, "shm"), "mb_per_s")
        theirs = _figure(summary, ("S1", key, "ff"), "mb_per_s")
        add(
            f"S1 {label} blob: MB/s delivered ≥ faster-fifo's",
            f"{_fmt(ours, 1)} vs {_fmt(theirs, 1)}",
            _check(ours, theirs, 1.0, at_most=False),
        )
    publish = _figure(summary, ("P1", "publish", "shm"), "calls_per_s")
    nats = _figure(summary, ("P1", "publish", "nats"), "calls_per_s")
    add(
        "P1 `publish()` calls/s ≥ 2× NATS's",
        f"{_fmt(publish)} vs {_fmt(nats)}",
        _check(publish, nats, 2.0, at_most=False),
        "P1",
    )
    for row in _pattern_targets(summary):
        add(*row)
    out = [
        "## The targets",
        "",
        "Each target of the performance issue, checked against the figures of this run "
        "(ratios from runs interleaved in time).",
        "",
        rows.text(),
        "",
    ]
    if missed:
        out += ["Why the targets not met are missed, from measurements:", ""]
        out += [f"- {why}" for why in missed]
        out.append("")
    return out


# ─── Q1 and R1: queue groups and request/reply ──────────────────────────────

#: How each peer is driven in Q1 and R1: (label, API style).
_Q1_LABELS = {
    "shm": ("shmbus `subscribe(pattern, queue=...)`", "asyncio"),
    "nats": ("NATS queue group `nc.subscribe(subject, queue=...)`", "asyncio"),
    "zmq": ("ZeroMQ PUSH → PULL", "blocking PUSH / asyncio PULL"),
}
_R1_LABELS = {
    "shm": ("shmbus `await bus.request()` / `await bus.reply()`", "asyncio"),
    "shmll": ("shmbus, both ends `low_latency=True` (opt-in mode)", "asyncio"),
    "nats": ("NATS `await nc.request()` / `await msg.respond()`", "asyncio"),
    "zmq": ("ZeroMQ REQ / REP", "asyncio (zmq.asyncio)"),
}


def _skipped(figures: dict[str, Any]) -> str | None:
    """'skipped: <reason>' for a row none of whose runs was measured."""
    if figures.get("runs") or not figures.get("skipped"):
        return None
    return "skipped: " + "; ".join(figures.get("skip_reasons") or ["unsupported"])


def _pattern_rows(
    scenario: str, labels: dict[str, tuple[str, str]], summary: dict[Key, dict[str, Any]]
) -> list[tuple[str, str, str, dict[str, Any]]]:
    """(peer, label, API, figures) of the peers that ran *scenario*, in order."""
    rows = []
    for peer, (label, api) in labels.items():
        figures = summary.get((scenario, "", peer))
        if figures is not None:
            rows.append((peer, label + _runs_note(figures), api, figures))
    return rows


def _skip_notes(rows: list[tuple[str, str, str, dict[str, Any]]]) -> list[str]:
    notes = [f"- {label}: {why}." for _, label, _, f in rows if (why := _skipped(f))]
    return ["", *notes] if notes else []


def _q1(summary: dict[Key, dict[str, Any]], peers: list[str]) -> list[str]:
    table = _Table(
        "peer",
        "API",
        "published/s",
        "delivered/s",
        "loss %",
        "per worker, fewest – most",
        "spread (fewest/most)",
        "workers' CPU s / 1M delivered",
        "shmbus/peer delivered/s",
        "run ended",
    )
    ours = summary.get(("Q1", "", "shm"), {})
    rows = _pattern_rows("Q1", _Q1_LABELS, summary)
    for peer, label, api, figures in rows:
        if _skipped(figures):
            table.row(label, api, *["—"] * 7, "skipped (below)")
            continue
        table.row(
            label,
            api,
            _fmt(figures.get("published_per_s")),
            _fmt(figures.get("delivered_per_s")),
            _fmt(figures.get("loss_pct"), 2),
            f"{_fmt(figures.get('worker_min'))} – {_fmt(figures.get('worker_max'))}",
            _fmt(figures.get("spread"), 2),
            _fmt(figures.get("sub_cpu_s_per_million"), 2),
            "—"
            if peer == "shm"
            else _ratio(ours.get("delivered_per_s"), figures.get("delivered_per_s")),
            _ends(figures),
        )
    return [
        f"One publisher floods, as in T1, {QUEUE_WORKERS} worker processes that are members "
        f"of one queue group (`{QUEUE_GROUP}`, pattern `decky.*.traffic`): each event should "
        "reach exactly one worker. *delivered/s* = events received by all workers together / "
        "time from the first publish to the last receipt; *loss* = published events no worker "
        "received; *per worker* = events received by the worker that got the fewest and the "
        "one that got the most, *spread* their ratio (1.00 = even). A worker gets a share of "
        f"unknown size, so every peer's worker ends {QUIET_S * 1000:g} ms after its last "
        "event (with its queue empty, where the transport tells). ZeroMQ's PUSH blocks when "
        "every worker is full, so it loses nothing and its publisher runs at the workers' "
        "pace; NATS's server drops for a slow consumer; shmbus drops oldest and counts it.",
        "",
        table.text(),
        *_skip_notes(rows),
    ]


def _r1(summary: dict[Key, dict[str, Any]], peers: list[str]) -> list[str]:
    table = _Table(
        "peer",
        "API",
        "p50 µs",
        "p90 µs",
        "p99 µs",
        "p99.9 µs",
        "max µs",
        "round trips",
        "requests/s",
        "timed out",
        "shmbus/peer p50",
        "shmbus/peer p99",
    )
    ours = summary.get(("R1", "", "shm"), {})
    rows = _pattern_rows("R1", _R1_LABELS, summary)
    for peer, label, api, figures in rows:
        if _skipped(figures):
            table.row(label, api, *["—"] * 10)
            continue
        table.row(
            label,
            api,
            _fmt(figures.get("p50_us"), 1),
            _fmt(figures.get("p90_us"), 1),
            _fmt(figures.get("p99_us"), 1),
            _fmt(figures.get("p999_us"), 1),
            _fmt(figures.get("max_us"), 1),
            _fmt(figures.get("samples")),
            _fmt(figures.get("published_per_s")),
            _fmt(figures.get("timeouts")),
            "—" if peer == "shm" else _ratio(ours.get("p50_us"), figures.get("p50_us")),
            "—" if peer == "shm" else _ratio(ours.get("p99_us"), figures.get("p99_us")),
        )
    return [
        f"One requester process sends {REQUEST_WARMUP} unmeasured requests, then the measured "
        "ones, each once the previous reply is in hand, to one responder process that "
        "answers each with the request's payload (both ways the standard ~230-byte "
        "envelope, decoded into a `shmbus.Event`). *Round trip* = from the stamp taken when "
        "the request's payload is built, right before the request call, to the reply in hand "
        f"in the requester; a request unanswered after {REQUEST_TIMEOUT:g} s is *timed out*. "
        "Ratios below 1 mean shmbus is faster.",
        "",
        table.text(),
        *_skip_notes(rows),
    ]


def _pattern_targets(
    summary: dict[Key, dict[str, Any]],
) -> list[tuple[str, str, str, str | None]]:
    """The targets of queue groups and request/reply: (target, measured,
    verdict, key of the explanation of a miss in :data:`_SHORTFALLS`)."""
    rows: list[tuple[str, str, str, str | None]] = []
    q1 = summary.get(("Q1", "", "shm"), {})
    ours = _figure(summary, ("Q1", "", "shm"), "delivered_per_s")
    for peer, label in (("nats", "a NATS queue group"), ("zmq", "ZeroMQ PUSH/PULL")):
        theirs = _figure(summary, ("Q1", "", peer), "delivered_per_s")
        measured = f"{_fmt(ours)} vs {_fmt(theirs)}"
        if _skipped(q1):
            measured = f"shmbus skipped (see Q1) vs {_fmt(theirs)}"
        rows.append(
            (
                f"Q1 queue group delivered/s ≥ 3× {label}",
                measured,
                _check(ours, theirs, 3.0, at_most=False),
                "Q1",
            )
        )
    r1 = summary.get(("R1", "", "shm"), {})
    ours = _figure(summary, ("R1", "", "shm"), "p50_us")
    theirs = _figure(summary, ("R1", "", "nats"), "p50_us")
    measured = f"{_fmt(ours, 1)} µs vs {_fmt(theirs, 1)} µs"
    if _skipped(r1):
        measured = f"shmbus skipped (see R1) vs {_fmt(theirs, 1)} µs"
    rows.append(
        (
            "R1 request/reply p50 round trip ≤ 0.5× NATS's",
            measured,
            _check(ours, theirs, 0.5, at_most=True),
            "R1",
        )
    )
    low = _figure(summary, ("R1", "", "shmll"), "p50_us")
    rows.append(
        (
            "R1 low-latency mode (opt-in) p50 round trip ≤ 0.5× NATS's",
            f"{_fmt(low, 1)} µs vs {_fmt(theirs, 1)} µs",
            _check(low, theirs, 0.5, at_most=True),
            "R1",
        )
    )
    return rows


_SECTIONS = {
    "T1": _t1,
    "T2": _t2,
    "T3": _t3,
    "L1": _l1,
    "S1": _s1,
    "P1": _p1,
    "Z1": _z1,
    "Q1": _q1,
    "R1": _r1,
}


# ─── Charts ──────────────────────────────────────────────────────────────────


def write_charts(directory: Path, outcome: BenchOutcome) -> tuple[list[str], str | None]:
    """Draw the charts into *directory*; return (file names, note or None)."""
    try:
        import matplotlib
    except ImportError:
        return [], "not drawn: matplotlib is not installed (pip install 'shmbus[bench]')"
    matplotlib.use("Agg")
    summary = summarise(outcome.results)
    written: list[str] = []
    for name, draw in (("throughput.png", _throughput_chart), ("latency_cdf.png", _latency_chart)):
        if draw(directory / name, summary):
            written.append(name)
        else:  # nothing to draw: do not leave an older run's chart beside these results
            (directory / name).unlink(missing_ok=True)
    return written, None


def _bars(ax: Any, groups: list[str], series: dict[str, list[float]], ylabel: str) -> None:
    width = 0.8 / max(len(series), 1)
    for i, (peer, values) in enumerate(series.items()):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, values, width, label=peer_info(peer).label, color=_colour(peer))
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)


def _throughput_chart(path: Path, summary: dict[Key, dict[str, Any]]) -> bool:
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    panels: list[tuple[str, list[str], list[Key], str, bool]] = []
    flow = [(s, "") for s in ("T1", "T3") if any(k[0] == s for k in summary)]
    if flow:
        panels.append(
            (
                "T1 / T3: delivered events/s",
                [{"T1": "T1 1→1", "T3": f"T3 {FANIN_PUBLISHERS}→1"}[s] for s, _ in flow],
                [(s, v, "") for s, v in flow],
                "delivered_per_s",
                False,
            )
        )
    fanouts = sorted({k[1] for k in summary if k[0] == "T2"}, key=lambda v: int(v.split("=")[1]))
    if fanouts:
        panels.append(
            (
                "T2 fan-out: aggregate delivered events/s",
                [f"1→{v.split('=')[1]}" for v in fanouts],
                [("T2", v, "") for v in fanouts],
                "delivered_per_s",
                False,
            )
        )
    sizes = sorted({k[1] for k in summary if k[0] == "S1"}, key=lambda v: int(v.split("=")[1]))
    if sizes:
        panels.append(
            (
                "S1 event size: MB/s delivered (log scale)",
                [_size(int(v.split("=")[1])) for v in sizes],
                [("S1", v, "") for v in sizes],
                "mb_per_s",
                True,
            )
        )
    if not panels:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.8), squeeze=False)
    for ax, (title, groups, keys, metric, log_scale) in zip(axes[0], panels, strict=True):
        series: dict[str, list[float]] = {}
        for peer in _in_order(k[2] for k in summary):
            values = [summary.get((k[0], k[1], peer), {}).get(metric) for k in keys]
            if any(v is not None for v in values):
                series[peer] = [float(v) if v is not None else 0.0 for v in values]
        _bars(ax, groups, series, {"mb_per_s": "MB/s delivered"}.get(metric, "events/s"))
        if not log_scale:
            ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:,.0f}"))
        ax.set_title(title, fontsize=10)
        if log_scale:
            ax.set_yscale("log")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"shmbus vs peers: throughput (medians; {os.cpu_count()} CPUs)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _latency_chart(path: Path, summary: dict[Key, dict[str, Any]]) -> bool:
    import matplotlib.pyplot as plt

    lines = [
        (peer, summary[("L1", "", peer)]["_samples"])
        for peer in _in_order(k[2] for k in summary)
        if ("L1", "", peer) in summary and summary[("L1", "", peer)]["_samples"]
    ]
    if not lines:
        return False
    fig, (ax, tail) = plt.subplots(1, 2, figsize=(12, 4.8))
    for peer, samples in lines:
        n = len(samples)
        step = max(1, n // 2000)
        xs = [samples[i] / 1000 for i in range(0, n, step)] + [samples[-1] / 1000]
        ys = [(i + 1) / n for i in range(0, n, step)] + [1.0]
        style = "--" if peer in REFERENCE_PEERS else "-"
        label = peer_info(peer).label
        ax.plot(xs, ys, style, label=label, color=_colour(peer))
        tail.plot(xs, [max(1 - y, 0.5 / n) for y in ys], style, label=label, color=_colour(peer))
    for axis in (ax, tail):
        axis.set_xscale("log")
        axis.set_xlabel("one-way latency, µs (log)")
        axis.grid(alpha=0.3, which="both")
    ax.set_ylabel("fraction of events ≤ x")
    ax.set_title(f"L1: latency CDF at {LATENCY_RATE:,.0f} events/s", fontsize=10)
    tail.set_yscale("log")
    tail.set_ylabel("fraction of events > x (log)")
    tail.set_title("the tail", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
