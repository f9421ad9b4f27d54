"""Attach and detach capture: ``crmflow watch TABLE`` / ``crmflow unwatch TABLE``.

For each watched table there are three statement-level triggers (insert, update,
delete), each calling a function generated from the templates in ``sql/install/capture.sql``
with the table's primary key filled in. Any table with a primary key works, in any
schema, with a single or composite key.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from engine import catalog, db
from engine.sqlexpr import UnsafeExpression, render_expression, validate_expression

OPERATIONS = ("insert", "update", "delete")
TRIGGER_PREFIX = "tg_crmflow__"
log = logging.getLogger(__name__)


class CaptureError(ValueError):
    pass


@dataclass(frozen=True)
class Watched:
    entity_type: str
    table_schema: str
    table_name: str
    pk_columns: list[str]


def singular(word: str) -> str:
    """``leads`` → ``lead``, ``opportunities`` → ``opportunity``, ``addresses`` → ``address``."""
    irregular = {"people": "person", "children": "child", "men": "man", "women": "woman"}
    if word in irregular:
        return irregular[word]
    for suffix, replacement in (
        ("ies", "y"),
        ("sses", "ss"),
        ("shes", "sh"),
        ("ches", "ch"),
        ("xes", "x"),
        ("zzes", "zz"),
    ):
        if word.endswith(suffix) and len(word) > len(suffix):
            return word[: -len(suffix)] + replacement
    if word.endswith("s") and not word.endswith(("ss", "us", "is")) and len(word) > 1:
        return word[:-1]
    return word


def default_entity_name(table_name: str) -> str:
    name = re.sub(r"[^a-z0-9_]+", "_", singular(table_name.lower())).strip("_")
    if not name or name[0].isdigit():
        name = f"t_{name}"
    return name[:40]


def function_name(entity_type: str, op: str) -> sql.Identifier:
    return sql.Identifier("crmflow", f"tg_{entity_type}__{op}")


def drop_ddl(w: Watched, relations: list[str]) -> list[sql.Composed]:
    """Drop the triggers from ``relations`` (the table and its partitions), then the functions."""
    statements: list[sql.Composed] = []
    for relation in relations:
        for op in OPERATIONS:
            statements.append(
                db.template("drop_trigger", "capture.sql").format(
                    trigger=sql.Identifier(TRIGGER_PREFIX + op), table=sql.SQL(relation)
                )
            )
    for op in OPERATIONS:
        statements.append(
            db.template("drop_function", "capture.sql").format(
                function=function_name(w.entity_type, op)
            )
        )
    statements.append(
        db.template("drop_sequence", "capture.sql").format(
            sequence=sql.Identifier("crmflow", f"tg_{w.entity_type}__epoch")
        )
    )
    return statements


async def install(conn: psycopg.AsyncConnection[Any], w: Watched, relid: int) -> None:
    """Generate the entity's capture functions and put its triggers on the table and its
    partitions (crmflow.install_capture in sql/install/capture.sql)."""
    await conn.execute(
        db.query("install_capture", "capture.sql"),
        {"entity_type": w.entity_type, "relid": relid, "pk_columns": w.pk_columns},
    )


# crmflow's own table that it does capture: its alerts, delivered by ordinary workflows.
_OWN_CAPTURED = ("crmflow", "alerts")


def _not_capturable(schema: str, table: str) -> str | None:
    """Why a table must not be watched: PostgreSQL's catalogs, or crmflow's and
    procrastinate's own tables (capturing the outbox would capture its own writes)."""
    from engine.config import get_settings

    if schema in ("pg_catalog", "information_schema", "pg_toast") or schema.startswith("pg_"):
        return "is a system catalog; only the CRM's tables can be captured"
    if (
        schema in ("crmflow", get_settings().procrastinate_schema)
        and (
            schema,
            table,
        )
        != _OWN_CAPTURED
    ):
        return "is one of crmflow's own tables; only the CRM's tables can be captured"
    return None


async def _capturable_table(
    conn: psycopg.AsyncConnection[Any], table: str
) -> tuple[dict[str, Any], list[str]]:
    """The table ``table`` names (its catalog row) and its primary key columns; a
    CaptureError says why it cannot be watched."""
    found = await catalog.resolve_table(conn, table)
    if found is None:
        raise CaptureError(f"no table named {table!r}")
    if found["relkind"] not in ("r", "p"):
        raise CaptureError(f"{table!r} is not a table (views cannot be captured)")
    refusal = _not_capturable(found["table_schema"], found["table_name"])
    if refusal:
        raise CaptureError(f"{found['table_schema']}.{found['table_name']} {refusal}")
    pk = [
        r["name"]
        for r in await (
            await conn.execute(
                db.query("primary_key_columns", "catalog.sql"), {"relid": found["relid"]}
            )
        ).fetchall()
    ]
    if not pk:
        raise CaptureError(
            f"{found['table_schema']}.{found['table_name']} has no primary key; "
            "crmflow identifies entities by it"
        )
    return found, pk


