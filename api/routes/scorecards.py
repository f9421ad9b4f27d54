"""``/scorecards``: list, read, apply (PUT) and run scorecards (docs/scorecards.md), through
:mod:`engine.scorecards`, the implementation behind ``crmflow score``: the same checks,
the same error paths (``factors[1].aggregate.window``)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Path
from pydantic import BaseModel, Field

from api.deps import Conn, by_method
from api.problems import ApiError, problem_responses
from engine.scorecards import run, store
from engine.scorecards.model import ScorecardError

router = APIRouter(
    prefix="/scorecards",
    tags=["scorecards"],
    dependencies=[Depends(by_method)],
    responses=problem_responses(401, 403, 422, 503),
)

Name = Annotated[str, Path(pattern=r"^[a-z][a-z0-9_]{0,62}$", description="the scorecard's name")]
NOT_FOUND = problem_responses(404)

EXAMPLE = {
    "entity_type": "lead",
    "model": "points",
    "factors": [
        {
            "id": "big_company",
            "weight": 30,
            "condition": [{"field": "employees", "operator": "greater_than", "value": 100}],
        },
        {
            "id": "from_website",
            "weight": 20,
            "condition": [{"field": "source", "operator": "equals", "value": "website_form"}],
        },
    ],
    "bands": {"cold": 0, "warm": 30, "hot": 50},
    "write": {"score": "score"},
}


class ScorecardSummary(BaseModel):
    id: int
    name: str
    entity_type: str
    status: str
    current_version: int
    schedule: str | None
    realtime: bool
    next_run_at: datetime | None
    last_run_at: datetime | None
    created_at: datetime
    updated_at: datetime
    scored: int = Field(description="entities with a current score")
    levels: dict[str, int] | None = Field(description="entities per level")


class ScorecardVersion(BaseModel):
    version: int
    definition_hash: str
    columns_read: list[str]
    created_at: datetime


class Scorecard(BaseModel):
    id: int
    name: str
    entity_type: str
    status: str
    current_version: int
    schedule: str | None
    realtime: bool
    next_run_at: datetime | None
    last_run_at: datetime | None
    created_at: datetime
    updated_at: datetime
    definition: dict[str, Any]
    columns_read: list[str]
    versions: list[ScorecardVersion]


class RunIn(BaseModel):
    keys: list[dict[str, Any]] | None = Field(
        default=None,
        description='key objects of the entities to score ({"id": 42}); omitted: all of them',
    )


class RunOut(BaseModel):
    scorecard: str
    version: int
    scored: int
    updated: int = Field(description="entity rows written")
    history_rows: int
    level_changes: int
    skipped_locked: int = Field(description="rows a writer held locked, written on a later run")
    seconds: float


def _invalid(exc: ScorecardError) -> ApiError:
    return ApiError(
        422,
        f"the scorecard is invalid: {len(exc.issues)} problem(s)",
        errors=exc.as_list(),
        kind="invalid-scorecard",
        title="Invalid scorecard",
    )


async def _get(conn: Conn, name: str) -> dict[str, Any]:
    try:
        return await store.get(conn, name)
    except store.ScorecardNotFound:
        raise ApiError(404, f"no scorecard named {name!r}") from None


@router.get("", response_model=list[ScorecardSummary], summary="List scorecards")
async def list_scorecards(conn: Conn) -> list[dict[str, Any]]:
    return await store.list_scorecards(conn)


@router.get("/{name}", response_model=Scorecard, summary="Get a scorecard", responses=NOT_FOUND)
async def get_scorecard(conn: Conn, name: Name) -> dict[str, Any]:
    return await _get(conn, name)


@router.put(
    "/{name}",
    response_model=Scorecard,
    summary="Create or update a scorecard (a changed definition is a new version)",
    responses=problem_responses(400),
)
async def put_scorecard(
    conn: Conn,
    name: Name,
    definition: Annotated[
        dict[str, Any],
        Body(
            description="the definition (docs/scorecards.md); the path's name wins",
            openapi_examples={"lead scoring": {"summary": "points", "value": EXAMPLE}},
        ),
    ],
) -> dict[str, Any]:
    try:
        await store.apply(conn, {**definition, "name": name})
    except ScorecardError as exc:
        raise _invalid(exc) from None
    return await _get(conn, name)


@router.post(
    "/{name}/run",
    response_model=RunOut,
    summary="Score the whole table, or the given entities, now",
    responses=NOT_FOUND,
)
async def run_scorecard(conn: Conn, name: Name, body: RunIn | None = None) -> dict[str, Any]:
    try:
        card = await store.load(conn, name)
    except store.ScorecardNotFound:
        raise ApiError(404, f"no scorecard named {name!r}") from None
    except ScorecardError as exc:
        raise _invalid(exc) from None
    keys = body.keys if body is not None else None
    if keys is not None:
        pk = set(card.entity.pk_columns)
        for i, k in enumerate(keys):
            if set(k) != pk:
                raise ApiError(
                    422,
                    f"keys[{i}]: the key of {card.entity.entity_type} is {sorted(pk)}",
                    errors=[{"path": f"body.keys[{i}]", "message": f"expected {sorted(pk)}"}],
                )
    try:
        return (await run.score(conn, card, keys)).as_dict()
    except run.ScoringYielded as exc:
        raise ApiError(
            409, f"scorecard {name!r}: {exc} (a schema change of the CRM, say); run it again"
        ) from None
