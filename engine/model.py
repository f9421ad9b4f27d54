"""Workflow definitions: the JSON users write, parsed and checked for shape.

The seed's JSON is accepted exactly as written::

    {"name": "Auto-qualify new leads from website",
     "trigger": {"type": "entity_created", "entity_type": "lead"},
     "conditions": [{"field": "source", "operator": "equals", "value": "website_form"}],
     "actions": [{"type": "qualify_lead"}, {"type": "enrich_lead", "delay": 60}],
     "status": "active"}

Checks that need the database (fields exist, values fit column types, action
parameters) live in :mod:`engine.workflows`; this module only needs the JSON.
Every error names the path of the offending part, e.g. ``conditions[1].operator``.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from engine.conditions import Condition, ConditionError, parse_conditions
from engine.durations import parse_duration as parse_duration  # engine.model.parse_duration
from engine.windows import Window

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

# ───────────────────────────── triggers ─────────────────────────────

_ENTITY_RE = re.compile(r"[a-z_][a-z0-9_]{0,39}")  # fullmatch: "$" would allow a final "\n"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


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

# ───────────────────────────── steps ─────────────────────────────


class RetryPolicy(_Strict):
    max_attempts: int = Field(3, ge=1, le=50)
    backoff: Duration = 1.0  # the first wait; doubles each attempt
    max_backoff: Duration = 3600.0
    jitter: bool = True


class DelayUntil(_Strict):
    """Wait until a date/time field of the entity, shifted by ``offset`` ("-1d")."""

    until: str
    offset: float = 0.0

    @field_validator("offset", mode="before")
    @classmethod
    def _offset(cls, v: Any) -> float:
        return parse_duration(v, allow_negative=True)


class WaitUntil(_Strict):
    """A step that waits (engine/lifecycle.py) until the entity meets ``conditions``, or
    the custom event ``event`` about it arrives, or ``timeout`` passes; then it runs, its
    result saying which (``{"outcome": "met" | "event" | "timed_out"}``)."""

    conditions: Any = None
    event: str | None = Field(None, pattern=r"^[A-Za-z0-9_.:-]{1,100}$")
    timeout: Duration
    _conditions: Condition | None = PrivateAttr(None)  # parsed by parse_definition

    @model_validator(mode="after")
    def _one_of(self) -> WaitUntil:
        if (self.conditions is None) == (self.event is None):
            raise ValueError("give either 'conditions' or 'event'")
        return self

    @property
    def parsed_conditions(self) -> Condition | None:
        return self._conditions


class Step(BaseModel):
    """One action. Keys other than the step options are the action's parameters."""

    model_config = ConfigDict(extra="allow")

    type: str = Field(pattern=r"^[a-z][a-z0-9_.]{0,99}$")
    id: str | None = Field(None, pattern=r"^[A-Za-z0-9_-]{1,64}$")
    delay: Duration | DelayUntil | None = None
    when: Any = None
    retry: RetryPolicy | None = None
    timeout: Duration | None = None
    on_failure: Literal["stop", "continue", "compensate"] = "stop"
    depends_on: list[str] | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    # business hours (engine/windows.py): due outside them, the step waits for the next opening
    window: Window | None = None
    # wait for a condition or a custom event first (engine/lifecycle.py)
    wait_until: WaitUntil | None = None
    _when: Condition | None = PrivateAttr(None)  # the parsed ``when`` tree, set by parse_definition

    @model_validator(mode="before")
    @classmethod
    def _wait_timeout(cls, data: Any) -> Any:
        # "timeout" beside "wait_until" is the wait's timeout, not the action's
        if (
            isinstance(data, dict)
            and isinstance(data.get("wait_until"), dict)
            and "timeout" in data
            and "timeout" not in data["wait_until"]
        ):
            data = dict(data)
            data["wait_until"] = {**data["wait_until"], "timeout": data.pop("timeout")}
        return data

    @field_validator("retry", mode="before")
    @classmethod
    def _retry_count(cls, v: Any) -> Any:
        if isinstance(v, int) and not isinstance(v, bool):
            return {"max_attempts": v}
        return v

    @model_validator(mode="after")
    def _collect_params(self) -> Step:
        extra = dict(self.__pydantic_extra__ or {})
        if extra:
            overlap = set(extra) & set(self.params)
            if overlap:
                raise ValueError(f"{sorted(overlap)} given both inline and in 'params'")
            self.params = {**extra, **self.params}
            self.__pydantic_extra__ = {}
        return self

    @property
    def when_condition(self) -> Condition | None:
        return self._when


