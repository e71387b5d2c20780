"""Running the benchmark: one run at a time, every child accounted for.

Owns
----
* :func:`execute`: one :class:`~shmbus_tools.bench.spec.RunSpec` from start to end.
  Subscribers start first and report ready (connected and subscribed), then
  the publishers; all are told "start"; once every publisher reported, the
  subscribers are told how many events were published and drain until they
  have them or the drain deadline passes. Every phase has a deadline, so a run
  is bounded in time whatever a peer does. Whatever happens, every child is
  stopped and joined and the peer's per-run resources released (``finally``).

  The children are forked (:class:`shmbus_tools.children.Child`, so they
  start as warm as this process) and speak over their link::

      child  -> parent   "ready"                 set up: connected, subscribed
      parent -> child    "start"                 begin publishing / measuring
      child  -> parent   ("final", {...})        the child's figures
      parent -> sub      ("drain", {"expected": n, "deadline": t})
      parent -> child    "stop"                  clean up and exit
      child  -> parent   ("error", {...})        it failed (the harness's report)
      child  -> parent   ("unsupported", {"reason": r})   in place of "ready":
                                                 the peer cannot do what the run
                                                 needs; the run is skipped

  Q1 runs the driver's queue-group workers as subscribers; R1 its
  responder as the subscriber and its requester as the publisher. A run a
  child declared unsupported has status "skipped" and the child's reason.

  A child whose parent's end closes behaves as if told to stop; the loops of
  the child side are :mod:`shmbus_tools.bench.harness`'s.
* :func:`derive_metrics`: the figures of a run from its children's reports.
* :class:`Bench`: the whole benchmark: which peers can run here (and why not),
  their servers (started once, stopped in ``finally``), the ``--baseline``
  revision's export (made once, removed in ``finally``), the plan in its
  round-robin order, Z1's rate taken from T1's median, progress reporting.

Definitions (every peer alike)
------------------------------
* published/s: events published / the publishers' time from their first
  publish to their last (flush included where the client buffers).
* delivered/s: events received by all subscribers / the time from the first
  publish to the last event received (so a subscriber that lags is measured
  by when it really caught up).
* loss %: share of the events each subscriber should have received that it
  did not receive by the end of the run (dropped by the transport, or still
  in flight when the drain deadline passed).
* subscriber CPU: user + system CPU of the subscriber processes (every
  thread) from "start" to the end of the drain, per million events delivered.
* latency: from the ``monotonic_ns`` stamp taken when the payload is built,
  right before the publish call, to the event in hand in the subscriber.
* Q1 (queue group): every event should reach exactly one worker, so loss is
  the share of published events no worker received; *spread* is the fewest
  events one worker received over the most.
* R1 (request/reply): round trip from the stamp taken when the request's
  payload is built, right before the request call, to its reply in hand in
  the requester; requests/s = measured requests / the time from the first
  to the last reply; loss = requests without a reply in time.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, Final

from ..children import BlockingLink, Child, ChildFailed, stop_all, wait_all
from ..servers import NatsServer, RedisServer
from .baseline import Baseline, BaselineError, exported, is_baseline
from .harness import UNSUPPORTED
from .peers import Driver, Env, driver_class
from .progress import Progress
from .spec import PEERS, ZERO_LOSS_FRACTION, RunSpec, Settings, plan
from .workload import cdf_points, envelope_size, median, quantile

__all__ = ["Bench", "BenchOutcome", "RunResult", "derive_metrics", "execute"]

log = logging.getLogger("shmbus_tools.bench")

_READY_TIMEOUT: Final = 30.0
#: Beyond its duration, how long a publisher may take to report.
_PUBLISH_SLACK: Final = 20.0
#: Beyond the drain deadline, how long a subscriber may take to report.
_REPORT_SLACK: Final = 5.0
#: How long children get to exit after "stop", then after SIGTERM.
_STOP_GRACE: Final = 2.0


@dataclass
class RunResult:
    """One run's outcome."""

    spec: RunSpec
    status: str  # "ok", "failed" or "skipped"
    error: str | None = None
    #: Why a skipped run was skipped (its child's words).
    skip_reason: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    publishers: list[dict[str, Any]] = field(default_factory=list)
    subscribers: list[dict[str, Any]] = field(default_factory=list)
    #: Pooled one-way latencies in ns, sorted (latency runs; not in results.json).
    samples: list[int] = field(default_factory=list)
    wall_s: float = 0.0
    started_at: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def failed(self) -> bool:
        return self.status == "failed"

    def to_json(self) -> dict[str, Any]:
        spec = dataclasses.asdict(self.spec)
        return {
            "scenario": spec.pop("scenario"),
            "variant": spec.pop("variant"),
            "peer": spec.pop("peer"),
            "rep": spec.pop("rep"),
            "status": self.status,
            "error": self.error,
            "skip_reason": self.skip_reason,
            "started_at": round(self.started_at, 3),
            "wall_s": round(self.wall_s, 3),
            "spec": spec,
            "metrics": self.metrics,
            "publishers": self.publishers,
            "subscribers": self.subscribers,
            "latency_cdf_us": (
                [[q, round(v / 1000, 2)] for q, v in cdf_points(self.samples)]
                if self.samples
                else None
            ),
        }


