"""The entity writes of a scoring run: after the scoring statement stored the results in
``crmflow.score_latest``, the entity's own columns (``write:``) are updated from it in
short chunks (:func:`compile_write_chunk`, run by :func:`write_rows`), so that no CRM
row stays locked for long and a row a CRM writer holds is skipped and retried, not
waited for; rows a failed chunk leaves are marked pending (:func:`write_pending` writes
pending rows)."""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import psycopg
from psycopg import sql

from engine import db
from engine.scorecards.sqlparts import LoadedScorecard, comparable, typed

log = logging.getLogger(__name__)

# Entity rows written per transaction: a chunk's row locks last one short statement.
WRITE_CHUNK = 2000
# How long a chunk's single UPDATE may wait for a lock a CRM writer holds before it is
# rolled back and the chunk written carefully (skipping the locked rows).
AT_ONCE_LOCK_TIMEOUT_MS = 5


def _q(name: str) -> str:
    return db.query(name, "scorecards.sql")


def compile_write_chunk(card: LoadedScorecard, careful: bool = True) -> sql.Composed:
    """One chunk of entity writes: the ``crmflow.score_latest`` rows whose row ids
    (``ctid``) are in ``%(rows)s`` (the scoring statement returns those it wrote) are
    copied into their entities' columns, where they differ.

    ``careful``: rows a CRM writer holds locked are skipped (SKIP LOCKED: no wait) and
    marked ``pending`` for a later pass; the written ones lose the mark. Not careful:
    one UPDATE of them all, which the caller runs under a lock timeout of a few
    milliseconds and, if any row is locked, rolls back and runs carefully: locking the
    rows first and then updating them wrote each row twice (a third of the writes' time).

    By row id, not by key: finding 100,000 results by their JSON keys took a third of the
    writes (a jsonb comparison at every step of the index), a row id is a direct fetch.
    A result replaced since (another run rescored the entity: that run wrote it, or found
    the entity's columns already right) is no longer found at its old row id, even when
    the replacing run committed after this statement began (``_ROWS``), and is left
    alone."""
    d, entity = card.definition, card.entity
    written = d.write.columns()
    pk = entity.pk_columns

    def value(key: str) -> sql.Composable:
        return typed(entity, written[key], sql.SQL("l.{}").format(sql.Identifier(_LATEST[key])))

    parts = {
        "typed_key": sql.SQL(", ").join(
            # The entity's key columns, typed, from the JSON key (so that the joins to the
            # CRM table are on its own primary key).
            sql.SQL("CAST(l.entity_key ->> {} AS {}) AS {}").format(
                sql.Literal(c), sql.SQL(entity.columns[c].type_sql), sql.Identifier(f"k{i}")
            )
            for i, c in enumerate(pk)
        ),
        "ncols": sql.SQL(", ").join(sql.Identifier("n", c) for c in pk),
        "t": entity.table,
        "sets": sql.SQL(", ").join(
            sql.SQL("{} = {}").format(sql.Identifier(col), value(key))
            for key, col in written.items()
        ),
        "nl": sql.SQL(" AND ").join(
            sql.SQL("{} = {}").format(sql.Identifier("n", c), sql.Identifier("l", f"k{i}"))
            for i, c in enumerate(pk)
        ),
        "nk": sql.SQL(" AND ").join(
            sql.SQL("{} = {}").format(sql.Identifier("n", c), sql.Identifier("k", c)) for c in pk
        ),
        "differs": sql.SQL(" OR ").join(
            sql.SQL("{} IS DISTINCT FROM {}").format(
                comparable(entity, col, sql.Identifier("n", col)),
                comparable(entity, col, value(key)),
            )
            for key, col in written.items()
        ),
    }
    return sql.Composed(
        [_ROWS.format(**parts), (_CAREFUL if careful else _AT_ONCE).format(**parts)]
    )


# Each row fetched by its id (a TID scan; OFFSET 0 keeps the lookup apart): as a filter,
# ctid = ANY (the array parameter) was tested against every row of the scorecard, and a
# join was planned as a hash of all of them. FOR SHARE: a row another run has replaced
# since this statement's snapshot is seen replaced (its new version no longer has the
# id) and left alone, instead of its older result being written; SKIP LOCKED: a row
# another run is replacing right now is left to that run, not waited for.
_ROWS = sql.SQL(
    "WITH l AS (SELECT l.*, {typed_key} "
    "FROM unnest(CAST(%(rows)s AS tid[])) AS r(row_id) CROSS JOIN LATERAL "
    "(SELECT l.ctid AS row_id, l.* FROM crmflow.score_latest AS l "
    "WHERE l.ctid = r.row_id OFFSET 0 FOR SHARE SKIP LOCKED) AS l "
    "WHERE l.scorecard_id = %(scorecard_id)s), "
)

