"""``/suppressions``: suppression lists (engine/suppressions.py), as ``crmflow suppress``.

An entry names an entity (``entity_type`` and ``key``) or an ``email`` on a named
``list``; workflows with ``"suppress": [list]`` do not enroll it, and ``send_email``
never writes to an address on the list ``unsubscribed``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Response, status
from pydantic import BaseModel, ConfigDict, Field

from api.deps import Conn, CurrentKey, by_method
from api.problems import ApiError, problem_responses
from engine import suppressions

router = APIRouter(
    prefix="/suppressions",
    tags=["suppressions"],
    dependencies=[Depends(by_method)],
    responses=problem_responses(401, 403, 422, 503),
)

ListName = Annotated[str, Path(pattern=r"^[A-Za-z0-9_.:-]{1,100}$", description="the list's name")]
EntityKey = Annotated[
    int | Annotated[str, Field(min_length=1, max_length=1000)] | dict[str, Any],
    Field(description='the entity\'s key: 42, "42", or an object for a composite key'),
]


class SuppressionIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    list: str = Field(
        pattern=r"^[A-Za-z0-9_.:-]{1,100}$", description="the list, e.g. unsubscribed"
    )
    entity_type: str | None = Field(
        None, pattern=r"^[a-z_][a-z0-9_]{0,39}$", description="with key: an entity"
    )
    key: EntityKey | None = None
    email: str | None = Field(None, max_length=320, description="or an email address")
    until: str | None = Field(
        None,
        max_length=40,
        description="suppress through this date (2026-12-31) or until this ISO date-time; "
        "none: for good",
    )
    reason: str | None = Field(None, max_length=1000)


class SuppressionOut(BaseModel):
    id: int
    list: str
    entity_type: str | None
    key: Any = Field(description="the entity's key (its value for a one-column key)")
    email: str | None
    reason: str | None
    until: datetime | None
    created_at: datetime
    who: str | None = Field(description="who added it: api:<key name> or os:<user>")
    active: bool = Field(description="false once until has passed: it suppresses nothing")


def _refused(exc: suppressions.SuppressionError, prefix: str) -> ApiError:
    return ApiError(
        exc.status,
        str(exc),
        errors=[{"path": f"{prefix}.{i.path}", "message": i.message} for i in exc.issues],
    )


@router.get("", response_model=list[SuppressionOut], summary="List suppression entries")
async def list_suppressions(
    conn: Conn,
    list_name: Annotated[
        str | None,
        Query(alias="list", pattern=r"^[A-Za-z0-9_.:-]{1,100}$", description="one list"),
    ] = None,
    entity_type: Annotated[str | None, Query(pattern=r"^[a-z_][a-z0-9_]{0,39}$")] = None,
    email: Annotated[str | None, Query(max_length=320)] = None,
    active: Annotated[bool | None, Query(description="true: only those in force")] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
    offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
) -> Any:
    """Entries of every list, or of ``list``, filtered by entity type, email or state."""
    return await suppressions.entries(
        conn,
        list_name,
        entity_type=entity_type,
        email=email,
        active=active,
        limit=limit,
        offset=offset,
    )


@router.post(
    "",
    response_model=SuppressionOut,
    status_code=status.HTTP_201_CREATED,
    summary="Add an entity or an email address to a suppression list",
)
async def add_suppression(conn: Conn, key: CurrentKey, body: SuppressionIn) -> Any:
    """Adding the same entity or address to the same list again updates its ``until``
    and ``reason``."""
    try:
        return await suppressions.add(
            conn,
            body.list,
            entity_type=body.entity_type,
            key=body.key,
            email=body.email,
            until=body.until,
            reason=body.reason,
            who=f"api:{key['name']}",
        )
    except suppressions.SuppressionError as exc:
        raise _refused(exc, "body") from None


@router.delete(
    "/{list_name}",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Remove an entity or an email address from a suppression list",
    responses=problem_responses(404),
)
async def remove_suppression(
    conn: Conn,
    list_name: ListName,
    entity_type: Annotated[str | None, Query(pattern=r"^[a-z_][a-z0-9_]{0,39}$")] = None,
    entity_key: Annotated[
        str | None,
        Query(alias="key", min_length=1, max_length=1000, description="the entity's key"),
    ] = None,
    email: Annotated[str | None, Query(max_length=320)] = None,
) -> Response:
    """Give ``entity_type`` and ``key``, or ``email``."""
    try:
        removed = await suppressions.remove(
            conn, list_name, entity_type=entity_type, key=entity_key, email=email
        )
    except suppressions.SuppressionError as exc:
        raise _refused(exc, "query") from None
    if not removed:
        raise ApiError(404, f"no such entry on the list {list_name!r}")
    return Response(status_code=status.HTTP_204_NO_CONTENT)
