"""The scoring statement: :func:`scored_ctes` turns the features (``build``'s ``f``) into
the segment's weights, the contributions ``c<i>``, the linear predictor, the score, the
level, the top factors and the days to the event; :func:`compile_scoring` adds the
writes of the results to ``crmflow.score_history`` (where the score or level changed)
and ``crmflow.score_latest``, and the keys of the entities whose columns need writing
(``engine.scorecards.entity_writes`` writes them)."""

from __future__ import annotations

import math
from typing import Any

from psycopg import sql

from engine.scorecards.features import build, segment_name
from engine.scorecards.model import TOP_FACTORS, ScorecardDefinition
from engine.scorecards.sqlparts import (
    FENCE,
    Compiled,
    LoadedScorecard,
    comparable,
    key_match,
    lit,
    typed,
    with_ctes,
)

# exp() of a linear predictor beyond ±700 overflows a double; the score is 0 or 1 there.
EXP_CLAMP = 700.0
_JSON_PAIRS = 40  # jsonb_build_object takes at most 100 arguments


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
        sql.SQL(
            "a AS (SELECT f.*, {seg} AS segment, {intercept} AS b, {contribs} FROM f{fence})"
        ).format(
            seg=segment_name(d),
            intercept=intercept,
            contribs=sql.SQL(", ").join(contribs),
            fence=FENCE,
        )
    )
    lp = sql.SQL(" + ").join(
        [sql.SQL("a.b"), *(sql.SQL("a.{}").format(sql.Identifier(f"c{i}")) for i in range(n))]
    )
    ctes.append(sql.SQL("l AS (SELECT a.*, ({}) AS lp FROM a{})").format(lp, FENCE))
    score: sql.Composable
    if d.model == "logistic":
        score = sql.SQL("1.0 / (1.0 + exp(least({m}, greatest(-{m}, -l.lp))))").format(
            m=lit(EXP_CLAMP)
        )
    else:
        score = sql.SQL("l.lp")
    ctes.append(
        sql.SQL("u AS (SELECT l.*, CAST({} AS double precision) AS score FROM l{})").format(
            score, FENCE
        )
    )
    top, rank_cte = _top_factors(d)
    if rank_cte is not None:
        ctes.append(rank_cte)
    ctes.append(
        sql.SQL(
            "s AS (SELECT u.*, {level} AS level, {top} AS factors, "
            "CAST({days} AS double precision) AS days FROM {src} AS u{fence})"
        ).format(
            level=_level(d),
            top=top,
            days=_days(d),
            src=sql.Identifier("rk" if rank_cte is not None else "u"),
            fence=FENCE,
        )
    )
    return ctes, compiled


def _level(d: ScorecardDefinition) -> sql.Composable:
    """The band of ``u.score``: the highest whose lower bound it reaches."""
    bands = list(d.bands.items())
    level_cases = sql.SQL(" ").join(
        sql.SQL("WHEN u.score >= {} THEN {}").format(lit(bound), sql.Literal(name))
        for name, bound in reversed(bands[1:])
    )
    return (
        sql.SQL("(CASE {} ELSE {} END)").format(level_cases, sql.Literal(bands[0][0]))
        if len(bands) > 1
        else sql.Literal(bands[0][0])
    )


def _days(d: ScorecardDefinition) -> sql.Composable:
    """The survival model's median days to the event (NULL without one), capped."""
    if d.survival is None:
        return sql.SQL("CAST(NULL AS double precision)")
    sv = d.survival
    index = sql.SQL(" + ").join(
        [lit(sv.intercept)]
        + [
            sql.SQL("u.{} * {}").format(sql.Identifier(f"v{i}"), lit(sv.coefficients[f.id]))
            for i, f in enumerate(d.factors)
            if f.id in sv.coefficients
        ]
    )
    return sql.SQL("least({mx}, exp(least({m}, {idx})) * {k})").format(
        mx=lit(sv.max_days), m=lit(EXP_CLAMP), idx=index, k=lit(math.log(2) ** (1 / sv.shape))
    )


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
    if len(d.factors) > RANKED_FACTORS:
        return _sorted_top(d), None
    return _ranked_top(d)


def _contribution(i: int) -> sql.Composable:
    return sql.SQL("u.{}").format(sql.Identifier(f"c{i}"))


