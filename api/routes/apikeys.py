"""``/apikeys``: create, list and revoke API keys (admin keys only)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, status

from api.deps import Conn, require
from api.problems import ApiError, problem_responses
from api.routes.params import Flag, ObjectId
from api.schemas import ApiKey, ApiKeyCreated, ApiKeyIn
from engine import apikeys

router = APIRouter(
    prefix="/apikeys",
    tags=["API keys"],
    dependencies=[Depends(require("admin"))],
    responses=problem_responses(401, 403, 422, 503),
)


@router.get("", response_model=list[ApiKey], summary="List API keys (never the keys)")
async def list_keys(
    conn: Conn,
    include_revoked: Annotated[Flag, Query(description="include revoked keys")] = True,
) -> Any:
    return await apikeys.list_keys(conn, include_revoked=include_revoked)


@router.post(
    "",
    response_model=ApiKeyCreated,
    status_code=status.HTTP_201_CREATED,
    summary="Create an API key (the key is in this response only)",
    responses=problem_responses(400, 413),
)
async def create_key(conn: Conn, body: ApiKeyIn) -> Any:
    try:
        row, key = await apikeys.create(conn, body.name, body.scope)
    except ValueError as exc:
        raise ApiError(422, str(exc), errors=[{"path": "body.name", "message": str(exc)}]) from None
    return {**row, "key": key}


@router.delete(
    "/{key_id}",
    response_model=ApiKey,
    summary="Revoke an API key",
    responses=problem_responses(404),
)
async def revoke_key(conn: Conn, key_id: ObjectId) -> Any:
    return await apikeys.revoke(conn, key_id)
