"""iceoryx2: zero-copy shared-memory publish/subscribe, through its Python bindings.

Each run gets an iceoryx2 world of its own: every child builds its node from
a config whose file prefix (``iox2-bench-<pid>-<run>_``) and root directory
(under the benchmark's private temporary directory) are unique to the run, so
runs back to back share nothing, and :meth:`IceoryxDriver.release` can remove
whatever a child left (a killed child runs no destructor) by that prefix
alone.

Two services of one name carry a run:

* publish-subscribe with a payload of ``Slice[c_uint8]``: one sample is one
  event, ``<topic length: 1 byte><topic><shmbus envelope>``; the subscriber
  copies it out, releases the sample, filters on the topic with the shmbus
  matcher and decodes the envelope into a :class:`shmbus.Event`, as the
  queue peers do. Samples are sized for the run's envelopes (the slice
  length grows in powers of two should one be larger); a subscriber's
  buffer holds 1024 samples, fewer for large events so that it stays within
  faster-fifo's 16 MiB (at least 16).
* event: the publisher's notifier wakes the subscribers' listeners after
  every sample; a subscriber takes every sample there is, then sleeps in
  ``Listener.blocking_wait()`` (iceoryx2's blocking receive for one service;
  a WaitSet is its multiplexer for many). A notification that lands between
  the last ``receive()`` and the wait is kept, so no wake-up is lost.

Like the queues, iceoryx2 is run lossless: no safe overflow, and a publisher
facing a full subscriber buffer retries until delivered. Each publisher ends
its stream with an empty sample; a subscriber is done when it has one from
every publisher. ``SIGUSR1`` at the drain deadline interrupts the wait
(iceoryx2 reports the interrupted wait as an error, which the loop ignores,
so Python's handler ends the run). iceoryx2's own handling of SIGINT and
SIGTERM is off: the children keep the harness's.
"""

from __future__ import annotations

import ctypes
import importlib
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from shmbus.codec import decode_envelope, encode_envelope

from ...children import BlockingLink
from ..harness import blocking_publisher, blocking_subscriber
from ..spec import RunSpec
from ..workload import EVENT_TYPE, MAX_EVENT_SIZE, TOPICS, Recorder, envelope_size, make_matcher
from . import Driver

__all__ = ["DRIVERS", "IceoryxDriver"]

#: Bytes a subscriber's buffer may hold (faster-fifo's queue), and its
#: bounds in samples.
BUFFER_BYTES: Final = 16 * 1024 * 1024
MIN_BUFFER: Final = 16
MAX_BUFFER: Final = 1024
#: Slack over the sampled envelope: its integers vary in width with ``seq``.
SLICE_SLACK: Final = 64
#: How long a child retries opening a service another child is creating.
OPEN_TIMEOUT: Final = 5.0
_SERVICE: Final = "shmbus/bench"
_SHM_DIR: Final = "/dev/shm"


def _iceoryx2() -> Any:
    """The iceoryx2 module (it has no type information: Any from here on)."""
    return importlib.import_module("iceoryx2")


@dataclass(frozen=True)
class _Run:
    """What the parent hands the children of one run."""

    prefix: str
    root: str
    slice_len: int
    buffer: int


class _Endpoint:
    """One child's node and the run's two services, released in :meth:`close`."""

    def __init__(self, run: _Run, spec: RunSpec) -> None:
        ice = _iceoryx2()
        self.ice = ice
        # Its warnings (no config file: the defaults) are noise in the
        # progress output; IOX2_LOG_LEVEL still overrides.
        ice.set_log_level_from_env_or(ice.LogLevel.Error)
        config = ice.config.default()
        config.global_cfg.prefix = ice.FileName.new(run.prefix)
        config.global_cfg.root_path = ice.Path.new(run.root)
        self.node: Any = (
            ice.NodeBuilder.new()
            .config(config)
            .signal_handling_mode(ice.SignalHandlingMode.Disabled)
            .create(ice.ServiceType.Ipc)
        )
        name = ice.ServiceName.new(_SERVICE)
        payload = ice.Slice[ctypes.c_uint8]
        self.pubsub: Any = self._open(
            lambda: (
                self.node.service_builder(name)
                .publish_subscribe(payload)
                .max_publishers(spec.publishers)
                .max_subscribers(spec.subscribers)
                .subscriber_max_buffer_size(run.buffer)
                .history_size(0)
                .enable_safe_overflow(False)
                .open_or_create()
            )
        )
        self.event: Any = self._open(
            lambda: (
                self.node.service_builder(name)
                .event()
                .max_notifiers(spec.publishers)
                .max_listeners(spec.subscribers)
                .open_or_create()
            )
        )
        self.ports: list[Any] = []

    @staticmethod
    def _open(attempt: Callable[[], Any]) -> Any:
        # Children start together: one may find the service half created by
        # another and fail; the creator finishes within iceoryx2's creation
        # timeout.
        deadline = time.monotonic() + OPEN_TIMEOUT
        while True:
            try:
                return attempt()
            except Exception:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.01)

    def port(self, port: Any) -> Any:
        self.ports.append(port)
        return port

    def close(self) -> None:
        # Ports before services before the node, so the last one out removes
        # the service's files.
        for port in reversed(self.ports):
            port.delete()
        self.ports.clear()
        self.pubsub = self.event = self.node = None


