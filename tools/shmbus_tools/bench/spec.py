"""What the benchmark runs: scenarios, peers, modes and one run's specification.

Owns
----
* :data:`SCENARIOS` and :data:`PEERS`: the names accepted by ``--scenarios``
  and ``--peers``, with the words the report uses for them; :func:`peer_info`
  also knows the reference rows and ``--baseline``'s ``shm@<rev>`` peers.
* :class:`Settings`: run lengths, repetitions and sweeps of a mode (full,
  ``--quick``, ``--smoke``).
* :class:`RunSpec`: everything a child process needs to know about the run it
  takes part in. A spec is plain data, handed to children across ``fork()``.
* :func:`plan`: the ordered list of runs. Repetitions are the outer loop and
  peers the inner one, so the peers of one scenario run back to back,
  round-robin, and machine noise hits them alike.
* The shapes of the two scenarios of queue groups and request/reply, run by
  the peers of :data:`SCENARIO_PEERS` only: Q1, one publisher flooding
  :data:`QUEUE_WORKERS` subscribers that are members of one queue group
  (:data:`QUEUE_GROUP`), so each event goes to exactly one of them; R1, one
  requester sending :attr:`Settings.requests` requests one after the other
  (after :data:`REQUEST_WARMUP` unmeasured ones) to one responder, bounded
  in time by the run's duration.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Final

from shmbus._checks import check_int

from .baseline import is_baseline, package_name

__all__ = [
    "FANIN_PUBLISHERS",
    "LATENCY_RATE",
    "PEERS",
    "QUEUE_GROUP",
    "QUEUE_WORKERS",
    "REFERENCE_PEERS",
    "REQUEST_TIMEOUT",
    "REQUEST_WARMUP",
    "SCENARIOS",
    "SCENARIO_PEERS",
    "ZERO_LOSS_FRACTION",
    "PeerInfo",
    "RunSpec",
    "Settings",
    "p1_variants",
    "peer_info",
    "plan",
    "settings_for",
]

#: Events/s of the latency scenario.
LATENCY_RATE: Final = 2000.0
FANIN_PUBLISHERS: Final = 4
#: Z1 paces the shmbus publisher at this fraction of T1's delivered/s.
ZERO_LOSS_FRACTION: Final = 0.8
#: Q1: worker processes in the queue group, and the group's name.
QUEUE_WORKERS: Final = 4
QUEUE_GROUP: Final = "workers"
#: R1: requests sent (and answered) before the measured ones, so connections,
#: inboxes and code paths are warm; and how long one request waits for its
#: reply before it counts as timed out.
REQUEST_WARMUP: Final = 200
REQUEST_TIMEOUT: Final = 2.0

#: Scenario name -> one-line description (the report's section titles).
SCENARIOS: Final = {
    "T1": "throughput, one publisher → one subscriber process",
    "T2": "fan-out, one publisher → N subscriber processes",
    "T3": f"fan-in, {FANIN_PUBLISHERS} publisher processes → one subscriber process",
    "L1": f"one-way latency at a paced {LATENCY_RATE:,.0f} events/s",
    "S1": "event size sweep (MB/s delivered)",
    "P1": "cost of one publish call in a tight loop",
    "Z1": f"zero loss when paced at {ZERO_LOSS_FRACTION:.0%} of the subscriber's capacity",
    "Q1": f"queue group, one publisher → {QUEUE_WORKERS} worker processes in one group",
    "R1": "request/reply round trip, one requester process → one responder process",
}

#: Scenarios only some peers run (the others have no such pattern): their peers.
SCENARIO_PEERS: Final = {
    "Q1": ("shm", "nats", "zmq"),
    "R1": ("shm", "nats", "zmq"),
}


@dataclass(frozen=True)
class PeerInfo:
    """How the report names a peer and the API style it is driven through."""

    label: str
    publisher_api: str
    subscriber_api: str
    what: str

    @property
    def api(self) -> str:
        if self.publisher_api == self.subscriber_api:
            return self.publisher_api
        return f"{self.publisher_api} pub / {self.subscriber_api} sub"


PEERS: Final = {
    "shm": PeerInfo(
        "shmbus",
        "asyncio",
        "asyncio",
        "shmbus.ShmBus, default settings (a 3 MiB ring per publisher, queue 1024); "
        "`await bus.publish()`, `async for event in sub`",
    ),
    "nats": PeerInfo(
        "NATS",
        "asyncio",
        "asyncio",
        "nats-server on 127.0.0.1 (TCP), nats-py client; native `decky.*.traffic` "
        "wildcard; `async for msg in sub.messages`",
    ),
    "zmq": PeerInfo(
        "ZeroMQ",
        "blocking",
        "asyncio",
        "pyzmq PUB (XPUB, to know when subscribers are connected) / zmq.asyncio SUB "
        "over ipc://, prefix filter `decky.` then the shmbus matcher",
    ),
    "mpq": PeerInfo(
        "multiprocessing.Queue",
        "blocking",
        "blocking",
        "one queue per subscriber, the publisher puts to each; `q.get()`; "
        "the subscriber filters with the shmbus matcher",
    ),
    "ff": PeerInfo(
        "faster-fifo",
        "blocking",
        "blocking",
        "faster_fifo.Queue (16 MiB) per subscriber, `put()` to each, `get_many()`; "
        "the subscriber filters with the shmbus matcher",
    ),
    "ice": PeerInfo(
        "iceoryx2",
        "blocking",
        "blocking",
        "iceoryx2 publish-subscribe (`Slice[c_uint8]` samples: topic + envelope) plus an "
        "event service: `loan_slice_uninit()`/`send()` then `notify()`; the subscriber "
        "drains `receive()` and sleeps in `Listener.blocking_wait()`, filters with the "
        "shmbus matcher",
    ),
    "redis": PeerInfo(
        "Redis",
        "asyncio",
        "asyncio",
        "redis-server on 127.0.0.1 (TCP), redis-py asyncio; `PUBLISH`, "
        "`PSUBSCRIBE decky.*.traffic`, `async for message in pubsub.listen()`",
    ),
}

#: Rows that are measured for reference, not peers one can choose.
REFERENCE_PEERS: Final = {
    "shmll": PeerInfo(
        "shmbus, low_latency=True (opt-in mode)",
        "asyncio",
        "asyncio",
        "as shmbus, but the subscriber's bus is `ShmBus(name, low_latency=True)`: its "
        "reader polls the ring for an adaptive window before it sleeps",
    ),
    "shmuv": PeerInfo(
        "shmbus on uvloop",
        "asyncio (uvloop)",
        "asyncio (uvloop)",
        "as shmbus, with publisher and subscriber on uvloop's event loop (`uvloop.run`); "
        "uvloop is an optional extra",
    ),
    "shmsync": PeerInfo(
        "shmbus, blocking subscription",
        "blocking",
        "blocking",
        "shmbus without asyncio on either side: `publish_nowait()` from a plain loop; "
        "`for event in bus.subscribe_sync(...)` in a process with no event loop (the "
        "consuming thread reads the rings and sleeps on its doorbell, a POSIX semaphore)",
    ),
    "sem": PeerInfo(
        "bare POSIX semaphore (reference)",
        "blocking",
        "blocking",
        "stamp in shared memory + sem_post; the receiver blocks in sem_wait, no asyncio, "
        "no envelope",
    ),
    "fifo": PeerInfo(
        "FIFO + add_reader, asyncio (reference)",
        "blocking",
        "asyncio",
        "shmbus's wake-up mechanism alone: stamp in shared memory + one byte to a named "
        "FIFO that the receiver's event loop watches (`add_reader`), handed to a coroutine "
        "through an `asyncio.Queue`; no ring, no envelope",
    ),
    "loop": PeerInfo(
        "loop overhead (reference)",
        "-",
        "-",
        "building the payload dict and its time stamp, no publish",
    ),
}


def baseline_info(peer: str) -> PeerInfo:
    """How the report names ``shm@<rev>``: shmbus as of that revision."""
    short = peer.partition("@")[2]
    return PeerInfo(
        f"shmbus@{short}",
        "asyncio",
        "asyncio",
        f"shmbus as of commit {short} (`--baseline`), exported with `git archive` and "
        f"imported as package `{package_name(short)}`; driven exactly as shmbus (same workers, "
        "default settings)",
    )


def peer_info(name: str) -> PeerInfo:
    """A peer's, reference row's or baseline's words."""
    if is_baseline(name):
        return baseline_info(name)
    return PEERS.get(name) or REFERENCE_PEERS[name]


