"""Argument checks shared by the transports and commands.

Rules
-----
* A wrong *type* is a :class:`TypeError`, a value of the right type outside
  its range a :class:`ValueError`; both messages name the argument, the value
  given and the limit it broke.
* ``bool`` is never accepted as a number (``True`` is an ``int`` to Python,
  never what a caller meant by a size or a number of seconds).
* A number of seconds may be an ``int`` or a ``float`` but must be finite.
"""

from __future__ import annotations

import math

__all__ = ["check_int", "check_seconds"]


def check_int(name: str, value: object, *, minimum: int, maximum: int | None = None) -> int:
    """Return *value* if it is an ``int`` (not a ``bool``) from *minimum* to
    *maximum* (inclusive; no upper limit if None), else raise.

    Raises
    ------
    TypeError
        *value* is not an ``int``, or is a ``bool``.
    ValueError
        *value* is below *minimum* or above *maximum*.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__} ({value!r})")
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be at most {maximum}, got {value}")
    return value


def check_seconds(
    name: str,
    value: object,
    *,
    minimum: float = 0.0,
    above: bool = False,
    maximum: float | None = None,
) -> float:
    """Return *value* as a ``float`` if it is a finite number of seconds of at
    least *minimum* (above it, with *above*) and at most *maximum*, else raise.

    Raises
    ------
    TypeError
        *value* is not an ``int`` or a ``float``, or is a ``bool``.
    ValueError
        *value* is not finite or outside the limits.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(
            f"{name} must be a number of seconds, not {type(value).__name__} ({value!r})"
        )
    seconds = float(value)
    if not math.isfinite(seconds):
        raise ValueError(f"{name} must be a finite number of seconds, got {value!r}")
    if above and seconds <= minimum:
        raise ValueError(f"{name} must be above {minimum:g} seconds, got {value!r}")
    if seconds < minimum:
        raise ValueError(f"{name} must be at least {minimum:g} seconds, got {value!r}")
    if maximum is not None and seconds > maximum:
        raise ValueError(f"{name} must be at most {maximum:g} seconds, got {value!r}")
    return seconds