class IceoryxDriver(Driver):
    name = "ice"
    blocking_subscriber = True

    @classmethod
    def unavailable(cls) -> str | None:
        try:
            _iceoryx2()
        except ImportError:
            return "Python package iceoryx2 is not installed (pip install 'shmbus[bench]')"
        return None

    def prepare(self, spec: RunSpec) -> _Run:
        slice_len = 1 + max(map(len, TOPICS)) + envelope_size(spec.blob_size) + SLICE_SLACK
        return _Run(
            prefix=f"iox2-bench-{os.getpid()}-{spec.run_id}_",
            root=os.path.join(self.env.tmpdir, f"iceoryx2-{spec.run_id}") + "/",
            slice_len=slice_len,
            buffer=max(MIN_BUFFER, min(MAX_BUFFER, BUFFER_BYTES // slice_len)),
        )

    def release(self, spec: RunSpec, resources: Any) -> None:
        run: _Run = resources
        for name in os.listdir(_SHM_DIR):
            if name.startswith(run.prefix):
                try:
                    os.unlink(os.path.join(_SHM_DIR, name))
                except FileNotFoundError:
                    pass
        shutil.rmtree(run.root, ignore_errors=True)

    def publisher(self, link: BlockingLink, spec: RunSpec, resources: Any, index: int) -> None:
        run: _Run = resources
        end = _Endpoint(run, spec)
        try:
            ice = end.ice
            publisher = end.port(
                end.pubsub.publisher_builder()
                .initial_max_slice_len(run.slice_len)
                .allocation_strategy(ice.AllocationStrategy.PowerOfTwo)
                .backpressure_strategy(ice.BackpressureStrategy.RetryUntilDelivered)
                .create()
            )
            notifier = end.port(end.event.notifier_builder().create())
            loan, notify, memmove = publisher.loan_slice_uninit, notifier.notify, ctypes.memmove

            def put(frame: bytes) -> None:
                sample = loan(len(frame))
                memmove(sample.payload_ptr, frame, len(frame))
                sample.assume_init().send()
                notify()

            def send(topic: str, payload: dict[str, Any]) -> None:
                head = topic.encode()
                body = encode_envelope(topic, payload, EVENT_TYPE, MAX_EVENT_SIZE)
                put(bytes((len(head),)) + head + body)

            def end_of_stream() -> None:
                put(b"")

            blocking_publisher(link, spec, send, after=end_of_stream)
        finally:
            end.close()

    def subscriber(self, link: BlockingLink, spec: RunSpec, resources: Any, index: int) -> None:
        run: _Run = resources
        end = _Endpoint(run, spec)
        try:
            subscriber = end.port(end.pubsub.subscriber_builder().buffer_size(run.buffer).create())
            listener = end.port(end.event.listener_builder().create())
            consume = _receive_loop(end.ice, subscriber, listener, spec.publishers)
            blocking_subscriber(link, spec, consume)
        finally:
            end.close()


def _receive_loop(
    ice: Any, subscriber: Any, listener: Any, publishers: int
) -> Callable[[Recorder], None]:
    matcher = make_matcher()
    wait_error = ice.ListenerWaitError

    def consume(record: Recorder) -> None:
        receive, wait, string_at = subscriber.receive, listener.blocking_wait, ctypes.string_at
        ends = 0
        while True:
            sample = receive()
            if sample is None:
                try:
                    wait()
                except wait_error as exc:
                    # A signal cut the wait short; its Python handler (the
                    # drain deadline's) runs next.
                    if str(exc) != "InterruptSignal":
                        raise
                continue
            frame = string_at(sample.payload_ptr, sample.header.number_of_elements)
            sample.delete()
            if not frame:
                ends += 1
                if ends == publishers:
                    return
                continue
            cut = 1 + frame[0]
            topic = frame[1:cut].decode()
            if matcher(topic):
                record(decode_envelope(topic, memoryview(frame)[cut:], MAX_EVENT_SIZE))

    return consume


DRIVERS: dict[str, type[Driver]] = {"ice": IceoryxDriver}
