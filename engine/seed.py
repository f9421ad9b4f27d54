"""``crmflow seed``: the example CRM schema, captured, with the pre-configured workflows."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from engine import capture, db, workflows
from engine.config import Settings, get_settings

# Tables of the example CRM under capture, with their derived fields.
WATCHED: dict[str, dict[str, str]] = {
    "leads": {},
    "deals": {"last_activity_days_ago": "current_date - CAST(last_activity_at AS date)"},
    "accounts": {"days_to_renewal": "renewal_date - current_date"},
    "contacts": {},
}


def seed_workflow_files() -> list[Path]:
    return sorted((db.resource_dir("examples") / "workflows").glob("*.json"))


async def install_example_crm(conn: psycopg.AsyncConnection[Any], settings: Settings) -> None:
    async with conn.transaction():
        await conn.execute(
            sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(settings.crm_schema))
        )
        await conn.execute(
            sql.SQL("SET LOCAL search_path TO {}").format(sql.Identifier(settings.crm_schema))
        )
        await conn.execute(db.query("install", "example_crm.sql").encode())


async def seed(
    conn: psycopg.AsyncConnection[Any], settings: Settings | None = None
) -> list[workflows.SaveResult]:
    """Create the example CRM (when missing), watch it, apply the seed workflows."""
    settings = settings or get_settings()
    await install_example_crm(conn, settings)
    for table, derived in WATCHED.items():
        await capture.watch(conn, f"{settings.crm_schema}.{table}", derived=derived)
    results = []
    async with conn.transaction():
        for path in seed_workflow_files():
            results.append(await workflows.apply(conn, json.loads(path.read_text())))
    return results
