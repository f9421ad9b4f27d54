"""``crmflow seed``: the example CRM schema, captured, with the pre-configured workflows."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import yaml
from psycopg import sql
from psycopg.types.json import Jsonb

from engine import capture, db, workflows
from engine.config import Settings, get_settings

# Tables of the example CRM under capture, with their derived fields.
WATCHED: dict[str, dict[str, str]] = {
    "leads": {},
    "deals": {"last_activity_days_ago": "current_date - CAST(last_activity_at AS date)"},
    "accounts": {"days_to_renewal": "renewal_date - current_date"},
    "contacts": {},
    # The churn playbook's tasks: closing one as a false positive feeds back.
    "tasks": {},
}

# The churn scorecard's signal tables (docs/churn.md): related to accounts by
# account_id, with the time column its aggregates window on (table: (key, time column)).
RELATIONS: dict[str, tuple[str, str]] = {
    "logins": ("account_id", "occurred_at"),
    "feature_usage": ("account_id", "occurred_at"),
    "support_tickets": ("account_id", "opened_at"),
    "nps_responses": ("account_id", "responded_at"),
    "invoices": ("account_id", "due_date"),
    "contacts": ("account_id", "left_at"),
}


# Who the pre-configured workflows work with (deal and lead owners, CSMs for the churn
# playbook, managers to notify), added by `crmflow seed` to an empty users table. The
# demo's writes use them too (ids 1 and 2 are the sales reps).
EXAMPLE_USERS: list[tuple[str, str, str]] = [
    ("Ana Ruiz", "ana@acme.test", "sales_rep"),
    ("Ben Okafor", "ben@acme.test", "sales_rep"),
    ("Chloé Martin", "chloe@acme.test", "csm"),
    ("Dev Patel", "dev@acme.test", "csm"),
    ("Mia Chen", "mia@acme.test", "manager"),
]


@dataclass
class Seeded:
    workflows: list[workflows.SaveResult]
    # The example users added ({"id", "name", "email", "role"}); empty when the users
    # table already had users.
    users: list[dict[str, Any]] = field(default_factory=list)
    # Roles the workflows need that no active user has (with users of the CRM's own).
    missing_roles: list[str] = field(default_factory=list)
    # The scorecards applied (examples/scorecards/).
    scorecards: list[Any] = field(default_factory=list)


# The roles the pre-configured workflows assign or notify: the playbook's CSM, the
# notifications to "role:manager".
NEEDED_ROLES = ("csm", "manager")


def seed_workflow_files() -> list[Path]:
    return sorted((db.resource_dir("examples") / "workflows").glob("*.json"))


def seed_scorecard_files() -> list[Path]:
    return sorted((db.resource_dir("examples") / "scorecards").glob("*.yaml"))


async def seed_scorecards(conn: psycopg.AsyncConnection[Any], settings: Settings) -> list[Any]:
    """Declare the signal tables' relations to accounts and apply the example scorecards
    that are not stored yet (one already there, refitted by `score fit --save` perhaps,
    keeps its weights)."""
    from engine.scorecards import relations, store

    for table, (key, time_column) in RELATIONS.items():
        await relations.add_relation(
            conn, f"{settings.crm_schema}.{table}", "account", key, time_column
        )
    saved = []
    for path in seed_scorecard_files():
        raw = yaml.safe_load(path.read_text())
        try:
            await store.get(conn, raw["name"])
        except store.ScorecardNotFound:
            saved.append(await store.apply(conn, raw))
    return saved


async def install_example_crm(conn: psycopg.AsyncConnection[Any], settings: Settings) -> None:
    async with conn.transaction():
        await conn.execute(
            sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(settings.crm_schema))
        )
        await conn.execute(
            sql.SQL("SET LOCAL search_path TO {}").format(sql.Identifier(settings.crm_schema))
        )
        await conn.execute(db.install_script("example_crm.sql").encode())


async def seed_example_users(
    conn: psycopg.AsyncConnection[Any], settings: Settings
) -> list[dict[str, Any]]:
    """Add :data:`EXAMPLE_USERS` if the CRM's users table is empty; returns those added.
    A role that may not read and insert into the table (a CRM of someone else's) adds
    none."""
    users = [{"name": n, "email": e, "role": r} for n, e, r in EXAMPLE_USERS]
    async with conn.transaction():
        await conn.execute(
            sql.SQL("SET LOCAL search_path TO {}").format(sql.Identifier(settings.crm_schema))
        )
        allowed = await (
            await conn.execute(
                "SELECT has_table_privilege('users', 'SELECT')"
                " AND has_table_privilege('users', 'INSERT') AS ok"
            )
        ).fetchone()
        if not (allowed and allowed["ok"]):
            return []
        # Two seeds at once add the users once (a lock of crmflow's, not the CRM's table).
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext('crmflow seed users'))")
        cursor = await conn.execute(db.query("seed_users", "seed.sql"), {"users": Jsonb(users)})
        return list(await cursor.fetchall())


async def seed(conn: psycopg.AsyncConnection[Any], settings: Settings | None = None) -> Seeded:
    """Create the example CRM (when missing), watch it, apply the seed workflows, and add
    the example users when there are none (the workflows assign and notify users)."""
    settings = settings or get_settings()
    await install_example_crm(conn, settings)
    for table, derived in WATCHED.items():
        await capture.watch(conn, f"{settings.crm_schema}.{table}", derived=derived)
    scorecards = await seed_scorecards(conn, settings)
    results = []
    async with conn.transaction():
        for path in seed_workflow_files():
            results.append(await workflows.apply(conn, json.loads(path.read_text())))
    users = await seed_example_users(conn, settings)
    try:
        async with conn.transaction():
            present = await (
                await conn.execute(
                    sql.SQL("SELECT DISTINCT role FROM {} WHERE active").format(
                        sql.Identifier(settings.crm_schema, "users")
                    )
                )
            ).fetchall()
    except psycopg.errors.InsufficientPrivilege:
        return Seeded(results, users, scorecards=scorecards)  # cannot tell
    have = {r["role"] for r in present}
    return Seeded(results, users, [r for r in NEEDED_ROLES if r not in have], scorecards)