PEER_ALIASES: Final = {
    "shmbus": "shm",
    "zeromq": "zmq",
    "mp": "mpq",
    "multiprocessing": "mpq",
    "faster-fifo": "ff",
    "faster_fifo": "ff",
    "iceoryx2": "ice",
    "iox2": "ice",
}


@dataclass(frozen=True)
class Settings:
    """Run lengths and sweeps of one mode."""

    mode: str
    reps: int
    throughput_s: float
    latency_s: float
    size_s: float
    call_s: float
    fanouts: tuple[int, ...]
    sizes: tuple[int, ...]
    #: Longest a subscriber may take, after the publishers finished, to drain.
    drain_s: float
    #: R1: requests measured per run, after :data:`REQUEST_WARMUP`.
    requests: int = 2000


_MODES: Final = {
    "full": Settings(
        mode="full",
        reps=3,
        throughput_s=3.0,
        latency_s=3.0,
        size_s=2.0,
        call_s=2.0,
        fanouts=(1, 2, 4, 8),
        sizes=(64, 1024, 16384, 65536, 262144),
        drain_s=5.0,
        requests=5000,
    ),
    "quick": Settings(
        mode="quick",
        reps=1,
        throughput_s=0.6,
        latency_s=1.5,
        size_s=0.4,
        call_s=0.4,
        fanouts=(1, 4),
        sizes=(64, 16384, 262144),
        drain_s=2.0,
    ),
    "smoke": Settings(
        mode="smoke",
        reps=1,
        throughput_s=0.15,
        latency_s=0.25,
        size_s=0.1,
        call_s=0.1,
        fanouts=(2,),
        sizes=(1024,),
        requests=50,
        # Generous: only a lagging subscriber uses it, and the smoke test
        # wants every run to account for every event, even on a busy machine.
        drain_s=5.0,
    ),
}


