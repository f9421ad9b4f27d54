"""The aggregate factors' SQL: one grouped CTE ``r_<j>`` per related table, a single pass
over its rows in the widest window the relation's factors need, each factor's window and
``where`` as a FILTER (``c<i>``, and ``p<i>`` for the previous window when the factor
compares with it); and each aggregate factor's value over those columns."""

from __future__ import annotations

from psycopg import sql

from engine.model import Issue
from engine.scorecards.model import Aggregate, Factor
from engine.scorecards.row_factors import FactorBuilder
from engine.scorecards.sqlparts import AS_OF, Relation, before, spec_columns

NUMERIC_KINDS = ("number",)
TIME_KINDS = ("date", "timestamp")


def _agg_value(
    b: FactorBuilder, a: Aggregate, rel: Relation, path: str
) -> tuple[sql.Composable | None, bool]:
    """The per-row value an aggregate reads (None: count(*)); whether it is a count/sum."""
    if a.column is None:
        return None, True
    spec = rel.entity.resolve(a.column)
    if spec is None:
        b.issues.append(
            Issue(
                f"{path}.column",
                f"{rel.entity.qualified_name} (relation {rel.name!r}) has no column {a.column!r}",
            )
        )
        return sql.SQL("NULL"), True
    b.related_columns.setdefault(rel.entity.entity_type, set()).update(
        spec_columns(spec, rel.entity)
    )
    expr = spec.expr("r")
    if a.function == "count":
        return expr, True
    if spec.kind in NUMERIC_KINDS:
        value: sql.Composable = sql.SQL("CAST({} AS double precision)").format(expr)
    elif spec.kind == "boolean":
        value = sql.SQL("CAST(CAST({} AS integer) AS double precision)").format(expr)
    elif spec.kind in TIME_KINDS and a.function in ("min", "max", "avg"):
        value = sql.SQL(
            "(extract(epoch FROM ({as_of} - CAST({e} AS timestamptz))) / 86400.0)"
        ).format(as_of=AS_OF, e=expr)
    else:
        b.issues.append(
            Issue(
                f"{path}.column",
                f"{a.function} needs a numeric column ({a.column!r} is {spec.display_type})",
            )
        )
        return sql.SQL("NULL"), True
    return value, a.function == "sum"


def aggregate_ctes(
    b: FactorBuilder, keyed: bool
) -> tuple[list[sql.Composable], dict[str, sql.Composable]]:
    """The grouped CTEs over the related tables, and each aggregate factor's value."""
    by_relation: dict[str, list[tuple[int, Factor]]] = {}
    for i, f in enumerate(b.d.factors):
        if f.aggregate is not None:
            by_relation.setdefault(f.aggregate.relation, []).append((i, f))
    ctes: list[sql.Composable] = []
    values: dict[str, sql.Composable] = {}
    for j, (name, members) in enumerate(by_relation.items()):
        rel = _usable_relation(b, name, members)
        if rel is not None:
            ctes.append(_relation_cte(b, j, name, rel, members, keyed, values))
    return ctes, values


def _usable_relation(
    b: FactorBuilder, name: str, members: list[tuple[int, Factor]]
) -> Relation | None:
    """The relation ``name`` when aggregates can read it, else None (an issue per factor)."""
    rel = b.card.relations.get(name)
    if rel is None:
        known = ", ".join(sorted(b.card.relations)) or "none declared"
        for i, _ in members:
            b.issues.append(
                Issue(
                    f"factors[{i}].aggregate.relation",
                    f"{b.entity.entity_type} has no relation {name!r} "
                    f"(relations: {known}); declare it with `crmflow relation add`",
                )
            )
        return None
    if len(b.entity.pk_columns) != 1:
        for i, _ in members:
            b.issues.append(
                Issue(
                    f"factors[{i}].aggregate",
                    "aggregates need an entity with a single-column primary key",
                )
            )
        return None
    return rel


