"""Durations as users write them: ``60``, ``"90s"``, ``"5m"``, ``"2h"``, ``"1d"``.

Its own module so that settings (:mod:`engine.config`), conditions and workflow
definitions can all read durations without importing one another.
"""

from __future__ import annotations

import re
from typing import Any

_UNITS = {
    "s": 1,
    "sec": 1,
    "secs": 1,
    "second": 1,
    "seconds": 1,
    "m": 60,
    "min": 60,
    "mins": 60,
    "minute": 60,
    "minutes": 60,
    "h": 3600,
    "hr": 3600,
    "hrs": 3600,
    "hour": 3600,
    "hours": 3600,
    "d": 86400,
    "day": 86400,
    "days": 86400,
    "w": 604800,
    "week": 604800,
    "weeks": 604800,
}
_DURATION_RE = re.compile(r"^\s*([+-]?\d+(?:\.\d+)?)\s*([a-z]*)\s*$")


def parse_duration(value: Any, *, default_unit: str = "s", allow_negative: bool = False) -> float:
    """Seconds from ``60``, ``"90s"``, ``"5m"``, ``"2h"``, ``"1d"``, ``"2 weeks"``.

    Days are 24 hours and weeks 7 days: durations are exact, whatever the time zone.
    """
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 60, '5m', '2h' or '1d'")
    if isinstance(value, int | float):
        seconds = float(value) * _UNITS[default_unit]
    elif isinstance(value, str):
        match = _DURATION_RE.match(value.lower())
        if not match or (match.group(2) and match.group(2) not in _UNITS):
            raise ValueError(f"{value!r} is not a duration such as 60, '5m', '2h' or '1d'")
        seconds = float(match.group(1)) * _UNITS[match.group(2) or default_unit]
    else:
        raise ValueError("expected a duration such as 60, '5m', '2h' or '1d'")
    if seconds < 0 and not allow_negative:
        raise ValueError("a duration cannot be negative")
    if abs(seconds) > 10 * 365 * 86400:
        raise ValueError("a duration cannot exceed 10 years")
    return seconds