def settings_for(mode: str, reps: int | None = None) -> Settings:
    """The settings of *mode*, with *reps* repetitions if given."""
    settings = _MODES[mode]
    if reps is None:
        return settings
    return replace(settings, reps=check_int("reps", reps, minimum=1))


@dataclass(frozen=True)
class RunSpec:
    """One run: one scenario (and variant) for one peer, one repetition."""

    scenario: str
    peer: str
    rep: int
    #: Distinguishes runs of one scenario: ``"fanout=4"``, ``"size=1024"``,
    #: ``"publish_nowait"``; empty when the scenario has one shape.
    variant: str = ""
    publishers: int = 1
    subscribers: int = 1
    duration: float = 1.0
    #: Events/s each publisher is paced at; None = as fast as it can.
    rate: float | None = None
    #: S1: bytes of the payload's blob; None = the 9-field traffic record.
    blob_size: int | None = None
    #: Subscribers keep one-way latency samples.
    latency: bool = False
    drain_s: float = 2.0
    #: Filled in by the runner: unique per run of this benchmark.
    run_id: int = 0
    #: Extra, scenario-specific numbers to carry into the results (e.g. Z1's
    #: calibration).
    notes: dict[str, float] = field(default_factory=dict)
    #: Q1: the queue group every subscriber joins (None: plain subscribers,
    #: each gets every event).
    queue: str | None = None
    #: R1: requests measured after the warm-up (None: not a request/reply
    #: run). The publisher is then the requester, the subscriber the
    #: responder, and :attr:`duration` bounds the run.
    requests: int | None = None

    @property
    def is_call(self) -> bool:
        """P1 runs measure one process calling publish, no subscriber."""
        return self.scenario == "P1"

    @property
    def key(self) -> tuple[str, str, str]:
        """(scenario, variant, peer): the runs whose median is reported together."""
        return (self.scenario, self.variant, self.peer)

    def describe(self) -> str:
        variant = f" {self.variant}" if self.variant else ""
        return f"{self.scenario}{variant} {self.peer}"


