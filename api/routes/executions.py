"""``/executions``: history with filters and cursor pagination, detail with steps,
retry (replay from the failed step) and cancel."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, status

from api.deps import Conn, RunnerDep, by_method
from api.problems import ApiError, problem_responses
from api.routes.params import Id, Limit, ObjectId
from api.schemas import (
    CancelIn,
    DateTime,
    EntityType,
    ExecutionDetail,
    ExecutionPage,
)
from engine import executions
from engine.statuses import ExecutionStatus

router = APIRouter(
    prefix="/executions",
    tags=["executions"],
    dependencies=[Depends(by_method)],
    responses=problem_responses(401, 403, 422, 503),
)


@router.get("", response_model=ExecutionPage, summary="List executions, newest first")
async def list_executions(
    conn: Conn,
    workflow_id: Annotated[Id | None, Query()] = None,
    status: ExecutionStatus | None = None,
    entity_type: Annotated[EntityType | None, Query()] = None,
    entity_id: Annotated[
        str | None,
        Query(
            max_length=200,
            description="the entity's id: its key's value (42, ABC-1); for a composite key,"
            ' the JSON object of the key, as executions show it ({"a": 1, "b": "x"})',
        ),
    ] = None,
    since: Annotated[DateTime | None, Query(description="triggered at or after")] = None,
    until: Annotated[DateTime | None, Query(description="triggered before")] = None,
    before_id: Annotated[
        Id | None,
        Query(description="the cursor: next_cursor of a page"),
    ] = None,
    limit: Limit = 50,
) -> Any:
    items = await executions.list_executions(
        conn,
        workflow_id=workflow_id,
        status=status,
        entity_type=entity_type,
        entity_id=entity_id,
        since=since,
        until=until,
        before_id=before_id,
        limit=limit,
    )
    next_cursor = items[-1]["id"] if len(items) == limit else None
    return {"items": items, "next_cursor": next_cursor}


@router.get(
    "/{execution_id}",
    response_model=ExecutionDetail,
    summary="An execution with its steps",
    responses=problem_responses(404),
)
async def get_execution(conn: Conn, execution_id: ObjectId) -> Any:
    return await executions.get_execution(conn, execution_id)


@router.post(
    "/{execution_id}/retry",
    response_model=ExecutionDetail,
    status_code=status.HTTP_202_ACCEPTED,
    summary="Replay a failed execution from its failed step(s)",
    responses=problem_responses(404, 409),
)
async def retry_execution(conn: Conn, runner: RunnerDep, execution_id: ObjectId) -> Any:
    current = await executions.get_execution(conn, execution_id)
    if not await runner.replay(execution_id):
        raise ApiError(
            409, f"execution {execution_id} is {current['status']}; only failed ones are retried"
        )
    return await executions.get_execution(conn, execution_id)


@router.post(
    "/{execution_id}/cancel",
    response_model=ExecutionDetail,
    summary="Cancel a pending, waiting or running execution",
    responses=problem_responses(400, 404, 409, 413),
)
async def cancel_execution(
    conn: Conn, runner: RunnerDep, execution_id: ObjectId, body: CancelIn | None = None
) -> Any:
    """Queued jobs are cancelled; a running step finishes and the next one does not start."""
    current = await executions.get_execution(conn, execution_id)
    reason = body.reason if body else None
    if not await runner.cancel(execution_id, reason):
        raise ApiError(
            409, f"execution {execution_id} is {current['status']}; it can no longer be cancelled"
        )
    return await executions.get_execution(conn, execution_id)
