"""Triggers: what starts a workflow (entity events, schedules, dates, manual runs, custom
events)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    BaseModel,
    Field,
    field_validator,
    model_validator,
)

from engine.durations import parse_duration as parse_duration  # engine.model.parse_duration
from engine.model.base import _ENTITY_RE, Duration, _Strict


class _EntityTrigger(_Strict):
    entity_type: str

    @field_validator("entity_type")
    @classmethod
    def _entity_name(cls, v: str) -> str:
        if not _ENTITY_RE.fullmatch(v):
            raise ValueError("an entity type is lowercase letters, digits and '_' (like 'lead')")
        return v


class EntityCreated(_EntityTrigger):
    type: Literal["entity_created"]


class EntityUpdated(_EntityTrigger):
    type: Literal["entity_updated"]


class EntityDeleted(_EntityTrigger):
    type: Literal["entity_deleted"]


UNSET: Any = object()


class FieldUpdated(_EntityTrigger):
    """Fires when ``field`` (or any of ``fields``) changes; ``from``/``to`` narrow it."""

    type: Literal["field_updated"]
    field: str | None = None
    fields: list[str] | None = None
    from_: Any = Field(UNSET, alias="from")
    to: Any = UNSET

    @model_validator(mode="after")
    def _one_field(self) -> FieldUpdated:
        if bool(self.field) == bool(self.fields):
            raise ValueError("give either 'field' or a non-empty 'fields' list")
        if self.fields and (self.from_ is not UNSET or self.to is not UNSET):
            raise ValueError("'from' and 'to' need a single 'field'")
        for name, value in (("from", self.from_), ("to", self.to)):
            if value is None:
                raise ValueError(f"'{name}' cannot be null (use is_empty in conditions)")
        return self

    @property
    def watched_fields(self) -> list[str]:
        return self.fields or [self.field or ""]


class Scheduled(_Strict):
    """Cron schedule; with an entity, the conditions pick the rows that enroll each tick."""

    type: Literal["scheduled"]
    schedule: str
    timezone: str = "UTC"
    entity_type: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _cron_alias(cls, data: Any) -> Any:
        if isinstance(data, dict) and "cron" in data and "schedule" not in data:
            data = {**data, "schedule": data["cron"]}
            del data["cron"]
        return data

    @field_validator("schedule")
    @classmethod
    def _valid_cron(cls, v: str) -> str:
        from croniter import croniter

        fields = v.split()
        # Six fields are seconds first, as the scheduler reads them (cron_iter).
        # croniter's default puts the seconds last, which would read "0 30 9 * * *"
        # (09:30:00 daily) as hour 30 and refuse it.
        seconds_first = len(fields) == 6
        if len(fields) not in (5, 6) or not croniter.is_valid(v, second_at_beginning=seconds_first):
            raise ValueError(f"{v!r} is not a cron expression (5 fields, or 6 with seconds)")
        return v

    @field_validator("timezone")
    @classmethod
    def _valid_tz(cls, v: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {v!r}") from None
        return v


class DateRelative(_EntityTrigger):
    """Fires ``offset`` from a date field of each row: ``"-3d"`` is 3 days before."""

    type: Literal["date_relative"]
    field: str
    offset: float = 0.0
    # Rows whose moment is further in the past than this when first seen do not fire,
    # so watching an old table does not flood it with overdue enrollments.
    lookback: Duration = 86400.0

    @model_validator(mode="before")
    @classmethod
    def _offset_forms(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        try:
            if "before" in data:
                data["offset"] = -parse_duration(data.pop("before"), default_unit="d")
            elif "after" in data:
                data["offset"] = parse_duration(data.pop("after"), default_unit="d")
            elif "offset" in data:
                data["offset"] = parse_duration(
                    data["offset"], default_unit="d", allow_negative=True
                )
        except ValueError as exc:
            raise ValueError(f"offset: {exc}") from None
        return data


class Manual(_Strict):
    type: Literal["manual"]
    entity_type: str | None = None


class CustomEvent(_Strict):
    """A named event posted to ``POST /events/{name}``, optionally about an entity."""

    type: Literal["event"]
    event: str = Field(pattern=r"^[A-Za-z0-9_.:-]{1,100}$")
    entity_type: str | None = None


Trigger = (
    EntityCreated
    | EntityUpdated
    | EntityDeleted
    | FieldUpdated
    | Scheduled
    | DateRelative
    | Manual
    | CustomEvent
)
TRIGGER_TYPES: dict[str, type[BaseModel]] = {
    "entity_created": EntityCreated,
    "entity_updated": EntityUpdated,
    "field_updated": FieldUpdated,
    "entity_deleted": EntityDeleted,
    "scheduled": Scheduled,
    "date_relative": DateRelative,
    "manual": Manual,
    "event": CustomEvent,
}
# Triggers the matcher evaluates on captured events; the others are run by the
# scheduler (scheduled, date_relative) or by a person (manual).
EVENT_TRIGGERS = frozenset(
    {"entity_created", "entity_updated", "field_updated", "entity_deleted", "event"}
)