def _factor_object(d: ScorecardDefinition, i: int) -> sql.Composable:
    """Factor ``i`` as an element of the top factors: id, label, value, contribution."""
    f = d.factors[i]
    return sql.SQL(
        "jsonb_build_object('id', {id}, 'label', {label}, 'value', {v}, 'contribution', {c})"
    ).format(
        id=sql.Literal(f.id),
        label=sql.Literal(f.display),
        v=_rounded(sql.SQL("u.{}").format(sql.Identifier(f"v{i}"))),
        c=_rounded(_contribution(i)),
    )


def _sorted_top(d: ScorecardDefinition) -> sql.Composable:
    """The top factors by a sorted sub-select over the factors (many factors)."""
    rows = sql.SQL(", ").join(
        sql.SQL("({}, {}, {})").format(_factor_object(d, i), _contribution(i), sql.Literal(i))
        for i in range(len(d.factors))
    )
    return sql.SQL(
        "(SELECT coalesce(jsonb_agg(x.j ORDER BY x.c DESC, x.o), '[]'::jsonb) FROM "
        "(SELECT * FROM (VALUES {rows}) AS x(j, c, o) WHERE x.c > 0 "
        "ORDER BY x.c DESC, x.o LIMIT {top}) AS x)"
    ).format(rows=rows, top=sql.Literal(TOP_FACTORS))


