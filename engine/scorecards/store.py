"""Scorecards stored and versioned (``crmflow score apply``): like workflows, a changed
definition is a new version; the checks against the catalog happen here."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from engine import catalog, db
from engine.catalog import EntitySchema
from engine.model import Issue
from engine.scorecards.compile import (
    LoadedScorecard,
    Relation,
    build,
    compile_scoring,
    compile_write_chunk,
)
from engine.scorecards.model import ScorecardDefinition, ScorecardError, parse_scorecard
from engine.sqlexpr import UnsafeExpression, render_expression, validate_expression

# Type OIDs an expression factor may have: numbers, and booleans (read as 1/0).
_BOOL_OID = 16
_NUMBER_OIDS = {20, 21, 23, 700, 701, 1700}


class ScorecardNotFound(LookupError):
    pass


def _q(name: str) -> str:
    return db.query(name, "scorecards.sql")


def definition_hash(stored: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(stored, sort_keys=True).encode()).hexdigest()


def demand_name(name: str) -> str:
    return f"scorecard:{name}"


async def _relations(
    conn: psycopg.AsyncConnection[Any], entity: str, entities: dict[str, EntitySchema]
) -> dict[str, Relation]:
    out: dict[str, Relation] = {}
    rows = await (await conn.execute(_q("relations"), {"entity_type": entity})).fetchall()
    for r in rows:
        related = entities.get(r["related_entity_type"])
        if related is not None:
            out[r["name"]] = Relation(r["name"], related, r["key_column"], r["time_column"])
    return out


async def _expression_types(
    conn: psycopg.AsyncConnection[Any], d: ScorecardDefinition, entity: EntitySchema
) -> tuple[frozenset[str], list[Issue]]:
    booleans: set[str] = set()
    issues: list[Issue] = []
    for i, f in enumerate(d.factors):
        if f.expression is None:
            continue
        path = f"factors[{i}].expression.sql"
        try:
            validate_expression(f.expression.sql, entity.columns)
            rendered = render_expression(f.expression.sql, "n")
        except UnsafeExpression:
            continue  # reported by the compiler
        probe = sql.SQL("SELECT ({}) FROM {} AS n LIMIT 0").format(sql.SQL(rendered), entity.table)
        try:
            async with conn.transaction():
                cur = await conn.execute(probe)
        except psycopg.Error as exc:
            issues.append(Issue(path, f"does not compile: {exc.diag.message_primary or exc}"))
            continue
        assert cur.description is not None
        oid = cur.description[0].type_code
        if oid == _BOOL_OID:
            booleans.add(f.id)
        elif oid not in _NUMBER_OIDS:
            issues.append(Issue(path, "must be a number or a boolean"))
    return frozenset(booleans), issues


def _write_issues(d: ScorecardDefinition, entity: EntitySchema, reads: set[str]) -> list[Issue]:
    issues: list[Issue] = []
    wanted = {
        "score": ("number",),
        "level": ("text", "enum"),
        "factors": ("json",),
        "days_to_churn": ("number",),
    }
    for key, column in d.write.columns().items():
        path = f"write.{key}"
        spec = entity.columns.get(column)
        if spec is None:
            issues.append(Issue(path, f"{entity.qualified_name} has no column {column!r}"))
            continue
        if column in entity.pk_columns:
            issues.append(Issue(path, f"{column!r} is the key of {entity.entity_type}"))
        elif spec.kind not in wanted[key]:
            need = {"number": "a numeric", "text": "a text", "json": "a json/jsonb"}
            issues.append(
                Issue(
                    path,
                    f"{entity.qualified_name}.{column} is {spec.display_type}; "
                    f"{key} needs {' or '.join(need.get(k, 'an enum') for k in wanted[key])} "
                    "column",
                )
            )
        elif spec.kind == "enum":
            missing = [b for b in d.bands if b not in spec.enum_labels]
            if missing:
                issues.append(
                    Issue(
                        path,
                        f"{entity.qualified_name}.{column} is an enum without the label"
                        f"{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))}",
                    )
                )
        if column in reads and column not in entity.pk_columns:
            issues.append(Issue(path, f"{column!r} is also read by the factors or segments"))
    return issues


async def load_definition(
    conn: psycopg.AsyncConnection[Any],
    d: ScorecardDefinition,
    scorecard_id: int | None = None,
    version: int = 0,
    check: bool = True,
) -> LoadedScorecard:
    """Resolve the entity and relations of ``d`` and check it against the catalog
    (``check``: let PostgreSQL plan the statements too, as a save does)."""
    entities = await catalog.load_entities(conn)
    entity = entities.get(d.entity_type)
    if entity is None:
        watched = ", ".join(sorted(entities)) or "none yet"
        raise ScorecardError(
            [
                Issue(
                    "entity_type",
                    f"{d.entity_type!r} is not a watched entity (watched: {watched}); "
                    "run `crmflow watch TABLE` first",
                )
            ]
        )
    relations = await _relations(conn, d.entity_type, entities)
    booleans, issues = await _expression_types(conn, d, entity)
    card = LoadedScorecard(scorecard_id, version, d, entity, relations, booleans)
    _, _, compiled = build(card, keyed=False)
    issues += compiled.issues
    issues += _write_issues(d, entity, compiled.columns_read)
    if issues:
        raise ScorecardError(issues)
    if not check:
        return card
    # PostgreSQL checks the statements (types of the comparisons, casts) without running
    # them.
    for what, statement in (
        ("scoring", compile_scoring(card, keyed=True)),
        ("writing", compile_write_chunk(card) if d.write.columns() else None),
    ):
        if statement is None:
            continue
        try:
            async with conn.transaction():
                await conn.execute(
                    sql.SQL("EXPLAIN {}").format(statement),
                    {
                        "as_of": None,
                        "keys": Jsonb([]),
                        "rows": [],
                        "scorecard_id": 0,
                        "version": 0,
                    },
                )
        except psycopg.Error as exc:
            raise ScorecardError(
                [
                    Issue(
                        "",
                        f"the {what} statement does not compile: {exc.diag.message_primary or exc}",
                    )
                ]
            ) from None
    return card


@dataclass
class SaveResult:
    scorecard_id: int
    name: str
    version: int
    created: bool
    changed: bool


def _next_run(schedule: str | None) -> datetime | None:
    if schedule is None:
        return None
    from croniter import croniter

    return croniter(schedule, datetime.now(UTC)).get_next(datetime)  # type: ignore[no-any-return]


async def apply(conn: psycopg.AsyncConnection[Any], raw: Any) -> SaveResult:
    """Create or update a scorecard by name; a changed definition is a new version."""
    d = parse_scorecard(raw)
    card = await load_definition(conn, d)
    _, _, compiled = build(card, keyed=False)
    stored = {k: v for k, v in d.stored().items() if k != "status"}
    digest = definition_hash(stored)

    async def save() -> SaveResult:
        existing = await (
            await conn.execute(_q("lock_scorecard_by_name"), {"name": d.name})
        ).fetchone()
        head = {
            "name": d.name,
            "entity_type": d.entity_type,
            "status": d.status,
            "schedule": d.schedule,
            "realtime": d.realtime,
            "next_run_at": _next_run(d.schedule),
        }
        created = existing is None
        if existing is None:
            row = await (await conn.execute(_q("insert_scorecard"), head)).fetchone()
            assert row is not None
            sid, version, changed = int(row["id"]), 1, True
        else:
            sid = int(existing["id"])
            current = await (
                await conn.execute(_q("current_scorecard_version"), {"id": sid})
            ).fetchone()
            assert current is not None
            changed = current["definition_hash"] != digest
            version = int(current["version"]) + (1 if changed else 0)
        if changed:
            await conn.execute(
                _q("insert_scorecard_version"),
                {
                    "id": sid,
                    "version": version,
                    "definition": Jsonb(stored),
                    "definition_hash": digest,
                    "columns_read": sorted(compiled.columns_read),
                },
            )
        if not created:
            await conn.execute(_q("update_scorecard_head"), {**head, "id": sid, "version": version})
        await _sources(conn, sid, card, compiled.columns_read, compiled.related_columns)
        return SaveResult(sid, d.name, version, created, changed)

    return await db.retry_lock_timeouts(conn, save, f"saving scorecard {d.name!r}")


async def _sources(
    conn: psycopg.AsyncConnection[Any],
    sid: int,
    card: LoadedScorecard,
    reads: set[str],
    related_reads: dict[str, set[str]],
) -> None:
    """What rescores the scorecard in real time, and the capture that feeds it."""
    from engine import prefilter

    d, entity = card.definition, card.entity
    await conn.execute(_q("clear_score_sources"), {"id": sid})
    await prefilter.drop_capture_demand(conn, demand_name(d.name))
    if not (d.realtime and d.status == "active"):
        return
    await conn.execute(
        _q("insert_score_source"),
        {
            "id": sid,
            "source_entity": entity.entity_type,
            "key_column": None,
            "entity_key_column": None,
            "columns": sorted(reads),
        },
    )
    await prefilter.set_capture_demand(
        conn, demand_name(d.name), entity.entity_type, ["insert", "update"], sorted(reads)
    )
    used = dict.fromkeys(f.aggregate.relation for f in d.factors if f.aggregate is not None)
    for name in used:
        rel = card.relations[name]
        related = rel.entity.entity_type
        if related == entity.entity_type:
            continue
        await conn.execute(
            _q("insert_score_source"),
            {
                "id": sid,
                "source_entity": related,
                "key_column": rel.key_column,
                "entity_key_column": entity.pk_columns[0],
                "columns": None,
            },
        )
        await prefilter.set_capture_demand(
            conn,
            demand_name(d.name),
            related,
            ["insert", "update", "delete"],
            sorted(related_reads.get(related, set()) | {rel.key_column}),
        )


async def list_scorecards(conn: psycopg.AsyncConnection[Any]) -> list[dict[str, Any]]:
    return [dict(r) for r in await (await conn.execute(_q("list_scorecards"), {})).fetchall()]


async def get(conn: psycopg.AsyncConnection[Any], name: str) -> dict[str, Any]:
    row = await (await conn.execute(_q("get_scorecard"), {"name": name})).fetchone()
    if row is None:
        raise ScorecardNotFound(name)
    out = dict(row)
    out["definition"] = {**row["definition"], "status": row["status"]}
    out["versions"] = [
        dict(v)
        for v in await (await conn.execute(_q("scorecard_versions"), {"id": row["id"]})).fetchall()
    ]
    return out


async def load(conn: psycopg.AsyncConnection[Any], name: str) -> LoadedScorecard:
    """The current version of scorecard ``name``, ready to compile."""
    row = await get(conn, name)
    d = parse_scorecard(row["definition"])
    return await load_definition(conn, d, int(row["id"]), int(row["current_version"]), False)


async def load_by_id(conn: psycopg.AsyncConnection[Any], scorecard_id: int) -> LoadedScorecard:
    row = await (await conn.execute(_q("scorecard_by_id"), {"id": scorecard_id})).fetchone()
    if row is None:
        raise ScorecardNotFound(str(scorecard_id))
    d = parse_scorecard({**row["definition"], "status": row["status"]})
    return await load_definition(conn, d, int(row["id"]), int(row["current_version"]), False)
