"""
Single values in the units and shapes the config writes them in: durations (``"30s"``, ``"250ms"``),
sizes (``"16MiB"``), counts, numbers, true/false, one of a set, lists of strings.  Each converter
takes the TOML value and returns the Python value or raises ValueError with the reason the reader
reports; none reads a file or knows which key it serves.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TypeVar

__all__ = [
    "choice",
    "count",
    "non_negative",
    "one_or_more",
    "parse_duration",
    "parse_size",
    "port_number",
    "positive_duration",
    "positive_int",
    "strings",
    "typed",
]

T = TypeVar("T")

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
_SIZE = re.compile(r"^\s*(\d+)\s*(B|KiB|MiB|GiB|KB|MB|GB)?\s*$")
_SIZE_UNITS = {
    None: 1,
    "B": 1,
    "KiB": 1024,
    "MiB": 1024**2,
    "GiB": 1024**3,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
}


def parse_duration(value: object) -> float:
    """``"30s"``, ``"250ms"``, ``"2m"``, ``"1h"`` or a number of seconds -> seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 30s, 250ms, 2m")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION.match(value)):
        seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    else:
        raise ValueError(f"{value!r} is not a duration such as 30s, 250ms, 2m")
    if seconds < 0:
        raise ValueError("must not be negative")
    return seconds


def parse_size(value: object) -> int:
    """``"16MiB"``, ``"64KiB"``, ``"100"`` or an integer number of bytes -> bytes."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 64KiB or 16MiB")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str) and (m := _SIZE.match(value)):
        size = int(m.group(1)) * _SIZE_UNITS[m.group(2)]
    else:
        raise ValueError(f"{value!r} is not a size such as 64KiB or 16MiB")
    if size < 0:
        raise ValueError("must not be negative")
    return size


def typed(kind: type[T], description: str) -> Callable[[object], T]:
    """A value of Python type ``kind`` (a bool is not an int), described as ``description``."""

    def convert(value: object) -> T:
        if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
            raise ValueError(f"expected {description}")
        return value

    return convert


def positive_int(value: object) -> int:
    """A whole number of at least 1."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError("expected a whole number of at least 1")
    return value


def choice(*choices: str) -> Callable[[object], str]:
    """One of ``choices``."""

    def convert(value: object) -> str:
        if value not in choices:
            raise ValueError(f"{value!r} is not one of {', '.join(choices)}")
        return str(value)

    return convert


def non_negative(value: object) -> float:
    """A number of at least 0, as a float."""
    if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
        raise ValueError("expected a number of at least 0")
    return float(value)


def count(value: object) -> int:
    """A whole number of at least 0 (0: no limit)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError("expected a whole number of at least 0 (0: no limit)")
    return value


def strings(value: object) -> tuple[str, ...]:
    """A list of strings, as a tuple."""
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError("expected a list of strings")
    return tuple(value)


def positive_duration(value: object) -> float:
    """A duration of more than 0 seconds."""
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError("must be more than 0")
    return seconds


def one_or_more(value: object) -> tuple[str, ...]:
    """A string or a list of strings, as a tuple."""
    return (value,) if isinstance(value, str) else strings(value)


def port_number(value: object) -> int:
    """A TCP port number from 1 to 65535."""
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 65535:
        raise ValueError("expected a port number from 1 to 65535")
    return value
