"""The ``shmbus`` command: publish, subscribe, inspect and clean up buses.

Owns
----
The command line (``shmbus SUBCOMMAND ...`` and ``python -m shmbus``), its
argument checking, its output and its exit codes. Subcommands::

    pub      publish events          sub      print events as they arrive
    request  ask and print the reply reply    answer requests (echo or fixed)
    ls       list the host's buses   stat     per-instance and per-group counters
    clean    remove dead buses       metrics  serve figures to Prometheus
    bridge                           written elsewhere, loaded on demand
    demo, bench                      the source checkout's tools (tools/shmbus_tools)

Invariants
----------
* This is the only module of the bus that prints (the demo, benchmark and
  soak tools print their own reports); it writes to ``sys.stdout`` (results)
  and ``sys.stderr`` (errors) explicitly.
* Exit codes: 0 success (and Ctrl-C on ``sub``, ``stat --watch`` and
  ``metrics``, which run until stopped); 1 a runtime failure, reported as one
  line ``shmbus: error: ...`` (the traceback only with ``-v``); 2 bad
  arguments (argparse's own message); 130 interrupted otherwise.
* ``demo``, ``bench`` and ``bridge`` live in their own modules and are
  imported only when that subcommand is run (or its help asked for). The
  demo and the benchmark are not part of the installed package: they are
  found in the source checkout the package runs from (an editable install),
  and otherwise the command says where to get them. So a
  missing module or optional dependency fails that subcommand alone, with
  ``not available: ...``; a missing extra (``bridge`` without ``nats``,
  ``metrics`` without ``metrics``) says so with the
  :class:`~shmbus.errors.MissingExtraError` message, which names the ``pip``
  command. Each module exposes ``add_arguments(parser)`` and
  ``main(args) -> int``.
* Commands that join a bus (``pub``, ``sub``, ``request``, ``reply``) use
  the ring geometry of the bus if it already exists, so they never clash
  with it.
* ``request`` exits 1 with one line when no reply comes (nobody answered
  within ``--timeout``), as for every runtime failure.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import dataclasses
import importlib
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import FrameType, ModuleType
from typing import TYPE_CHECKING, Any, NoReturn

from ._checks import int_argument, number_argument
from ._core.shmfiles import validate_bus_name
from .contract import (
    BaseBus,
    Event,
    validate_headers,
    validate_pattern,
    validate_queue_name,
    validate_topic,
)
from .errors import MissingExtraError, ShmBusError
from .inbox import MAX_REQUEST_TIMEOUT

if TYPE_CHECKING:
    from ._core.inspection import BusInfo

__all__ = ["build_parser", "main"]

log = logging.getLogger("shmbus.cli")

#: Subcommands written in their own modules: name -> (module, one-line help).
PLUGINS: dict[str, tuple[str, str]] = {
    "demo": ("shmbus_tools.demo", "run a small demonstration of the bus"),
    "bench": ("shmbus_tools.bench", "measure throughput and latency of the bus"),
    "bridge": ("shmbus.bridge", "forward events between a bus and another transport"),
}

#: The package of the source checkout's tools (``tools/shmbus_tools``).
TOOLS_PACKAGE = "shmbus_tools"

#: Environment variable naming the default bus of ``--bus``.
BUS_ENV = "SHMBUS_BUS"

_HANDLER = "_shmbus_handler"


class CliError(Exception):
    """A runtime failure to report as one line and exit 1."""


# ─── Entry point ─────────────────────────────────────────────────────────────


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line *argv* (default ``sys.argv[1:]``); return the exit code."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    command = _command_of(args_list)
    plugin: ModuleType | None = None
    if command in PLUGINS:
        try:
            plugin = _load_plugin(command)
        except CliError as exc:
            _configure_logging(_verbosity(args_list))
            _error(f"{command}: not available: {exc}")
            return 1
    chosen = (command, plugin) if command is not None and plugin is not None else None
    parser = build_parser(plugin=chosen)
    args = parser.parse_args(args_list)
    verbose = int(getattr(args, "verbose", 0) or 0)
    if plugin is None or verbose:
        # A plugin may set up logging itself (its own --log-level, say).
        _configure_logging(verbose)
    handler: Callable[[argparse.Namespace], int] | None = getattr(args, _HANDLER, None)
    if handler is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return handler(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader of our output went away (`shmbus sub x | head -1`).
        _silence_stdout()
        return 0
    except Exception as exc:  # every runtime failure: one line, exit 1
        if verbose:
            log.exception("shmbus %s failed", command)
        _error(_describe(exc))
        return 1


def _command_of(argv: Sequence[str]) -> str | None:
    """The subcommand word: the first argument not an option (the top-level
    options take no values)."""
    for arg in argv:
        if arg == "--":
            return None
        if not arg.startswith("-"):
            return arg
    return None


def _verbosity(argv: Sequence[str]) -> int:
    count = 0
    for arg in argv:
        if arg == "--verbose":
            count += 1
        elif arg.startswith("-") and not arg.startswith("--") and set(arg[1:]) == {"v"}:
            count += len(arg) - 1
    return count


def _load_plugin(command: str) -> ModuleType:
    module_name, _ = PLUGINS[command]
    in_tools = module_name.partition(".")[0] == TOOLS_PACKAGE
    if in_tools:
        _find_checkout_tools()
    try:
        module = importlib.import_module(module_name)
    except MissingExtraError as exc:
        raise CliError(str(exc)) from None
    except ModuleNotFoundError as exc:
        if in_tools and exc.name in (TOOLS_PACKAGE, module_name):
            raise CliError(
                f"the {command} is not part of the installed package; it ships with the "
                f"source: run ./tools/{command} from a clone of the shmbus repository"
            ) from None
        if exc.name == module_name:
            raise CliError(f"module {module_name} is not part of this installation") from None
        raise CliError(
            f"{module_name} needs the package providing {exc.name!r}, which is not installed"
        ) from None
    except Exception as exc:
        log.debug("importing %s failed", module_name, exc_info=True)
        raise CliError(f"importing {module_name} failed: {_describe(exc)}") from None
    for attr in ("add_arguments", "main"):
        if not callable(getattr(module, attr, None)):
            raise CliError(f"{module_name} has no {attr}() function")
    return module


def _find_checkout_tools() -> None:
    """Make the checkout's ``tools/`` importable when this package runs from
    a source checkout (an editable install); a wheel has no ``tools/``."""
    tools = Path(__file__).resolve().parent.parent / "tools"
    if (tools / TOOLS_PACKAGE / "__init__.py").is_file() and str(tools) not in sys.path:
        sys.path.append(str(tools))


# ─── Parser ──────────────────────────────────────────────────────────────────


def build_parser(plugin: tuple[str, ModuleType] | None = None) -> argparse.ArgumentParser:
    """The ``shmbus`` argument parser. *plugin* (name, module) gets its real
    subparser; the other plugin subcommands are listed but not imported."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=argparse.SUPPRESS,
        help="log more (-v: info, -vv: debug) and show tracebacks of failures",
    )
    parser = argparse.ArgumentParser(
        prog="shmbus",
        description="Brokerless publish/subscribe over POSIX shared memory: "
        "publish, subscribe, inspect and clean up the buses of this host.",
        epilog="examples:\n"
        "  shmbus sub 'orders.>' &\n"
        "  shmbus pub orders.created '{\"id\": 1}' --type order.new\n"
        "  shmbus reply 'svc.time' '{\"now\": \"noon\"}' &\n"
        "  shmbus request svc.time '{}' --timeout 2\n"
        "  shmbus ls\n"
        "  shmbus stat default --watch\n\n"
        f"--bus defaults to ${BUS_ENV}, else 'default'. "
        "Run 'shmbus COMMAND --help' for a command's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"shmbus {_version()}")
    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="log more (-v: info, -vv: debug) and show tracebacks of failures",
    )
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    def add(name: str, help_text: str, epilog: str) -> argparse.ArgumentParser:
        return commands.add_parser(
            name,
            help=help_text,
            description=help_text[0].upper() + help_text[1:] + ".",
            epilog=epilog,
            parents=[common],
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    _add_pub(add)
    _add_sub(add)
    _add_request(add)
    _add_reply(add)
    _add_ls(add)
    _add_stat(add)
    _add_clean(add)
    _add_metrics(add)
    for name, (_module, help_text) in PLUGINS.items():
        if plugin is not None and plugin[0] == name:
            sub = commands.add_parser(
                name,
                help=help_text,
                description=help_text[0].upper() + help_text[1:] + ".",
                parents=[common],
                conflict_handler="resolve",
                formatter_class=argparse.RawDescriptionHelpFormatter,
            )
            plugin[1].add_arguments(sub)
            sub.set_defaults(**{_HANDLER: _plugin_handler(plugin[1])})
        else:
            # Listed for the top-level help only; main() loads the module
            # before parsing whenever this subcommand is the one run.
            commands.add_parser(name, help=help_text, add_help=False)
    return parser


_Add = Callable[[str, str, str], argparse.ArgumentParser]


def _add_bus_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--bus",
        type=_bus_name,
        default=_default_bus(),
        metavar="NAME",
        help=f"bus name (default: ${BUS_ENV}, else 'default'; now {_default_bus()!r})",
    )