async def _register(
    conn: psycopg.AsyncConnection[Any], found: dict[str, Any], pk: list[str], entity: str | None
) -> Watched:
    """Record the table as watched under ``entity`` (default: the table's singular); a
    CaptureError when the name is bad, taken by another table, or the table is watched
    under another name."""
    entity = entity or default_entity_name(found["table_name"])
    if not re.fullmatch(r"[a-z_][a-z0-9_]{0,39}", entity):
        raise CaptureError(f"entity name {entity!r}: lowercase letters, digits and '_', at most 40")
    row = await (
        await conn.execute(
            db.query("watch_table", "catalog.sql"),
            {
                "entity_type": entity,
                "table_schema": found["table_schema"],
                "table_name": found["table_name"],
                "pk_columns": pk,
            },
        )
    ).fetchone()
    if row is None:  # the name belongs to another table
        other = await (
            await conn.execute(
                db.query("watched_by_entity", "catalog.sql"), {"entity_type": entity}
            )
        ).fetchone()
        where = f"{other['table_schema']}.{other['table_name']}" if other else "another table"
        raise CaptureError(f"entity name {entity!r} is already used by {where}")
    if row["entity_type"] != entity:
        raise CaptureError(
            f"{found['table_schema']}.{found['table_name']} is already watched as "
            f"{row['entity_type']!r}; unwatch it first to rename the entity"
        )
    return Watched(entity, found["table_schema"], found["table_name"], pk)


async def watch(
    conn: psycopg.AsyncConnection[Any],
    table: str,
    entity: str | None = None,
    derived: dict[str, str] | None = None,
    all_rows: bool | None = None,
    all_columns: bool | None = None,
) -> Watched:
    """Capture writes to ``table`` as events of ``entity`` (default: the table's singular).

    Capture keeps the rows some active workflow could match (docs/design.md, "Capture
    keeps what can match"); ``all_rows=True`` keeps every row of the table (an audit
    trail), ``False`` goes back to filtering, ``None`` leaves the table's choice as is.
    Of the rows kept it stores the key and the columns active workflows, derived fields
    and capture demands read; ``all_columns=True`` stores whole rows, ``False`` goes back
    to pruning, ``None`` leaves the table's choice as is."""
    async with conn.transaction():
        found, pk = await _capturable_table(conn, table)
        w = await _register(conn, found, pk, entity)
        entity = w.entity_type
        if all_rows is not None:
            await conn.execute(
                db.query("set_capture_all", "catalog.sql"),
                {"entity_type": entity, "capture_all": all_rows},
            )
        if all_columns is not None:
            await conn.execute(
                db.query("set_capture_all_columns", "capture.sql"),
                {"entity_type": entity, "all_columns": all_columns},
            )
        try:
            async with conn.transaction():
                await install(conn, w, found["relid"])
        except psycopg.Error as exc:  # a privilege the role lacks, a table locked away...
            raise CaptureError(
                f"cannot capture {w.table_schema}.{w.table_name}: {exc.diag.message_primary or exc}"
            ) from None
        for name, source in (derived or {}).items():
            await declare_derived(conn, entity, name, source)
        return w


async def declare_derived(
    conn: psycopg.AsyncConnection[Any], entity_type: str, name: str, source: str
) -> str:
    """Declare (or replace) a derived field; returns its SQL type."""
    if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", name):
        raise CaptureError(f"derived field name {name!r}: lowercase letters, digits and '_'")
    entity = await catalog.load_entity(conn, entity_type)
    if entity is None:
        raise CaptureError(f"no watched entity {entity_type!r}")
    if name in entity.columns:
        raise CaptureError(f"{name!r} is already a column of {entity.qualified_name}")
    try:
        validate_expression(source, entity.columns)
        rendered = render_expression(source, "n")
    except UnsafeExpression as exc:
        raise CaptureError(f"derived field {name!r}: {exc}") from None
    probe = sql.SQL("SELECT ({}) FROM {} AS n LIMIT 0").format(sql.SQL(rendered), entity.table)
    try:
        async with conn.transaction():
            cur = await conn.execute(probe)
    except psycopg.Error as exc:
        raise CaptureError(f"derived field {name!r}: {exc.diag.message_primary or exc}") from None
    assert cur.description is not None
    facts = await (
        await conn.execute(
            db.query("type_facts", "catalog.sql"), {"type_oid": cur.description[0].type_code}
        )
    ).fetchone()
    assert facts is not None
    await conn.execute(
        db.query("upsert_derived_field", "catalog.sql"),
        {
            "entity_type": entity_type,
            "name": name,
            "expression": rendered,
            "source": source,
            "data_type": facts["data_type"],
        },
    )
    # Which columns capture keeps depends on the derived fields' sources.
    await conn.execute(
        db.query("generate_capture", "capture.sql"),
        {"entity_type": entity_type, "pk_columns": entity.pk_columns},
    )
    return str(facts["data_type"])


