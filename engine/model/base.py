"""What every part of a definition shares: the errors that name a path, durations, and
the strict base model (unknown keys refused)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    ValidationError,
)

from engine.durations import parse_duration as parse_duration  # engine.model.parse_duration

# ───────────────────────────── errors ─────────────────────────────


@dataclass(frozen=True)
class Issue:
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class DefinitionError(ValueError):
    """A workflow definition was refused; ``issues`` says where and why."""

    def __init__(self, issues: list[Issue]) -> None:
        self.issues = issues
        super().__init__("; ".join(str(i) for i in issues))

    def as_list(self) -> list[dict[str, str]]:
        return [{"path": i.path, "message": i.message} for i in self.issues]


def format_loc(loc: tuple[int | str, ...], prefix: str = "") -> str:
    path = prefix
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
    return path


def _user_loc(loc: tuple[int | str, ...]) -> tuple[int | str, ...]:
    """Drop pydantic's own parts of an error location (union members, validators):
    our field names are lowercase, those parts are class names or contain brackets."""
    return tuple(
        part
        for part in loc
        if isinstance(part, int) or not (part[:1].isupper() or "[" in part or "-" in part)
    )


def issues_from_pydantic(exc: ValidationError, prefix: str = "") -> list[Issue]:
    issues: dict[str, Issue] = {}
    for err in exc.errors(include_url=False):
        message = err["msg"]
        if err["type"] == "extra_forbidden":
            message = "unknown field"
        elif err["type"] == "value_error":
            message = message.removeprefix("Value error, ")
        path = format_loc(_user_loc(tuple(err["loc"])), prefix)
        # A value that fits no member of a union: the first member's reason is the one
        # that reads best ("'soon' is not a duration ..."), not one line per member.
        issues.setdefault(path, Issue(path, message))
    return list(issues.values())


# ───────────────────────────── durations ─────────────────────────────


def _duration(value: Any) -> float:
    return parse_duration(value)


Duration = Annotated[float, BeforeValidator(_duration)]


_ENTITY_RE = re.compile(r"[a-z_][a-z0-9_]{0,39}")  # fullmatch: "$" would allow a final "\n"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