# ─── One run ─────────────────────────────────────────────────────────────────


def execute(spec: RunSpec, driver: Driver) -> RunResult:
    """Run *spec* with *driver*; never raises for a failing run (except Ctrl-C)."""
    result = RunResult(spec=spec, status="failed", started_at=time.time())
    began = time.monotonic()
    resources = driver.prepare(spec)
    subs: list[Child] = []
    pubs: list[Child] = []

    if spec.requests is not None:
        sub_method, pub_method = driver.responder, driver.requester
    elif spec.queue is not None:
        sub_method, pub_method = driver.group_member, driver.publisher
    else:
        sub_method, pub_method = driver.subscriber, driver.publisher

    def start(role: str, method: Callable[[BlockingLink, RunSpec, Any, int], None]) -> None:
        group = subs if role == "sub" else pubs
        for i in range(spec.subscribers if role == "sub" else spec.publishers):
            child = Child(
                _target(method, spec, resources, i),
                name=f"{spec.describe()} {role}{i}",
                method="fork",
            )
            group.append(child)
            child.start()
        wait_all(group, _said("ready", UNSUPPORTED), time.monotonic() + _READY_TIMEOUT, "ready")

    try:
        start("sub", sub_method)
        reason = _unsupported(subs)
        if reason is None:
            start("pub", pub_method)
            reason = _unsupported(pubs)
        if reason is not None:
            result.status, result.skip_reason = "skipped", reason
            log.info("run %s skipped: %s", spec.describe(), reason)
            return result
        for child in (*subs, *pubs):
            child.send("start")
        wait_all(pubs, _said("final"), time.monotonic() + spec.duration + _PUBLISH_SLACK, "figures")
        pub_finals: list[dict[str, Any]] = [c.latest["final"] for c in pubs]
        expected = sum(int(final["published"]) for final in pub_finals)
        drain_deadline = time.monotonic() + spec.drain_s
        for child in subs:
            child.send(("drain", {"expected": expected, "deadline": drain_deadline}))

        def expire() -> float | None:
            if not driver.blocking_subscriber:
                return None
            for child in subs:
                if "final" not in child.latest:
                    child.signal(signal.SIGUSR1)
            return time.monotonic() + _REPORT_SLACK

        wait_all(
            subs,
            _said("final"),
            drain_deadline + (0.1 if driver.blocking_subscriber else _REPORT_SLACK),
            "figures",
            on_deadline=expire,
        )
        sub_finals: list[dict[str, Any]] = [c.latest["final"] for c in subs]
        samples: list[int] = []
        for final in [*sub_finals, *pub_finals]:  # R1's requester keeps round trips
            samples.extend(final.pop("samples", []))
        samples.sort()
        result.samples = samples
        result.publishers = pub_finals
        result.subscribers = sub_finals
        result.metrics = derive_metrics(spec, pub_finals, sub_finals, samples)
        result.status = "ok"
    except ChildFailed as exc:
        result.error = exc.summary
        log.info("run %s failed: %s", spec.describe(), exc.summary)
    finally:
        stop_all([*pubs, *subs], _STOP_GRACE)
        try:
            driver.release(spec, resources)
        except Exception:
            log.warning("releasing the resources of %s failed", spec.describe(), exc_info=True)
        result.wall_s = time.monotonic() - began
    return result


def _target(
    method: Callable[[BlockingLink, RunSpec, Any, int], None],
    spec: RunSpec,
    resources: Any,
    index: int,
) -> Callable[[BlockingLink], None]:
    def run(link: BlockingLink) -> None:
        method(link, spec, resources, index)

    return run


def _said(*kinds: str) -> Callable[[Child], bool]:
    """Whether a child has sent a message of one of *kinds*."""
    return lambda child: any(kind in child.latest for kind in kinds)