async def unwatch(conn: psycopg.AsyncConnection[Any], table: str, force: bool = False) -> Watched:
    async with conn.transaction():
        found = await catalog.resolve_table(conn, table)
        lookup = (
            {"table_schema": found["table_schema"], "table_name": found["table_name"]}
            if found
            else _split_name(table)
        )
        row = await (
            await conn.execute(db.query("watched_by_table", "catalog.sql"), lookup)
        ).fetchone()
        if row is None and found is None:  # a table renamed or dropped: its entity name
            row = await (
                await conn.execute(
                    db.query("watched_by_entity", "catalog.sql"), {"entity_type": table}
                )
            ).fetchone()
        if row is None:
            raise CaptureError(f"{table!r} is not watched")
        w = Watched(
            row["entity_type"], row["table_schema"], row["table_name"], list(row["pk_columns"])
        )
        users = await (
            await conn.execute(
                db.query("live_workflows_of_entity", "catalog.sql"), {"entity_type": w.entity_type}
            )
        ).fetchall()
        active = [u["name"] for u in users if u["status"] == "active"]
        if active and not force:
            raise CaptureError(
                f"active workflows use {w.entity_type!r}: {', '.join(active)}; pause them "
                "or use --force (which pauses them)"
            )
        if active:
            await conn.execute(
                db.query("pause_workflows_of_entity", "catalog.sql"), {"entity_type": w.entity_type}
            )
        # Wherever its triggers are now: the table under any name, and its partitions.
        relations = [
            r["relation"]
            for r in await (
                await conn.execute(
                    db.query("captured_relations", "capture.sql"), {"entity_type": w.entity_type}
                )
            ).fetchall()
        ]
        for statement in drop_ddl(w, relations):
            await conn.execute(statement)
        await conn.execute(db.query("unwatch_table", "catalog.sql"), {"entity_type": w.entity_type})
        return w


def _split_name(name: str) -> dict[str, str]:
    schema, _, table = name.rpartition(".")
    return {"table_schema": schema or "public", "table_name": table}


async def list_watched(conn: psycopg.AsyncConnection[Any]) -> list[dict[str, Any]]:
    return await (await conn.execute(db.query("list_watched", "catalog.sql"), {})).fetchall()


async def reinstall_all(conn: psycopg.AsyncConnection[Any]) -> int:
    """Regenerate every watched table's capture functions (after an upgrade of
    sql/install/capture.sql), then heal: follow renames and key changes, capture new partitions."""
    rows = await (
        await conn.execute(db.query("watched_tables_with_oid", "catalog.sql"), {})
    ).fetchall()
    count = 0
    for row in rows:
        await conn.execute(
            db.query("generate_capture", "capture.sql"),
            {"entity_type": row["entity_type"], "pk_columns": list(row["pk_columns"])},
        )
        count += 1
    for change in await heal(conn):
        log.warning("capture of %s: %s", change["entity_type"], change["change"])
    return count


async def heal(
    conn: psycopg.AsyncConnection[Any], lock_timeout: str = "200ms"
) -> list[dict[str, Any]]:
    """Bring capture in line with the catalog (crmflow.heal_capture); what it changed or
    found wrong, one row per entity and finding."""
    async with conn.transaction():
        bound = await (
            await conn.execute(
                db.query("bound_lock_wait", "capture.sql"), {"lock_timeout": lock_timeout}
            )
        ).fetchone()
        assert bound is not None
        changes = await (await conn.execute(db.query("heal_capture", "capture.sql"))).fetchall()
        await conn.execute(
            db.query("restore_lock_wait", "capture.sql"), {"lock_timeout": bound["previous"]}
        )
        return changes


async def install_event_trigger(conn: psycopg.AsyncConnection[Any]) -> bool:
    """The DDL event trigger that heals capture in the DDL's own transaction. Only a
    superuser may create one; without it the worker's periodic heal does the job."""
    row = await (await conn.execute(db.query("may_create_event_trigger", "capture.sql"))).fetchone()
    if not (row and row["allowed"]):
        return False
    await conn.execute(db.install_script("event_trigger.sql").encode())
    return True