def _relation_cte(
    b: FactorBuilder,
    j: int,
    name: str,
    rel: Relation,
    members: list[tuple[int, Factor]],
    keyed: bool,
    values: dict[str, sql.Composable],
) -> sql.Composable:
    """The CTE ``r_<j>`` over relation ``name``'s rows, one group per entity key; puts each
    of its factors' values in ``values``."""
    cols = b.related_columns.setdefault(rel.entity.entity_type, set())
    cols.add(rel.key_column)
    alias = sql.Identifier(f"r_{j}")
    key = sql.Identifier("r", rel.key_column)
    t = sql.Identifier("r", rel.time_column) if rel.time_column else None
    if t is not None:
        cols.add(rel.time_column or "")
    selects: list[sql.Composable] = [sql.SQL("{} AS k").format(key)]
    widest: float | None = 0.0
    for i, f in members:
        a = f.aggregate
        assert a is not None
        path = f"factors[{i}].aggregate"
        if a.window is not None and t is None:
            b.issues.append(
                Issue(
                    f"{path}.window",
                    f"relation {name!r} has no time column; declare one "
                    "(`crmflow relation add ... --time-column COL`) to use windows",
                )
            )
            continue
        where = (
            b.condition(a.where, f"{path}.where", rel.entity, "r") if a.where is not None else None
        )
        value, zero_when_empty = _agg_value(b, a, rel, path)
        if a.window is None:
            widest = None
        elif widest is not None:
            widest = max(widest, a.window * (2 if a.compare_to_previous else 1))
        values[f.id] = _factor_columns(selects, alias, i, a, t, where, value, zero_when_empty)
    where_parts: list[sql.Composable] = [sql.SQL("{} IS NOT NULL").format(key)]
    if t is not None:
        where_parts.append(sql.SQL("{} <= {}").format(t, AS_OF))
        if widest:
            where_parts.append(sql.SQL("{} > {}").format(t, before(widest)))
    if keyed:
        where_parts.append(sql.SQL("{} IN (SELECT e.k0 FROM e)").format(key))
    return sql.SQL(
        "{alias} AS (SELECT {selects} FROM {table} AS r WHERE {where} GROUP BY {key})"
    ).format(
        alias=alias,
        selects=sql.SQL(", ").join(selects),
        table=rel.entity.table,
        where=sql.SQL(" AND ").join(where_parts),
        key=key,
    )


def _factor_columns(
    selects: list[sql.Composable],
    alias: sql.Identifier,
    i: int,
    a: Aggregate,
    t: sql.Composable | None,
    where: sql.Composable | None,
    value: sql.Composable | None,
    zero_when_empty: bool,
) -> sql.Composable:
    """Adds factor ``i``'s columns to the CTE's ``selects`` (``c<i>`` over its window,
    ``p<i>`` over the previous one); returns the factor's value read from them."""
    w = a.window
    cur_name = sql.Identifier(f"c{i}")
    selects.append(
        sql.SQL("{} AS {}").format(_agg_call(a.function, value, t, where, w, None), cur_name)
    )
    cur: sql.Composable = sql.SQL("{}.{}").format(alias, cur_name)
    if zero_when_empty:
        cur = sql.SQL("coalesce({}, 0.0)").format(cur)
    expr: sql.Composable = cur
    if a.compare_to_previous is not None and w is not None:
        prev_name = sql.Identifier(f"p{i}")
        selects.append(
            sql.SQL("{} AS {}").format(_agg_call(a.function, value, t, where, 2 * w, w), prev_name)
        )
        prev: sql.Composable = sql.SQL("{}.{}").format(alias, prev_name)
        if zero_when_empty:
            prev = sql.SQL("coalesce({}, 0.0)").format(prev)
        expr = _compare(a.compare_to_previous, cur, prev)
    return expr


def _agg_call(
    fn: str,
    value: sql.Composable | None,
    t: sql.Composable | None,
    where: sql.Composable | None,
    lo: float | None,
    hi: float | None,
) -> sql.Composable:
    """``fn(value)`` over the related rows with ``as_of - lo < t <= as_of - hi``."""
    conds: list[sql.Composable] = []
    if t is not None and lo is not None:
        conds.append(sql.SQL("{} > {}").format(t, before(lo)))
    if t is not None and hi:
        conds.append(sql.SQL("{} <= {}").format(t, before(hi)))
    if where is not None:
        conds.append(where)
    call: sql.Composable = (
        sql.SQL("count(*)") if value is None else sql.SQL("{}({})").format(sql.SQL(fn), value)
    )
    if conds:
        call = sql.SQL("{} FILTER (WHERE {})").format(call, sql.SQL(" AND ").join(conds))
    return sql.SQL("CAST({} AS double precision)").format(call)


def _compare(kind: str, cur: sql.Composable, prev: sql.Composable) -> sql.Composable:
    if kind == "decline":
        return sql.SQL(
            "(CASE WHEN {p} > 0 AND {c} IS NOT NULL "
            "THEN greatest(0.0, least(1.0, ({p} - {c}) / {p})) ELSE 0.0 END)"
        ).format(c=cur, p=prev)
    if kind == "increase":
        return sql.SQL(
            "(CASE WHEN {c} IS NOT NULL AND {p} IS NOT NULL "
            "THEN greatest(0.0, ({c} - {p}) / greatest({p}, 1.0)) ELSE 0.0 END)"
        ).format(c=cur, p=prev)
    if kind == "ratio":
        return sql.SQL("({c} / NULLIF({p}, 0.0))").format(c=cur, p=prev)
    return sql.SQL("({c} - {p})").format(c=cur, p=prev)