def _unsupported(children: list[Child]) -> str | None:
    """The reason the first child that declared the run unsupported gave."""
    for child in children:
        if UNSUPPORTED in child.latest:
            return str(child.latest[UNSUPPORTED].get("reason") or "unsupported")
    return None


def derive_metrics(
    spec: RunSpec,
    publishers: list[dict[str, Any]],
    subscribers: list[dict[str, Any]],
    samples: list[int],
) -> dict[str, Any]:
    """The figures of one run (see the module docstring for definitions)."""
    published = sum(int(p["published"]) for p in publishers)
    start_ns = min(int(p["start_ns"]) for p in publishers)
    end_ns = max(int(p["end_ns"]) for p in publishers)
    publish_s = max((end_ns - start_ns) / 1e9, 1e-9)
    metrics: dict[str, Any] = {
        "published": published,
        "publish_errors": sum(int(p.get("errors", 0)) for p in publishers),
        "publish_s": round(publish_s, 6),
        "published_per_s": published / publish_s,
        "publisher_cpu_s": sum(float(p["cpu_s"]) for p in publishers),
    }
    if spec.is_call:
        metrics["us_per_call"] = publish_s * 1e6 / published if published else None
        metrics["calls_per_s"] = published / publish_s
        return metrics
    if spec.requests is not None:
        return metrics | _request_metrics(publishers, subscribers, samples)
    received = sum(int(s["received"]) for s in subscribers)
    # A queue group's members share the events: each should reach one of them.
    should = published * (1 if spec.queue is not None else len(subscribers))
    last_ns = max((int(s["last_ns"]) for s in subscribers if s["received"]), default=0)
    window_s = (last_ns - start_ns) / 1e9 if received else 0.0
    dropped = [s["dropped"] for s in subscribers if s.get("dropped") is not None]
    cpu_s = sum(float(s["cpu_s"]) for s in subscribers)
    metrics.update(
        {
            "subscribers": len(subscribers),
            "received": received,
            "should_receive": should,
            "delivered_per_s": received / window_s if window_s > 0 else 0.0,
            "loss_pct": 100.0 * (should - received) / should if should else None,
            "dropped_counted": sum(int(d) for d in dropped) if dropped else None,
            "subscriber_cpu_s": cpu_s,
            "sub_cpu_s_per_million": cpu_s / received * 1e6 if received else None,
            "ends": sorted({str(s.get("end")) for s in subscribers}),
        }
    )
    if spec.queue is not None:
        shares = [int(s["received"]) for s in subscribers]
        fewest, most = min(shares, default=0), max(shares, default=0)
        metrics.update(worker_min=fewest, worker_max=most, spread=fewest / most if most else None)
    if spec.blob_size is not None:
        size = envelope_size(spec.blob_size)
        metrics["envelope_bytes"] = size
        metrics["mb_per_s"] = metrics["delivered_per_s"] * size / 1e6
    if spec.latency or samples:
        metrics.update(_quantiles_us(samples))
    if spec.rate is not None:
        metrics["target_rate"] = spec.rate
    return metrics


def _request_metrics(
    requesters: list[dict[str, Any]], responders: list[dict[str, Any]], samples: list[int]
) -> dict[str, Any]:
    """R1's figures: the round trips, the requests answered and timed out."""
    requests = sum(int(p["published"]) for p in requesters)
    answered = sum(int(p.get("answered", 0)) for p in requesters)
    metrics: dict[str, Any] = {
        "requests": requests,
        "answered": answered,
        "timeouts": sum(int(p.get("errors", 0)) for p in requesters),
        "wrong_replies": sum(int(p.get("wrong_replies", 0)) for p in requesters),
        "loss_pct": 100.0 * (requests - answered) / requests if requests else None,
        "responder_cpu_s": sum(float(s["cpu_s"]) for s in responders),
        "ends": sorted({str(s.get("end")) for s in responders}),
    }
    return metrics | _quantiles_us(samples)


def _quantiles_us(samples: list[int]) -> dict[str, Any]:
    """p50 … max of sorted ns *samples*, in µs, and their number."""
    figures: dict[str, Any] = {}
    for name, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("p999", 0.999), ("max", 1.0)):
        value = quantile(samples, q)
        figures[f"{name}_us"] = round(value / 1000, 2) if value is not None else None
    figures["samples"] = len(samples)
    return figures


# ─── The whole benchmark ─────────────────────────────────────────────────────


