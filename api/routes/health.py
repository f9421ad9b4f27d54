"""``GET /health`` (no key needed): database, worker heartbeats, outbox backlog.

200 while the database answers (``degraded`` when no worker heartbeats, migrations
are pending, active workflows are broken by schema drift or a target host's circuit
breaker is open), 503 when it does not.
"""

from __future__ import annotations

from typing import Any

import psycopg
from fastapi import APIRouter
from fastapi.responses import JSONResponse
from psycopg_pool import PoolTimeout

from api.deps import PoolDep, SettingsDep
from api.problems import problem_responses
from api.schemas import DatabaseHealth, Health
from engine import db
from engine.breakers import list_breakers
from engine.matcher import broken_workflows
from engine.migrations import pending_migrations

router = APIRouter(tags=["health"])

HEALTH_TIMEOUT = 3.0


def _q(name: str) -> str:
    return db.query(name, "health.sql")


@router.get(
    "/health",
    response_model=Health,
    summary="Service health",
    responses={
        503: {"model": Health, "description": "the database is unreachable"},
        **problem_responses(422),
    },
)
async def health(pool: PoolDep, settings: SettingsDep) -> Any:
    try:
        async with pool.connection(timeout=HEALTH_TIMEOUT) as conn:
            pending = await pending_migrations(conn)
            workers = await (
                await conn.execute(
                    _q("health_workers"), {"timeout": settings.stalled_worker_timeout}
                )
            ).fetchone()
            outbox = await (await conn.execute(_q("health_outbox"), {})).fetchone()
            broken = await broken_workflows(conn)
            breakers = await list_breakers(conn)
    except (PoolTimeout, psycopg.Error) as exc:
        down = Health(
            status="down",
            database=DatabaseHealth(
                ok=False, error=str(exc).splitlines()[0] if str(exc) else "error"
            ),
            workers=None,
            outbox=None,
        )
        return JSONResponse(down.model_dump(mode="json"), status_code=503)
    assert workers is not None and outbox is not None
    degraded = bool(pending) or workers["alive"] == 0 or bool(broken) or bool(breakers)
    return {
        "status": "degraded" if degraded else "ok",
        "database": {"ok": True, "migrations_pending": pending},
        "workers": {
            "alive": workers["alive"],
            "last_heartbeat": workers["last_heartbeat"],
            "last_heartbeat_age_seconds": workers["last_heartbeat_age"],
        },
        "outbox": {"pending": outbox["pending"], "oldest_age_seconds": outbox["oldest_age"]},
        "broken_workflows": broken,
        "circuit_breakers": breakers,
    }
