"""Scorecards compiled to set-based SQL (docs/scorecards.md).

One statement scores every entity asked for (the whole table, or the keys in
``%(keys)s``): the row factors (conditions and whitelisted expressions) read the entity's
row ``n``; the aggregates read one grouped CTE per related table (a single pass over its
rows in the widest window, each factor's window and ``where`` as a FILTER); then the
segment's weights, the contributions, the score, the level, the top factors and the
days to the event. The scoring statement stores the results in ``crmflow.score_latest``
and ``crmflow.score_history``; the entity's columns are written afterwards in short
chunks (:func:`write_chunk`), so no host row stays locked for long.

Every time-dependent part reads ``as_of`` (``%(as_of)s``, NULL meaning ``now()``), so
:func:`compile_features` can compute the factors as of a past date.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql

from engine.catalog import EntitySchema, FieldSpec
from engine.conditions import Compiler, ConditionError, parse_conditions
from engine.model import Issue
from engine.scorecards.model import TOP_FACTORS, Aggregate, Factor, ScorecardDefinition
from engine.sqlexpr import UnsafeExpression, render_expression, validate_expression

# A scalar sub-select: evaluated once per statement (an InitPlan), not once per row.
AS_OF = sql.SQL("(SELECT coalesce(CAST(%(as_of)s AS timestamptz), now()))")
F8 = sql.SQL("double precision")
# exp() of a linear predictor beyond ±700 overflows a double; the score is 0 or 1 there.
EXP_CLAMP = 700.0
NUMERIC_KINDS = ("number",)
TIME_KINDS = ("date", "timestamp")
_JSON_PAIRS = 40  # jsonb_build_object takes at most 100 arguments


@dataclass(frozen=True)
class Relation:
    name: str
    entity: EntitySchema  # the related table
    key_column: str
    time_column: str | None


@dataclass
class LoadedScorecard:
    id: int | None
    version: int
    definition: ScorecardDefinition
    entity: EntitySchema
    relations: dict[str, Relation]
    boolean_factors: frozenset[str] = frozenset()  # expression factors of boolean type


@dataclass
class Compiled:
    """The pieces of a compiled scorecard, and what it reads."""

    ctes: list[sql.Composable]
    columns_read: set[str]
    related_columns: dict[str, set[str]]  # related entity type -> its columns read
    issues: list[Issue] = field(default_factory=list)


def lit(value: float) -> sql.Composable:
    return sql.SQL("CAST({} AS double precision)").format(sql.Literal(repr(float(value))))


def _interval(seconds: float) -> sql.Composable:
    return sql.SQL("({} * interval '1 second')").format(sql.Literal(float(seconds)))


def _before(seconds: float) -> sql.Composable:
    """``as_of - seconds``, computed once per statement (the rows compare with a constant)."""
    return sql.SQL("(SELECT coalesce(CAST(%(as_of)s AS timestamptz), now()) - {})").format(
        _interval(seconds)
    )


def _columns_of(source: str, entity: EntitySchema) -> set[str]:
    """The entity's columns a whitelisted expression reads (ColumnRef names)."""
    import pglast
    from pglast import ast
    from pglast.visitors import Visitor

    found: set[str] = set()

    class _Refs(Visitor):
        def visit_ColumnRef(self, ancestors: Any, node: ast.ColumnRef) -> None:
            names = [getattr(f, "sval", None) for f in (node.fields or ())]
            if names and isinstance(names[-1], str):
                found.add(names[-1])

    try:
        _Refs()(pglast.parse_sql(f"SELECT {source}"))
    except Exception:  # validated elsewhere; unknown here means "reads anything"
        return set(entity.columns)
    return found & set(entity.columns)


def _spec_columns(spec: FieldSpec, entity: EntitySchema) -> set[str]:
    if spec.derived_source is not None:
        return _columns_of(spec.derived_source, entity)
    return {spec.column} if spec.column else set()


