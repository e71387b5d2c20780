"""Argument checks shared by the transports, the commands and the tools.

Rules
-----
* A wrong *type* is a :class:`TypeError`, a value of the right type outside
  its range a :class:`ValueError`; both messages name the argument, the value
  given and the limit it broke.
* ``bool`` is never accepted as a number (``True`` is an ``int`` to Python,
  never what a caller meant by a size or a number of seconds).
* A number (of seconds, or of anything else) may be an ``int`` or a
  ``float`` but must be finite.
* On a command line, :func:`int_argument` and :func:`number_argument` make
  ``argparse`` types of the same checks: text that is not a number, or a
  number out of range, is an ``argparse.ArgumentTypeError`` with the same
  message (``argparse`` exits with status 2 and prints it).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

__all__ = ["check_int", "check_number", "check_seconds", "int_argument", "number_argument"]


def _shown(limit: float) -> str:
    return str(limit) if isinstance(limit, int) else f"{limit:g}"


def _check_range(
    name: str,
    value: float,
    given: str,
    *,
    minimum: float,
    above: bool = False,
    maximum: float | None = None,
    unit: str = "",
) -> None:
    suffix = f" {unit}" if unit else ""
    if above and value <= minimum:
        raise ValueError(f"{name} must be above {_shown(minimum)}{suffix}, got {given}")
    if value < minimum:
        raise ValueError(f"{name} must be at least {_shown(minimum)}{suffix}, got {given}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be at most {_shown(maximum)}{suffix}, got {given}")


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
    _check_range(name, value, str(value), minimum=minimum, maximum=maximum)
    return value


def check_number(
    name: str,
    value: object,
    *,
    minimum: float = 0.0,
    above: bool = False,
    maximum: float | None = None,
    unit: str = "",
) -> float:
    """Return *value* as a ``float`` if it is a finite number of at least
    *minimum* (above it, with *above*) and at most *maximum*, else raise;
    *unit* (``"seconds"``) is named in the messages.

    Raises
    ------
    TypeError
        *value* is not an ``int`` or a ``float``, or is a ``bool``.
    ValueError
        *value* is not finite or outside the limits.
    """
    noun = f"number of {unit}" if unit else "number"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a {noun}, not {type(value).__name__} ({value!r})")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{name} must be a finite {noun}, got {value!r}")
    _check_range(
        name, number, repr(value), minimum=minimum, above=above, maximum=maximum, unit=unit
    )
    return number


#: :func:`check_number` of a number of seconds: ``check_seconds(name, value,
#: minimum=..., above=..., maximum=...)``.
check_seconds = functools.partial(check_number, unit="seconds")


def int_argument(name: str, *, minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    """An ``argparse`` type: the text as an ``int`` that :func:`check_int`
    accepts for *name*."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise _bad_argument(f"{name} must be a whole number, got {text!r}") from None
        try:
            return check_int(name, value, minimum=minimum, maximum=maximum)
        except ValueError as exc:
            raise _bad_argument(str(exc)) from None

    return parse


def number_argument(
    name: str,
    *,
    minimum: float = 0.0,
    above: bool = False,
    maximum: float | None = None,
    unit: str = "",
) -> Callable[[str], float]:
    """An ``argparse`` type: the text as a ``float`` that :func:`check_number`
    accepts for *name*."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            noun = f"number of {unit}" if unit else "number"
            raise _bad_argument(f"{name} must be a {noun}, got {text!r}") from None
        try:
            return check_number(
                name, value, minimum=minimum, above=above, maximum=maximum, unit=unit
            )
        except ValueError as exc:
            raise _bad_argument(str(exc)) from None

    return parse


def _bad_argument(message: str) -> Exception:
    # Imported here: only commands parse arguments, and the transports that
    # import this module need no argparse.
    import argparse

    return argparse.ArgumentTypeError(message)
