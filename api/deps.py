"""Dependencies shared by the routers: settings, the pool, a connection, the API key.

Auth: ``Authorization: Bearer <key>``. Reads (GET) need a ``read`` key, everything
else a ``write`` key, API key management an ``admin`` key (read < write < admin).
401 without a valid key, 403 when its scope is too small.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated, Any

import psycopg
from fastapi import Depends, Request
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from psycopg import pq
from psycopg_pool import PoolTimeout

from api.problems import ApiError
from engine import apikeys, audit, db
from engine.config import Settings
from engine.executor.runner import Runner

# How long a request waits for a free connection before answering 503.
CONNECTION_TIMEOUT = 10.0
# ... unless the pool holds no connection at all after this long: then the database is
# away (the pool drops dead connections and cannot make new ones), and waiting for
# the full timeout would only make every client hang before the same 503.
UNREACHABLE_WAIT = 1.5
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_pool(request: Request) -> db.Pool:
    pool: db.Pool = request.app.state.pool
    return pool


def get_runner(request: Request) -> Runner:
    runner: Runner = request.app.state.runner
    return runner


SettingsDep = Annotated[Settings, Depends(get_settings)]
PoolDep = Annotated[db.Pool, Depends(get_pool)]
RunnerDep = Annotated[Runner, Depends(get_runner)]


async def _reachable(pool: db.Pool) -> bool:
    """Whether the database accepts a connection now (a busy pool is not an outage)."""
    try:
        probe = await psycopg.AsyncConnection.connect(db.pool_conninfo(pool), connect_timeout=2)
    except psycopg.Error:
        return False
    await probe.close()
    return True


@contextlib.asynccontextmanager
async def _connection(pool: db.Pool) -> AsyncIterator[db.DictConnection]:
    """``pool.connection(CONNECTION_TIMEOUT)``, failing fast when the database is away."""
    try:
        conn = await pool.getconn(timeout=min(UNREACHABLE_WAIT, CONNECTION_TIMEOUT))
    except PoolTimeout:
        # The pool may still count connections it is trying to make: ask the server
        # itself before waiting longer (a refused connection answers at once).
        if pool.get_stats().get("pool_size", 0) == 0 or not await _reachable(pool):
            raise
        conn = await pool.getconn(timeout=max(CONNECTION_TIMEOUT - UNREACHABLE_WAIT, 0.0))
    try:
        async with conn:
            yield conn
    finally:
        await pool.putconn(conn)


async def get_conn(pool: PoolDep) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    """A pooled connection in autocommit for this request, as the engine's functions
    expect (they open their own transactions); shared by all of the request's dependencies."""
    async with _connection(pool) as conn:
        await conn.set_autocommit(True)
        try:
            yield conn
        finally:
            # Back as the pool hands connections out to the engine (not autocommit).
            with contextlib.suppress(psycopg.Error):
                if conn.info.transaction_status != pq.TransactionStatus.IDLE:
                    await conn.rollback()
                await conn.set_autocommit(False)


Conn = Annotated[psycopg.AsyncConnection[Any], Depends(get_conn)]

bearer = HTTPBearer(
    auto_error=False,
    scheme_name="ApiKey",
    description="An API key (`crmflow apikey create`): `Authorization: Bearer cf_...`",
)


def _unauthorized(detail: str) -> ApiError:
    return ApiError(401, detail, headers={"WWW-Authenticate": "Bearer"})


async def current_key(
    conn: Conn,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> dict[str, Any]:
    """The caller's API key; 401 when it is missing, malformed, unknown or revoked."""
    if credentials is None:
        raise _unauthorized("an API key is required: Authorization: Bearer <key>")
    key = await apikeys.verify(conn, credentials.credentials)
    if key is None:
        raise _unauthorized("the API key is not valid (unknown, malformed or revoked)")
    # Who the audit trail names for this request's workflow changes (engine/audit.py).
    audit.set_actor(key["name"])
    return key


CurrentKey = Annotated[dict[str, Any], Depends(current_key)]


def _check_scope(key: dict[str, Any], need: str) -> None:
    if not apikeys.allows(key["scope"], need):
        raise ApiError(403, f"this needs a {need} key; this key's scope is {key['scope']}")


def require(scope: str) -> Callable[..., Awaitable[dict[str, Any]]]:
    """A dependency that needs a key of at least ``scope``."""

    async def dependency(key: CurrentKey) -> dict[str, Any]:
        _check_scope(key, scope)
        return key

    return dependency


async def by_method(request: Request, key: CurrentKey) -> dict[str, Any]:
    """read for GET, write for everything else: the rule of the resource routers."""
    _check_scope(key, "read" if request.method in SAFE_METHODS else "write")
    return key


_QUERY_NAMES: dict[int, frozenset[str]] = {}


def _walk_query(dependant: Dependant) -> set[str]:
    names = {p.alias for p in dependant.query_params}
    for sub in dependant.dependencies:
        names |= _walk_query(sub)
    return names


def _query_names(route: APIRoute) -> frozenset[str]:
    names = _QUERY_NAMES.get(id(route))
    if names is None:
        names = _QUERY_NAMES[id(route)] = frozenset(_walk_query(route.dependant))
    return names


async def known_query_only(request: Request) -> None:
    """Refuse query parameters the operation does not take: a typo (``?workflow=3`` for
    ``?workflow_id=3``) must not silently widen a filter."""
    route = request.scope.get("route")
    if not isinstance(route, APIRoute):
        return
    known = _query_names(route)
    unknown = sorted({name for name in request.query_params if name not in known})
    if unknown:
        takes = ", ".join(sorted(known)) or "none"
        raise ApiError(
            422,
            f"unknown query parameter(s): {', '.join(unknown)}",
            errors=[
                {"path": f"query.{name}", "message": f"unknown query parameter (takes: {takes})"}
                for name in unknown
            ],
        )