def _tree_columns(tree: Any, entity: EntitySchema) -> set[str]:
    from engine.conditions import FieldCondition, SqlCondition, walk

    cols: set[str] = set()
    for leaf in walk(tree):
        if isinstance(leaf, FieldCondition):
            spec = entity.resolve(leaf.field)
            if spec is not None:
                cols |= _spec_columns(spec, entity)
        elif isinstance(leaf, SqlCondition):
            cols |= _columns_of(leaf.sql, entity)
    return cols


class _Builder:
    def __init__(self, card: LoadedScorecard) -> None:
        self.card = card
        self.d = card.definition
        self.entity = card.entity
        self.issues: list[Issue] = []
        self.columns_read: set[str] = set()
        self.related_columns: dict[str, set[str]] = {}

    # ── conditions ──

    def _condition(self, raw: Any, path: str, entity: EntitySchema, alias: str) -> sql.Composable:
        try:
            tree = parse_conditions(raw, path)
        except ConditionError as exc:
            self.issues += [Issue(p, m) for p, m in exc.issues]
            return sql.SQL("false")
        compiler = Compiler(entity, allow_transitions=False, now=AS_OF)
        compiled = compiler.compile(tree, alias)
        self.issues += [Issue(p, m) for p, m in compiler.issues]
        cols = _tree_columns(tree, entity)
        if entity is self.entity:
            self.columns_read |= cols
        else:
            self.related_columns.setdefault(entity.entity_type, set()).update(cols)
        return compiled

    # ── row factors ──

    def row_value(self, f: Factor, path: str) -> sql.Composable:
        if f.condition is not None:
            cond = self._condition(f.condition, f"{path}.condition", self.entity, "n")
            return sql.SQL("CASE WHEN {} THEN 1.0 ELSE 0.0 END").format(cond)
        assert f.expression is not None
        source = f.expression.sql
        try:
            validate_expression(source, self.entity.columns)
            rendered = render_expression(source, "n")
        except UnsafeExpression as exc:
            self.issues.append(Issue(f"{path}.expression.sql", str(exc)))
            return sql.SQL("NULL")
        self.columns_read |= _columns_of(source, self.entity)
        if f.id in self.card.boolean_factors:
            return sql.SQL("(CASE WHEN ({e}) THEN 1.0 WHEN NOT ({e}) THEN 0.0 END)").format(
                e=sql.SQL(rendered)
            )
        return sql.SQL("({})").format(sql.SQL(rendered))

    # ── aggregates ──

    def _agg_value(
        self, a: Aggregate, rel: Relation, path: str
    ) -> tuple[sql.Composable | None, bool]:
        """The per-row value an aggregate reads (None: count(*)); whether it is a count/sum."""
        if a.column is None:
            return None, True
        spec = rel.entity.resolve(a.column)
        if spec is None:
            self.issues.append(
                Issue(
                    f"{path}.column",
                    f"{rel.entity.qualified_name} (relation {rel.name!r}) has no column "
                    f"{a.column!r}",
                )
            )
            return sql.SQL("NULL"), True
        self.related_columns.setdefault(rel.entity.entity_type, set()).update(
            _spec_columns(spec, rel.entity)
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
            self.issues.append(
                Issue(
                    f"{path}.column",
                    f"{a.function} needs a numeric column ({a.column!r} is {spec.display_type})",
                )
            )
            return sql.SQL("NULL"), True
        return value, a.function == "sum"

    def aggregates(self, keyed: bool) -> tuple[list[sql.Composable], dict[str, sql.Composable]]:
        """The grouped CTEs over the related tables, and each aggregate factor's value."""
        by_relation: dict[str, list[tuple[int, Factor]]] = {}
        for i, f in enumerate(self.d.factors):
            if f.aggregate is not None:
                by_relation.setdefault(f.aggregate.relation, []).append((i, f))
        ctes: list[sql.Composable] = []
        values: dict[str, sql.Composable] = {}
        pk = self.entity.pk_columns
        for j, (name, members) in enumerate(by_relation.items()):
            rel = self.card.relations.get(name)
            if rel is None:
                known = ", ".join(sorted(self.card.relations)) or "none declared"
                for i, _ in members:
                    self.issues.append(
                        Issue(
                            f"factors[{i}].aggregate.relation",
                            f"{self.entity.entity_type} has no relation {name!r} "
                            f"(relations: {known}); declare it with `crmflow relation add`",
                        )
                    )
                continue
            if len(pk) != 1:
                for i, _ in members:
                    self.issues.append(
                        Issue(
                            f"factors[{i}].aggregate",
                            "aggregates need an entity with a single-column primary key",
                        )
                    )
                continue
            cols = self.related_columns.setdefault(rel.entity.entity_type, set())
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
                    self.issues.append(
                        Issue(
                            f"{path}.window",
                            f"relation {name!r} has no time column; declare one "
                            "(`crmflow relation add ... --time-column COL`) to use windows",
                        )
                    )
                    continue
                where = (
                    self._condition(a.where, f"{path}.where", rel.entity, "r")
                    if a.where is not None
                    else None
                )
                value, zero_when_empty = self._agg_value(a, rel, path)
                if a.window is None:
                    widest = None
                elif widest is not None:
                    widest = max(widest, a.window * (2 if a.compare_to_previous else 1))

                def agg(
                    lo: float | None,
                    hi: float | None,
                    fn: str = a.function,
                    t: sql.Composable | None = t,
                    where: sql.Composable | None = where,
                    value: sql.Composable | None = value,
                ) -> sql.Composable:
                    return _agg_call(fn, value, t, where, lo, hi)

                w = a.window
                cur_name = sql.Identifier(f"c{i}")
                selects.append(sql.SQL("{} AS {}").format(agg(w, None), cur_name))
                cur: sql.Composable = sql.SQL("{}.{}").format(alias, cur_name)
                if zero_when_empty:
                    cur = sql.SQL("coalesce({}, 0.0)").format(cur)
                expr: sql.Composable = cur
                if a.compare_to_previous is not None and w is not None:
                    prev_name = sql.Identifier(f"p{i}")
                    selects.append(sql.SQL("{} AS {}").format(agg(2 * w, w), prev_name))
                    prev: sql.Composable = sql.SQL("{}.{}").format(alias, prev_name)
                    if zero_when_empty:
                        prev = sql.SQL("coalesce({}, 0.0)").format(prev)
                    expr = _compare(a.compare_to_previous, cur, prev)
                values[f.id] = expr
            where_parts: list[sql.Composable] = [sql.SQL("{} IS NOT NULL").format(key)]
            if t is not None:
                where_parts.append(sql.SQL("{} <= {}").format(t, AS_OF))
                if widest:
                    where_parts.append(sql.SQL("{} > {}").format(t, _before(widest)))
            if keyed:
                where_parts.append(sql.SQL("{} IN (SELECT e.k0 FROM e)").format(key))
            ctes.append(
                sql.SQL(
                    "{alias} AS (SELECT {selects} FROM {table} AS r WHERE {where} GROUP BY {key})"
                ).format(
                    alias=alias,
                    selects=sql.SQL(", ").join(selects),
                    table=rel.entity.table,
                    where=sql.SQL(" AND ").join(where_parts),
                    key=key,
                )
            )
        return ctes, values


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
        conds.append(sql.SQL("{} > {}").format(t, _before(lo)))
    if t is not None and hi:
        conds.append(sql.SQL("{} <= {}").format(t, _before(hi)))
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


def _pk_key(entity: EntitySchema, alias: str) -> sql.Composable:
    return sql.SQL("jsonb_build_object({})").format(
        sql.SQL(", ").join(
            sql.SQL("{}, {}").format(sql.Literal(c), sql.Identifier(alias, c))
            for c in entity.pk_columns
        )
    )


def _key_match(entity: EntitySchema, alias: str, key: sql.Composable) -> sql.Composable:
    """``alias``'s key equals the JSON key object ``key`` (typed, so indexes serve it)."""
    return sql.SQL(" AND ").join(
        sql.SQL("{} = CAST({} ->> {} AS {})").format(
            sql.Identifier(alias, c), key, sql.Literal(c), sql.SQL(entity.columns[c].type_sql)
        )
        for c in entity.pk_columns
    )


def build(card: LoadedScorecard, keyed: bool) -> tuple[list[sql.Composable], list[str], Compiled]:
    """The CTEs ``e`` (entities and row factors), ``r_j`` (aggregates) and ``f`` (each
    factor's value ``v<i>`` after ``missing``, the segment ``seg``). ``keyed``: only the
    entities whose keys are in ``%(keys)s`` (a JSON array of key objects)."""
    b = _Builder(card)
    d, entity = b.d, b.entity
    row_values: dict[str, sql.Composable] = {}
    for i, f in enumerate(d.factors):
        if f.aggregate is None:
            row_values[f.id] = b.row_value(f, f"factors[{i}]")
    seg_cases: list[sql.Composable] = []
    catch_all: int | None = None
    for i, s in enumerate(d.segments):
        if s.when is None:
            catch_all = i
            break
        cond = b._condition(s.when, f"segments[{i}].when", entity, "n")
        seg_cases.append(sql.SQL("WHEN {} THEN {}").format(cond, sql.Literal(i)))
    seg = (
        sql.SQL("CASE {} ELSE {} END").format(
            sql.SQL(" ").join(seg_cases), sql.Literal(-1 if catch_all is None else catch_all)
        )
        if seg_cases
        else sql.Literal(-1 if catch_all is None else catch_all)
    )
    agg_ctes, agg_values = b.aggregates(keyed)
    pk = entity.pk_columns
    e_cols: list[sql.Composable] = [
        sql.SQL("{} AS entity_key").format(_pk_key(entity, "n")),
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
    e = sql.SQL("e AS MATERIALIZED (SELECT {} FROM {} AS n WHERE {})").format(
        sql.SQL(", ").join(e_cols), entity.table, keys_filter
    )
    ctes: list[sql.Composable] = [e, *agg_ctes]
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
    ctes.append(sql.SQL("f AS (SELECT {} FROM e {})").format(sql.SQL(", ").join(f_cols), joins))
    b.columns_read |= set(pk)
    compiled = Compiled(ctes, b.columns_read, b.related_columns, b.issues)
    names = [f.id for f in d.factors]
    return ctes, names, compiled


def segment_name(d: ScorecardDefinition) -> sql.Composable:
    if not d.segments:
        return sql.Literal("default")
    return sql.SQL("(CASE f.seg {} ELSE 'default' END)").format(
        sql.SQL(" ").join(
            sql.SQL("WHEN {} THEN {}").format(sql.Literal(i), sql.Literal(s.name))
            for i, s in enumerate(d.segments)
        )
    )


def _by_segment(d: ScorecardDefinition, pick: Any) -> sql.Composable:
    """A CASE on the segment over per-segment constants (just the constant when equal)."""
    default = pick(None)
    per = [pick(s) for s in d.segments]
    if all(v == default for v in per):
        return lit(default)
    return sql.SQL("(CASE f.seg {} ELSE {} END)").format(
        sql.SQL(" ").join(
            sql.SQL("WHEN {} THEN {}").format(sql.Literal(i), lit(v)) for i, v in enumerate(per)
        ),
        lit(default),
    )


def scored_ctes(card: LoadedScorecard, keyed: bool) -> tuple[list[sql.Composable], Compiled]:
    """``build``'s CTEs, then ``s``: per entity the segment name, ``v<i>``, ``c<i>`` (the
    contributions), ``lp``, ``score``, ``level``, ``factors`` (top 3) and ``days``
    (:func:`contributions_of` makes the jsonb of the contributions where needed)."""
    ctes, _names, compiled = build(card, keyed)
    d = card.definition
    n = len(d.factors)
    contribs = [
        sql.SQL("f.{v} * {w} AS {c}").format(
            v=sql.Identifier(f"v{i}"),
            w=_by_segment(d, lambda s, f=f: d.weights_of(s)[1][f.id]),
            c=sql.Identifier(f"c{i}"),
        )
        for i, f in enumerate(d.factors)
    ]
    intercept = _by_segment(d, lambda s: d.weights_of(s)[0])
    ctes.append(
        sql.SQL("a AS (SELECT f.*, {seg} AS segment, {intercept} AS b, {contribs} FROM f)").format(
            seg=segment_name(d), intercept=intercept, contribs=sql.SQL(", ").join(contribs)
        )
    )
    lp = sql.SQL(" + ").join(
        [sql.SQL("a.b"), *(sql.SQL("a.{}").format(sql.Identifier(f"c{i}")) for i in range(n))]
    )
    ctes.append(sql.SQL("l AS (SELECT a.*, ({}) AS lp FROM a)").format(lp))
    score: sql.Composable
    if d.model == "logistic":
        score = sql.SQL("1.0 / (1.0 + exp(least({m}, greatest(-{m}, -l.lp))))").format(
            m=lit(EXP_CLAMP)
        )
    else:
        score = sql.SQL("l.lp")
    ctes.append(
        sql.SQL("u AS (SELECT l.*, CAST({} AS double precision) AS score FROM l)").format(score)
    )
    bands = list(d.bands.items())
    level_cases = sql.SQL(" ").join(
        sql.SQL("WHEN u.score >= {} THEN {}").format(lit(bound), sql.Literal(name))
        for name, bound in reversed(bands[1:])
    )
    level = (
        sql.SQL("(CASE {} ELSE {} END)").format(level_cases, sql.Literal(bands[0][0]))
        if len(bands) > 1
        else sql.Literal(bands[0][0])
    )
    top, rank_cte = _top_factors(d)
    if rank_cte is not None:
        ctes.append(rank_cte)
    days: sql.Composable = sql.SQL("CAST(NULL AS double precision)")
    if d.survival is not None:
        sv = d.survival
        index = sql.SQL(" + ").join(
            [lit(sv.intercept)]
            + [
                sql.SQL("u.{} * {}").format(sql.Identifier(f"v{i}"), lit(sv.coefficients[f.id]))
                for i, f in enumerate(d.factors)
                if f.id in sv.coefficients
            ]
        )
        days = sql.SQL("least({mx}, exp(least({m}, {idx})) * {k})").format(
            mx=lit(sv.max_days), m=lit(EXP_CLAMP), idx=index, k=lit(math.log(2) ** (1 / sv.shape))
        )
    ctes.append(
        sql.SQL(
            "s AS (SELECT u.*, {level} AS level, {top} AS factors, "
            "CAST({days} AS double precision) AS days FROM {src} AS u)"
        ).format(
            level=level,
            top=top,
            days=days,
            src=sql.Identifier("rk" if rank_cte is not None else "u"),
        )
    )
    return ctes, compiled


def _rounded(expr: sql.Composable) -> sql.Composable:
    """To 6 decimals, in double precision (a numeric round trip costs several times more
    per row)."""
    return sql.SQL("(round({} * 1000000.0) / 1000000.0)").format(expr)


# Up to this many factors the top factors are ranked by comparisons in the row (no
# sub-select per entity: 4x cheaper at 4 factors); above it, a sorted sub-select.
RANKED_FACTORS = 12


def _top_factors(d: ScorecardDefinition) -> tuple[sql.Composable, sql.Composable | None]:
    """The top factors' JSON array over the row ``u`` (the largest positive
    contributions, ties by factor order), and the CTE ``rk`` of ranks it needs, if any."""
    n = len(d.factors)

    def c(i: int) -> sql.Composable:
        return sql.SQL("u.{}").format(sql.Identifier(f"c{i}"))

    def obj(i: int) -> sql.Composable:
        f = d.factors[i]
        return sql.SQL(
            "jsonb_build_object('id', {id}, 'label', {label}, 'value', {v}, 'contribution', {c})"
        ).format(
            id=sql.Literal(f.id),
            label=sql.Literal(f.display),
            v=_rounded(sql.SQL("u.{}").format(sql.Identifier(f"v{i}"))),
            c=_rounded(c(i)),
        )

    if n > RANKED_FACTORS:
        rows = sql.SQL(", ").join(
            sql.SQL("({}, {}, {})").format(obj(i), c(i), sql.Literal(i)) for i in range(n)
        )
        top = sql.SQL(
            "(SELECT coalesce(jsonb_agg(x.j ORDER BY x.c DESC, x.o), '[]'::jsonb) FROM "
            "(SELECT * FROM (VALUES {rows}) AS x(j, c, o) WHERE x.c > 0 "
            "ORDER BY x.c DESC, x.o LIMIT {top}) AS x)"
        ).format(rows=rows, top=sql.Literal(TOP_FACTORS))
        return top, None
    # rank i = how many factors come before it: a larger contribution, or an equal one
    # earlier in the list. Positive contributions rank 0..k-1 (k of them).
    ranks = []
    for i in range(n):
        terms = [
            sql.SQL("CAST({} {} {} AS integer)").format(c(j), sql.SQL(">=" if j < i else ">"), c(i))
            for j in range(n)
            if j != i
        ]
        ranks.append(
            sql.SQL("({}) AS {}").format(
                sql.SQL(" + ").join(terms) if terms else sql.SQL("0"), sql.Identifier(f"rk{i}")
            )
        )
    positives = sql.SQL(" + ").join(
        sql.SQL("CAST({} > 0 AS integer)").format(c(i)) for i in range(n)
    )
    ranks.append(sql.SQL("({}) AS positives").format(positives))
    rank_cte = sql.SQL("rk AS (SELECT u.*, {} FROM u)").format(sql.SQL(", ").join(ranks))

    def element(r: int) -> sql.Composable:
        return sql.SQL("(CASE {} END)").format(
            sql.SQL(" ").join(
                sql.SQL("WHEN u.{} = {} THEN {}").format(
                    sql.Identifier(f"rk{i}"), sql.Literal(r), obj(i)
                )
                for i in range(n)
            )
        )

    arms: list[sql.Composable] = [sql.SQL("WHEN u.positives = 0 THEN '[]'::jsonb")]
    for k in range(1, min(TOP_FACTORS, n) + 1):
        cond = (
            sql.SQL("u.positives = {}").format(sql.Literal(k))
            if k < min(TOP_FACTORS, n)
            else sql.SQL("true")
        )
        arms.append(
            sql.SQL("WHEN {} THEN jsonb_build_array({})").format(
                cond, sql.SQL(", ").join(element(r) for r in range(k))
            )
        )
    return sql.SQL("(CASE {} END)").format(sql.SQL(" ").join(arms)), rank_cte


def contributions_of(d: ScorecardDefinition, alias: str) -> sql.Composable:
    """``{factor id: contribution}`` (jsonb) from the row ``alias``'s ``c<i>``: built only
    for the history rows a run inserts (a jsonb object per entity costs)."""
    pairs = [
        sql.SQL("{}, {}").format(
            sql.Literal(f.id),
            _rounded(sql.SQL("{}.{}").format(sql.Identifier(alias), sql.Identifier(f"c{i}"))),
        )
        for i, f in enumerate(d.factors)
    ]
    return sql.SQL(" || ").join(
        sql.SQL("jsonb_build_object({})").format(sql.SQL(", ").join(pairs[k : k + _JSON_PAIRS]))
        for k in range(0, len(pairs), _JSON_PAIRS)
    )


def _with(ctes: list[sql.Composable]) -> sql.Composable:
    return sql.SQL("WITH {}").format(sql.SQL(", ").join(ctes))


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
    ).format(_with(ctes), segment_name(card.definition), sql.SQL(", ").join(cols))
    params: dict[str, Any] = {"as_of": as_of}
    if keys is not None:
        params["keys"] = Jsonb(keys)
    return sql.Composed([query]), params


def _typed(entity: EntitySchema, column: str, value: sql.Composable) -> sql.Composable:
    spec = entity.columns[column]
    if spec.kind == "json" and spec.type_sql.endswith("json"):
        return sql.SQL("CAST(CAST({} AS text) AS {})").format(value, sql.SQL(spec.type_sql))
    return sql.SQL("CAST({} AS {})").format(value, sql.SQL(spec.type_sql))


def _comparable(entity: EntitySchema, column: str, value: sql.Composable) -> sql.Composable:
    """``value`` in a form that compares (json has no equality: compared as jsonb)."""
    spec = entity.columns[column]
    if spec.kind == "json":
        return sql.SQL("CAST({} AS jsonb)").format(value)
    return value


_SOURCES = {"score": "score", "level": "level", "factors": "factors", "days_to_churn": "days"}


def compile_scoring(card: LoadedScorecard, keyed: bool) -> sql.Composed:
    """The scoring statement: scores, ``crmflow.score_history`` rows where the score or
    level changed, ``crmflow.score_latest`` upserted. Returns the counts and
    ``to_write``, the keys of the entities whose columns differ from what they should
    hold (:func:`compile_write_chunk` writes them)."""
    ctes, _ = scored_ctes(card, keyed)
    d, entity = card.definition, card.entity
    differs_parts = [
        sql.SQL("{} IS DISTINCT FROM {}").format(
            _comparable(entity, col, sql.SQL("s.{}").format(sql.Identifier(f"w_{key}"))),
            _comparable(
                entity,
                col,
                _typed(entity, col, sql.SQL("s.{}").format(sql.Identifier(_SOURCES[key]))),
            ),
        )
        for key, col in d.write.columns().items()
    ]
    differs = sql.SQL(" OR ").join(differs_parts) if differs_parts else sql.SQL("false")
    ctes.append(
        sql.SQL(
            "j AS MATERIALIZED (SELECT s.entity_key, s.segment, s.score, s.level, s.lp, s.factors, "
            "{cs}, s.days, p.score AS p_score, p.level AS p_level, "
            "p.version AS p_version, p.segment AS p_segment, p.lp AS p_lp, p.factors AS p_factors, "
            "p.days_to_event AS p_days, ({differs}) AS differs "
            "FROM s LEFT JOIN crmflow.score_latest AS p "
            "ON p.scorecard_id = %(scorecard_id)s AND p.entity_key = s.entity_key)"
        ).format(
            differs=differs,
            cs=sql.SQL(", ").join(
                sql.SQL("s.{}").format(sql.Identifier(f"c{i}")) for i in range(len(d.factors))
            ),
        )
    )
    ctes.append(
        sql.SQL(
            "hist AS (INSERT INTO crmflow.score_history (entity_type, entity_key, scorecard_id, "
            "version, score, previous_score, change, level, previous_level, contributions, "
            "scored_at) SELECT {et}, j.entity_key, %(scorecard_id)s, %(version)s, j.score, "
            "j.p_score, j.score - j.p_score, j.level, j.p_level, {contributions}, now() FROM j "
            "WHERE j.p_score IS NULL OR j.level IS DISTINCT FROM j.p_level "
            "OR round(j.score * 1000000.0) <> round(j.p_score * 1000000.0) "
            "RETURNING 1)"
        ).format(et=sql.Literal(entity.entity_type), contributions=contributions_of(d, "j"))
    )
    ctes.append(
        sql.SQL(
            "up AS (INSERT INTO crmflow.score_latest AS t (scorecard_id, entity_key, version, "
            "segment, score, level, lp, factors, days_to_event, scored_at) "
            "SELECT %(scorecard_id)s, j.entity_key, %(version)s, j.segment, j.score, j.level, "
            "j.lp, j.factors, j.days, now() FROM j "
            "WHERE j.p_score IS NULL OR (j.p_version, j.p_segment, j.p_score, j.p_level, j.p_lp, "
            "j.p_factors, j.p_days) IS DISTINCT FROM (%(version)s, j.segment, "
            "j.score, j.level, j.lp, j.factors, j.days) "
            "ON CONFLICT (scorecard_id, entity_key) DO UPDATE SET version = EXCLUDED.version, "
            "segment = EXCLUDED.segment, score = EXCLUDED.score, level = EXCLUDED.level, "
            "lp = EXCLUDED.lp, factors = EXCLUDED.factors, days_to_event = EXCLUDED.days_to_event, "
            "scored_at = EXCLUDED.scored_at RETURNING 1)"
        )
    )
    # Entities gone from the table lose their current score; their history stays. (An
    # anti-join on the table by its key, whose size the planner knows; on the CTE ``j`` it
    # sized its hash for the misestimated millions of rows.)
    scope = (
        sql.SQL(
            "AND l.entity_key IN (SELECT k FROM jsonb_array_elements(CAST(%(keys)s AS jsonb)) AS k)"
        )
        if keyed
        else sql.SQL("")
    )
    ctes.append(
        sql.SQL(
            "gone AS (DELETE FROM crmflow.score_latest AS l WHERE l.scorecard_id = "
            "%(scorecard_id)s {} AND NOT EXISTS (SELECT 1 FROM {t} AS n WHERE {match}) "
            "RETURNING 1)"
        ).format(scope, t=entity.table, match=_key_match(entity, "n", sql.SQL("l.entity_key")))
    )
    return sql.Composed(
        [
            _with(ctes),
            sql.SQL(
                " SELECT (SELECT count(*) FROM j) AS scored, (SELECT count(*) FROM hist) AS "
                "history_rows, (SELECT coalesce(jsonb_agg(j.entity_key), '[]'::jsonb) FROM j "
                "WHERE j.differs) AS to_write, "
                "(SELECT count(*) FROM j WHERE j.p_level IS NOT NULL "
                "AND j.p_level <> j.level) AS level_changes, (SELECT count(*) FROM gone) AS gone"
            ),
        ]
    )


def compile_write_chunk(card: LoadedScorecard) -> sql.Composed:
    """One chunk of entity writes: the entities whose key objects are in ``%(keys)s``
    get the values ``crmflow.score_latest`` holds for them, where they differ. Rows a
    CRM writer holds locked are skipped (SKIP LOCKED: no wait) and marked ``pending``
    for a later pass; the written ones lose the mark."""
    d, entity = card.definition, card.entity
    written = d.write.columns()
    pk = entity.pk_columns

    def value(key: str) -> sql.Composable:
        return _typed(entity, written[key], sql.SQL("l.{}").format(sql.Identifier(_LATEST[key])))

    sets = sql.SQL(", ").join(
        sql.SQL("{} = {}").format(sql.Identifier(col), value(key)) for key, col in written.items()
    )
    differs = sql.SQL(" OR ").join(
        sql.SQL("{} IS DISTINCT FROM {}").format(
            _comparable(entity, col, sql.Identifier("n", col)),
            _comparable(entity, col, value(key)),
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
                nkey=_pk_key(entity, "n"),
                qkey=_pk_key(entity, "q"),
                kkey=_pk_key(entity, "k"),
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
