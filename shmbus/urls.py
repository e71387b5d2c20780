"""Bus URLs: :func:`get_bus` turns one configuration string into a bus.

Owns the URL syntax of every transport and its options, so that a program
switches transport by changing one setting (``SHMBUS_URL``)::

    shm://NAME?capacity=1048576&max_event_size=65536&mode=660&queue_size=1024
    memory://?queue_size=64
    null://
    nats://127.0.0.1:4222,127.0.0.1:4223?name=worker&reconnect_time_wait=0.5

and, with ``fallback="shm://NAME"``, a :class:`~shmbus.fallback.FallbackBus`
(NATS with the host's shm bus as fallback).

Guarantees: a bus is returned unconnected; a malformed URL, an unknown
scheme or option, or a value of the wrong shape raises :class:`ValueError`
naming it and listing the valid choices. The NATS transports are imported
only when a ``nats://`` URL asks for them: nats-py is an optional dependency,
and without it such a URL raises :class:`~shmbus.errors.MissingExtraError`
naming ``pip install 'shmbus[nats]'``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlsplit

from .contract import BaseBus
from .memory import MemoryBus, NullBus
from .shm import ShmBus

if TYPE_CHECKING:
    from .nats import NatsBus

__all__ = ["DEFAULT_URL", "ENV_VAR", "SCHEMES", "get_bus"]

#: Environment variable read when no URL is given.
ENV_VAR = "SHMBUS_URL"

#: URL used when neither the argument nor the environment gives one.
DEFAULT_URL = "shm://default"

#: Supported URL schemes.
SCHEMES = ("shm", "memory", "null", "nats")

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _to_int(value: str) -> int:
    return int(value, 10)


def _to_float(value: str) -> float:
    return float(value)


def _to_mode(value: str) -> int:
    """Permission bits, octal with or without the ``0o`` prefix: ``0o660``, ``660``."""
    digits = value.lower().removeprefix("0o")
    mode = int(digits, 8)
    if not 0 <= mode <= 0o777:
        raise ValueError(f"{value!r} is not between 0 and 0o777")
    return mode


def _to_bool(value: str) -> bool:
    lowered = value.lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError(f"{value!r} is not one of {', '.join(_TRUE + _FALSE)}")


def _to_str(value: str) -> str:
    return value


_Parser = Callable[[str], Any]

_SHM_OPTIONS: dict[str, _Parser] = {
    "capacity": _to_int,
    "max_event_size": _to_int,
    "queue_size": _to_int,
    "mode": _to_mode,
    "group": _to_str,
    "low_latency": _to_bool,
    "spin_for_replies": _to_bool,
}
_LOCAL_OPTIONS: dict[str, _Parser] = {"max_event_size": _to_int, "queue_size": _to_int}
_NATS_URL_OPTIONS: dict[str, _Parser] = {
    "queue_size": _to_int,
    "name": _to_str,
    "connect_timeout": _to_float,
    "reconnect_time_wait": _to_float,
    "max_reconnect_attempts": _to_int,
    "ping_interval": _to_float,
    "max_outstanding_pings": _to_int,
    "no_echo": _to_bool,
    "pending_size": _to_int,
    "dont_randomize": _to_bool,
    "drain_timeout": _to_float,
}
#: Options of the fallback bus itself (given as keyword options of get_bus).
_FALLBACK_OPTIONS = ("overlap", "dedupe_size", "retry_interval")


def get_bus(url: str | None = None, *, fallback: str | None = None, **options: Any) -> BaseBus:
    """Return an unconnected bus for *url*.

    Parameters
    ----------
    url:
        ``shm://NAME?...``, ``memory://``, ``null://`` or
        ``nats://host:port[,host:port...]?...``. Default: the ``SHMBUS_URL``
        environment variable, else ``shm://default``.
    fallback:
        Only with a ``nats://`` URL: a ``shm://`` URL; the result is then a
        :class:`~shmbus.fallback.FallbackBus` that uses the shm bus while
        NATS is unreachable.
    **options:
        Constructor options of the transport, overriding those in the URL
        (for NATS, any ``nats.aio.client.Client.connect`` option too; with a
        fallback, ``overlap``, ``dedupe_size`` and ``retry_interval`` go to
        the FallbackBus and the rest to the NATS bus).

    Raises
    ------
    ValueError
        Malformed URL, unknown scheme or option, bad option value, or a
        fallback that is not a ``shm://`` URL or not after a ``nats://`` one.
    TypeError
        A URL that is not a string.
    MissingExtraError
        A ``nats://`` URL without the ``nats`` extra installed (the message
        names the ``pip`` command); an :class:`ImportError`.
    """
    if url is None:
        url = os.environ.get(ENV_VAR) or DEFAULT_URL
    scheme, target, query = _split(url)
    if fallback is not None:
        if scheme != "nats":
            raise ValueError(f"fallback={fallback!r} applies only to nats:// URLs, not to {url!r}")
        fb_scheme, fb_target, fb_query = _split(fallback)
        if fb_scheme != "shm":
            raise ValueError(
                f"fallback URL {fallback!r} must use the shm:// scheme, not {fb_scheme}://"
            )
        fallback_options = {k: options.pop(k) for k in _FALLBACK_OPTIONS if k in options}
        from .fallback import FallbackBus  # optional dependency (nats-py)

        return FallbackBus(
            _make_nats(url, target, query, options),
            _make_shm(fallback, fb_target, fb_query, {}),
            **fallback_options,
        )
    if scheme == "shm":
        return _make_shm(url, target, query, options)
    if scheme in ("memory", "null"):
        if target:
            raise ValueError(f"{scheme}:// URLs take no name or host, got {target!r} in {url!r}")
        parsed = _parse_query(url, scheme, query, _LOCAL_OPTIONS)
        _check_keywords(scheme, options, _LOCAL_OPTIONS)
        parsed.update(options)
        return MemoryBus(**parsed) if scheme == "memory" else NullBus(**parsed)
    return _make_nats(url, target, query, options)


def _split(url: object) -> tuple[str, str, str]:
    """(scheme, name-or-hosts, query) of *url*, or ValueError."""
    if not isinstance(url, str):
        raise TypeError(f"bus URL must be a str, not {type(url).__name__} ({url!r})")
    if "://" not in url:
        raise ValueError(
            f"bus URL {url!r} has no scheme; valid forms: shm://NAME, memory://, null://, "
            "nats://HOST:PORT[,HOST:PORT...]"
        )
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise ValueError(f"malformed bus URL {url!r}: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise ValueError(
            f"unknown scheme {parts.scheme!r} in bus URL {url!r}; valid schemes: "
            f"{', '.join(SCHEMES)}"
        )
    if parts.fragment:
        raise ValueError(f"bus URL {url!r} has a fragment ({parts.fragment!r}); remove it")
    path = parts.path.strip("/")
    if parts.netloc and path:
        raise ValueError(f"bus URL {url!r} has a path ({parts.path!r}); expected {scheme}://NAME")
    return scheme, parts.netloc or path, parts.query


def _parse_query(url: str, scheme: str, query: str, valid: Mapping[str, _Parser]) -> dict[str, Any]:
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=True) if query else []
    except ValueError:
        raise ValueError(
            f"malformed query {query!r} in bus URL {url!r}; expected key=value&..."
        ) from None
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key not in valid:
            raise ValueError(
                f"unknown option {key!r} in bus URL {url!r}; valid options for {scheme}:// "
                f"URLs: {', '.join(sorted(valid))}"
            )
        if key in result:
            raise ValueError(f"option {key!r} is given twice in bus URL {url!r}")
        try:
            result[key] = valid[key](value)
        except ValueError as exc:
            raise ValueError(
                f"bad value {value!r} for option {key!r} in bus URL {url!r}: {exc}"
            ) from None
    return result


def _check_keywords(scheme: str, options: Mapping[str, Any], valid: Mapping[str, Any]) -> None:
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(
            f"unknown option(s) {', '.join(map(repr, unknown))} for {scheme}:// buses; "
            f"valid options: {', '.join(sorted(valid))}"
        )


def _make_shm(url: str, name: str, query: str, options: dict[str, Any]) -> ShmBus:
    parsed = _parse_query(url, "shm", query, _SHM_OPTIONS)
    _check_keywords("shm", options, _SHM_OPTIONS)
    parsed.update(options)
    return ShmBus(name or "default", **parsed)


def _make_nats(url: str, hosts: str, query: str, options: dict[str, Any]) -> NatsBus:
    from .nats import NATS_CONNECT_OPTIONS, NatsBus  # optional dependency (nats-py)

    if not hosts:
        raise ValueError(f"nats:// URL {url!r} names no server; expected nats://HOST:PORT")
    servers = []
    for host in hosts.split(","):
        if not host.strip():
            raise ValueError(f"nats:// URL {url!r} has an empty server in {hosts!r}")
        server = f"nats://{host.strip()}"
        try:
            port = urlsplit(server).port
        except ValueError:
            port = -1
        if port is not None and not 1 <= port <= 65535:
            raise ValueError(
                f"nats:// URL {url!r} has server {host.strip()!r} with a port that is not "
                "a number from 1 to 65535"
            )
        servers.append(server)
    parsed = _parse_query(url, "nats", query, _NATS_URL_OPTIONS)
    valid_keywords = set(NATS_CONNECT_OPTIONS) | {"queue_size", "name", "connect_timeout"}
    _check_keywords("nats", options, dict.fromkeys(valid_keywords))
    parsed.update(options)
    return NatsBus(servers if len(servers) > 1 else servers[0], **parsed)
