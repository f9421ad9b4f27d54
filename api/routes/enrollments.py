"""``/workflows/{id}/enrollments``: a workflow's enrollment list (view crmflow.enrollments):
each execution as a CRM's enrollment list shows it, filtered by state, newest first."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel, Field

from api.deps import Conn, by_method
from api.problems import problem_responses
from api.routes.params import Id, Limit, ObjectId
from engine import lifecycle, workflows
from engine.lifecycle import EnrollmentState

router = APIRouter(
    prefix="/workflows",
    tags=["workflows"],
    dependencies=[Depends(by_method)],
    responses=problem_responses(401, 403, 422, 503),
)


class Enrollment(BaseModel):
    execution_id: int
    workflow_id: int
    workflow_version: int
    entity_type: str | None
    entity_id: Any
    state: EnrollmentState
    current_step: str | None = Field(description="the step running, else the next one due")
    waiting_until: datetime | None = Field(description="when a waiting enrollment is due again")
    enrolled_at: datetime
    finished_at: datetime | None
    goal_met_at: datetime | None
    reason: str | None = Field(description="why it ended, when not completed (exit criteria...)")


class EnrollmentPage(BaseModel):
    items: list[Enrollment]
    counts: dict[EnrollmentState, int] = Field(description="enrollments in each state")
    next_cursor: int | None = Field(
        description="pass as before_id for the next page; null on the last page"
    )


@router.get(
    "/{workflow_id}/enrollments",
    response_model=EnrollmentPage,
    summary="A workflow's enrollments, newest first, by state",
    responses=problem_responses(404),
)
async def list_enrollments(
    conn: Conn,
    workflow_id: ObjectId,
    state: Annotated[
        EnrollmentState | None,
        Query(description="only enrollments in this state"),
    ] = None,
    before_id: Annotated[Id | None, Query(description="the cursor: next_cursor of a page")] = None,
    limit: Limit = 50,
) -> Any:
    await workflows.get_workflow(conn, workflow_id)
    return await lifecycle.list_enrollments(
        conn, workflow_id, state=state, before_id=before_id, limit=limit
    )
