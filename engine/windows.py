"""Business-hours windows: the step option ``window``, and when a step may run.

::

    "window": {"days": ["mon", "tue", "wed", "thu", "fri"], "from": "09:00", "to": "17:00",
               "timezone": "Europe/Lisbon"}          # or "timezone_field": "tz"

A step due outside its window is deferred to the next opening; one due inside runs at
once. Times are wall-clock times in the window's zone, so the window follows daylight
saving time: 09:00 in Lisbon is 09:00 UTC in winter and 08:00 UTC in summer.

- ``days`` (default: every day) names the days the window *opens*; ``to`` is
  exclusive. ``from`` later than ``to`` is an overnight window (``"22:00"``-``"06:00"``
  opens at 22:00 on each listed day and closes at 06:00 the next morning); ``to`` may
  be ``"24:00"`` (midnight at the end of the day). ``from`` equal to ``to`` is refused.
- A wall time that a daylight-saving change skips on some day (02:30 when the clocks
  jump from 02:00 to 03:00) opens that day at the same time shifted by the change
  (03:30); a wall time that occurs twice opens at its first occurrence.
- ``timezone_field`` reads the zone from a text column of the entity's row, as it is
  when the step is due. When that column is NULL, empty or not an IANA zone, the
  window's ``fallback_timezone`` (default ``UTC``) applies: the step still runs (or
  waits) and what was chosen is said, in the deferred step's result (``window.note``)
  and in the worker's log.

This module is pure computation (no SQL, no engine imports): the model, the executor's
waves, its careful path and the matcher's inline path all call it.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

log = logging.getLogger(__name__)

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_TIME_RE = re.compile(r"([01][0-9]|2[0-3]):([0-5][0-9])")
MAX_ZONE_LENGTH = 100


def zone(name: str) -> ZoneInfo | None:
    """The IANA zone of that name (``zoneinfo``), or None."""
    if not isinstance(name, str) or not name or len(name) > MAX_ZONE_LENGTH:
        return None
    try:
        return ZoneInfo(name)
    except Exception:  # ZoneInfoNotFoundError, ValueError (a path), a broken file
        return None


def _hhmm(value: Any, *, allow_24: bool = False) -> str:
    if not isinstance(value, str):
        raise ValueError("a time is a string 'HH:MM' (24-hour clock, like '09:00')")
    if allow_24 and value == "24:00":
        return value
    if not _TIME_RE.fullmatch(value):
        extra = " (or '24:00')" if allow_24 else ""
        raise ValueError(f"{value!r} is not a time 'HH:MM' from '00:00' to '23:59'{extra}")
    return value


def _minutes(hhmm: str) -> int:
    hours, minutes = hhmm.split(":")
    return int(hours) * 60 + int(minutes)


class Window(BaseModel):
    """The ``window`` step option (checked when the workflow is saved)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    days: list[str] = Field(default_factory=lambda: list(DAYS), min_length=1, max_length=7)
    from_: str = Field(alias="from")
    to: str
    timezone: str | None = None
    timezone_field: str | None = Field(None, min_length=1, max_length=63)
    fallback_timezone: str = "UTC"

    @field_validator("days", mode="before")
    @classmethod
    def _days(cls, v: Any) -> Any:
        if not isinstance(v, list):
            raise ValueError(f"days is a list of day names, from {list(DAYS)}")
        days: list[str] = []
        for day in v:
            name = day.lower() if isinstance(day, str) else day
            if name not in DAYS:
                raise ValueError(f"{day!r} is not a day; one of {list(DAYS)}")
            if name in days:
                raise ValueError(f"{day!r} is listed twice")
            days.append(name)
        return days

    @field_validator("from_", mode="before")
    @classmethod
    def _from(cls, v: Any) -> str:
        return _hhmm(v)

    @field_validator("to", mode="before")
    @classmethod
    def _to(cls, v: Any) -> str:
        return _hhmm(v, allow_24=True)

    @field_validator("timezone", "fallback_timezone")
    @classmethod
    def _zone(cls, v: str | None) -> str | None:
        if v is not None and zone(v) is None:
            raise ValueError(f"unknown time zone {v!r} (an IANA name, like 'Europe/Lisbon')")
        return v

    @model_validator(mode="after")
    def _one_zone(self) -> Window:
        if (self.timezone is None) == (self.timezone_field is None):
            raise ValueError("give exactly one of 'timezone' and 'timezone_field'")
        if self.from_ == self.to:
            raise ValueError(
                f"'from' and 'to' are both {self.from_!r}: an empty window "
                "(for all day, use 'from': '00:00', 'to': '24:00')"
            )
        return self

    @property
    def overnight(self) -> bool:
        return _minutes(self.from_) > _minutes(self.to)

    def describe(self) -> str:
        where = self.timezone or f"the zone in {self.timezone_field}"
        return f"{','.join(self.days)} {self.from_}-{self.to} ({where})"