def _ranked_top(d: ScorecardDefinition) -> tuple[sql.Composable, sql.Composable]:
    """The top factors by ranks compared in the row (few factors): the array, and the CTE
    ``rk`` of the ranks."""
    n = len(d.factors)
    c = _contribution
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
    rank_cte = sql.SQL("rk AS (SELECT u.*, {} FROM u{})").format(sql.SQL(", ").join(ranks), FENCE)

    def element(r: int) -> sql.Composable:
        return sql.SQL("(CASE {} END)").format(
            sql.SQL(" ").join(
                sql.SQL("WHEN u.{} = {} THEN {}").format(
                    sql.Identifier(f"rk{i}"), sql.Literal(r), _factor_object(d, i)
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


_SOURCES = {"score": "score", "level": "level", "factors": "factors", "days_to_churn": "days"}


def compile_scoring(card: LoadedScorecard, keyed: bool) -> sql.Composed:
    """The scoring statement: scores, ``crmflow.score_history`` rows where the score or
    level changed, ``crmflow.score_latest`` upserted. Returns the counts and
    ``to_write``, the row ids of the ``crmflow.score_latest`` rows whose entities'
    columns may differ from them (:func:`compile_write_chunk` writes them where they do).
    ``level_changes`` counts an entity's first level too (no previous level, NULL: its
    level column's first write is a change a field_updated workflow sees); a level is
    never NULL (the lowest band's otherwise)."""
    ctes, _ = scored_ctes(card, keyed)
    ctes.append(_joined_cte(card))
    ctes += _stored_ctes(card)
    ctes.append(_gone_cte(card, keyed))
    return sql.Composed(
        [
            with_ctes(ctes),
            sql.SQL(
                " SELECT (SELECT count(*) FROM j) AS scored, (SELECT count(*) FROM hist) AS "
                "history_rows, (SELECT coalesce(array_agg(w.row_id::text), '{}') FROM "
                "(SELECT row_id FROM fresh UNION ALL SELECT row_id FROM up WHERE differs "
                "UNION ALL SELECT j.p_row FROM j WHERE j.differs AND NOT j.changed) AS w) "
                "AS to_write, "
                "(SELECT count(*) FROM j WHERE j.p_level IS DISTINCT FROM j.level) AS "
                "level_changes, (SELECT count(*) FROM gone) AS gone"
            ),
        ]
    )


def _joined_cte(card: LoadedScorecard) -> sql.Composable:
    """``j``: the scores next to the entity's ``crmflow.score_latest`` row, and whether
    the entity's written columns differ from what they should hold."""
    d, entity = card.definition, card.entity
    differs_parts = [
        sql.SQL("{} IS DISTINCT FROM {}").format(
            comparable(entity, col, sql.SQL("s.{}").format(sql.Identifier(f"w_{key}"))),
            comparable(
                entity,
                col,
                typed(entity, col, sql.SQL("s.{}").format(sql.Identifier(_SOURCES[key]))),
            ),
        )
        for key, col in d.write.columns().items()
    ]
    differs = sql.SQL(" OR ").join(differs_parts) if differs_parts else sql.SQL("false")
    return sql.SQL(
        "j AS MATERIALIZED (SELECT s.entity_key, s.segment, s.score, s.level, s.lp, s.factors, "
        "{cs}, s.days, p.score AS p_score, p.level AS p_level, "
        "p.ctid AS p_row, ({differs}) AS differs, "
        "(p.score IS NULL OR (p.version, p.segment, p.score, p.level, p.lp, p.factors, "
        "p.days_to_event) IS DISTINCT FROM (%(version)s, s.segment, s.score, s.level, s.lp, "
        "s.factors, s.days)) AS changed "
        "FROM s LEFT JOIN crmflow.score_latest AS p "
        "ON p.scorecard_id = %(scorecard_id)s AND p.entity_key = s.entity_key)"
    ).format(
        differs=differs,
        cs=sql.SQL(", ").join(
            sql.SQL("s.{}").format(sql.Identifier(f"c{i}")) for i in range(len(d.factors))
        ),
    )


def _stored_ctes(card: LoadedScorecard) -> list[sql.Composable]:
    """``hist``: a ``crmflow.score_history`` row where the score or the level changed (or
    the entity is new); ``up``: ``crmflow.score_latest`` upserted where anything changed."""
    d, entity = card.definition, card.entity
    return [
        sql.SQL(
            "hist AS (INSERT INTO crmflow.score_history (entity_type, entity_key, scorecard_id, "
            "version, score, previous_score, change, level, previous_level, contributions, "
            "scored_at) SELECT {et}, j.entity_key, %(scorecard_id)s, %(version)s, j.score, "
            "j.p_score, j.score - j.p_score, j.level, j.p_level, {contributions}, now() FROM j "
            "WHERE j.p_score IS NULL OR j.level IS DISTINCT FROM j.p_level "
            "OR round(j.score * 1000000.0) <> round(j.p_score * 1000000.0) "
            "RETURNING 1)"
        ).format(et=sql.Literal(entity.entity_type), contributions=contributions_of(d, "j")),
        # A plain INSERT for the entities without a score yet and an UPDATE for the
        # others, not one INSERT ... ON CONFLICT: the speculative insertion took twice as
        # long per row (1.9 s against 1.0 s per 100,000 first scores). No other run can
        # insert meanwhile: runs of a scorecard hold its run lock.
        sql.SQL(
            "fresh AS (INSERT INTO crmflow.score_latest (scorecard_id, entity_key, version, "
            "segment, score, level, lp, factors, days_to_event, scored_at) "
            "SELECT %(scorecard_id)s, j.entity_key, %(version)s, j.segment, j.score, j.level, "
            "j.lp, j.factors, j.days, now() FROM j WHERE j.p_score IS NULL "
            "RETURNING ctid AS row_id)"
        ),
        sql.SQL(
            "up AS (UPDATE crmflow.score_latest AS t SET version = %(version)s, "
            "segment = j.segment, score = j.score, level = j.level, lp = j.lp, "
            "factors = j.factors, days_to_event = j.days, scored_at = now() FROM j "
            "WHERE t.scorecard_id = %(scorecard_id)s AND t.entity_key = j.entity_key "
            "AND j.p_score IS NOT NULL AND j.changed RETURNING t.ctid AS row_id, j.differs)"
        ),
    ]


def _gone_cte(card: LoadedScorecard, keyed: bool) -> sql.Composable:
    """``gone``: the ``crmflow.score_latest`` rows of entities no longer in the table
    (of those in ``%(keys)s`` when ``keyed``), deleted."""
    entity = card.entity
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
    return sql.SQL(
        "gone AS (DELETE FROM crmflow.score_latest AS l WHERE l.scorecard_id = "
        "%(scorecard_id)s {} AND NOT EXISTS (SELECT 1 FROM {t} AS n WHERE {match}) "
        "RETURNING 1)"
    ).format(scope, t=entity.table, match=key_match(entity, "n", sql.SQL("l.entity_key")))