def _add_pub(add: _Add) -> None:
    p = add(
        "pub",
        "publish events on a topic",
        "examples:\n"
        '  shmbus pub orders.created \'{"id": 1, "total": 9.5}\' --type order.new\n'
        "  shmbus pub ticks.1s --count 10\n"
        '  printf \'{"n": 1}\\n{"n": 2}\\n\' | shmbus pub numbers   # one event per line\n\n'
        "Without JSON, events are read from standard input (one JSON object per\n"
        "line) when it is not a terminal; otherwise one event with payload {} is sent.",
    )
    p.add_argument(
        "topic", type=_topic, metavar="TOPIC", help="topic to publish on, e.g. orders.created"
    )
    p.add_argument(
        "payload",
        nargs="?",
        type=_json_payload,
        metavar="JSON",
        help="payload, a JSON object (default {}); '-' reads JSON lines from standard input",
    )
    p.add_argument(
        "--type", dest="event_type", default="", metavar="T", help="event type, e.g. order.new"
    )
    p.add_argument(
        "--count",
        type=_count,
        default=1,
        metavar="N",
        help="publish each event N times (default 1)",
    )
    _add_header_option(p)
    _add_bus_option(p)
    p.set_defaults(**{_HANDLER: _cmd_pub})


def _add_sub(add: _Add) -> None:
    p = add(
        "sub",
        "print events as they arrive",
        "examples:\n"
        "  shmbus sub 'orders.>'                 # orders.created, orders.eu.paid, ...\n"
        "  shmbus sub 'sensors.*.temp' --json    # one JSON object per line\n"
        "  shmbus sub '>' --count 1 --bus jobs   # wait for one event on bus 'jobs'\n"
        "  shmbus sub 'jobs.>' --queue workers   # one of the group's members gets each\n\n"
        "Patterns: '*' matches one token, a final '>' one or more tokens.\n"
        "Runs until Ctrl-C or SIGTERM (exit 0), or until N events were printed.",
    )
    p.add_argument("pattern", type=_pattern, metavar="PATTERN", help="topic pattern")
    p.add_argument("--count", type=_count, default=None, metavar="N", help="exit after N events")
    _add_queue_option(p)
    p.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object per line: v, id, topic, type, ts, payload",
    )
    _add_bus_option(p)
    p.set_defaults(**{_HANDLER: _cmd_sub})


