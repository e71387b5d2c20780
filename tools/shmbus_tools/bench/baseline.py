"""shmbus as of an older git revision, measured beside the work tree: ``--baseline REV``.

Owns
----
* :func:`resolve`: REV -> :class:`Baseline` (the commit, its short hash, the
  peer's name ``shm@<short>`` and label ``shmbus@<short>``), checked before
  anything runs.
* :func:`exported`: the revision's ``shmbus/`` package, taken with ``git
  archive`` (the repository's index, HEAD and worktree list are untouched)
  into a private directory ``/tmp/shmbus-baseline-<short>-*``, imported and
  yielded as a module; on exit the module is forgotten and the directory
  removed.

Isolation
---------
The old copy is imported under its own top-level name, ``shmbus_at_<short>``
(the package directory is renamed after extraction and loaded from its file
location; ``sys.path`` is not touched). shmbus's modules import each other
relatively, so the whole old copy lives under that name and shares no module
with the work tree's ``shmbus``, which the benchmark itself keeps using (its
harness, control protocol and workload). The editable install of the work
tree maps only the name ``shmbus``, so it cannot capture the old copy either.
Old sources that import ``shmbus`` absolutely are rewritten to the new name
on export, and :func:`exported` checks that every module of the old copy comes
from the export directory.

The parent imports the old copy once; the peer's children are forked from it,
as the work tree's shmbus peer's are, so both peers start equally warm.
"""

from __future__ import annotations

import importlib.util
import io
import logging
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Final

__all__ = [
    "BASELINE_PREFIX",
    "Baseline",
    "BaselineError",
    "exported",
    "bus_class",
    "is_baseline",
    "package_name",
    "resolve",
]

log = logging.getLogger("shmbus_tools.bench")

#: Peer names of baselines: ``shm@<short hash>``.
BASELINE_PREFIX: Final = "shm@"

_ABSOLUTE_IMPORT: Final = re.compile(r"^(\s*)(from|import)(\s+)shmbus\b", re.MULTILINE)


class BaselineError(Exception):
    """The revision cannot be resolved, exported or imported."""


def package_name(short: str) -> str:
    """The top-level name of the old copy of revision *short*."""
    return f"shmbus_at_{short}"


def is_baseline(peer: str) -> bool:
    """Whether *peer* names a baseline peer (``shm@<short>``)."""
    return peer.startswith(BASELINE_PREFIX)


@dataclass(frozen=True)
class Baseline:
    """One revision of shmbus to measure as a peer."""

    #: As given on the command line (``HEAD``, ``main``, a hash).
    rev: str
    commit: str
    short: str
    #: The commit's subject line.
    subject: str
    #: The root of the git work tree the revision is taken from.
    repo: Path
    #: The work tree's ``shmbus/`` (its bench aside) is the revision's: an
    #: A/A comparison, whose ratios show the noise of the machine.
    same_as_work_tree: bool = False

    @property
    def peer(self) -> str:
        return f"{BASELINE_PREFIX}{self.short}"

    @property
    def label(self) -> str:
        return f"shmbus@{self.short}"

    @property
    def package(self) -> str:
        """The top-level name the old copy is imported under."""
        return package_name(self.short)

    def to_json(self) -> dict[str, str | bool]:
        return {
            "rev": self.rev,
            "commit": self.commit,
            "short": self.short,
            "subject": self.subject,
            "peer": self.peer,
            "label": self.label,
            "package": self.package,
            "same_as_work_tree": self.same_as_work_tree,
        }


