"""Migrations: replaying them gives the expected schema; append-only; idempotent; safe
to run twice at once."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path
from typing import Any

import psycopg
import pytest

from engine import db
from engine.migrations import MigrationError, migrate, migration_files
from tests.paths import TESTS

SNAPSHOT = TESTS / "schema.txt"

# The crmflow schema as the catalog sees it, in a stable text form (no OIDs, no
# version-specific formatting beyond PostgreSQL's own deparsers).
SCHEMA_QUERY = """
SELECT 'table ' || c.relname || ' ' || string_agg(
           a.attname || ' ' || format_type(a.atttypid, a.atttypmod)
           || CASE WHEN a.attnotnull THEN ' not null' ELSE '' END
           || coalesce(' default ' || pg_get_expr(d.adbin, d.adrelid), '')
           || CASE WHEN a.attidentity <> '' THEN ' identity' ELSE '' END, ', '
           ORDER BY a.attnum) AS line
  FROM pg_class c
  JOIN pg_namespace n ON n.oid = c.relnamespace
  JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
  LEFT JOIN pg_attrdef d ON d.adrelid = c.oid AND d.adnum = a.attnum
 WHERE n.nspname = 'crmflow' AND c.relkind IN ('r', 'p')
 GROUP BY c.relname
UNION ALL
SELECT 'index ' || pg_get_indexdef(i.indexrelid)
  FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid
  JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE n.nspname = 'crmflow'
UNION ALL
SELECT 'constraint ' || c.relname || ' ' || con.conname || ' ' || pg_get_constraintdef(con.oid)
  FROM pg_constraint con JOIN pg_class c ON c.oid = con.conrelid
  JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE n.nspname = 'crmflow'
UNION ALL
SELECT 'function ' || p.proname || '(' || pg_get_function_identity_arguments(p.oid) || ')'
  FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
 WHERE n.nspname = 'crmflow'
UNION ALL
SELECT 'trigger ' || c.relname || ' ' || t.tgname
  FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
  JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE n.nspname = 'crmflow' AND NOT t.tgisinternal
UNION ALL
SELECT 'view ' || c.relname || ' ' || string_agg(a.attname, ', ' ORDER BY a.attnum)
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
  JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0
 WHERE n.nspname = 'crmflow' AND c.relkind IN ('v', 'm')
 GROUP BY c.relname
ORDER BY 1
"""


async def schema_of(url: str) -> str:
    async with await db.connect(url, autocommit=True) as conn:
        rows = await (await conn.execute(SCHEMA_QUERY)).fetchall()
    return "\n".join(r["line"] for r in rows) + "\n"


async def test_replaying_the_migrations_gives_the_expected_schema(
    empty_db: str, db_url: str, tmp_path: Path
) -> None:
    files = migration_files()
    # Replay one migration at a time, as a database that followed every release did.
    steps = tmp_path / "migrations"
    steps.mkdir()
    async with await db.connect(empty_db, autocommit=True) as conn:
        for f in files:
            shutil.copy(f, steps / f.name)
            await migrate(conn, steps, install=f == files[-1])
    replayed = await schema_of(empty_db)
    assert replayed == await schema_of(db_url), "step by step != all at once"
    if os.environ.get("UPDATE_SCHEMA_SNAPSHOT"):
        SNAPSHOT.write_text(replayed)
    assert replayed == SNAPSHOT.read_text(), (
        "the schema changed: if on purpose, add a migration and regenerate tests/schema.txt "
        "with UPDATE_SCHEMA_SNAPSHOT=1"
    )


async def test_migrate_is_idempotent_and_refuses_edited_migrations(
    conn: psycopg.AsyncConnection[Any], tmp_path: Path
) -> None:
    report = await migrate(conn)
    assert report.applied == [] and report.procrastinate == []
    edited = tmp_path / "migrations"
    shutil.copytree(migration_files()[0].parent, edited)
    first = sorted(edited.glob("*.sql"))[0]
    first.write_text(first.read_text() + "\n-- a harmless looking edit\n")
    with pytest.raises(MigrationError, match="edited after it was applied"):
        await migrate(conn, edited)
    missing = tmp_path / "older"
    missing.mkdir()
    shutil.copy(migration_files()[0], missing / migration_files()[0].name)
    with pytest.raises(MigrationError, match="does not know"):
        await migrate(conn, missing)


async def test_two_migrates_at_once(empty_db: str) -> None:
    async def one() -> list[str]:
        async with await db.connect(empty_db, autocommit=True) as conn:
            return (await migrate(conn)).applied

    first, second = await asyncio.gather(one(), one())
    assert sorted([first, second], key=len) == [[], [f.stem for f in migration_files()]]
    async with await db.connect(empty_db, autocommit=True) as conn:
        row = await (
            await conn.execute(
                "SELECT to_regclass('procrastinate.procrastinate_jobs') IS NOT NULL AS ok"
            )
        ).fetchone()
        assert row and row["ok"]
