"""The benchmark's command line: ``tools/bench`` and ``shmbus bench``.

Owns
----
Its options (:func:`add_arguments`), checking them, running the benchmark and
writing its outputs (:func:`main`), and its console output: the progress line
on stderr, the list of files written on stdout. This and
:mod:`shmbus_tools.bench.progress` are the only modules of the package that write
to the console, and they write to ``sys.stdout``/``sys.stderr`` explicitly.

Exit codes: 0 every run succeeded or was skipped (a peer that cannot do what
the run needs, the reason in the report); 1 some run failed (the results are
still written, failed runs marked); 2 bad arguments; 130 interrupted (every child
and server is stopped first; nothing is written).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from shmbus._checks import int_argument

from .baseline import Baseline, BaselineError, resolve
from .progress import Progress
from .report import host_facts, write_charts, write_json, write_markdown
from .runner import Bench
from .spec import PEER_ALIASES, PEERS, SCENARIOS, peer_info, settings_for

__all__ = ["add_arguments", "build_parser", "main", "run_from_command_line"]

log = logging.getLogger("shmbus_tools.bench")

#: Peers of ``--smoke`` unless ``--peers`` says otherwise: shmbus and one
#: peer that needs nothing beyond the standard library.
SMOKE_PEERS = ("shm", "mpq")


def _default_out() -> Path:
    """``docs/bench`` of the source tree this package runs from, else ./shmbus-bench."""
    root = Path(__file__).resolve().parents[2]
    if (root / "setup.cfg").is_file() and (root / "docs").is_dir():
        return root / "docs" / "bench"
    return Path("shmbus-bench")


def _scenario_list(text: str) -> list[str]:
    names = [part.strip().upper() for part in text.split(",") if part.strip()]
    unknown = [name for name in names if name not in SCENARIOS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown scenario(s) {', '.join(unknown) or '(none given)'}; "
            f"choose from {','.join(SCENARIOS)}"
        )
    return [name for name in SCENARIOS if name in names]  # canonical order


def _peer_list(text: str) -> list[str]:
    names = [part.strip().lower() for part in text.split(",") if part.strip()]
    names = [PEER_ALIASES.get(name, name) for name in names]
    unknown = [name for name in names if name not in PEERS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown peer(s) {', '.join(unknown) or '(none given)'}; choose from {','.join(PEERS)}"
        )
    return [name for name in PEERS if name in names]


def _baseline(text: str) -> Baseline:
    try:
        return resolve(text.strip())
    except BaselineError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the benchmark's options to *parser*."""
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--quick",
        action="store_true",
        help="about a minute: one short run per figure, fewer fan-outs and sizes, every peer",
    )
    mode.add_argument(
        "--smoke",
        action="store_true",
        help="a few seconds: every scenario for a fraction of a second, shmbus and "
        f"{SMOKE_PEERS[1]} unless --peers is given (for tests; the numbers mean nothing)",
    )
    parser.add_argument(
        "--scenarios",
        type=_scenario_list,
        default=None,
        metavar="LIST",
        help=f"comma-separated subset of {','.join(SCENARIOS)} (default: all)",
    )
    parser.add_argument(
        "--peers",
        type=_peer_list,
        default=None,
        metavar="LIST",
        help=f"comma-separated subset of {','.join(PEERS)} (default: all; shm is always "
        "useful to keep, the ratios are against it)",
    )
    parser.add_argument(
        "--baseline",
        type=_baseline,
        default=None,
        metavar="REV",
        help="also measure shmbus as of git revision REV (a branch, tag or commit of this "
        "source checkout), as peer shmbus@<short hash> beside shm in the same run; the "
        "report gives current/baseline ratios. Implies shm in --peers",
    )
    parser.add_argument(
        "--reps",
        type=int_argument("--reps", minimum=1),
        default=None,
        metavar="N",
        help="repetitions of every run; figures are their medians (default 3, --quick 1)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        metavar="DIR",
        help=f"where to write results.md, results.json and the charts (default {_default_out()})",
    )
    parser.add_argument("--no-charts", action="store_true", help="do not draw the PNG charts")
    parser.add_argument("--quiet", action="store_true", help="no progress display")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m shmbus_tools.bench",
        description="Benchmark shmbus side by side with NATS, ZeroMQ, multiprocessing.Queue, "
        "faster-fifo, iceoryx2 and Redis (where installed).",
    )
    add_arguments(parser)
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="log more (-v info, -vv debug)"
    )
    return parser


def run_from_command_line(argv: Sequence[str] | None = None) -> int:
    """``python -m shmbus_tools.bench``."""
    return main(build_parser().parse_args(argv))


def _command(args: argparse.Namespace) -> str:
    parts = ["python -m shmbus_tools.bench"]
    if args.quick:
        parts.append("--quick")
    if args.smoke:
        parts.append("--smoke")
    if args.scenarios:
        parts.append("--scenarios " + ",".join(args.scenarios))
    if args.peers:
        parts.append("--peers " + ",".join(args.peers))
    if args.baseline:
        parts.append(f"--baseline {args.baseline.rev}")
    if args.reps:
        parts.append(f"--reps {args.reps}")
    return " ".join(parts)


def _configure_logging(verbose: int) -> None:
    if logging.getLogger().handlers:
        return  # the caller (the shmbus command) set it up
    level = logging.WARNING if verbose <= 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(
        level=level, stream=sys.stderr, format="%(asctime)s %(name)s %(levelname)s: %(message)s"
    )


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(args: argparse.Namespace) -> int:
    """Run the benchmark as *args* say; write the outputs; return the exit code."""
    _configure_logging(int(getattr(args, "verbose", 0) or 0))
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    settings = settings_for(mode, args.reps)
    scenarios = args.scenarios or list(SCENARIOS)
    peers = args.peers or (list(SMOKE_PEERS) if args.smoke else list(PEERS))
    baseline: Baseline | None = getattr(args, "baseline", None)
    if baseline is not None:
        # Right after shm, so the two run back to back in every round.
        peers = [name for name in peers if name != "shm"]
        peers[:0] = ["shm", baseline.peer]
    out = args.out if args.out is not None else _default_out()
    out.mkdir(parents=True, exist_ok=True)
    progress = Progress(None if args.quiet else sys.stderr)
    facts = host_facts()
    # SIGTERM unwinds like Ctrl-C, so every child and server is stopped.
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        outcome = Bench(settings, scenarios, peers, progress, baseline).run()
    except KeyboardInterrupt:
        sys.stderr.write("\ninterrupted: every child process and server was stopped\n")
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    facts["load_average_end"] = host_facts()["load_average"]
    command = _command(args)
    charts: list[str] = []
    note: str | None = None
    if not args.no_charts:
        charts, note = write_charts(out, outcome)
    write_json(out / "results.json", outcome, settings, facts, command)
    write_markdown(out / "results.md", outcome, settings, facts, command, charts, note)
    written = ["results.md", "results.json", *charts]
    sys.stdout.write("".join(f"wrote {out / name}\n" for name in written))
    for name, reason in outcome.skipped.items():
        sys.stdout.write(f"skipped {peer_info(name).label}: {reason}\n")
    failed = [r for r in outcome.results if r.failed]
    if failed:
        sys.stdout.write(f"{len(failed)} of {len(outcome.results)} runs failed; see results.md\n")
    sys.stdout.flush()
    return 1 if failed else 0