class Limits(_Strict):
    max_per_minute: int | None = Field(None, ge=1)
    on_rate_limit: Literal["wait", "drop"] = "wait"
    max_concurrent: int | None = Field(None, ge=1)
    # A template naming what the limits count per ("{{ entity.account_id }}"): at most
    # max_concurrent executions (and max_per_minute starts) per key (engine/executor/flow.py).
    key: str | None = Field(None, min_length=1, max_length=500)
    debounce: Duration | None = None
    reenrollment: Literal["always", "never", "after"] = "always"
    reenroll_after: Duration | None = None

    @field_validator("key")
    @classmethod
    def _key_is_a_template(cls, v: str | None) -> str | None:
        if v is not None:
            from engine import templates  # (templates imports this module's neighbours)

            try:
                templates.check(v)
            except templates.TemplateProblem as exc:
                raise ValueError(str(exc)) from None
        return v

    @model_validator(mode="after")
    def _reenroll(self) -> Limits:
        if self.reenrollment == "after" and not self.reenroll_after:
            raise ValueError("reenrollment 'after' needs reenroll_after (e.g. '30d')")
        return self


# ───────────────────────────── names ─────────────────────────────

MAX_NAME_LENGTH = 200
# Control (Cc), format (Cf: zero-width spaces and joiners, bidi overrides, soft hyphen,
# BOM), surrogate (Cs) and line/paragraph separator (Zl, Zp) characters: invisible or
# layout-changing, they would let two names that look the same be two workflows.
_REFUSED_NAME_CATEGORIES = {"Cc", "Cf", "Cs", "Zl", "Zp"}


def normalise_name(value: str) -> str:
    """A workflow name in its one canonical form (NFKC: fullwidth letters, ligatures and
    compatibility spaces become their plain forms), so that names that read the same are
    the same name; ``ValueError`` for an invisible or control character, surrounding
    whitespace, or more than 200 characters once normalised."""
    for position, char in enumerate(value):
        if unicodedata.category(char) in _REFUSED_NAME_CATEGORIES:
            label = unicodedata.name(char, "a control character")
            raise ValueError(
                f"contains an invisible or control character, U+{ord(char):04X} ({label}), "
                f"at position {position}: remove it (it would make a lookalike of another name)"
            )
    normalised = unicodedata.normalize("NFKC", value)
    if normalised != normalised.strip():
        raise ValueError("begins or ends with whitespace: remove it")
    if len(normalised) > MAX_NAME_LENGTH:
        raise ValueError(
            f"is {len(normalised)} characters once normalised (NFKC); at most {MAX_NAME_LENGTH}"
        )
    if any(unicodedata.category(c) in _REFUSED_NAME_CATEGORIES for c in normalised):
        raise ValueError("contains an invisible or control character once normalised (NFKC)")
    return normalised


def _suppress_list(value: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_.:-]{1,100}", value):
        raise ValueError(
            f"{value[:100]!r} is not a suppression list name "
            "(1 to 100 letters, digits or _ . : -, like 'unsubscribed')"
        )
    return value


SuppressList = Annotated[str, AfterValidator(_suppress_list)]


class WorkflowDefinition(_Strict):
    name: str = Field(min_length=1, max_length=MAX_NAME_LENGTH)
    description: str | None = Field(None, max_length=5000)
    trigger: Any
    conditions: Any = Field(default_factory=list)
    actions: list[Step] = Field(min_length=1, max_length=100)
    status: Literal["active", "paused"] = "paused"
    priority: int = Field(0, ge=-1000, le=1000)
    environment: str = Field("production", pattern=r"^[A-Za-z0-9_-]{1,50}$")
    limits: Limits = Field(default_factory=Limits)
    edge_triggered: bool = False
    # Suppression lists (engine/suppressions.py): entities on any of them do not enroll.
    suppress: list[SuppressList] | None = Field(None, max_length=20)
    # Enrollment lifecycle (engine/lifecycle.py): met, the execution ends completed
    # ("goal met"); exit_when: it ends cancelled ("exit criteria").
    goal: Any = None
    exit_when: Any = None

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return normalise_name(v)

    # Filled by parse_definition from the raw JSON.
    _trigger: Trigger
    _conditions: Condition
    _goal: Condition | None = PrivateAttr(None)
    _exit_when: Condition | None = PrivateAttr(None)

    @property
    def parsed_goal(self) -> Condition | None:
        return self._goal

    @property
    def parsed_exit_when(self) -> Condition | None:
        return self._exit_when

    @property
    def parsed_trigger(self) -> Trigger:
        return self._trigger

    @property
    def parsed_conditions(self) -> Condition:
        return self._conditions

    @property
    def entity_type(self) -> str | None:
        return getattr(self._trigger, "entity_type", None)

    @property
    def trigger_type(self) -> str:
        return str(self._trigger.type)


MAX_DEFINITION_BYTES = 256_000
MAX_DEFINITION_DEPTH = 64


