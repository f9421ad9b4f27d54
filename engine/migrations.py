"""``crmflow migrate``: crmflow's migrations, procrastinate's schema, and the SQL in ``sql/``.

Everything happens in one transaction under an advisory lock, so two processes that
migrate at once take turns and a failure leaves nothing half-applied.

- ``migrations/NNNN_name.sql`` are append-only. Each applied file is recorded with its
  SHA-256; a file edited after it was applied is an error, not a silent drift.
- procrastinate lives in its own schema. A fresh database gets procrastinate's
  ``schema.sql``; an existing one gets the procrastinate migrations it has not seen
  (recorded in the same table as ``procrastinate/<file>``).
- The non-migration SQL (capture helpers, reporting views) is re-applied each time
  (``CREATE OR REPLACE``), and every watched table's capture code is regenerated, so
  upgrading crmflow upgrades them.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from engine import capture, db
from engine.config import get_settings

# pg_advisory_xact_lock key: "crmflow migrate"
MIGRATION_LOCK = 0x63726D666C6F77
_q = db.Queries("migrations.sql")
_FILE_RE = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")
ALERT_ENTITY = "crmflow_alert"
# The scripts of sql/install/ (not migrations) applied on every migrate, in this order.
INSTALL_FILES = ("functions.sql", "capture.sql", "views.sql")


class MigrationError(RuntimeError):
    pass


@dataclass
class MigrationReport:
    applied: list[str] = field(default_factory=list)
    procrastinate: list[str] = field(default_factory=list)
    recaptured_tables: int = 0


def checksum(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def migration_files(directory: Path | None = None) -> list[Path]:
    directory = directory or db.resource_dir("migrations")
    files = sorted(p for p in directory.iterdir() if p.suffix == ".sql")
    for p in files:
        if not _FILE_RE.match(p.name):
            raise MigrationError(f"{p.name}: migration files are named NNNN_description.sql")
    numbers = [p.name[:4] for p in files]
    if len(set(numbers)) != len(numbers):
        raise MigrationError("two migration files share a number")
    return files


def _procrastinate_sql() -> tuple[str, list[Path]]:
    from procrastinate import schema

    migrations = sorted(Path(schema.migrations_path).glob("*.sql"))
    return schema.SchemaManager.get_schema(), migrations


async def migrate(
    conn: psycopg.AsyncConnection[Any], directory: Path | None = None, install: bool = True
) -> MigrationReport:
    report = MigrationReport()
    settings = get_settings()
    async with conn.transaction():
        await conn.execute(_q("migration_timeouts"))
        await conn.execute(_q("migration_lock"), {"lock": MIGRATION_LOCK})
        await conn.execute(_q("bootstrap_migrations"))
        rows = await (await conn.execute(_q("applied_migrations"), {})).fetchall()
        applied = {r["version"]: r["checksum"] for r in rows}

        files = migration_files(directory)
        known = {p.stem for p in files}
        for p in files:
            text = p.read_text(encoding="utf-8")
            digest = checksum(text)
            if p.stem in applied:
                if applied[p.stem] != digest:
                    raise MigrationError(
                        f"migration {p.name} was edited after it was applied "
                        "(checksum differs); migrations are append-only: add a new one"
                    )
                continue
            try:
                await conn.execute(text.encode())
            except psycopg.Error as exc:
                raise MigrationError(f"migration {p.name} failed: {exc}") from exc
            await conn.execute(_q("record_migration"), {"version": p.stem, "checksum": digest})
            report.applied.append(p.stem)
        newer = [v for v in applied if not v.startswith("procrastinate/") and v not in known]
        if newer:
            raise MigrationError(
                f"the database has migrations this crmflow does not know: {sorted(newer)} "
                "(is an older version running against a newer database?)"
            )

        report.procrastinate = await _migrate_procrastinate(
            conn, settings.procrastinate_schema, applied
        )
        if not install:  # replaying old migrations alone (tests): today's sql/ needs them all
            return report
        # SQL that is not a migration: CREATE OR REPLACE on every run.
        for filename in INSTALL_FILES:
            await conn.execute(db.install_script(filename).encode())
        await capture.install_event_trigger(conn)
        report.recaptured_tables = await capture.reinstall_all(conn)
        if (
            await (await conn.execute(_q("alerts_table_exists"), {})).fetchone()
            and not await (
                await conn.execute(
                    db.query("watched_by_entity", "catalog.sql"), {"entity_type": ALERT_ENTITY}
                )
            ).fetchone()
        ):
            # crmflow watches its own alerts: workflows deliver them (engine/alerts.py).
            await capture.watch(conn, "crmflow.alerts", entity=ALERT_ENTITY)
    return report


async def _migrate_procrastinate(
    conn: psycopg.AsyncConnection[Any], schema_name: str, applied: dict[str, str]
) -> list[str]:
    schema_sql, migration_paths = _procrastinate_sql()
    await conn.execute(
        db.template("procrastinate_schema", "migrations.sql").format(
            schema=sql.Identifier(schema_name)
        )
    )
    exists = await (
        await conn.execute(_q("procrastinate_installed"), {"schema": schema_name})
    ).fetchone()
    done: list[str] = []
    if not exists or not exists["x"]:
        await conn.execute(schema_sql.encode())
        # schema.sql already contains every migration shipped with this version.
        for p in migration_paths:
            await conn.execute(
                _q("record_migration"),
                {"version": f"procrastinate/{p.stem}", "checksum": checksum(p.read_text())},
            )
        done.append("schema.sql")
    else:
        for p in migration_paths:
            version = f"procrastinate/{p.stem}"
            if version in applied:
                continue
            text = p.read_text(encoding="utf-8")
            await conn.execute(text.encode())
            await conn.execute(
                _q("record_migration"), {"version": version, "checksum": checksum(text)}
            )
            done.append(p.name)
    await conn.execute(_q("reset_search_path"))
    await conn.execute(
        db.template("procrastinate_wakeups", "migrations.sql").format(
            schema=sql.Identifier(schema_name)
        )
    )
    return done


async def pending_migrations(conn: psycopg.AsyncConnection[Any]) -> list[str]:
    """Migrations on disk that the database has not applied (for health checks)."""
    exists = await (await conn.execute(_q("ledger_exists"))).fetchone()
    if not exists or not exists["x"]:
        return [p.stem for p in migration_files()]
    rows = await (await conn.execute(_q("applied_migrations"), {})).fetchall()
    applied = {r["version"] for r in rows}
    return [p.stem for p in migration_files() if p.stem not in applied]
