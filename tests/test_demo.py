"""The demo (``python -m shmbus_tools.demo``) end to end, in a subprocess.

Checks what the demo promises: it exits 0, every subscriber received
events, the catch-all subscription accounts for every event published
(received + dropped == published), and no file of its bus is left in
/dev/shm. The bus is named with this session's tag, so the session's own
leak check covers it too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

from conftest import new_bus_name
from shmbus_tools.demo import PATTERNS

from shmbus._core.shmfiles import bus_file_paths

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_demo(*args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shmbus_tools.demo", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def parse_summary(stdout: str) -> dict[str, Any]:
    lines = [line for line in stdout.splitlines() if line.startswith("SUMMARY ")]
    assert lines, f"no SUMMARY line in the output:\n{stdout}"
    assert stdout.rstrip().splitlines()[-1] == lines[-1], "SUMMARY is not the last line"
    summary: dict[str, Any] = json.loads(lines[-1].removeprefix("SUMMARY "))
    return summary


def test_demo_runs_and_accounts_for_every_event() -> None:
    name = new_bus_name("demo")
    result = run_demo("--seconds", "2", "--rate", "2000", "--bus", name)
    output = f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.returncode == 0, output
    assert "Traceback" not in result.stderr, output

    summary = parse_summary(result.stdout)
    assert summary["bus"] == name
    assert summary["ok"] is True, output
    published = summary["published"]
    assert published > 0
    assert summary["publish_errors"] == 0

    subscribers = summary["subscribers"]
    assert [sub["pattern"] for sub in subscribers] == list(PATTERNS)
    for sub in subscribers:
        assert sub["received"] > 0, output
        assert sub["received"] + sub["dropped"] >= sub["matching_published"], output
    catch_all = [sub for sub in subscribers if sub["matches_all"]]
    assert {sub["pattern"] for sub in catch_all} == {"decky.*.traffic", "decky.>"}
    for sub in catch_all:
        assert sub["matching_published"] == published
        assert sub["received"] + sub["dropped"] == published, output
    narrow = next(sub for sub in subscribers if sub["pattern"] == "decky.7.*")
    # Topics go round-robin over 64 ids: id 7 gets a 64th of them.
    assert published // 64 <= narrow["matching_published"] <= published // 64 + 1

    assert bus_file_paths(name) == []


def test_demo_rejects_a_bad_bus_name() -> None:
    result = run_demo("--seconds", "1", "--bus", "not/a name", timeout=30)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
