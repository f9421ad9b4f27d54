"""The entity writes of a scoring run: after the scoring statement stored the results in
``crmflow.score_latest``, the entity's own columns (``write:``) are updated from it in
short chunks (:func:`compile_write_chunk`), so that no CRM row stays locked for long and
a row a CRM writer holds is skipped and retried, not waited for."""

from __future__ import annotations

from psycopg import sql

from engine.scorecards.sqlparts import LoadedScorecard, comparable, pk_key, typed


def compile_write_chunk(card: LoadedScorecard) -> sql.Composed:
    """One chunk of entity writes: the entities whose key objects are in ``%(keys)s``
    get the values ``crmflow.score_latest`` holds for them, where they differ. Rows a
    CRM writer holds locked are skipped (SKIP LOCKED: no wait) and marked ``pending``
    for a later pass; the written ones lose the mark."""
    d, entity = card.definition, card.entity
    written = d.write.columns()
    pk = entity.pk_columns

    def value(key: str) -> sql.Composable:
        return typed(entity, written[key], sql.SQL("l.{}").format(sql.Identifier(_LATEST[key])))

    sets = sql.SQL(", ").join(
        sql.SQL("{} = {}").format(sql.Identifier(col), value(key)) for key, col in written.items()
    )
    differs = sql.SQL(" OR ").join(
        sql.SQL("{} IS DISTINCT FROM {}").format(
            comparable(entity, col, sql.Identifier("n", col)),
            comparable(entity, col, value(key)),
        )
        for key, col in written.items()
    )

    def cols(alias: str) -> sql.Composable:
        return sql.SQL(", ").join(sql.Identifier(alias, c) for c in pk)

    def same(a: str, b: str) -> sql.Composable:
        return sql.SQL(" AND ").join(
            sql.SQL("{} = {}").format(sql.Identifier(a, c), sql.Identifier(b, c)) for c in pk
        )

    return sql.Composed(
        [
            sql.SQL(
                "WITH q AS (SELECT {qcols} FROM jsonb_populate_recordset(NULL::{t}, "
                "CAST(%(keys)s AS jsonb)) AS q), "
                "k AS (SELECT {ncols} FROM {t} AS n WHERE ({ncols}) IN (SELECT {qcols} FROM q) "
                "FOR UPDATE OF n SKIP LOCKED), "
                "w AS (UPDATE {t} AS n SET {sets} FROM k, crmflow.score_latest AS l "
                "WHERE {nk} AND l.scorecard_id = %(scorecard_id)s AND l.entity_key = {nkey} "
                "AND ({differs}) RETURNING 1), "
                "skipped AS (UPDATE crmflow.score_latest AS l SET pending = true FROM q "
                "WHERE l.scorecard_id = %(scorecard_id)s AND l.entity_key = {qkey} "
                "AND NOT l.pending AND NOT EXISTS (SELECT 1 FROM k WHERE {qk}) RETURNING 1), "
                "cleared AS (UPDATE crmflow.score_latest AS l SET pending = false FROM k "
                "WHERE l.scorecard_id = %(scorecard_id)s AND l.entity_key = {kkey} "
                "AND l.pending RETURNING 1) "
                "SELECT (SELECT count(*) FROM q) AS todo, (SELECT count(*) FROM k) AS locked, "
                "(SELECT count(*) FROM w) AS written, (SELECT count(*) FROM skipped) AS marked, "
                "(SELECT count(*) FROM cleared) AS cleared"
            ).format(
                qcols=cols("q"),
                ncols=cols("n"),
                t=entity.table,
                sets=sets,
                nk=same("n", "k"),
                nkey=pk_key(entity, "n"),
                qkey=pk_key(entity, "q"),
                kkey=pk_key(entity, "k"),
                qk=same("k", "q"),
                differs=differs,
            )
        ]
    )


_LATEST = {
    "score": "score",
    "level": "level",
    "factors": "factors",
    "days_to_churn": "days_to_event",
}