def window_issues(
    window: Window, entity: Any, path: str, *, waits: bool = False
) -> list[tuple[str, str]]:
    """Catalog checks: ``timezone_field`` is a text column of the entity (read from the
    row when the step is due, like ``delay.until``); ``waits``: the step has a
    ``wait_until`` too, which is refused (the window goes on the step after the wait)."""
    if waits:
        return [
            (
                f"{path}.window",
                "a step with wait_until cannot have a window too: put the window on the "
                "step after it",
            )
        ]
    if window.timezone_field is None:
        return []
    field_path = f"{path}.window.timezone_field"
    if entity is None:
        return [(field_path, "timezone_field needs a trigger with an entity_type")]
    spec = entity.columns.get(window.timezone_field)
    if spec is None:
        return [(field_path, f"{entity.entity_type} has no column {window.timezone_field!r}")]
    if spec.kind != "text":
        return [
            (
                field_path,
                f"{window.timezone_field!r} is a {spec.display_type} column; a time zone "
                "is read from a text column",
            )
        ]
    return []


# ───────────────────────────── computing openings ─────────────────────────────


@dataclass(frozen=True)
class Zone:
    """The zone a window is read in for one entity, and why (``note``: a fallback)."""

    name: str
    info: ZoneInfo
    note: str | None = None


def zone_for(window: Window, row: dict[str, Any] | None) -> Zone:
    """The window's zone for this entity row: the fixed one, the row's column, or the
    fallback (with a note saying why)."""
    if window.timezone is not None:
        return Zone(window.timezone, ZoneInfo(window.timezone))
    field = window.timezone_field or ""
    raw = (row or {}).get(field)
    fallback = window.fallback_timezone
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        note = f"{field} is empty; the window is read in {fallback} (fallback_timezone)"
        return Zone(fallback, ZoneInfo(fallback), note)
    found = zone(raw.strip()) if isinstance(raw, str) else None
    if found is None:
        shown = repr(raw)[:60]
        note = (
            f"{field} holds {shown}, not an IANA time zone; the window is read in "
            f"{fallback} (fallback_timezone)"
        )
        return Zone(fallback, ZoneInfo(fallback), note)
    return Zone(raw.strip(), found)


def _wall(day: date, minutes: int, tz: ZoneInfo) -> datetime:
    """That wall time of that day in ``tz``, as a UTC moment (fold 0: the first of a
    repeated time; a skipped time lands after the gap, shifted by it)."""
    if minutes >= 24 * 60:
        day, minutes = day + timedelta(days=1), minutes - 24 * 60
    local = datetime(day.year, day.month, day.day, minutes // 60, minutes % 60, tzinfo=tz)
    return local.astimezone(UTC)


def next_opening(window: Window, at: datetime, tz: ZoneInfo) -> datetime:
    """``at`` itself when the window is open then, else the moment it next opens."""
    start_min, end_min = _minutes(window.from_), _minutes(window.to)
    overnight = start_min > end_min
    today = at.astimezone(tz).date()
    # From yesterday (an overnight window still open) to a week ahead: every listed
    # day opens once in any 7 days.
    for offset in range(-1, 9):
        day = today + timedelta(days=offset)
        if DAYS[day.weekday()] not in window.days:
            continue
        start = _wall(day, start_min, tz)
        end = _wall(day + timedelta(days=1) if overnight else day, end_min, tz)
        if start <= at < end:
            return at
        if start > at:
            return start  # the days go forward: the first later start is the next opening
    raise AssertionError(f"window {window.describe()} never opens")  # days is never empty


@dataclass(frozen=True)
class Decision:
    """Whether a windowed step runs now: ``at`` is now (open) or the next opening."""

    at: datetime
    zone: Zone
    open: bool

    def note(self) -> dict[str, Any]:
        """What the step's result says: while it waits, until when and in which zone;
        and a fallback zone, whether it waits or not (kept in the result once it ran)."""
        note: dict[str, Any] = {"timezone": self.zone.name}
        if not self.open:
            note = {"deferred_until": self.at.isoformat(), **note}
        if self.zone.note:
            note["note"] = self.zone.note
        return {"window": note}

    @property
    def worth_noting(self) -> bool:
        """Whether the step's record gets the note: deferred, or read in a fallback zone."""
        return not self.open or self.zone.note is not None


def decide(window: Window, row: dict[str, Any] | None, at: datetime) -> Decision:
    tz = zone_for(window, row)
    opening = next_opening(window, at, tz.info)
    return Decision(opening, tz, opening <= at)


def decide_many(
    window: Window, rows: list[dict[str, Any] | None], at: datetime, *, what: str = ""
) -> list[Decision]:
    """One decision per row at the same moment, computed once per distinct zone (a
    group of a wave shares its moment, so the zones are all that differ)."""
    by_zone: dict[tuple[str, str | None], Decision] = {}
    by_value: dict[str | None, Decision] = {}  # the zone column's value -> its decision
    field = window.timezone_field
    out: list[Decision] = []
    for row in rows:
        raw = (row or {}).get(field) if field is not None else None
        cacheable = raw is None or isinstance(raw, str)
        decision = by_value.get(raw) if cacheable else None
        if decision is None:
            tz = zone_for(window, row)
            decision = by_zone.get((tz.name, tz.note))
            if decision is None:
                opening = next_opening(window, at, tz.info)
                decision = by_zone[(tz.name, tz.note)] = Decision(opening, tz, opening <= at)
                if tz.note:
                    where = f"{what}: " if what else ""
                    log.warning("%swindow %s: %s", where, window.describe(), tz.note)
            if cacheable:
                by_value[raw] = decision
        out.append(decision)
    return out