@dataclass
class BenchOutcome:
    results: list[RunResult]
    #: Peers that could not run here, with the reason.
    skipped: dict[str, str]
    #: Server versions, for the report.
    versions: dict[str, str]
    started_at: float
    elapsed_s: float
    #: Z1's calibration: T1 capacity and the paced rate used.
    zero_loss: dict[str, float]
    #: ``--baseline``: the revision measured as peer ``shm@<short>``.
    baseline: Baseline | None = None


class Bench:
    """The benchmark of *scenarios* over *peers* with *settings*."""

    def __init__(
        self,
        settings: Settings,
        scenarios: list[str],
        peers: list[str],
        progress: Progress,
        baseline: Baseline | None = None,
    ) -> None:
        self.settings = settings
        self.scenarios = scenarios
        self.peers = peers
        self.progress = progress
        self.baseline = baseline

    def run(self) -> BenchOutcome:
        started_at, began = time.time(), time.monotonic()
        skipped: dict[str, str] = {}
        versions: dict[str, str] = {}
        results: list[RunResult] = []
        zero_loss: dict[str, float] = {}
        with ExitStack() as stack:
            tmpdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="shmbus-bench-"))
            env = Env(tmpdir=tmpdir)
            reasons: dict[str, str] = {}
            if self.baseline is not None:
                try:
                    env.baseline = stack.enter_context(exported(self.baseline))
                except BaselineError as exc:
                    reasons[self.baseline.peer] = str(exc)
            drivers: dict[str, Driver] = {}
            for name in [*self.peers, "shmll", "shmuv", "shmsync", "fifo", "sem", "loop"]:
                reason = reasons.get(name) or _unavailable(name)
                if reason is None:
                    server = driver_class(name).server
                    reason = self._start_server(server, env, stack, versions)
                if reason is not None:
                    if name in PEERS or is_baseline(name):
                        skipped[name] = reason
                    log.warning("peer %s skipped: %s", name, reason)
                    continue
                drivers[name] = driver_class(name)(env)
            peers = [name for name in self.peers if name in drivers]
            runs, zero_loss_runs = plan(self.settings, self.scenarios, peers)
            calibration = [
                dataclasses.replace(spec, scenario="T1")
                for spec in zero_loss_runs
                if "T1" not in self.scenarios
            ]
            self.progress.begin([spec.duration for spec in [*runs, *calibration, *zero_loss_runs]])
            for spec in [*runs, *calibration]:
                results.append(self._one(spec, drivers[spec.peer]))
            if zero_loss_runs:
                capacity = median(
                    [
                        r.metrics.get("delivered_per_s")
                        for r in results
                        if r.ok and r.spec.scenario == "T1" and r.spec.peer == "shm"
                    ]
                )
                if capacity:
                    rate = ZERO_LOSS_FRACTION * capacity
                    zero_loss = {"t1_delivered_per_s": capacity, "paced_rate": rate}
                    for spec in zero_loss_runs:
                        paced = dataclasses.replace(
                            spec, rate=rate, notes={"t1_delivered_per_s": capacity}
                        )
                        results.append(self._one(paced, drivers["shm"]))
                else:
                    log.warning("Z1 skipped: no successful shmbus T1 run to calibrate it")
            self.progress.end()
        return BenchOutcome(
            results=results,
            skipped=skipped,
            versions=versions,
            started_at=started_at,
            elapsed_s=time.monotonic() - began,
            zero_loss=zero_loss,
            baseline=self.baseline,
        )

    def _one(self, spec: RunSpec, driver: Driver) -> RunResult:
        spec = dataclasses.replace(spec, run_id=self.progress.done + 1)
        self.progress.run_started(spec)
        result = execute(spec, driver)
        self.progress.run_finished(result.wall_s, spec.duration, result.error)
        if result.skip_reason is not None:
            self.progress.note(f"{spec.describe()} skipped: {result.skip_reason}")
        return result

    def _start_server(
        self, server: str | None, env: Env, stack: ExitStack, versions: dict[str, str]
    ) -> str | None:
        if server is None:
            return None
        try:
            if server == "nats" and env.nats_url is None:
                nats = stack.enter_context(NatsServer(env.tmpdir))
                env.nats_url = nats.url
                versions["nats-server"] = nats.version
            elif server == "redis" and env.redis_url is None:
                redis = stack.enter_context(RedisServer(env.tmpdir))
                env.redis_url = redis.url
                versions["redis-server"] = redis.version
        except Exception as exc:
            return f"{server} server did not start: {exc}"
        return None


def _unavailable(name: str) -> str | None:
    try:
        cls = driver_class(name)
    except ImportError as exc:
        return f"Python package {exc.name or exc} is not installed (pip install 'shmbus[bench]')"
    return cls.unavailable()
