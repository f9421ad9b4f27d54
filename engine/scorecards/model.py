"""Scorecard definitions (docs/scorecards.md): the pydantic model and the checks that
need no database. ``engine.scorecards.store`` checks the rest against the catalog."""

from __future__ import annotations

import math
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from engine.durations import parse_duration
from engine.model import Issue, issues_from_pydantic

NAME_RE = re.compile(r"[a-z][a-z0-9_]{0,62}")
_ENTITY_RE = re.compile(r"[a-z_][a-z0-9_]{0,39}")
MAX_FACTORS = 100
MAX_SEGMENTS = 20
TOP_FACTORS = 3
COMPARISONS = ("decline", "increase", "ratio", "difference")


class ScorecardError(ValueError):
    """A scorecard (or a relation) was refused; ``issues`` say where and why."""

    def __init__(self, issues: list[Issue]) -> None:
        self.issues = issues
        super().__init__("; ".join(str(i) for i in issues))

    def as_list(self) -> list[dict[str, str]]:
        return [{"path": i.path, "message": i.message} for i in self.issues]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _finite(v: float) -> float:
    if not math.isfinite(v):
        raise ValueError("must be a finite number")
    return v


def _identifier(v: str, what: str) -> str:
    if not NAME_RE.fullmatch(v):
        raise ValueError(f"{what} {v!r}: lowercase letters, digits and '_', starting with a letter")
    return v


class SqlExpression(_Strict):
    sql: str = Field(min_length=1, max_length=5000)


class Aggregate(_Strict):
    relation: str
    function: Literal["count", "sum", "avg", "min", "max"] = "count"
    column: str | None = None
    where: Any = None
    window: float | None = None
    compare_to_previous: Literal["decline", "increase", "ratio", "difference"] | None = None

    @field_validator("window", mode="before")
    @classmethod
    def _window(cls, v: Any) -> Any:
        if v is None:
            return None
        seconds = parse_duration(v)
        if seconds <= 0:
            raise ValueError("a window is longer than 0")
        return seconds

    @field_validator("compare_to_previous", mode="before")
    @classmethod
    def _compare(cls, v: Any) -> Any:
        if v is True:
            return "decline"
        if v is False:
            return None
        if v not in COMPARISONS:
            raise ValueError(f"{v!r}: one of true (decline), {', '.join(COMPARISONS)}")
        return v

    @model_validator(mode="after")
    def _shape(self) -> Aggregate:
        if self.function != "count" and self.column is None:
            raise ValueError(f"{self.function} needs a column")
        if self.compare_to_previous is not None and self.window is None:
            raise ValueError("compare_to_previous needs a window")
        return self


class Factor(_Strict):
    id: str
    label: str | None = Field(default=None, max_length=200)
    weight: float = 0.0
    missing: float = 0.0
    condition: Any = None
    expression: SqlExpression | None = None
    aggregate: Aggregate | None = None

    @field_validator("id")
    @classmethod
    def _id(cls, v: str) -> str:
        return _identifier(v, "factor id")

    @field_validator("weight", "missing")
    @classmethod
    def _num(cls, v: float) -> float:
        return _finite(v)

    @model_validator(mode="after")
    def _one_kind(self) -> Factor:
        kinds = [
            k for k in ("condition", "expression", "aggregate") if getattr(self, k) is not None
        ]
        if len(kinds) != 1:
            raise ValueError(
                "a factor has exactly one of condition, expression, aggregate"
                + (f" (it has {', '.join(kinds)})" if kinds else "")
            )
        return self

    @property
    def kind(self) -> str:
        if self.condition is not None:
            return "condition"
        return "expression" if self.expression is not None else "aggregate"

    @property
    def display(self) -> str:
        return self.label or self.id


class Segment(_Strict):
    name: str
    when: Any = None
    intercept: float | None = None
    weights: dict[str, float] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if v == "default":
            raise ValueError("'default' is the name of the top-level weights")
        return _identifier(v, "segment name")

    @field_validator("intercept")
    @classmethod
    def _num(cls, v: float | None) -> float | None:
        return None if v is None else _finite(v)


class Survival(_Strict):
    model: Literal["weibull"] = "weibull"
    intercept: float
    coefficients: dict[str, float] = Field(default_factory=dict)
    shape: float = Field(gt=0)
    max_days: float = Field(default=3650, gt=0)


class Band(_Strict):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    level: str
    from_: float = Field(alias="from")


class Write(_Strict):
    score: str | None = None
    level: str | None = None
    factors: str | None = None
    days_to_churn: str | None = None

    def columns(self) -> dict[str, str]:
        return {k: v for k, v in self.model_dump().items() if v is not None}