def _add_request(add: _Add) -> None:
    p = add(
        "request",
        "send a request and print the first reply",
        "examples:\n"
        "  shmbus request svc.time                      # payload {}\n"
        "  shmbus request svc.add '{\"a\": 1, \"b\": 2}' --timeout 5\n"
        "  shmbus request svc.echo '{}' --json -H traceparent:00-4bf9...-01\n\n"
        "Prints the reply's payload as JSON (--json: the whole reply). Exits 1\n"
        "with one line if no reply comes within --timeout seconds.",
    )
    p.add_argument("topic", type=_topic, metavar="TOPIC", help="topic to send the request on")
    p.add_argument(
        "payload",
        nargs="?",
        type=_json_object,
        default=None,
        metavar="JSON",
        help="the request's payload, a JSON object (default {})",
    )
    p.add_argument(
        "--timeout",
        type=_request_timeout,
        default=1.0,
        metavar="SECONDS",
        help="how long to wait for the reply (default 1)",
    )
    p.add_argument(
        "--type", dest="event_type", default="", metavar="T", help="event type of the request"
    )
    _add_header_option(p)
    p.add_argument(
        "--json",
        action="store_true",
        help="print the whole reply as JSON: v, id, topic, type, ts, payload (and headers)",
    )
    _add_bus_option(p)
    p.set_defaults(**{_HANDLER: _cmd_request})


def _add_reply(add: _Add) -> None:
    p = add(
        "reply",
        "answer requests with a fixed payload, or echo each request's payload",
        "examples:\n"
        "  shmbus reply 'svc.echo'                          # echo every request\n"
        "  shmbus reply 'svc.time' '{\"now\": \"noon\"}'        # always the same answer\n"
        "  shmbus reply 'svc.>' --queue responders --count 10\n\n"
        "Prints each request it answers (--json: one JSON object per line); events\n"
        "published without a reply address are skipped. Runs until Ctrl-C or\n"
        "SIGTERM (exit 0), or until it answered N requests.",
    )
    p.add_argument("pattern", type=_pattern, metavar="PATTERN", help="topic pattern to answer")
    p.add_argument(
        "payload",
        nargs="?",
        type=_json_object,
        default=None,
        metavar="JSON",
        help="the reply, a JSON object (default: the request's own payload)",
    )
    _add_queue_option(p)
    p.add_argument(
        "--count", type=_count, default=None, metavar="N", help="exit after N replies"
    )
    p.add_argument(
        "--type", dest="event_type", default="", metavar="T", help="event type of the replies"
    )
    _add_header_option(p)
    p.add_argument(
        "--json",
        action="store_true",
        help="print each request as one JSON object: v, id, topic, type, ts, payload, ...",
    )
    _add_bus_option(p)
    p.set_defaults(**{_HANDLER: _cmd_reply})


