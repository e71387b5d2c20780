"""The exceptions shmbus raises, arranged by whose fault it was.

* Caller mistakes use built-ins: :class:`TypeError` and :class:`ValueError`
  for bad arguments (topic, pattern, payload, size, name), and
  :class:`RuntimeError` subclasses for using a bus in the wrong state.
* :class:`SegmentError` and its subclasses: the shared state is not usable
  as found (corrupted by someone else, made by an incompatible version or
  with options that cannot coexist, out of room).
* :class:`TransportUnavailableError`: a server-based transport (NATS) could
  not be reached or did not answer.
* :class:`RequestTimeoutError` (and :class:`NoRespondersError`): a request
  got no reply; both are :class:`TimeoutError`.
* :class:`MissingExtraError`: a transport or command needs an optional
  dependency that is not installed; the message names the ``pip`` command.
* :class:`~shmbus.codec.EnvelopeDecodeError` (defined next to the codec):
  bytes that should hold an envelope do not.

Every class here derives from :class:`ShmBusError`, so one ``except`` catches
everything specific to shmbus. Each also derives from the built-in a caller
would catch without knowing shmbus (:class:`RuntimeError`,
:class:`ConnectionError`, :class:`ImportError`, :class:`PermissionError`,
:class:`OSError`, :class:`ValueError`, :class:`TimeoutError`).
"""

from __future__ import annotations

__all__ = [
    "BusClosedError",
    "BusInUseError",
    "ForeignFileError",
    "ForkedBusError",
    "IncompatibleSegmentError",
    "MissingExtraError",
    "NoFreeSlotError",
    "NoRespondersError",
    "RequestTimeoutError",
    "SegmentCorruptError",
    "SegmentError",
    "SegmentSpaceError",
    "ShmBusError",
    "SubscriptionClosedError",
    "TransportUnavailableError",
]


class ShmBusError(Exception):
    """Base class of every exception specific to shmbus."""


class BusClosedError(ShmBusError, RuntimeError):
    """The bus was closed by its owner; publish and subscribe are refused."""


class SubscriptionClosedError(ShmBusError, RuntimeError):
    """``get()`` on a blocking subscription that is closed: by its
    ``close()``, by its bus closing, or at interpreter exit (iterating it
    just stops)."""


class BusInUseError(ShmBusError, RuntimeError):
    """A bus asked to be cleaned up has live processes attached."""


class ForkedBusError(ShmBusError, RuntimeError):
    """A bus instance inherited across ``fork()`` was used in the child.

    The child shares the parent's mapping and descriptors, so using them
    would corrupt the parent's state. Create and connect a new bus in the
    child instead.
    """


class ForeignFileError(ShmBusError, PermissionError):
    """A file with one of the bus's names must not be used: another user owns
    it (and it is not the bus's group's), it is a symlink or not the type it
    should be, or its permission bits are broader than the bus's mode. The
    message names the file and its owner."""


class SegmentError(ShmBusError):
    """The bus's shared-memory state cannot be used as found."""


class SegmentCorruptError(SegmentError):
    """A segment header field holds a value no shmbus process writes."""


class IncompatibleSegmentError(SegmentError):
    """The segment was made by another layout version or with options that
    cannot coexist with the ones asked for (the message names both)."""


class SegmentSpaceError(SegmentError, OSError):
    """There is not enough room in ``/dev/shm`` for the segment."""


class NoFreeSlotError(SegmentError):
    """Every instance slot of the segment is held by a live process."""


class TransportUnavailableError(ShmBusError, ConnectionError):
    """A server-based transport (NATS) could not be reached in time, or its
    connection is down; the message names the servers and the cause."""


class RequestTimeoutError(ShmBusError, TimeoutError):
    """A request got no reply within its timeout: nobody answered (on a
    transport that cannot tell whether anyone listens), or the responder
    died, stalled or was too slow. The message names the topic and the
    timeout."""


class NoRespondersError(RequestTimeoutError):
    """A request found nobody subscribed to its topic, and the transport
    knew it at once (in-process buses, NATS's no-responders status), so it
    did not wait for the timeout. A :class:`RequestTimeoutError`, so code
    that handles a timeout handles this too, on every transport."""


#: The optional extras: name -> (the package it installs, what needs it).
EXTRAS: dict[str, tuple[str, str]] = {
    "nats": ("nats-py", "the NATS transports (NatsBus, FallbackBus, nats:// URLs, shmbus bridge)"),
    "metrics": ("prometheus-client", "the Prometheus exporter (shmbus metrics)"),
}


class MissingExtraError(ShmBusError, ImportError):
    """An optional dependency is not installed.

    The message names what needs it and the exact command that installs it,
    e.g. ``pip install 'shmbus[nats]'``; :attr:`extra` is the extra's name
    and :attr:`name` (as on every :class:`ImportError`) the missing module.
    """

    def __init__(self, extra: str, module: str | None = None) -> None:
        package, needed_by = EXTRAS[extra]
        #: The extra that installs the missing dependency ("nats", "metrics").
        self.extra = extra
        #: The command that installs it.
        self.pip_command = f"pip install 'shmbus[{extra}]'"
        super().__init__(
            f"missing optional dependency {package}, used by {needed_by}; "
            f"install it with: {self.pip_command}",
            name=module,
        )

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.extra, self.name))