def _git(repo: Path, *args: str) -> str:
    try:
        done = subprocess.run(
            ["git", "-C", str(repo), *args],
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BaselineError(f"git {args[0]} failed: {exc}") from None
    if done.returncode != 0:
        message = done.stderr.strip().splitlines()
        raise BaselineError(message[-1] if message else f"git {args[0]} failed")
    return done.stdout.strip()


def _source_root() -> Path:
    """The git work tree this package runs from."""
    here = Path(__file__).resolve().parent
    try:
        return Path(_git(here, "rev-parse", "--show-toplevel"))
    except BaselineError:
        raise BaselineError(
            f"{here} is not in a git work tree: --baseline needs the shmbus source checkout"
        ) from None


def resolve(rev: str, repo: Path | None = None) -> Baseline:
    """*rev* of the repository at *repo* (default: the one this package is in)."""
    root = repo if repo is not None else _source_root()
    if not rev or rev.startswith("-"):
        raise BaselineError(f"not a revision: {rev!r}")
    try:
        commit = _git(
            root, "rev-parse", "--verify", "--quiet", "--end-of-options", f"{rev}^{{commit}}"
        )
    except BaselineError:
        raise BaselineError(f"unknown revision {rev!r} in {root}") from None
    try:
        _git(root, "cat-file", "-e", f"{commit}:shmbus/shm.py")
    except BaselineError:
        raise BaselineError(f"revision {rev!r} ({commit[:12]}) has no shmbus/shm.py") from None
    short = _git(root, "rev-parse", "--short", commit)
    subject = _git(root, "log", "-1", "--format=%s", commit)
    return Baseline(
        rev=rev,
        commit=commit,
        short=short,
        subject=subject,
        repo=root,
        same_as_work_tree=_same_as_work_tree(root, commit),
    )


def _same_as_work_tree(root: Path, commit: str) -> bool:
    """No change (staged, unstaged or untracked) to ``shmbus/`` outside its
    bench between *commit* and the work tree."""
    paths = ["--", "shmbus", ":(exclude)shmbus/bench"]
    try:
        _git(root, "diff", "--quiet", commit, *paths)
        untracked = _git(root, "ls-files", "--others", "--exclude-standard", *paths)
    except BaselineError:  # git diff --quiet exits 1 when there are differences
        return False
    return not untracked


@contextmanager
def exported(baseline: Baseline) -> Iterator[ModuleType]:
    """The revision's shmbus package, imported as ``baseline.package``.

    Exported with ``git archive`` into a private temporary directory, removed
    (and the modules forgotten) on exit.
    """
    directory = Path(tempfile.mkdtemp(prefix=f"shmbus-baseline-{baseline.short}-"))
    try:
        package_dir = _export(baseline, directory)
        module = _import(baseline.package, package_dir)
        log.info(
            "baseline %s (%s) imported as %s from %s",
            baseline.label,
            baseline.commit,
            baseline.package,
            module.__file__,
        )
        yield module
    finally:
        for name in [n for n in sys.modules if n.partition(".")[0] == baseline.package]:
            del sys.modules[name]
        shutil.rmtree(directory, ignore_errors=True)


def _export(baseline: Baseline, directory: Path) -> Path:
    """``git archive`` the revision's ``shmbus/`` (its bench left out) into
    *directory*, renamed to ``baseline.package``; return the package directory."""
    try:
        done = subprocess.run(
            [
                "git",
                "-C",
                str(baseline.repo),
                "archive",
                "--format=tar",
                baseline.commit,
                "--",
                "shmbus",
                ":(exclude)shmbus/bench",
            ],
            capture_output=True,
            check=False,
            timeout=120,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BaselineError(f"git archive failed: {exc}") from None
    if done.returncode != 0:
        error = done.stderr.decode(errors="replace").strip()
        raise BaselineError(f"git archive {baseline.commit[:12]} failed: {error}")
    with tarfile.open(fileobj=io.BytesIO(done.stdout)) as archive:
        archive.extractall(directory, filter="data")
    package_dir = directory / baseline.package
    (directory / "shmbus").rename(package_dir)
    for path in package_dir.rglob("*.py"):
        text = path.read_text()
        fixed = _ABSOLUTE_IMPORT.sub(rf"\1\2\3{baseline.package}", text)
        if fixed != text:
            log.info("baseline: rewrote absolute shmbus imports in %s", path.name)
            path.write_text(fixed)
    return package_dir


def _import(package: str, package_dir: Path) -> ModuleType:
    """Import the package at *package_dir* as *package* (no ``sys.path`` change)."""
    if package in sys.modules:
        raise BaselineError(f"a package named {package} is already imported")
    spec = importlib.util.spec_from_file_location(
        package, package_dir / "__init__.py", submodule_search_locations=[str(package_dir)]
    )
    if spec is None or spec.loader is None:
        raise BaselineError(f"cannot load {package_dir}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[package] = module
    try:
        spec.loader.exec_module(module)
        shm = importlib.import_module(f"{package}.shm")
    except Exception as exc:
        raise BaselineError(f"the baseline does not import: {type(exc).__name__}: {exc}") from exc
    if not hasattr(shm, "ShmBus"):
        raise BaselineError("the baseline has no shmbus.shm.ShmBus")
    root = package_dir.resolve()
    for name, loaded in list(sys.modules.items()):
        if name.partition(".")[0] != package:
            continue
        file = getattr(loaded, "__file__", None)
        if file is not None and not Path(file).resolve().is_relative_to(root):
            raise BaselineError(f"baseline module {name} was imported from {file}")
    return module


def bus_class(module: ModuleType) -> type:
    """The old copy's ``ShmBus``."""
    shm = sys.modules[f"{module.__name__}.shm"]
    cls: type = shm.ShmBus
    return cls