def _add_queue_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--queue",
        type=_queue_name,
        default=None,
        metavar="NAME",
        help="join queue group NAME: each event goes to one of its members",
    )


def _add_header_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-H",
        "--header",
        dest="headers",
        type=_header,
        action="append",
        default=[],
        metavar="NAME:VALUE",
        help="add a header, e.g. -H traceparent:00-4bf9...-01 (repeatable)",
    )


def _add_ls(add: _Add) -> None:
    p = add(
        "ls",
        "list the buses of this host",
        "examples:\n  shmbus ls\n  shmbus ls --json | jq '.[].name'\n\n"
        "Shows each bus's segment size, how full its ring is, and its live\n"
        "instances (pid, command); 'readers' counts those with subscriptions.",
    )
    p.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    p.set_defaults(**{_HANDLER: _cmd_ls})


def _add_stat(add: _Add) -> None:
    p = add(
        "stat",
        "show a bus's figures, its instances' and its queue groups' counters",
        "examples:\n"
        "  shmbus stat orders\n"
        "  shmbus stat orders --watch        # refresh every second until Ctrl-C\n"
        "  shmbus stat orders --watch 5 --json\n\n"
        "Give NAME before --watch (--watch takes an optional number).\n"
        "LAG is how far (bytes) an instance's reader is behind the writers.\n"
        "A queue group's dropped events are those assigned to a member that lost\n"
        "them, or left or died before its consumer took them.",
    )
    p.add_argument(
        "name",
        nargs="?",
        type=_bus_name,
        default=_default_bus(),
        metavar="NAME",
        help=f"bus name (default: ${BUS_ENV}, else 'default')",
    )
    p.add_argument(
        "--watch",
        nargs="?",
        type=_interval,
        const=1.0,
        default=None,
        metavar="SECONDS",
        help="print again every SECONDS (default 1) until Ctrl-C",
    )
    p.add_argument(
        "--sample",
        type=_sample,
        default=0.5,
        metavar="SECONDS",
        help="one-shot: measure the publish rate over SECONDS (default 0.5; 0: skip)",
    )
    p.add_argument("--json", action="store_true", help="print JSON (one object per sample)")
    p.set_defaults(**{_HANDLER: _cmd_stat})


def _add_clean(add: _Add) -> None:
    p = add(
        "clean",
        "remove the files of buses that no process uses",
        "examples:\n"
        "  shmbus clean            # every bus on this host with no live process\n"
        "  shmbus clean orders\n"
        "  shmbus clean orders --force\n"
        "  shmbus clean --dry-run   # list what would be removed, remove nothing\n\n"
        "A live bus is refused (exit 1) unless --force: then its processes keep\n"
        "working on their mappings until they close, but processes that connect\n"
        "afterwards get a fresh, separate bus.",
    )
    p.add_argument(
        "name",
        nargs="?",
        type=_bus_name,
        default=None,
        metavar="NAME",
        help="bus to clean (default: every bus with no live process)",
    )
    p.add_argument("--force", action="store_true", help="remove a live bus's files too")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print what would be removed (and what left alone) and remove nothing",
    )
    p.set_defaults(**{_HANDLER: _cmd_clean})


def _add_metrics(add: _Add) -> None:
    p = add(
        "metrics",
        "serve the figures of every bus to Prometheus",
        "examples:\n"
        "  shmbus metrics                            # http://127.0.0.1:9464/metrics\n"
        "  shmbus metrics --listen 0.0.0.0:9464      # reachable from other hosts\n"
        "  shmbus metrics --listen 127.0.0.1:0       # any free port (printed)\n\n"
        "Needs the prometheus-client package: pip install 'shmbus[metrics]'.\n"
        "Every scrape reads the buses afresh. Runs until Ctrl-C or SIGTERM.",
    )
    p.add_argument(
        "--listen",
        type=_listen_address,
        default=("127.0.0.1", 9464),
        metavar="HOST:PORT",
        help="address to serve on (default 127.0.0.1:9464)",
    )
    p.set_defaults(**{_HANDLER: _cmd_metrics})


# ─── Argument types (raise ArgumentTypeError: exit 2 with the message) ──────


def _version() -> str:
    from . import __version__

    return str(__version__)


def _default_bus() -> str:
    return os.environ.get(BUS_ENV) or "default"


