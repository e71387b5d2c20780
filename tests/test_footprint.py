"""Memory footprint: a bus on which 16 processes publish with default settings
fits Docker's default 64 MiB /dev/shm, and running out of room is a clear
error for the call that needed it.

The scenario (tests/footprint_child.py) runs in a private mount namespace
whose /dev/shm is a 64 MiB tmpfs, so it measures the real limit without
touching the host's /dev/shm. It needs root and unshare(1); it is skipped
where either is missing."""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from shmbus._core.layout import BUS_SEGMENT_SIZE, DEFAULT_CAPACITY, ring_file_size

CHILD = Path(__file__).with_name("footprint_child.py")
MIB = 1 << 20


def _can_unshare() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "true"], capture_output=True
    )
    return probe.returncode == 0


@functools.cache
def scenario() -> dict[str, Any]:
    script = (
        "mount -t tmpfs -o size=64m tmpfs /dev/shm && "
        f"exec {sys.executable} {CHILD}"
    )
    done = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert lines, f"scenario printed no result (exit {done.returncode}):\n{done.stderr}"
    result: dict[str, Any] = json.loads(lines[-1])
    assert done.returncode == 0, f"scenario failed:\n{done.stderr}\n{result}"
    return result


pytestmark = pytest.mark.skipif(
    not _can_unshare(), reason="needs root and unshare --mount for a 64 MiB /dev/shm"
)


def test_sixteen_default_publishers_fit_in_a_64_mib_dev_shm() -> None:
    result = scenario()
    expected = BUS_SEGMENT_SIZE + 16 * ring_file_size(DEFAULT_CAPACITY)
    assert result["bytes_with_16"] == expected
    assert expected < 64 * MIB
    assert result["published"] >= 16


def test_every_event_of_the_publishers_that_fit_is_received() -> None:
    result = scenario()
    assert result["received"] == result["published"]


def test_the_publisher_that_does_not_fit_gets_a_space_error_naming_both_sizes() -> None:
    result = scenario()
    assert len(result["refused"]) == 1
    message = result["refused"][0]
    assert str(ring_file_size(DEFAULT_CAPACITY)) in message
    assert "bytes are free" in message


def test_the_bus_keeps_working_after_a_ring_was_refused_and_leaves_nothing() -> None:
    result = scenario()
    assert result["after"] == "fp.after"
    assert result["exit_codes"] == [0] * len(result["exit_codes"])
    assert result["left"] == []
