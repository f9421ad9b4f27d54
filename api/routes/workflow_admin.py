"""``/workflows/{id}/history`` (the audit trail) and ``/workflows/{id}/backfill``
(enroll the rows that already match an event workflow): engine/audit.py and
engine/backfill.py, as ``crmflow workflow history`` and ``workflow backfill``."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends
from pydantic import BaseModel, ConfigDict, Field

from api.deps import Conn, SettingsDep, by_method
from api.problems import ApiError, problem_responses
from api.routes.params import ObjectId
from engine import audit, backfill, workflows

router = APIRouter(
    prefix="/workflows",
    tags=["workflows"],
    dependencies=[Depends(by_method)],
    responses=problem_responses(401, 403, 422, 503),
)


class DiffEntry(BaseModel):
    path: str = Field(description="the changed part of the definition (status included)")
    before: Any = Field(None, description="its value before; absent when it was added")
    after: Any = Field(None, description="its value after; absent when it was removed")


class WorkflowChange(BaseModel):
    id: int
    workflow_id: int
    version: int = Field(description="the workflow's version after the change")
    actor: str = Field(description="who: the API key's name, or the OS user of the CLI")
    at: datetime
    action: str = Field(description="create | update | activate | pause | archive")
    diff: list[DiffEntry]


class BackfillIn(BaseModel):
    # Strict: 0 is not false, "5" is not 5 (a typo must not run a backfill).
    model_config = ConfigDict(extra="forbid", strict=True)

    dry_run: bool = Field(False, description="count what would enroll; change nothing")
    limit: Annotated[int, Field(ge=1, le=10_000_000)] | None = Field(
        None, description="enroll at most this many rows in this run"
    )


class BackfillOut(BaseModel):
    workflow_id: int
    dry_run: bool
    scanned: int = Field(description="rows of the entity's table read")
    matched: int = Field(description="rows meeting the workflow's conditions now")
    enrolled: int = Field(description="executions enrolled (on a dry run: that would be)")
    skipped: int = Field(
        description="matching rows left out: enrolled by a backfill before, the "
        "re-enrollment policy, or the limit"
    )
    batches: int
    limit: int | None


@router.get(
    "/{workflow_id}/history",
    response_model=list[WorkflowChange],
    response_model_exclude_unset=True,
    summary="A workflow's changes, oldest first: who, when, what (the audit trail)",
    responses=problem_responses(404),
)
async def workflow_history(conn: Conn, workflow_id: ObjectId) -> Any:
    """Every create, new version, activation, pause and archive, with the diff of the
    definition (``status`` included): ``[{"path", "before", "after"}]``."""
    await workflows.get_workflow(conn, workflow_id)
    rows = await audit.history(conn, workflow_id)
    # An absent before/after stays absent (added or removed), not null.
    return [
        WorkflowChange.model_validate(
            {**r, "diff": [DiffEntry.model_validate(d) for d in r["diff"]]}
        )
        for r in rows
    ]


@router.post(
    "/{workflow_id}/backfill",
    response_model=BackfillOut,
    summary="Enroll the existing rows that match an event workflow, now",
    responses=problem_responses(400, 404, 409, 413),
)
async def backfill_workflow(
    conn: Conn, settings: SettingsDep, workflow_id: ObjectId, body: BackfillIn | None = None
) -> Any:
    """For an active ``entity_created``, ``entity_updated`` or ``field_updated``
    workflow: its conditions on each row as it is now, in batches of 1,000 rows; each row
    enrolls once per workflow (a second run enrolls nothing); the re-enrollment policy
    and suppression lists apply, ``max_per_minute``/``max_concurrent`` when the
    executions start. ``dry_run`` only counts. 409 for other triggers, paused workflows
    and conditions that need a previous row (``changed``...), naming the path."""
    body = body or BackfillIn()
    await workflows.get_workflow(conn, workflow_id)
    try:
        report = await backfill.run(
            conn, workflow_id, dry_run=body.dry_run, limit=body.limit, settings=settings
        )
    except backfill.BackfillRefused as exc:
        raise ApiError(
            409,
            str(exc),
            errors=[{"path": exc.path, "message": str(exc)}] if exc.path else None,
        ) from None
    return report.as_dict()