def _checked(check: Callable[[str], object], value: str) -> str:
    try:
        check(value)
    except (TypeError, ValueError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


def _bus_name(value: str) -> str:
    return _checked(validate_bus_name, value)


def _topic(value: str) -> str:
    return _checked(validate_topic, value)


def _pattern(value: str) -> str:
    return _checked(validate_pattern, value)


def _queue_name(value: str) -> str:
    return _checked(validate_queue_name, value)


def _header(value: str) -> tuple[str, str]:
    name, sep, text = value.partition(":")
    if not sep:
        raise argparse.ArgumentTypeError(
            f"header {value!r} must be NAME:VALUE, e.g. traceparent:00-4bf9...-01"
        )
    text = text.strip()
    try:
        validate_headers({name: text})
    except (TypeError, ValueError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return name, text


class _Stdin:
    """Marker: read payloads from standard input."""


STDIN = _Stdin()


def _json_payload(value: str) -> dict[str, Any] | _Stdin:
    if value == "-":
        return STDIN
    return _json_object(value)


def _json_object(value: str) -> dict[str, Any]:
    try:
        payload = json.loads(value)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(
            f"JSON payload {value!r} is not valid JSON: {exc}"
        ) from None
    if not isinstance(payload, dict):
        raise argparse.ArgumentTypeError(
            f"JSON payload {value!r} is {_json_kind(payload)}; "
            "it must be an object, e.g. '{\"id\": 1}'"
        )
    return payload


def _json_kind(value: object) -> str:
    """What a decoded JSON value is, in JSON's words: "a JSON array", ..."""
    if isinstance(value, bool):
        return "a JSON boolean"
    if value is None:
        return "JSON null"
    kinds = ((dict, "object"), (list, "array"), (str, "string"), ((int, float), "number"))
    for cls, kind in kinds:
        if isinstance(value, cls):
            return f"a JSON {kind}"
    return f"a {type(value).__name__}"  # pragma: no cover - json.loads makes no other type


_count = int_argument("the count", minimum=1)
_interval = number_argument("the interval", above=True, unit="seconds")
_sample = number_argument("the sample time", unit="seconds")
_request_timeout = number_argument(
    "the timeout", above=True, maximum=MAX_REQUEST_TIMEOUT, unit="seconds"
)


def _listen_address(value: str) -> tuple[str, int]:
    host, sep, port_text = value.rpartition(":")
    if not sep or not port_text.isdigit():
        raise argparse.ArgumentTypeError(
            f"listen address {value!r} must be HOST:PORT, e.g. 127.0.0.1:9464 or [::1]:9464"
        )
    port = int(port_text)
    if port > 65535:
        raise argparse.ArgumentTypeError(f"port {port} of {value!r} is above the limit of 65535")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host or "0.0.0.0", port


# ─── pub ─────────────────────────────────────────────────────────────────────


def _cmd_pub(args: argparse.Namespace) -> int:
    return asyncio.run(_pub(args))


async def _pub(args: argparse.Namespace) -> int:
    payload: dict[str, Any] | _Stdin | None = args.payload
    if payload is None and not _is_tty(sys.stdin):
        payload = STDIN
    bus = _bus_for(args.bus)
    await bus.connect()
    sent = 0
    stopped: CliError | None = None
    try:
        if isinstance(payload, _Stdin):
            try:
                for line_number, payload_of_line in _stdin_payloads():
                    for _ in range(args.count):
                        _publish(
                            bus,
                            args.topic,
                            payload_of_line,
                            args.event_type,
                            f"standard input line {line_number}",
                            _headers_of(args),
                        )
                        sent += 1
            except CliError as exc:
                stopped = exc  # after the lines before it went out: say how many
            if sent == 0 and stopped is None:
                log.warning("standard input held no events: nothing was published")
        else:
            for _ in range(args.count):
                _publish(
                    bus, args.topic, payload or {}, args.event_type, "payload", _headers_of(args)
                )
                sent += 1
        failed = bus.stats().publish_errors
    finally:
        await bus.close()
    if stopped is not None:
        went_out = sent - failed
        raise CliError(
            f"{stopped}; stopped there: "
            + (
                f"{went_out} event(s) from the lines before it were published on bus "
                f"{args.bus!r}"
                if went_out
                else "nothing was published"
            )
            + (f" ({failed} more could not be)" if failed else "")
        )
    if failed:
        raise CliError(
            f"{failed} of {sent} event(s) could not be published on bus {args.bus!r} "
            "(see the log above)"
        )
    log.info("published %d event(s) on %r, bus %r", sent, args.topic, args.bus)
    return 0


def _stdin_payloads() -> Iterator[tuple[int, dict[str, Any]]]:
    if sys.stdin is None:  # started with standard input closed
        return
    for line_number, line in enumerate(sys.stdin, 1):
        text = line.strip()
        if not text:
            continue
        try:
            payload = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CliError(f"standard input line {line_number} is not valid JSON: {exc}") from None
        if not isinstance(payload, dict):
            raise CliError(
                f"standard input line {line_number} is {_json_kind(payload)}; "
                "each line must be a JSON object"
            )
        yield line_number, payload


def _publish(
    bus: BaseBus,
    topic: str,
    payload: dict[str, Any],
    event_type: str,
    what: str,
    headers: dict[str, str] | None,
) -> None:
    try:
        bus.publish_nowait(topic, payload, event_type=event_type, headers=headers)
    except (TypeError, ValueError) as exc:
        raise CliError(f"{what}: {exc}") from None


def _headers_of(args: argparse.Namespace) -> dict[str, str] | None:
    """The ``-H`` headers, checked together (their total size)."""
    if not args.headers:
        return None
    try:
        return validate_headers(dict(args.headers))
    except ValueError as exc:
        raise CliError(str(exc)) from None


def _bus_for(name: str) -> BaseBus:
    """A ShmBus on *name* with the geometry of the existing bus, if any."""
    from .shm import ShmBus

    return ShmBus.for_existing(name)


# ─── sub ─────────────────────────────────────────────────────────────────────


def _cmd_sub(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(_sub(args))
    except KeyboardInterrupt:  # before the loop's handlers were in place
        return 0


async def _sub(args: argparse.Namespace) -> int:
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    stop_signals = (signal.SIGINT, signal.SIGTERM)
    for sig in stop_signals:
        loop.add_signal_handler(sig, task.cancel)
    bus = _bus_for(args.bus)
    received = 0
    try:
        await bus.connect()
        render = _event_json if args.json else _event_line
        async with bus.subscribe(args.pattern, queue=args.queue) as subscription:
            log.info("subscribed to %r on bus %r", args.pattern, args.bus)
            async for event in subscription:
                _out(render(event))
                received += 1
                if args.count is not None and received >= args.count:
                    break
    except asyncio.CancelledError:
        log.info("stopped after %d event(s)", received)
    finally:
        await bus.close()
        for sig in stop_signals:
            loop.remove_signal_handler(sig)
    return 0


# ─── request and reply ───────────────────────────────────────────────────────


def _cmd_request(args: argparse.Namespace) -> int:
    return asyncio.run(_request(args))


async def _request(args: argparse.Namespace) -> int:
    headers = _headers_of(args)
    bus = _bus_for(args.bus)
    await bus.connect()
    try:
        reply = await bus.request(
            args.topic,
            args.payload or {},
            timeout=args.timeout,
            event_type=args.event_type,
            headers=headers,
        )
    finally:
        await bus.close()
    if args.json:
        _out(_event_json(reply))
    else:
        _out(json.dumps(reply.payload, ensure_ascii=False, default=_json_fallback))
    return 0


def _cmd_reply(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(_reply(args))
    except KeyboardInterrupt:  # before the loop's handlers were in place
        return 0


async def _reply(args: argparse.Namespace) -> int:
    headers = _headers_of(args)
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    stop_signals = (signal.SIGINT, signal.SIGTERM)
    for sig in stop_signals:
        loop.add_signal_handler(sig, task.cancel)
    bus = _bus_for(args.bus)
    answered = 0
    try:
        await bus.connect()
        render = _event_json if args.json else _event_line
        async with bus.subscribe(args.pattern, queue=args.queue) as subscription:
            log.info("answering requests on %r, bus %r", args.pattern, args.bus)
            async for request in subscription:
                if request.reply_to is None:
                    log.info("skipping an event on %r: it is not a request", request.topic)
                    continue
                payload = args.payload if args.payload is not None else request.payload
                await bus.reply(request, payload, event_type=args.event_type, headers=headers)
                _out(render(request))
                answered += 1
                if args.count is not None and answered >= args.count:
                    break
    except asyncio.CancelledError:
        log.info("stopped after %d repl(ies)", answered)
    finally:
        await bus.close()
        for sig in stop_signals:
            loop.remove_signal_handler(sig)
    return 0


def _event_line(event: Event) -> str:
    millis = int(event.ts * 1000) % 1000
    stamp = time.strftime("%H:%M:%S", time.localtime(event.ts)) + f".{millis:03d}"
    payload = json.dumps(event.payload, ensure_ascii=False, default=_json_fallback)
    return f"{stamp} {event.topic} {event.type or '-'} {payload}"


def _event_json(event: Event) -> str:
    return json.dumps(event.to_dict(), ensure_ascii=False, default=_json_fallback)


def _json_fallback(value: object) -> object:
    """JSON for what msgpack carries but JSON cannot: bytes as base64 text,
    anything else as its str()."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode("ascii")
    return str(value)


# ─── ls ──────────────────────────────────────────────────────────────────────


def _cmd_ls(args: argparse.Namespace) -> int:
    from ._core.inspection import list_buses

    errors: dict[str, str] = {}
    buses = list_buses(on_error=lambda name, exc: errors.__setitem__(name, _describe(exc)))
    if args.json:
        rows: list[dict[str, Any]] = [_bus_json(info) for info in buses]
        rows += [{"name": name, "error": why} for name, why in errors.items()]
        _out(json.dumps(sorted(rows, key=lambda row: str(row["name"])), ensure_ascii=False))
        return 0
    if not buses and not errors:
        _out("no shmbus buses on this host")
        return 0
    width = max(len("BUS"), *(len(name) for name in [*(b.name for b in buses), *errors]))
    _out(
        f"{'BUS':<{width}}  {'STATE':<5}  {'SIZE':>9}  {'FILL':>6}  "
        f"{'INSTANCES':>9}  {'READERS':>7}"
    )
    for info in buses:
        live = info.live_instances
        _out(
            f"{info.name:<{width}}  {'live' if info.live else 'dead':<5}  "
            f"{_size(info.segment_size):>9}  {info.fill * 100:>5.1f}%  "
            f"{len(live):>9}  {info.readers:>7}"
        )
        for slot in live:
            role = f"{slot.subscriptions} sub" if slot.reader else "no sub"
            _out(f"  pid {slot.pid:<8} {role:<7} {_one_line(slot.command)}")
    for name, why in sorted(errors.items()):
        _out(f"{name:<{width}}  error: {why}")
    return 0


# ─── stat ────────────────────────────────────────────────────────────────────


def _cmd_stat(args: argparse.Namespace) -> int:
    from ._core.inspection import read_bus

    def sample(previous: BusInfo, previous_at: float) -> tuple[BusInfo, float, float | None]:
        current = read_bus(args.name)
        now = time.monotonic()
        rate = None
        if current.created_ns == previous.created_ns and now > previous_at:
            rate = max(0, current.published - previous.published) / (now - previous_at)
        return current, now, rate

    if args.watch is None:
        info, taken = read_bus(args.name), time.monotonic()
        rate: float | None = None
        if args.sample > 0 and info.live:
            time.sleep(args.sample)
            info, taken, rate = sample(info, taken)
        _print_stat(info, rate, args.json, clear=False)
        return 0
    restore = _sigterm_raises_keyboard_interrupt()
    try:
        info, taken = read_bus(args.name), time.monotonic()
        _print_stat(info, None, args.json, clear=_is_tty(sys.stdout))
        while True:
            time.sleep(args.watch)
            info, taken, rate = sample(info, taken)
            _print_stat(info, rate, args.json, clear=_is_tty(sys.stdout))
    except KeyboardInterrupt:
        return 0
    finally:
        restore()


def _print_stat(info: BusInfo, rate: float | None, as_json: bool, *, clear: bool) -> None:
    if as_json:
        data = _bus_json(info)
        data["publish_rate"] = rate
        _out(json.dumps(data, ensure_ascii=False))
        return
    if clear:
        sys.stdout.write("\x1b[H\x1b[2J")
    rate_text = f" ({rate:.1f}/s)" if rate is not None else ""
    _out(
        f"bus {info.name}: {'live' if info.live else 'dead (no process attached)'}, "
        f"layout v{info.layout_version}, files {_size(info.segment_size)}, "
        f"default ring {_size(info.capacity)}, max event {_size(info.max_event_size)}"
    )
    _out(
        f"published {info.published}{rate_text} in {len(info.rings)} ring(s), "
        f"fullest ring {info.fill * 100:.1f}%"
    )
    for ring in info.rings:
        _out(
            f"  ring {ring.entry}.{ring.gen} {ring.state:<8} writer pid {ring.writer_pid:<8} "
            f"{_size(ring.capacity)}, {ring.published} events, fill {ring.fill * 100:.1f}%"
            + (f" ({ring.problem})" if ring.problem else "")
        )
    for group in info.groups:
        live = sum(1 for member in group.members if member.alive)
        _out(
            f"  group {group.queue} on {group.pattern}: {live} live member(s), "
            f"delivered {group.delivered}, dropped {group.dropped}"
        )
        for member in group.members:
            _out(
                f"    member pid {member.pid:<8} slot {member.slot:<3} "
                f"{'alive' if member.alive else 'dead':<5}  assigned {member.assigned}, "
                f"delivered {member.delivered}, dropped {member.dropped}"
            )
    if not info.instances:
        _out("no instances")
        return
    header = (
        "SLOT",
        "PID",
        "STATE",
        "SUBS",
        "LAG_BYTES",
        "DELIVERED",
        "DROPPED",
        "CORRUPT",
        "LAPPED",
        "PUBLISHED",
    )
    rows = [
        (
            str(s.slot),
            str(s.pid),
            "alive" if s.alive else "dead",
            str(s.subscriptions),
            str(s.lag_bytes) if s.reader else "-",
            str(s.delivered),
            str(s.dropped),
            str(s.corrupt),
            str(s.lapped),
            str(s.published),
        )
        for s in info.instances
    ]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    _out("  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True)) + "  COMMAND")
    for row, slot in zip(rows, info.instances, strict=True):
        cells = "  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True))
        _out(f"{cells}  {_one_line(slot.command)}")


def _bus_json(info: BusInfo) -> dict[str, Any]:
    data: dict[str, Any] = dataclasses.asdict(info)
    data["readers"] = info.readers
    return data


# ─── clean ───────────────────────────────────────────────────────────────────


def _cmd_clean(args: argparse.Namespace) -> int:
    from ._core.leftovers import BusInUseError, cleanup_report

    if args.dry_run:
        return _clean_dry_run(args.name, force=args.force)
    try:
        report = cleanup_report(args.name, force=args.force, strict=True)
    except BusInUseError as exc:
        raise CliError(f"{exc}; refusing without --force") from None
    for path in report.removed:
        _out(f"removed {path}")
    for name, why in sorted(report.skipped.items()):
        _out(f"left {name} alone: {why}")
    if not report.removed and not report.skipped:
        _out(f"nothing to remove for bus {args.name!r}" if args.name else "nothing to remove")
    return 0


def _clean_dry_run(name: str | None, *, force: bool) -> int:
    """Print what ``clean`` would remove and leave alone; remove nothing.

    A bus is live, as for the real command, while some process holds its
    attach lock; the answer may change before a real ``clean`` runs.
    """
    from ._core.leftovers import leftover_names
    from ._core.shmfiles import bus_file_paths

    found = False
    for bus in [name] if name is not None else leftover_names():
        paths = bus_file_paths(bus)
        if not paths:
            continue
        found = True
        try:
            live = _is_live(bus)
        except OSError as exc:
            if name is not None:
                raise
            _out(f"would leave {bus} alone: {_describe(exc)}")
            continue
        if live and not force:
            if name is not None:
                raise CliError(
                    f"bus {bus!r} is live: clean would refuse it without --force "
                    "(dry run: nothing was removed)"
                )
            _out(f"would leave {bus} alone: it is live (processes are attached)")
            continue
        for path in paths:
            _out(f"would remove {path}")
    if not found:
        _out(f"nothing to remove for bus {name!r}" if name else "nothing to remove")
    return 0


def _is_live(name: str) -> bool:
    """True if a process is attached to bus *name* (holds its attach lock);
    False if it has no segment (only orphaned rings or FIFOs are left)."""
    from ._core import ofd
    from ._core.layout import LOCK_ATTACH
    from ._core.shmfiles import segment_path

    try:
        fd = os.open(segment_path(name), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        return ofd.holds_conflicting(fd, LOCK_ATTACH, exclusive=True)
    finally:
        os.close(fd)


# ─── metrics ─────────────────────────────────────────────────────────────────


def _cmd_metrics(args: argparse.Namespace) -> int:
    try:
        from . import metrics
    except MissingExtraError as exc:
        raise CliError(f"metrics: not available: {exc}") from None
    host, port = args.listen
    restore = _sigterm_raises_keyboard_interrupt()
    try:
        try:
            server, thread = metrics.serve(host, port)
        except OSError as exc:
            raise CliError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        bound_host, bound_port = server.server_address[:2]
        host_text = bound_host.decode() if isinstance(bound_host, bytes) else str(bound_host)
        shown = f"[{host_text}]" if ":" in host_text else host_text
        _out(f"serving shmbus metrics on http://{shown}:{bound_port}/metrics")
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass
        finally:
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)
    finally:
        restore()
    return 0


# ─── Plugins ─────────────────────────────────────────────────────────────────


def _plugin_handler(module: ModuleType) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        code = module.main(args)
        return int(code) if code is not None else 0

    return run


# ─── Output and process helpers ──────────────────────────────────────────────


def _out(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _error(message: str) -> None:
    sys.stderr.write(f"shmbus: error: {_one_line(message)}\n")
    sys.stderr.flush()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, (CliError, ShmBusError, OSError)) and str(exc):
        if isinstance(exc, OSError) and exc.strerror:
            return f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
        return str(exc)
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _size(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _is_tty(stream: Any) -> bool:
    try:
        return bool(stream is not None and stream.isatty())
    except (ValueError, OSError):
        return False


def _configure_logging(verbose: int) -> None:
    level = logging.WARNING if verbose <= 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(
        level=level, stream=sys.stderr, format="%(asctime)s %(name)s %(levelname)s: %(message)s"
    )


def _sigterm_raises_keyboard_interrupt() -> Callable[[], None]:
    """Make SIGTERM stop a blocking command like Ctrl-C; return the undo."""

    def raise_interrupt(signum: int, frame: FrameType | None) -> NoReturn:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, raise_interrupt)

    def restore() -> None:
        signal.signal(signal.SIGTERM, previous)

    return restore


def _silence_stdout() -> None:
    """After EPIPE: point stdout at /dev/null so the interpreter's final flush
    does not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass
