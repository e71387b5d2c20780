"""The public surface of the package: what ``shmbus`` exports, that each of it
is documented, that ``from shmbus import *`` needs no optional extra, that a
missing extra fails one way everywhere, and the error tree.

The "without the extra" tests run a fresh interpreter in which the extra's
module cannot be imported (``sys.modules[name] = None``), whatever this
environment has installed.
"""

from __future__ import annotations

import inspect
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from cli_support import DEADLINE, started

import shmbus
from shmbus.errors import MissingExtraError, ShmBusError

ROOT = Path(__file__).resolve().parent.parent

#: The public API, pinned: adding or removing a name is a decision, made here.
EXPORTED = [
    "BaseBus",
    "BlockingSubscription",
    "BusClosedError",
    "BusInUseError",
    "BusStats",
    "EVENT_SCHEMA_VERSION",
    "EnvelopeDecodeError",
    "Event",
    "ForeignFileError",
    "ForkedBusError",
    "GroupStatistics",
    "IncompatibleSegmentError",
    "MemberStatistics",
    "MemoryBus",
    "MissingExtraError",
    "NoFreeSlotError",
    "NoRespondersError",
    "NullBus",
    "QueueSubscription",
    "RequestTimeoutError",
    "SegmentCorruptError",
    "SegmentError",
    "SegmentSpaceError",
    "ShmBus",
    "ShmBusError",
    "Subscription",
    "SubscriptionClosedError",
    "SubscriptionStatistics",
    "TransportUnavailableError",
    "cleanup",
    "get_bus",
    "matches",
]

#: Attributes of the package that need the ``nats`` extra (imported lazily).
LAZY = ["FallbackBus", "NatsBus"]

NATS_MESSAGE = str(MissingExtraError("nats"))

EXCEPTIONS = [
    name
    for name in EXPORTED
    if isinstance(getattr(shmbus, name), type) and issubclass(getattr(shmbus, name), Exception)
]


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    """Run ``python -c CODE`` to completion; its exit code and output."""
    with started([sys.executable, "-c", code]) as process:
        out, err = process.communicate(timeout=DEADLINE)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def without(*modules: str) -> str:
    """Python source that makes *modules* impossible to import."""
    return "import sys\n" + "".join(f"sys.modules[{name!r}] = None\n" for name in modules)


# ─── What is exported ────────────────────────────────────────────────────────


def test_all_names_exactly_the_public_api() -> None:
    assert shmbus.__all__ == EXPORTED


@pytest.mark.parametrize("name", EXPORTED)
def test_every_exported_name_is_importable(name: str) -> None:
    namespace: dict[str, object] = {}
    exec(f"from shmbus import {name}", namespace)
    assert namespace[name] is getattr(shmbus, name)


@pytest.mark.parametrize("name", EXPORTED + LAZY)
def test_every_exported_name_is_documented(name: str) -> None:
    """Classes and functions have a docstring of their own (not one a
    dataclass made up from the signature); constants a ``#:`` comment."""
    value = getattr(shmbus, name)
    if inspect.isclass(value) or inspect.isfunction(value):
        doc = value.__dict__.get("__doc__") if inspect.isclass(value) else value.__doc__
        assert doc and doc.strip() and not doc.startswith(f"{name}("), f"{name} has no docstring"
    else:
        comment = re.compile(rf"^#: .+\n(?:#: .*\n)*{name}\b[^\n]*=", re.MULTILINE)
        sources = (path.read_text() for path in (ROOT / "shmbus").glob("*.py"))
        assert any(comment.search(text) for text in sources), f"{name} has no #: comment"


def test_nats_transports_are_attributes_of_the_package_but_not_in_all() -> None:
    from shmbus.fallback import FallbackBus
    from shmbus.nats import NatsBus

    assert (shmbus.NatsBus, shmbus.FallbackBus) == (NatsBus, FallbackBus)
    assert not set(LAZY) & set(shmbus.__all__)
    assert set(LAZY) <= set(dir(shmbus))


