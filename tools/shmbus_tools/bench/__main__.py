"""``python -m shmbus_tools.bench``: run the benchmark (see :mod:`shmbus_tools.bench`)."""

from __future__ import annotations

import sys

from .cli import run_from_command_line

sys.exit(run_from_command_line())