#: Peers that can run each scenario (others are not meaningful there).
P1_VARIANTS: Final = {
    "shm": ("publish", "publish_nowait"),
    "nats": ("publish",),
    "zmq": ("send_multipart",),
    "redis": ("publish",),
}


def p1_variants(peer: str) -> tuple[str, ...]:
    """The P1 calls measured for *peer* (none: it has no P1 row)."""
    return P1_VARIANTS.get("shm" if is_baseline(peer) else peer, ())


def plan(
    settings: Settings, scenarios: list[str], peers: list[str]
) -> tuple[list[RunSpec], list[RunSpec]]:
    """Return (main runs, Z1 runs) in execution order.

    Z1 runs are separate because their rate comes from T1's median, known
    only once every T1 repetition is done.
    """
    runs: list[RunSpec] = []
    for rep in range(settings.reps):
        for scenario in scenarios:
            for shape_peers, template in _shapes(settings, scenario, peers):
                for peer in shape_peers:
                    runs.append(replace(template, peer=peer, rep=rep))
    zero_loss: list[RunSpec] = []
    if "Z1" in scenarios and "shm" in peers:
        for rep in range(settings.reps):
            zero_loss.append(
                RunSpec(
                    scenario="Z1",
                    peer="shm",
                    rep=rep,
                    duration=settings.throughput_s,
                    drain_s=settings.drain_s,
                )
            )
    return runs, zero_loss


def _shapes(s: Settings, scenario: str, peers: list[str]) -> list[tuple[list[str], RunSpec]]:
    """(peers, template) pairs: the runs of *scenario*, peer and rep left blank."""
    base = RunSpec(scenario=scenario, peer="", rep=0, drain_s=s.drain_s)
    if scenario == "T1":
        return [(peers, replace(base, duration=s.throughput_s))]
    if scenario == "T2":
        return [
            (
                peers,
                replace(
                    base, variant=f"fanout={fanout}", subscribers=fanout, duration=s.throughput_s
                ),
            )
            for fanout in s.fanouts
        ]
    if scenario == "T3":
        return [(peers, replace(base, publishers=FANIN_PUBLISHERS, duration=s.throughput_s))]
    if scenario == "L1":
        return [
            (
                [*peers, *(["shmll", "shmuv", "shmsync"] if "shm" in peers else []), "fifo", "sem"],
                replace(base, rate=LATENCY_RATE, latency=True, duration=s.latency_s),
            )
        ]
    if scenario == "S1":
        return [
            (peers, replace(base, variant=f"size={size}", blob_size=size, duration=s.size_s))
            for size in s.sizes
        ]
    if scenario in SCENARIO_PEERS:
        chosen = [p for p in peers if p in SCENARIO_PEERS[scenario]]
        if scenario == "R1" and "shm" in chosen:
            # Both ends wait for each other's message: the opt-in mode's row.
            chosen.insert(chosen.index("shm") + 1, "shmll")
        return _pattern_shapes(s, scenario, chosen)
    if scenario == "P1":
        shapes: list[tuple[list[str], RunSpec]] = []
        for peer in [*(p for p in peers if p1_variants(p)), "loop"]:
            for call in p1_variants(peer) or ("build payload",):
                shapes.append(
                    ([peer], replace(base, variant=call, subscribers=0, duration=s.call_s))
                )
        return shapes
    return []


def _pattern_shapes(
    s: Settings, scenario: str, peers: list[str]
) -> list[tuple[list[str], RunSpec]]:
    """Q1 and R1: the queue group and the request/reply runs."""
    if not peers:
        return []
    base = RunSpec(scenario=scenario, peer="", rep=0, drain_s=s.drain_s)
    if scenario == "Q1":
        return [
            (
                peers,
                replace(
                    base, subscribers=QUEUE_WORKERS, queue=QUEUE_GROUP, duration=s.throughput_s
                ),
            )
        ]
    # A bound, not a length: a peer at 1 ms per round trip takes a few
    # seconds, one whose requests time out stops there.
    bound = max(4 * s.latency_s, 2.0)
    return [(peers, replace(base, requests=s.requests, duration=bound))]