def test_star_import_works_without_any_extra() -> None:
    result = run_python(
        without("nats", "prometheus_client")
        + "namespace = {}\n"
        + "exec('from shmbus import *', namespace)\n"
        + "print(sorted(name for name in namespace if name != '__builtins__'))\n"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(EXPORTED)


# ─── A missing extra ─────────────────────────────────────────────────────────

#: Each way of asking for the NATS transports.
NATS_REQUESTS = {
    "attribute": "shmbus.NatsBus",
    "from-import": "exec('from shmbus import NatsBus')",
    "fallback": "exec('from shmbus import FallbackBus')",
    "get_bus": "shmbus.get_bus('nats://127.0.0.1:4222')",
    "get_bus-fallback": "shmbus.get_bus('nats://127.0.0.1:4222', fallback='shm://x')",
}


def test_every_way_to_ask_for_nats_without_the_extra_raises_one_error_naming_pip() -> None:
    result = run_python(
        without("nats")
        + "import json, shmbus\n"
        + "from shmbus.errors import MissingExtraError\n"
        + f"requests = {NATS_REQUESTS!r}\n"
        + "answers = {}\n"
        + "for way, request in requests.items():\n"
        + "    try:\n"
        + "        eval(request)\n"
        + "        answers[way] = 'no error'\n"
        + "    except MissingExtraError as exc:\n"
        + "        answers[way] = [str(exc), isinstance(exc, ImportError), exc.name]\n"
        + "print(json.dumps(answers))\n"
    )
    assert result.returncode == 0, result.stderr
    answers = json.loads(result.stdout)
    assert {way: answer[:2] for way, answer in answers.items()} == {
        way: [NATS_MESSAGE, True] for way in NATS_REQUESTS
    }
    assert {answer[2].split(".")[0] for answer in answers.values()} == {"nats"}
    assert "pip install 'shmbus[nats]'" in NATS_MESSAGE


def test_the_missing_extra_error_names_the_pip_command_of_each_extra() -> None:
    assert "pip install 'shmbus[nats]'" in str(MissingExtraError("nats"))
    assert "pip install 'shmbus[metrics]'" in str(MissingExtraError("metrics"))


# ─── The error tree ──────────────────────────────────────────────────────────


@pytest.mark.parametrize("name", EXCEPTIONS)
def test_every_exported_exception_is_a_shmbus_error(name: str) -> None:
    assert issubclass(getattr(shmbus, name), ShmBusError)


@pytest.mark.parametrize(
    ("name", "builtin"),
    [
        ("EnvelopeDecodeError", ValueError),
        ("TransportUnavailableError", ConnectionError),
        ("MissingExtraError", ImportError),
        ("BusClosedError", RuntimeError),
        ("ForkedBusError", RuntimeError),
        ("ForeignFileError", PermissionError),
        ("SegmentSpaceError", OSError),
    ],
)
def test_a_shmbus_error_is_also_the_builtin_a_caller_would_catch(
    name: str, builtin: type[Exception]
) -> None:
    assert issubclass(getattr(shmbus, name), builtin)


def test_the_readme_lists_every_exported_exception() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### Errors", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"\b(\w+Error)\b", section))
    assert set(EXCEPTIONS) <= listed, set(EXCEPTIONS) - listed


# ─── What the installed package ships ────────────────────────────────────────

#: Modules only the checkout's tools use: the benchmark's peers and charts.
TOOL_ONLY_MODULES = ["faster_fifo", "matplotlib", "redis", "shmbus_tools", "zmq"]


def test_no_module_of_the_package_imports_a_tool_or_a_benchmark_peer() -> None:
    result = run_python(
        "import importlib, pkgutil, sys\n"
        "import shmbus\n"
        "for info in pkgutil.walk_packages(shmbus.__path__, 'shmbus.'):\n"
        "    importlib.import_module(info.name)\n"
        f"print(sorted(m for m in {TOOL_ONLY_MODULES!r} if m in sys.modules))\n"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_the_package_holds_no_tool(tmp_path: Path) -> None:
    shipped = {path.stem for path in (ROOT / "shmbus").rglob("*.py")}
    assert not shipped & {"bench", "demo", "soak", "children", "servers", "profile"}
    assert not (ROOT / "shmbus" / "bench").exists()


@pytest.mark.parametrize("command", ["demo", "bench"])
def test_a_tool_command_outside_a_checkout_says_where_the_tool_is(
    tmp_path: Path, command: str
) -> None:
    # A copy of the package with no tools/ beside it, as a wheel installs it.
    import shutil

    shutil.copytree(ROOT / "shmbus", tmp_path / "shmbus")
    with started(
        [sys.executable, "-m", "shmbus", command, "--help"],
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tmp_path)},
    ) as process:
        out, err = process.communicate(timeout=DEADLINE)
    assert process.returncode == 1, (out, err)
    assert f"run ./tools/{command} from a clone of the shmbus repository" in err
