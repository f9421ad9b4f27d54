"""``/workflows``: create, read, replace, patch, archive, activate/pause, versions,
executions, dry run, manual runs and replaying the events a broken workflow missed.

Definitions go through :mod:`engine.workflows`, the implementation behind ``crmflow
workflow apply``: the same checks, the same error paths (``conditions[1].operator``).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Query, Response, status
from pydantic import WithJsonSchema

from api.deps import Conn, SettingsDep, by_method
from api.problems import ApiError, problem_responses
from api.routes.params import Flag, Id, Limit, ObjectId
from api.schemas import (
    DryRunIn,
    DryRunOut,
    ExecutionItem,
    ReplayOut,
    RunIn,
    RunOut,
    Workflow,
    WorkflowSummary,
    WorkflowVersion,
    definition_schema,
)
from engine import dryrun, executions, matcher, scheduler, workflows
from engine.model import DefinitionError, Issue, WorkflowDefinition

router = APIRouter(
    prefix="/workflows",
    tags=["workflows"],
    dependencies=[Depends(by_method)],
    responses=problem_responses(401, 403, 422, 503),
)

SEED_EXAMPLE = {
    "name": "Auto-qualify new leads from website",
    "trigger": {"type": "entity_created", "entity_type": "lead"},
    "conditions": [{"field": "source", "operator": "equals", "value": "website_form"}],
    "actions": [{"type": "qualify_lead"}, {"type": "enrich_lead", "delay": 60}],
    "status": "active",
}
Definition = Annotated[
    dict[str, Any],
    WithJsonSchema(definition_schema()),
    Body(
        description="A workflow definition (name, trigger, conditions, actions, status...)",
        openapi_examples={"seed": {"summary": "the seed's workflow", "value": SEED_EXAMPLE}},
    ),
]
Changes = Annotated[
    dict[str, Any],
    WithJsonSchema(definition_schema(partial=True)),
    Body(
        description="Top-level keys of the definition to replace; null removes a key",
        openapi_examples={"priority": {"summary": "change one key", "value": {"priority": 5}}},
    ),
]
NOT_FOUND = problem_responses(404)
EDIT_ERRORS = problem_responses(400, 404, 409, 413)


async def _live(conn: Conn, workflow_id: int) -> dict[str, Any]:
    """The workflow, which must not be archived (archived workflows are history)."""
    wf = await workflows.get_workflow(conn, workflow_id)
    if wf["status"] == "archived":
        raise ApiError(409, f"workflow {workflow_id} is archived; archived workflows are history")
    return wf


@router.get("", response_model=list[WorkflowSummary], summary="List workflows")
async def list_workflows(
    conn: Conn,
    include_archived: Annotated[Flag, Query(description="include archived workflows")] = False,
) -> list[dict[str, Any]]:
    return await workflows.list_workflows(conn, include_archived=include_archived)


@router.post(
    "",
    response_model=Workflow,
    status_code=status.HTTP_201_CREATED,
    summary="Create a workflow",
    responses=problem_responses(400, 409, 413),
)
async def create_workflow(conn: Conn, definition: Definition, response: Response) -> dict[str, Any]:
    """The seed's JSON works as written. ``status`` defaults to paused; the name must be
    free (409 otherwise). Invalid definitions get a 422 naming each offending path."""
    result = await workflows.create(conn, definition)
    response.headers["Location"] = f"/workflows/{result.id}"
    return await workflows.get_workflow(conn, result.id)


@router.get(
    "/{workflow_id}", response_model=Workflow, summary="Get a workflow", responses=NOT_FOUND
)
async def get_workflow(conn: Conn, workflow_id: ObjectId) -> dict[str, Any]:
    return await workflows.get_workflow(conn, workflow_id)


@router.put(
    "/{workflow_id}",
    response_model=Workflow,
    summary="Replace a workflow's definition",
    responses=EDIT_ERRORS,
)
async def replace_workflow(conn: Conn, workflow_id: ObjectId, definition: Definition) -> Any:
    """A changed definition becomes a new version; running executions keep theirs.
    Without ``status`` the workflow keeps its current status."""
    await _live(conn, workflow_id)
    await workflows.update(conn, workflow_id, definition)
    return await workflows.get_workflow(conn, workflow_id)


@router.patch(
    "/{workflow_id}",
    response_model=Workflow,
    summary="Change top-level keys of a workflow's definition",
    responses=EDIT_ERRORS,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/merge-patch+json": {"schema": definition_schema(partial=True)},
            },
        }
    },
)
async def patch_workflow(conn: Conn, workflow_id: ObjectId, changes: Changes) -> Any:
    """JSON merge patch on the top level: the keys given replace the stored ones, a key
    set to null is removed. The result is saved like a PUT (a new version if changed)."""
    wf = await _live(conn, workflow_id)
    # A key the definition cannot have is refused even as null: a typo must not be a no-op.
    unknown = [key for key in changes if key not in WorkflowDefinition.model_fields]
    if unknown:
        raise DefinitionError([Issue(key, "unknown field") for key in unknown])
    merged = {**wf["definition"], **changes}
    merged = {k: v for k, v in merged.items() if v is not None}
    await workflows.update(conn, workflow_id, merged)
    return await workflows.get_workflow(conn, workflow_id)


@router.delete(
    "/{workflow_id}",
    response_model=Workflow,
    summary="Archive a workflow",
    responses=NOT_FOUND,
)
async def archive_workflow(conn: Conn, workflow_id: ObjectId) -> Any:
    """Archived workflows stop matching; their versions and executions stay."""
    await workflows.get_workflow(conn, workflow_id)
    await workflows.set_status(conn, workflow_id, "archived")
    return await workflows.get_workflow(conn, workflow_id)


async def _set_status(conn: Conn, workflow_id: int, new_status: str) -> dict[str, Any]:
    await _live(conn, workflow_id)
    await workflows.set_status(conn, workflow_id, new_status)
    return await workflows.get_workflow(conn, workflow_id)


@router.put(
    "/{workflow_id}/activate",
    response_model=Workflow,
    summary="Activate a workflow",
    responses=problem_responses(404, 409),
)
async def activate_workflow(conn: Conn, workflow_id: ObjectId) -> Any:
    return await _set_status(conn, workflow_id, "active")


@router.put(
    "/{workflow_id}/pause",
    response_model=Workflow,
    summary="Pause a workflow",
    responses=problem_responses(404, 409),
)
async def pause_workflow(conn: Conn, workflow_id: ObjectId) -> Any:
    return await _set_status(conn, workflow_id, "paused")


@router.get(
    "/{workflow_id}/versions",
    response_model=list[WorkflowVersion],
    summary="A workflow's versions, oldest first",
    responses=NOT_FOUND,
)
async def list_versions(conn: Conn, workflow_id: ObjectId) -> Any:
    return await workflows.list_versions(conn, workflow_id)


@router.get(
    "/{workflow_id}/executions",
    response_model=list[ExecutionItem],
    summary="A workflow's executions, newest first",
    responses=NOT_FOUND,
)
async def list_workflow_executions(
    conn: Conn,
    workflow_id: ObjectId,
    limit: Limit = 50,
    before_id: Annotated[
        Id | None,
        Query(description="only executions older than this id"),
    ] = None,
) -> Any:
    await workflows.get_workflow(conn, workflow_id)
    return await executions.list_executions(
        conn, workflow_id=workflow_id, before_id=before_id, limit=limit
    )


@router.post(
    "/{workflow_id}/test",
    response_model=DryRunOut,
    summary="Dry run: would the workflow fire for this entity or row?",
    responses=EDIT_ERRORS,
)
async def test_workflow(conn: Conn, workflow_id: ObjectId, body: DryRunIn) -> Any:
    """Evaluates the current compiled predicate, and each top-level condition, on the
    entity's current row (``entity_id``) or on a given ``row``, as the matcher would for
    the workflow's trigger. Writes nothing."""
    return await dryrun.dry_run(
        conn,
        workflow_id,
        entity_id=body.entity_id,
        row=body.row,
        old_row=body.old_row,
        payload=body.payload,
    )


