"""``python -m shmbus.bench``: run the benchmark (see :mod:`shmbus.bench`)."""

from __future__ import annotations

import sys

from .cli import run_from_command_line

sys.exit(run_from_command_line())