def definition_size_issue(raw: Any) -> Issue | None:
    """Whether ``raw`` is too large or too deep, found without serialising it.

    A walk that stops as soon as a limit is crossed: ``json.dumps`` of the whole value
    would first build it, and a YAML file of nested aliases (a "billion laughs") is a
    few hundred bytes that expand to gigabytes; a deep nesting would overflow the
    recursion of every recursive step that follows. Sizes are those of compact JSON
    (close enough: the limit is about memory and time, not an exact byte count).
    """
    size = 0
    stack: list[tuple[Any, int]] = [(raw, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_DEFINITION_DEPTH:
            return Issue("", f"the definition is nested deeper than {MAX_DEFINITION_DEPTH} levels")
        if isinstance(value, dict):
            size += 2 + len(value)
            for key, item in value.items():
                size += len(str(key)) + 3
                stack.append((item, depth + 1))
        elif isinstance(value, list | tuple):
            size += 2 + len(value)
            stack.extend((item, depth + 1) for item in value)
        else:
            size += len(value) + 2 if isinstance(value, str) else len(str(value))
        if size > MAX_DEFINITION_BYTES:
            return Issue("", f"the definition is larger than {MAX_DEFINITION_BYTES} bytes")
    return None


def parse_definition(raw: Any) -> WorkflowDefinition:
    """Parse and check the shape of a definition; raise :class:`DefinitionError`."""
    if not isinstance(raw, dict):
        raise DefinitionError([Issue("", "a workflow is a JSON object")])
    too_big = definition_size_issue(raw)
    if too_big is not None:
        raise DefinitionError([too_big])
    issues: list[Issue] = []
    try:
        wf = WorkflowDefinition.model_validate(raw)
    except ValidationError as exc:
        issues.extend(issues_from_pydantic(exc))
        wf = None

    trigger = _parse_trigger(raw.get("trigger"), issues)
    try:
        conditions = parse_conditions(raw.get("conditions", []), "conditions")
    except ConditionError as exc:
        issues.extend(Issue(p, m) for p, m in exc.issues)
        conditions = None

    lifecycle: dict[str, Condition | None] = {}
    for key in ("goal", "exit_when"):
        if raw.get(key) is None:
            lifecycle[key] = None
            continue
        try:
            lifecycle[key] = parse_conditions(raw[key], key)
        except ConditionError as exc:
            issues.extend(Issue(p, m) for p, m in exc.issues)
            lifecycle[key] = None

    actions = raw.get("actions")
    steps: list[Any] = actions if isinstance(actions, list) else []
    waits: list[Condition | None] = []
    for i, step in enumerate(steps):
        wait = step.get("wait_until") if isinstance(step, dict) else None
        conditions_of_wait = wait.get("conditions") if isinstance(wait, dict) else None
        if conditions_of_wait is None:
            waits.append(None)
            continue
        try:
            path = f"actions[{i}].wait_until.conditions"
            waits.append(parse_conditions(conditions_of_wait, path))
        except ConditionError as exc:
            issues.extend(Issue(p, m) for p, m in exc.issues)
            waits.append(None)
    whens: list[Condition | None] = []
    for i, step in enumerate(steps):
        when = step.get("when") if isinstance(step, dict) else None
        if when is None:
            whens.append(None)
            continue
        try:
            whens.append(parse_conditions(when, f"actions[{i}].when"))
        except ConditionError as exc:
            issues.extend(Issue(p, m) for p, m in exc.issues)
            whens.append(None)

    if wf is not None and trigger is not None:
        issues.extend(_check_steps(wf.actions))
    if issues:
        raise DefinitionError(issues)
    assert wf is not None and trigger is not None and conditions is not None
    wf._trigger = trigger
    wf._conditions = conditions
    wf._goal, wf._exit_when = lifecycle["goal"], lifecycle["exit_when"]
    for step, when, wait in zip(wf.actions, whens, waits, strict=True):
        step._when = when
        if step.wait_until is not None:
            step.wait_until._conditions = wait
    return wf


def _parse_trigger(raw: Any, issues: list[Issue]) -> Trigger | None:
    if not isinstance(raw, dict):
        issues.append(Issue("trigger", "a trigger is an object with a 'type'"))
        return None
    kind = raw.get("type")
    model = TRIGGER_TYPES.get(kind) if isinstance(kind, str) else None
    if model is None:
        issues.append(
            Issue("trigger.type", f"unknown trigger type {kind!r}; one of {sorted(TRIGGER_TYPES)}")
        )
        return None
    try:
        return model.model_validate(raw)  # type: ignore[return-value]
    except ValidationError as exc:
        issues.extend(issues_from_pydantic(exc, "trigger"))
        return None


def step_ids(steps: list[Step]) -> list[str]:
    """Each step's id: its own, else its type, numbered when a type repeats."""
    counts: dict[str, int] = {}
    for s in steps:
        counts[s.type] = counts.get(s.type, 0) + 1
    seen: dict[str, int] = {}
    ids = []
    for s in steps:
        if s.id:
            ids.append(s.id)
            continue
        seen[s.type] = seen.get(s.type, 0) + 1
        ids.append(s.type if counts[s.type] == 1 else f"{s.type}_{seen[s.type]}")
    return ids


def _check_steps(steps: list[Step]) -> list[Issue]:
    issues: list[Issue] = []
    ids = step_ids(steps)
    positions = {}
    for i, sid in enumerate(ids):
        if sid in positions:
            issues.append(Issue(f"actions[{i}].id", f"step id {sid!r} is used twice"))
        positions[sid] = i
    for i, s in enumerate(steps):
        for dep in s.depends_on or []:
            if dep not in positions:
                issues.append(Issue(f"actions[{i}].depends_on", f"no step with id {dep!r}"))
            elif dep == ids[i]:
                issues.append(Issue(f"actions[{i}].depends_on", "a step cannot depend on itself"))
    if not issues:
        cycle = find_cycle(ids, dependencies(steps, ids))
        if cycle:
            issues.append(Issue("actions", "depends_on forms a cycle: " + " -> ".join(cycle)))
    return issues


def dependencies(steps: list[Step], ids: list[str]) -> dict[str, list[str]]:
    """Each step's prerequisites: its depends_on, else the step before it (sequential)."""
    deps: dict[str, list[str]] = {}
    for i, s in enumerate(steps):
        if s.depends_on is not None:
            deps[ids[i]] = list(s.depends_on)
        else:
            deps[ids[i]] = [ids[i - 1]] if i > 0 else []
    return deps


def find_cycle(ids: list[str], deps: dict[str, list[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in deps.get(node, []):
            if state.get(dep) == 1:
                return [*stack[stack.index(dep) :], dep]
            if dep not in state:
                found = visit(dep)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in ids:
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None
