"""A scorecard's features in SQL: :func:`build` makes the CTEs ``e`` (the entities in
scope, their segment, their row factors), ``r_<j>`` (the aggregates,
``engine.scorecards.aggregates``) and ``f`` (each factor's value ``v<i>`` after
``missing``), which the scoring statement (``engine.scorecards.scoring``) scores and
:func:`compile_features` returns as they were at a past date (what ``score fit`` learns
from)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql

from engine.scorecards.aggregates import aggregate_ctes
from engine.scorecards.model import ScorecardDefinition
from engine.scorecards.row_factors import FactorBuilder
from engine.scorecards.sqlparts import FENCE, Compiled, LoadedScorecard, lit, pk_key, with_ctes


def build(card: LoadedScorecard, keyed: bool) -> tuple[list[sql.Composable], list[str], Compiled]:
    """The CTEs ``e`` (entities and row factors), ``r_j`` (aggregates) and ``f`` (each
    factor's value ``v<i>`` after ``missing``, the segment ``seg``). ``keyed``: only the
    entities whose keys are in ``%(keys)s`` (a JSON array of key objects)."""
    b = FactorBuilder(card)
    d, entity = b.d, b.entity
    row_values: dict[str, sql.Composable] = {}
    for i, f in enumerate(d.factors):
        if f.aggregate is None:
            row_values[f.id] = b.row_value(f, f"factors[{i}]")
    seg = _segment_case(b)
    agg_ctes, agg_values = aggregate_ctes(b, keyed)
    ctes: list[sql.Composable] = [_entity_cte(b, seg, row_values, keyed), *agg_ctes]
    pk = entity.pk_columns
    f_cols: list[sql.Composable] = [
        sql.SQL("e.entity_key"),
        sql.SQL("e.seg"),
        *(sql.SQL("e.{}").format(sql.Identifier(f"k{i}")) for i in range(len(pk))),
        *(
            sql.SQL("e.{}").format(sql.Identifier(f"w_{k}"))
            for k, c in d.write.columns().items()
            if c in entity.columns
        ),
    ]
    for i, f in enumerate(d.factors):
        raw = (
            sql.SQL("e.{}").format(sql.Identifier(f"x{i}"))
            if f.id in row_values
            else agg_values.get(f.id, sql.SQL("NULL"))
        )
        f_cols.append(
            sql.SQL("coalesce(CAST({} AS double precision), {}) AS {}").format(
                raw, lit(f.missing), sql.Identifier(f"v{i}")
            )
        )
    joins = sql.SQL(" ").join(
        sql.SQL("LEFT JOIN {a} ON {a}.k = e.k0").format(a=sql.Identifier(f"r_{j}"))
        for j in range(len(agg_ctes))
    )
    ctes.append(
        sql.SQL("f AS (SELECT {} FROM e {}{})").format(sql.SQL(", ").join(f_cols), joins, FENCE)
    )
    b.columns_read |= set(pk)
    compiled = Compiled(ctes, b.columns_read, b.related_columns, b.issues)
    names = [f.id for f in d.factors]
    return ctes, names, compiled


def _segment_case(b: FactorBuilder) -> sql.Composable:
    """The entity's segment: the index of the first segment whose ``when`` holds (up to
    the catch-all), -1 for none."""
    seg_cases: list[sql.Composable] = []
    catch_all: int | None = None
    for i, s in enumerate(b.d.segments):
        if s.when is None:
            catch_all = i
            break
        cond = b.condition(s.when, f"segments[{i}].when", b.entity, "n")
        seg_cases.append(sql.SQL("WHEN {} THEN {}").format(cond, sql.Literal(i)))
    return (
        sql.SQL("CASE {} ELSE {} END").format(
            sql.SQL(" ").join(seg_cases), sql.Literal(-1 if catch_all is None else catch_all)
        )
        if seg_cases
        else sql.Literal(-1 if catch_all is None else catch_all)
    )


def _entity_cte(
    b: FactorBuilder, seg: sql.Composable, row_values: dict[str, sql.Composable], keyed: bool
) -> sql.Composable:
    """``e``: per entity in scope its key (``entity_key``, ``k<i>``), segment, row
    factors (``x<i>``) and the columns the scorecard writes as they are (``w_<key>``)."""
    d, entity = b.d, b.entity
    pk = entity.pk_columns
    e_cols: list[sql.Composable] = [
        sql.SQL("{} AS entity_key").format(pk_key(entity, "n")),
        sql.SQL("{} AS seg").format(seg),
    ]
    e_cols += [
        sql.SQL("{} AS {}").format(sql.Identifier("n", c), sql.Identifier(f"k{i}"))
        for i, c in enumerate(pk)
    ]
    for i, f in enumerate(d.factors):
        if f.id in row_values:
            e_cols.append(
                sql.SQL("CAST({} AS double precision) AS {}").format(
                    row_values[f.id], sql.Identifier(f"x{i}")
                )
            )
    for key, column in d.write.columns().items():
        if column in entity.columns:
            e_cols.append(
                sql.SQL("{} AS {}").format(sql.Identifier("n", column), sql.Identifier(f"w_{key}"))
            )
    keys_filter: sql.Composable = sql.SQL("true")
    if keyed:
        keys_filter = sql.SQL(
            "({cols}) IN (SELECT {kcols} FROM jsonb_populate_recordset(NULL::{t}, "
            "CAST(%(keys)s AS jsonb)) AS q)"
        ).format(
            cols=sql.SQL(", ").join(sql.Identifier("n", c) for c in pk),
            kcols=sql.SQL(", ").join(sql.Identifier("q", c) for c in pk),
            t=entity.table,
        )
    return sql.SQL("e AS MATERIALIZED (SELECT {} FROM {} AS n WHERE {})").format(
        sql.SQL(", ").join(e_cols), entity.table, keys_filter
    )


def segment_name(d: ScorecardDefinition) -> sql.Composable:
    if not d.segments:
        return sql.Literal("default")
    return sql.SQL("(CASE f.seg {} ELSE 'default' END)").format(
        sql.SQL(" ").join(
            sql.SQL("WHEN {} THEN {}").format(sql.Literal(i), sql.Literal(s.name))
            for i, s in enumerate(d.segments)
        )
    )


async def _loaded(
    conn: psycopg.AsyncConnection[Any], scorecard: LoadedScorecard | ScorecardDefinition
) -> LoadedScorecard:
    if isinstance(scorecard, LoadedScorecard):
        return scorecard
    from engine.scorecards.store import load_definition

    return await load_definition(conn, scorecard)


async def compile_features(
    conn: psycopg.AsyncConnection[Any],
    scorecard: LoadedScorecard | ScorecardDefinition,
    as_of: datetime | None = None,
    keys: list[dict[str, Any]] | None = None,
) -> tuple[sql.Composed, dict[str, Any]]:
    """A query of ``entity_key`` (jsonb), ``segment`` and one double column per factor id
    (after ``missing``) for every entity (or those in ``keys``), as of ``as_of``."""
    from psycopg.types.json import Jsonb

    card = await _loaded(conn, scorecard)
    ctes, names, compiled = build(card, keys is not None)
    if compiled.issues:
        from engine.scorecards.model import ScorecardError

        raise ScorecardError(compiled.issues)
    cols = [
        sql.SQL("f.{} AS {}").format(sql.Identifier(f"v{i}"), sql.Identifier(name))
        for i, name in enumerate(names)
    ]
    query = sql.SQL(
        "{} SELECT f.entity_key, {} AS segment, {} FROM f ORDER BY f.entity_key"
    ).format(with_ctes(ctes), segment_name(card.definition), sql.SQL(", ").join(cols))
    params: dict[str, Any] = {"as_of": as_of}
    if keys is not None:
        params["keys"] = Jsonb(keys)
    return sql.Composed([query]), params
