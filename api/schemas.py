"""Request and response bodies of the API (the OpenAPI schema is generated from them).

Workflow definitions are not modelled here: they are checked by the engine (the same
checks as ``crmflow workflow apply``), whose errors name the offending path.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictInt

from engine.statuses import ExecutionStatus, StepStatus, WorkflowStatus

MAX_BIGINT = 2**63 - 1

ScopeName = Literal["read", "write", "admin"]
# An entity's id: 42, "42", or {"deal_id": 7, "line_no": 2} for a composite key.
EntityId = Annotated[
    StrictInt | Annotated[str, Field(min_length=1, max_length=200)] | dict[str, Any],
    Field(description='the entity\'s key: 42, "42", or an object for a composite key'),
]
EntityType = Annotated[str, Field(pattern=r"^[a-z_][a-z0-9_]{0,39}$")]

_RFC3339 = re.compile(
    r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d{1,6})?([Zz]|[+-]\d{2}:\d{2})$"
)


def _rfc3339(value: Any) -> Any:
    """Only RFC 3339 date-times (pydantic alone also takes numbers as Unix times)."""
    if isinstance(value, str) and not _RFC3339.match(value):
        raise ValueError("expected an RFC 3339 date-time such as 2026-01-31T09:00:00Z")
    return value


DateTime = Annotated[datetime, BeforeValidator(_rfc3339)]


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ───────────────────────────── workflows ─────────────────────────────


class WorkflowSummary(BaseModel):
    id: int
    name: str
    status: WorkflowStatus
    execution_count: int
    version: int
    trigger_type: str
    entity_type: str | None
    priority: int
    created_at: datetime
    updated_at: datetime
    broken: bool = Field(
        False,
        description="its conditions no longer compile against the database (schema drift): "
        "it matches nothing until fixed",
    )
    broken_reason: str | None = Field(None, description="why it is broken")
    broken_at: datetime | None = Field(None, description="when it was found broken")
    broken_since_event_id: int | None = Field(
        None,
        description="the first event it may have missed; POST /workflows/{id}/replay-events "
        "matches it on them once it compiles again",
    )


class Workflow(WorkflowSummary):
    version_id: int
    definition: dict[str, Any] = Field(description="the current version's definition")
    predicate: str = Field(description="the compiled SQL predicate the matcher evaluates")


class WorkflowVersion(BaseModel):
    id: int
    version: int
    current: bool
    definition: dict[str, Any]
    definition_hash: str
    trigger_type: str
    entity_type: str | None
    priority: int
    predicate: str
    created_at: datetime


class DryRunIn(_In):
    entity_id: EntityId | None = Field(None, description="test the entity's current row")
    row: dict[str, Any] | None = Field(None, description="or test this row (column → value)")
    old_row: dict[str, Any] | None = Field(
        None,
        description="update triggers: the values the changed fields had before "
        "(fields left out had the row's values)",
    )
    payload: dict[str, Any] | None = Field(None, description="event triggers: the payload")


class ConditionResult(BaseModel):
    path: str
    condition: Any
    matches: bool
    sql: str


class DryRunOut(BaseModel):
    workflow_id: int
    workflow_version: int
    trigger_type: str
    entity_type: str | None
    op: str | None = Field(description="the operation simulated (insert, update, delete, event)")
    matches: bool = Field(description="whether the workflow would enroll")
    trigger_matches: bool
    conditions: list[ConditionResult] = Field(description="each top-level condition")
    sql: str = Field(description="the compiled predicate evaluated")
    row: dict[str, Any] | None = Field(description="the row as evaluated (typed by the table)")
    old_row: dict[str, Any] | None


class RunIn(_In):
    entity_id: EntityId | None = Field(None, description="run for this entity only")
    input: dict[str, Any] | None = Field(None, description="available to templates as input")


class RunOut(BaseModel):
    workflow_id: int
    execution_ids: list[int]


class ReplayOut(BaseModel):
    workflow_id: int
    since_event_id: int | None = Field(description="the first missed event; null: none")
    events: int = Field(description="events matched again")
    enrolled: int = Field(description="executions enrolled by the replay")


# ───────────────────────────── executions ─────────────────────────────


class ExecutionItem(BaseModel):
    id: int
    status: ExecutionStatus
    triggered_at: datetime
    actions_count: int
    workflow_id: int
    workflow_name: str
    workflow_version: int
    entity_type: str | None
    entity_id: Any
    event_id: int | None
    started_at: datetime | None
    finished_at: datetime | None
    error: str | None


class Step(BaseModel):
    id: str
    type: str
    status: StepStatus
    attempts: int
    scheduled_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    result: Any
    error: str | None


class ExecutionDetail(ExecutionItem):
    trace_id: str = Field(
        description="the execution's OpenTelemetry trace id (32 hex digits; docs/operations.md)"
    )
    steps: list[Step]


class ExecutionPage(BaseModel):
    items: list[ExecutionItem]
    next_cursor: int | None = Field(
        description="pass as before_id for the next page; null on the last page"
    )


class CancelIn(_In):
    reason: str | None = Field(None, max_length=500)


# ───────────────────────────── events ─────────────────────────────


class EventIn(_In):
    entity_type: EntityType | None = Field(None, description="the entity it is about")
    entity_id: EntityId | None = None
    payload: dict[str, Any] | None = Field(
        None, description="available to conditions and templates as event.payload and input"
    )


class EventOut(BaseModel):
    event_id: int
    event_name: str
    entity_type: str | None
    entity_id: Any
    captured_at: datetime


# ───────────────────────────── entities ─────────────────────────────


class EntityField(BaseModel):
    name: str
    type: str = Field(description="the PostgreSQL type")
    kind: str = Field(description="the family the condition operators work on")
    nullable: bool
    operators: list[str]
    enum_values: list[str] | None = None
    expression: str | None = Field(None, description="derived fields: the SQL expression")


class Entity(BaseModel):
    entity_type: str
    table_schema: str
    table_name: str
    pk_columns: list[str]
    fields: list[EntityField]
    derived_fields: list[EntityField]


# ───────────────────────────── health ─────────────────────────────


class DatabaseHealth(BaseModel):
    ok: bool
    error: str | None = None
    migrations_pending: list[str] = []


class WorkerHealth(BaseModel):
    alive: int
    last_heartbeat: datetime | None
    last_heartbeat_age_seconds: float | None


class OutboxHealth(BaseModel):
    pending: int
    oldest_age_seconds: float | None


class BrokenWorkflow(BaseModel):
    id: int
    name: str
    reason: str
    since: datetime | None


class CircuitBreaker(BaseModel):
    host: str = Field(description="the target host (with its port when not the default)")
    state: Literal["open", "half_open"] = Field(
        description="open: its steps wait; half_open: one probe call is out"
    )
    retry_at: datetime = Field(
        description="open: when the half-open probe may go; half_open: the probe's deadline"
    )
    trips: int = Field(description="openings in a row (the open period doubles with each)")
    failures: int = Field(description="the consecutive failures that opened it")
    opened_at: datetime | None
    last_error: str | None


class Health(BaseModel):
    status: Literal["ok", "degraded", "down"]
    database: DatabaseHealth
    workers: WorkerHealth | None
    outbox: OutboxHealth | None
    broken_workflows: list[BrokenWorkflow] = Field(
        [], description="active workflows that no longer compile (status degraded)"
    )
    circuit_breakers: list[CircuitBreaker] = Field(
        [],
        description="target hosts whose circuit breaker is open or half-open: their "
        "external steps wait (status degraded)",
    )


# ───────────────────────────── API keys ─────────────────────────────


class ApiKeyIn(_In):
    name: str = Field(min_length=1, max_length=200)
    scope: ScopeName


class ApiKey(BaseModel):
    id: int
    name: str
    prefix: str
    scope: ScopeName
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


class ApiKeyCreated(ApiKey):
    key: str = Field(description="the key itself: shown this once, store it now")


# ───────────────────────────── workflow definitions (documentation) ─────────────────────────────


def definition_schema(*, partial: bool = False) -> dict[str, Any]:
    """The JSON schema documented for workflow definitions (docs/workflows.md).

    It documents the shape only: the engine checks everything (fields, operators and
    values against the live catalog, action parameters) and its 422 names the paths.
    ``partial``: the body of PATCH, where every key is optional and null removes it.
    """
    from engine.actions import registry
    from engine.model import TRIGGER_TYPES

    properties: dict[str, Any] = {
        "name": {"type": "string", "minLength": 1, "maxLength": 200},
        "description": {"type": ["string", "null"], "maxLength": 5000},
        "trigger": {
            "type": "object",
            "required": ["type"],
            "properties": {"type": {"enum": sorted(TRIGGER_TYPES)}},
            "description": "what starts the workflow, e.g. "
            '{"type": "entity_created", "entity_type": "lead"}',
        },
        "conditions": {
            "description": "a list of conditions (all must hold), or a group "
            '{"all": [...]}, {"any": [...]}, {"not": {...}}, {"sql": "..."}; a condition '
            'is {"field", "operator", "value"}',
        },
        "actions": {
            "type": "array",
            "minItems": 1,
            "maxItems": 100,
            "items": {
                "type": "object",
                "required": ["type"],
                "properties": {"type": {"enum": sorted(registry())}},
                "description": "a step: its type, the action's parameters, and options "
                "(id, delay, when, retry, timeout, on_failure, depends_on, window: business "
                "hours)",
            },
        },
        "status": {"enum": ["active", "paused"], "description": "default: paused"},
        "priority": {"description": "an integer from -1000 to 1000 (default 0)"},
        "environment": {"description": "a label such as production (the default)"},
        "limits": {
            "description": "max_per_minute, on_rate_limit, max_concurrent, debounce, "
            "reenrollment, reenroll_after"
        },
        "edge_triggered": {"description": "fire only when the conditions become true"},
    }
    schema: dict[str, Any] = {
        "type": "object",
        "properties": properties,
        "additionalProperties": False,
    }
    if partial:
        schema["properties"] = {
            name: {"anyOf": [spec, {"type": "null"}]} if "type" in spec or "enum" in spec else spec
            for name, spec in properties.items()
        }
    else:
        schema["required"] = ["name", "trigger", "actions"]
    return schema
