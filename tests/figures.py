"""Figures measured by the fault-injection tests, for docs/RELIABILITY.md.

Tests call :func:`record` with a test id and a dict of figures; each call
prints one ``FIGURES {json}`` line (shown with ``pytest -s``, or in the
captured output of a failing test) and merges the entry into a JSON file:
``$SHMBUS_FIGURES`` if set, else ``.pytest_cache/shmbus-figures.json`` in the
repository. Figures are reported, never asserted on: timing belongs in the
docs, not in assertions.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from pathlib import Path
from typing import Any

_DEFAULT = Path(__file__).resolve().parent.parent / ".pytest_cache" / "shmbus-figures.json"


def figures_path() -> Path:
    return Path(os.environ.get("SHMBUS_FIGURES", _DEFAULT))


def record(test_id: str, figures: dict[str, Any]) -> None:
    """Print *figures* and store them under *test_id* (replacing older ones)."""
    entry = {**figures, "recorded_at": time.strftime("%Y-%m-%d %H:%M:%S")}
    print(f"FIGURES {test_id} {json.dumps(entry, sort_keys=True)}")
    path = figures_path()
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a+", encoding="utf-8") as f:
            fcntl.flock(f, fcntl.LOCK_EX)  # other sessions may write at once
            f.seek(0)
            try:
                data = json.loads(f.read() or "{}")
            except json.JSONDecodeError:
                data = {}
            data[test_id] = entry
            f.seek(0)
            f.truncate()
            json.dump(data, f, indent=1, sort_keys=True)