@router.post(
    "/{workflow_id}/run",
    response_model=RunOut,
    status_code=status.HTTP_202_ACCEPTED,
    summary="Run a manual, scheduled or date-relative workflow now",
    responses=EDIT_ERRORS,
)
async def run_workflow(
    conn: Conn, settings: SettingsDep, workflow_id: ObjectId, body: RunIn | None = None
) -> Any:
    """Enrolls the rows the conditions select (or the one ``entity_id``); the executions
    run on the workers. Event-triggered workflows cannot be run by hand (409)."""
    body = body or RunIn()
    await workflows.get_workflow(conn, workflow_id)
    ids = await scheduler.run_now(
        conn, workflow_id, settings=settings, input=body.input, entity_id=body.entity_id
    )
    return {"workflow_id": workflow_id, "execution_ids": ids}


@router.post(
    "/{workflow_id}/replay-events",
    response_model=ReplayOut,
    summary="Match a workflow that was broken on the events it missed",
    responses=problem_responses(404, 409),
)
async def replay_events(conn: Conn, settings: SettingsDep, workflow_id: ObjectId) -> Any:
    """Once a broken workflow compiles again (the schema fixed, or a new version saved),
    clears its broken state and enrolls it on its entity's events since it broke
    (``broken_since_event_id``). Idempotent: an event never enrolls twice. 409 while it
    still does not compile, or when it is not active."""
    await workflows.get_workflow(conn, workflow_id)
    try:
        return await matcher.replay_events(conn, workflow_id, settings)
    except workflows.ReplayRefused as exc:
        raise ApiError(409, str(exc)) from None
