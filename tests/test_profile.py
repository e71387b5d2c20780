"""``python -m shmbus_tools.profile --stages``: the per-stage latency table,
from a real run across processes with a small event count.

Checks what the table promises: each chain lists every stage, in path order,
with numbers that are not negative; the end-to-end table has every row, with
the bare semaphore as the unit of the ratios; the run leaves no file in
/dev/shm. Timings themselves are not asserted (they belong to the bench).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import new_bus_name
from shmbus_tools.stages import ASYNC_STAGES, SYNC_STAGES

from shmbus._core.shmfiles import bus_file_paths

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROW = re.compile(r"^\| (?P<label>[^|]+?) \| (?P<rest>.+) \|$")


class Output:
    def __init__(self, name: str, proc: subprocess.CompletedProcess[str], written: str) -> None:
        self.name, self.proc, self.written = name, proc, written


@pytest.fixture(scope="module")
def output(tmp_path_factory: pytest.TempPathFactory) -> Output:
    name = new_bus_name("profile")
    out = tmp_path_factory.mktemp("profile") / "profile.md"
    proc = subprocess.run(
        [sys.executable, "-m", "shmbus_tools.profile", "--stages", "--events", "300"]
        + ["--warmup", "50", "--bus-name", name, "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return Output(name, proc, Path(out).read_text(encoding="utf-8") if out.exists() else "")


def section(text: str, heading: str) -> list[tuple[str, list[str]]]:
    """The table rows (label, cells) under *heading*, up to the next heading."""
    lines = text.splitlines()
    assert heading in lines, f"no {heading!r} in:\n{text}"
    rows = []
    for line in lines[lines.index(heading) + 1 :]:
        if line.startswith("#"):
            break
        match = ROW.match(line)
        if (
            match
            and not line.startswith("|---")
            and not match["label"].startswith(("stage", "row"))
        ):
            rows.append((match["label"], [c.strip() for c in match["rest"].split("|")]))
    return rows


def test_the_stage_run_exits_cleanly_and_writes_what_it_prints(output: Output) -> None:
    detail = f"stdout:\n{output.proc.stdout}\nstderr:\n{output.proc.stderr}"
    assert output.proc.returncode == 0, detail
    assert "Traceback" not in output.proc.stderr, detail
    assert output.written == output.proc.stdout


@pytest.mark.parametrize(
    ("heading", "chain"),
    [
        ("### Stages: shmbus asyncio, instrumented", ASYNC_STAGES),
        ("### Stages: shmbus subscribe_sync, instrumented", SYNC_STAGES),
    ],
)
def test_each_chain_lists_every_stage_in_order_with_non_negative_figures(
    output: Output, heading: str, chain: tuple[tuple[str, str], ...]
) -> None:
    rows = section(output.proc.stdout, heading)
    names = [stage for stage, _ in chain]
    expected = [f"{a} → {b}" for a, b in zip(names, names[1:], strict=False)]
    assert [label for label, _ in rows[: len(expected)]] == expected
    assert rows[len(expected)][0] == "**end to end** (these events)"
    for label, cells in rows[: len(expected) + 1]:
        p50, p99 = (float(cell.strip("*")) for cell in cells)
        assert 0 <= p50 <= p99, (label, cells)


def test_the_end_to_end_table_has_every_row_against_the_semaphore(output: Output) -> None:
    rows = dict(section(output.proc.stdout, "### End to end"))
    assert list(rows) == [
        "bare POSIX semaphore",
        "FIFO + loop.add_reader",
        "shmbus asyncio, instrumented",
        "shmbus subscribe_sync, instrumented",
        "shmbus asyncio, not instrumented",
        "shmbus subscribe_sync, not instrumented",
    ]
    for label, (events, p50, p99, ratio50, ratio99) in rows.items():
        assert int(events.replace(",", "")) > 0, label
        assert 0 < float(p50) <= float(p99), label
        assert float(ratio50) > 0 and float(ratio99) > 0, label
    assert rows["bare POSIX semaphore"][3:] == ["1.00", "1.00"]


def test_the_stage_run_leaves_nothing_in_dev_shm(output: Output) -> None:
    assert output.proc.returncode == 0, output.proc.stderr
    for key in ("async", "sync", "async-bare", "sync-bare"):
        assert bus_file_paths(f"{output.name}-{key}") == []