class ScorecardDefinition(_Strict):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str
    description: str | None = Field(default=None, max_length=5000)
    entity_type: str
    model: Literal["logistic", "points"] = "logistic"
    intercept: float = 0.0
    factors: list[Factor] = Field(min_length=1, max_length=MAX_FACTORS)
    segments: list[Segment] = Field(default_factory=list, max_length=MAX_SEGMENTS)
    # Written as a mapping {level: lower bound}, kept as a list (JSONB does not keep the
    # order of an object's keys).
    band_list: list[Band] = Field(alias="bands", min_length=1, max_length=20)
    write: Write = Field(default_factory=Write)
    schedule: str | None = None
    realtime: bool = False
    survival: Survival | None = None
    status: Literal["active", "paused"] = "active"

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _identifier(v, "scorecard name")

    @field_validator("band_list", mode="before")
    @classmethod
    def _bands(cls, v: Any) -> Any:
        if isinstance(v, dict):
            return [{"level": k, "from": b} for k, b in v.items()]
        return v

    @property
    def bands(self) -> dict[str, float]:
        return {b.level: b.from_ for b in self.band_list}

    @field_validator("entity_type")
    @classmethod
    def _entity(cls, v: str) -> str:
        if not _ENTITY_RE.fullmatch(v):
            raise ValueError("an entity type is lowercase letters, digits and '_' (like 'account')")
        return v

    @field_validator("intercept")
    @classmethod
    def _num(cls, v: float) -> float:
        return _finite(v)

    @field_validator("schedule")
    @classmethod
    def _cron(cls, v: str | None) -> str | None:
        from croniter import croniter

        if v is not None and (len(v.split()) != 5 or not croniter.is_valid(v)):
            raise ValueError(f"{v!r} is not a cron expression (5 fields)")
        return v

    def factor(self, factor_id: str) -> Factor:
        return next(f for f in self.factors if f.id == factor_id)

    def weights_of(self, segment: Segment | None) -> tuple[float, dict[str, float]]:
        """The intercept and each factor's weight under ``segment`` (None: the default)."""
        weights = {f.id: f.weight for f in self.factors}
        if segment is None:
            return self.intercept, weights
        weights.update(segment.weights)
        return (self.intercept if segment.intercept is None else segment.intercept), weights

    def stored(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True, by_alias=True)


def check(d: ScorecardDefinition) -> list[Issue]:
    """The checks across fields that need no database."""
    issues: list[Issue] = []
    ids = [f.id for f in d.factors]
    for i, fid in enumerate(ids):
        if fid in ids[:i]:
            issues.append(Issue(f"factors[{i}].id", f"duplicate factor id {fid!r}"))
    known = set(ids)
    names = [s.name for s in d.segments]
    for i, seg in enumerate(d.segments):
        if seg.name in names[:i]:
            issues.append(Issue(f"segments[{i}].name", f"duplicate segment name {seg.name!r}"))
        if seg.when is None and i != len(d.segments) - 1:
            issues.append(Issue(f"segments[{i}].when", "only the last segment may omit when"))
        for fid, w in seg.weights.items():
            if fid not in known:
                issues.append(Issue(f"segments[{i}].weights.{fid}", f"no factor {fid!r}"))
            elif not math.isfinite(w):
                issues.append(Issue(f"segments[{i}].weights.{fid}", "must be a finite number"))
    previous: tuple[str, float] | None = None
    levels = [b.level for b in d.band_list]
    for i, level in enumerate(levels):
        if level in levels[:i]:
            issues.append(Issue(f"bands.{level}", f"duplicate level {level!r}"))
    for level, bound in ((b.level, b.from_) for b in d.band_list):
        if not NAME_RE.fullmatch(level):
            issues.append(
                Issue(f"bands.{level}", "level names are lowercase letters, digits and '_'")
            )
        if not math.isfinite(bound):
            issues.append(Issue(f"bands.{level}", "must be a finite number"))
        elif previous is not None and bound <= previous[1]:
            issues.append(
                Issue(
                    f"bands.{level}",
                    f"bounds must increase: {bound:g} is not above {previous[0]}'s {previous[1]:g}",
                )
            )
        previous = (level, bound)
    if d.survival is not None:
        for fid in d.survival.coefficients:
            if fid not in known:
                issues.append(Issue(f"survival.coefficients.{fid}", f"no factor {fid!r}"))
    elif d.write.days_to_churn is not None:
        issues.append(Issue("write.days_to_churn", "needs survival (the model of days)"))
    written = d.write.columns()
    seen: dict[str, str] = {}
    for key, column in written.items():
        if column in seen:
            issues.append(Issue(f"write.{key}", f"{column!r} is written by {seen[column]} too"))
        seen[column] = key
    return issues


def parse_scorecard(raw: Any) -> ScorecardDefinition:
    """JSON → definition; :class:`ScorecardError` naming each problem's path."""
    if not isinstance(raw, dict):
        raise ScorecardError([Issue("", "a scorecard is an object")])
    try:
        d = ScorecardDefinition.model_validate(raw)
    except ValidationError as exc:
        raise ScorecardError(issues_from_pydantic(exc)) from None
    issues = check(d)
    if issues:
        raise ScorecardError(issues)
    return d
