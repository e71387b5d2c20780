"""The benchmark's workload and the per-event bookkeeping every peer shares.

Owns
----
* The topics (``decky.<id>.traffic`` over :data:`DECKY_IDS` ids), the
  subscription pattern, and the two payload shapes: the 9-field traffic record
  (about 230 bytes as a msgpack envelope) and the sized blob of the S1 sweep.
  Every payload is stamped with ``time.monotonic_ns()`` when it is built, right
  before it is published (one clock for every process of a host).
* :class:`Recorder`: what a subscriber counts per event (count, first and last
  arrival, one-way latency samples when asked), identical for every peer so
  the per-event work on the receiving side is the same.
* Small statistics helpers (quantiles, medians, downsampled CDFs).

Invariants
----------
* Peers that do not carry shmbus events natively put the same msgpack envelope
  on their wire (:func:`shmbus.codec.encode_envelope`) and rebuild the same
  frozen :class:`shmbus.Event` on receipt (:func:`shmbus.codec.decode_envelope`),
  so every subscriber ends with the object a shmbus subscriber gets.
"""

from __future__ import annotations

import math
import resource
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any, Final

from shmbus._core.layout import DEFAULT_MAX_EVENT_SIZE
from shmbus.codec import encode_envelope
from shmbus.contract import TopicMatcher

__all__ = [
    "DECKY_IDS",
    "EVENT_TYPE",
    "MAX_EVENT_SIZE",
    "PATTERN",
    "TOPICS",
    "ZMQ_PREFIX",
    "PayloadFactory",
    "Recorder",
    "blob_payloads",
    "cdf_points",
    "cpu_seconds",
    "envelope_size",
    "make_matcher",
    "median",
    "payload_factory",
    "quantile",
    "traffic_payloads",
]

DECKY_IDS: Final = 64
TOPICS: Final = tuple(f"decky.{i}.traffic" for i in range(DECKY_IDS))
PATTERN: Final = "decky.*.traffic"
#: Prefix a ZeroMQ SUB socket filters on; the rest of the pattern is matched
#: in Python, as shmbus's reader does.
ZMQ_PREFIX: Final = b"decky."
EVENT_TYPE: Final = "traffic.flow"
#: Envelope limit used by every peer's encoder and decoder (shmbus's default).
MAX_EVENT_SIZE: Final = DEFAULT_MAX_EVENT_SIZE

_SOURCES: Final = tuple(f"10.7.{i // 250}.{i % 250 + 1}" for i in range(DECKY_IDS))

#: Builds event number ``seq``: returns (topic, payload), stamped now.
PayloadFactory = Callable[[int], tuple[str, dict[str, Any]]]


def traffic_payloads() -> PayloadFactory:
    """The standard workload: 9 fields, ~230 bytes as an envelope."""
    topics = TOPICS
    sources = _SOURCES
    mono_ns = time.monotonic_ns

    def make(seq: int) -> tuple[str, dict[str, Any]]:
        i = seq & 63
        return topics[i], {
            "decky_id": i,
            "seq": seq,
            "t_ns": mono_ns(),
            "src_addr": sources[i],
            "dst_addr": "198.51.100.254",
            "src_port": 32768 + (seq & 0x3FFF),
            "dst_port": 443,
            "protocol": "tcp",
            "byte_count": 64 + (seq * 37) % 1400,
        }

    return make


def blob_payloads(size: int) -> PayloadFactory:
    """The S1 workload: ``seq``, ``t_ns`` and a *size*-byte binary blob."""
    topics = TOPICS
    mono_ns = time.monotonic_ns
    blob = bytes(range(256)) * (size // 256) + bytes(size % 256)

    def make(seq: int) -> tuple[str, dict[str, Any]]:
        return topics[seq & 63], {"seq": seq, "t_ns": mono_ns(), "blob": blob}

    return make


def payload_factory(blob_size: int | None) -> PayloadFactory:
    """The factory for a run: the traffic record, or a blob of *blob_size* bytes."""
    return traffic_payloads() if blob_size is None else blob_payloads(blob_size)


def envelope_size(blob_size: int | None) -> int:
    """Bytes of one envelope of the workload (as every peer puts it on its wire)."""
    topic, payload = payload_factory(blob_size)(12345)
    return len(encode_envelope(topic, payload, EVENT_TYPE, MAX_EVENT_SIZE))


def make_matcher() -> Callable[[str], bool]:
    """The matcher a subscriber of a peer without wildcards applies: the
    same compiled, per-topic-cached matcher shmbus's reader routes with."""
    return TopicMatcher(PATTERN)


def cpu_seconds() -> float:
    """CPU time of this process, every thread, user + system."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Recorder:
    """A subscriber's bookkeeping: called once per event it gets in hand."""

    __slots__ = ("count", "first_ns", "last_ns", "samples", "end_note", "_latency")

    def __init__(self, *, latency: bool) -> None:
        self.count = 0
        self.first_ns = 0
        self.last_ns = 0
        self.samples: list[int] = []
        #: Set by a receive loop that ended early (e.g. the server hung up).
        self.end_note: str | None = None
        self._latency = latency

    def __call__(self, event: Any) -> None:
        """Record *event* (a :class:`shmbus.Event`)."""
        now = time.monotonic_ns()
        if not self.count:
            self.first_ns = now
        self.count += 1
        self.last_ns = now
        if self._latency:
            self.samples.append(now - event.payload["t_ns"])

    def stamped(self, now: int, stamp: int) -> None:
        """Record an arrival at *now* of something stamped *stamp* (no event)."""
        if not self.count:
            self.first_ns = now
        self.count += 1
        self.last_ns = now
        if self._latency:
            self.samples.append(now - stamp)


# ─── Statistics ─────────────────────────────────────────────────────────────


def quantile(sorted_values: Sequence[float], q: float) -> float | None:
    """The *q* quantile (nearest rank) of already sorted values; None if empty."""
    if not sorted_values:
        return None
    index = min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))
    return sorted_values[index]


def median(values: Sequence[float | None]) -> float | None:
    """Median of the values that are not None; None if there are none."""
    present = [value for value in values if value is not None]
    return statistics.median(present) if present else None


#: Quantiles kept per latency run: dense in the body, denser in the tail.
CDF_QUANTILES: Final = tuple([i / 100 for i in range(1, 100)] + [0.995, 0.999, 0.9995, 0.9999, 1.0])


def cdf_points(sorted_values: Sequence[float]) -> list[list[float]]:
    """``[[q, value], ...]`` at :data:`CDF_QUANTILES` (for results.json)."""
    points: list[list[float]] = []
    for q in CDF_QUANTILES:
        value = quantile(sorted_values, q)
        if value is not None:
            points.append([q, value])
    return points