_AT_ONCE = sql.SQL(
    "w AS (UPDATE {t} AS n SET {sets} FROM l WHERE {nl} AND ({differs}) RETURNING 1), "
    "cleared AS (UPDATE crmflow.score_latest AS p SET pending = false FROM l "
    "WHERE p.ctid = l.row_id AND l.pending RETURNING 1) "
    "SELECT (SELECT count(*) FROM w) AS written, 0 AS skipped"
)

# Only rows that differ are locked (a lock writes the CRM row's header), FOR NO KEY
# UPDATE as the UPDATE itself locks them: FOR UPDATE would make the CRM's inserts of rows
# referencing them wait (their foreign-key checks take KEY SHARE). A pending row is
# cleared when written, or when its entity no longer differs.
_CAREFUL = sql.SQL(
    "k AS (SELECT {ncols} FROM {t} AS n JOIN l ON {nl} WHERE ({differs}) "
    "FOR NO KEY UPDATE OF n SKIP LOCKED), "
    "w AS (UPDATE {t} AS n SET {sets} FROM k, l "
    "WHERE {nk} AND {nl} AND ({differs}) RETURNING 1), "
    "skipped AS (UPDATE crmflow.score_latest AS p SET pending = true FROM l "
    "WHERE p.ctid = l.row_id AND NOT l.pending "
    "AND NOT EXISTS (SELECT 1 FROM k AS n WHERE {nl}) "
    "AND EXISTS (SELECT 1 FROM {t} AS n WHERE {nl} AND ({differs})) RETURNING 1), "
    "cleared AS (UPDATE crmflow.score_latest AS p SET pending = false FROM l "
    "WHERE p.ctid = l.row_id AND l.pending "
    "AND (EXISTS (SELECT 1 FROM k AS n WHERE {nl}) "
    "OR NOT EXISTS (SELECT 1 FROM {t} AS n WHERE {nl} AND ({differs}))) RETURNING 1) "
    "SELECT (SELECT count(*) FROM w) AS written, "
    "(SELECT count(*) FROM l WHERE NOT EXISTS (SELECT 1 FROM k AS n WHERE {nl}) "
    "AND EXISTS (SELECT 1 FROM {t} AS n WHERE {nl} AND ({differs}))) AS skipped"
)


_LATEST = {
    "score": "score",
    "level": "level",
    "factors": "factors",
    "days_to_churn": "days_to_event",
}


async def write_rows(
    conn: psycopg.AsyncConnection[Any], card: LoadedScorecard, rows: list[str]
) -> tuple[int, int]:
    """Copy the ``crmflow.score_latest`` rows ``rows`` (their row ids) into their
    entities' columns, a chunk per transaction, with the engine's signed write context
    (so the writes are captured as crmflow's, depth 1). Rows a CRM writer holds locked
    are skipped and stay pending. Returns (rows written, rows skipped)."""
    if not card.definition.write.columns() or not rows:
        return 0, 0
    at_once, careful = compile_write_chunk(card, careful=False), compile_write_chunk(card)
    actor = f"crmflow:scorecard:{card.definition.name}"

    async def chunk(statement: sql.Composed, params: dict[str, Any], fast: bool) -> Any:
        async with conn.transaction():
            await conn.execute(
                db.query("set_write_context", "runtime.sql"), {"depth": "1", "actor": actor}
            )
            if fast:
                await conn.execute(f"SET LOCAL lock_timeout = '{AT_ONCE_LOCK_TIMEOUT_MS}ms'")
            return await (await conn.execute(statement, params)).fetchone()

    written = skipped = 0
    for start in range(0, len(rows), WRITE_CHUNK):
        params = {"scorecard_id": card.id, "rows": rows[start : start + WRITE_CHUNK]}
        row = None
        with contextlib.suppress(psycopg.errors.LockNotAvailable):
            row = await chunk(at_once, params, fast=True)
        if row is None:  # a CRM writer holds one of the rows (or the table): carefully
            try:
                row = await chunk(careful, params, fast=False)
            except psycopg.Error:
                await _mark_pending(conn, card, rows[start:])
                raise
        assert row is not None
        written += int(row["written"])
        skipped += int(row["skipped"])
    return written, skipped


async def _mark_pending(
    conn: psycopg.AsyncConnection[Any], card: LoadedScorecard, rows: list[str]
) -> None:
    """The rows a failed chunk and the chunks after it were to write, marked pending (the
    worker's pending pass writes them, every 10 s), best-effort: on a
    lost connection the next run finds them."""
    try:
        async with conn.transaction():
            await conn.execute(_q("mark_rows_pending"), {"scorecard_id": card.id, "rows": rows})
    except psycopg.Error as exc:
        log.error(
            "scorecard %s: %d entity write(s) failed and could not be marked pending (%s); "
            "its next run writes them",
            card.definition.name,
            len(rows),
            exc,
        )


async def write_pending(
    conn: psycopg.AsyncConnection[Any], card: LoadedScorecard
) -> tuple[int, int]:
    """Write the entities left pending (their rows were locked by a writer)."""
    rows = await (await conn.execute(_q("pending_rows"), {"id": card.id})).fetchall()
    return await write_rows(conn, card, [r["row_id"] for r in rows])
