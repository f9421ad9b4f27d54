"""The dashboard's risk page, ``/ui/risk``: a scorecard's entities by level (the churn
scorecard's accounts, by default) with their top factors, score change and trend, the
number per level over the last days, and links to their executions (docs/churn.md).

An entity whose table has a ``churned_at`` column set is listed only with
``?include=churned`` (it has left: no one acts on its risk any more).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Annotated, Any

import psycopg
from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse
from psycopg import sql

from api.deps import Conn
from api.routes.ui import UiKey, _page
from api.ui.risk import SPARK_H, SPARK_W, sparkline, trend_chart
from engine import catalog, db

router = APIRouter(prefix="/ui", include_in_schema=False)

DEFAULT_SCORECARD = "account_churn_risk"
PER_LEVEL = 25
TREND_DAYS = 14
SPARK_POINTS = 12
OUTCOME_COLUMN = "churned_at"


_q = db.Queries("risk.sql")


def _entity_sql(entity: catalog.EntitySchema, include_gone: bool) -> tuple[sql.Composable, ...]:
    """The join to the entity's table (for its name and outcome), its name, the filter."""
    pk = entity.pk_columns[0] if len(entity.pk_columns) == 1 else None
    if pk is None:
        return sql.SQL(""), sql.SQL("l.entity_key::text"), sql.SQL("true")
    join = sql.SQL(
        "LEFT JOIN {t} AS e ON e.{pk} = CAST(l.entity_key ->> {pk_name} AS {type})"
    ).format(
        t=entity.table,
        pk=sql.Identifier(pk),
        pk_name=sql.Literal(pk),
        type=sql.SQL(entity.columns[pk].type_sql),
    )
    name = (
        sql.SQL("coalesce(CAST(e.name AS text), l.entity_key ->> {})").format(sql.Literal(pk))
        if "name" in entity.columns
        else sql.SQL("l.entity_key ->> {}").format(sql.Literal(pk))
    )
    live: sql.Composable = sql.SQL("true")
    if OUTCOME_COLUMN in entity.columns and not include_gone:
        live = sql.SQL("e.{} IS NULL").format(sql.Identifier(OUTCOME_COLUMN))
    return join, name, live


def _levels(definition: dict[str, Any]) -> list[str]:
    """The scorecard's levels, most severe (highest band) first."""
    bands = definition.get("bands") or {}
    if isinstance(bands, dict):  # {level: lower bound}, as written
        return list(reversed(list(bands)))
    return [b["level"] for b in reversed(bands)]  # [{level, from}], as stored


async def _risk_rows(
    conn: psycopg.AsyncConnection[Any],
    card: dict[str, Any],
    entity: catalog.EntitySchema,
    include_gone: bool,
) -> tuple[dict[str, int], dict[str, list[dict[str, Any]]]]:
    join, name, live = _entity_sql(entity, include_gone)
    counts = await (
        await conn.execute(
            sql.SQL(
                "SELECT l.level, count(*) AS n FROM crmflow.score_latest AS l {join}"
                " WHERE l.scorecard_id = %(id)s AND {live} GROUP BY l.level"
            ).format(join=join, live=live),
            {"id": card["id"]},
        )
    ).fetchall()
    rows = await (
        await conn.execute(
            sql.SQL(
                "SELECT * FROM (SELECT l.entity_key, l.score, l.level, l.segment, l.factors,"
                " l.days_to_event, l.scored_at, {name} AS name, h.change,"
                " row_number() OVER (PARTITION BY l.level ORDER BY l.score DESC,"
                " l.entity_key) AS n"
                " FROM crmflow.score_latest AS l {join}"
                " LEFT JOIN LATERAL (SELECT h.change FROM crmflow.score_history AS h"
                " WHERE h.scorecard_id = l.scorecard_id AND h.entity_key = l.entity_key"
                " ORDER BY h.scored_at DESC, h.id DESC LIMIT 1) AS h ON true"
                " WHERE l.scorecard_id = %(id)s AND {live}) AS r"
                " WHERE n <= %(per_level)s ORDER BY score DESC"
            ).format(name=name, join=join, live=live),
            {"id": card["id"], "per_level": PER_LEVEL},
        )
    ).fetchall()
    by_level: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_level.setdefault(r["level"], []).append(dict(r))
    return {r["level"]: int(r["n"]) for r in counts}, by_level


@router.get("/risk")
async def risk_page(
    request: Request,
    conn: Conn,
    key: UiKey,
    scorecard: Annotated[str | None, Query(max_length=63)] = None,
    include: Annotated[str | None, Query(pattern="^churned$")] = None,
) -> HTMLResponse:
    cards = [dict(r) for r in await (await conn.execute(_q("risk_scorecards"))).fetchall()]
    names = [c["name"] for c in cards]
    wanted = scorecard or (DEFAULT_SCORECARD if DEFAULT_SCORECARD in names else None)
    card = next((c for c in cards if c["name"] == wanted), cards[0] if cards else None)
    context: dict[str, Any] = {"cards": cards, "card": card, "include": include}
    if card is None:
        return _page(request, "risk.html", key, **context)
    entity = await catalog.load_entity(conn, card["entity_type"])
    levels = _levels(card["definition"])
    counts: dict[str, int] = {}
    by_level: dict[str, list[dict[str, Any]]] = {}
    if entity is not None:
        counts, by_level = await _risk_rows(conn, card, entity, include == "churned")
    listed = [r for rows in by_level.values() for r in rows]
    keys = [json.dumps(r["entity_key"]) for r in listed]
    history: dict[str, list[float]] = {}
    runs: dict[str, dict[str, Any]] = {}
    if keys:
        for h in await (
            await conn.execute(
                _q("risk_history"),
                {"scorecard_id": card["id"], "keys": keys, "points": SPARK_POINTS},
            )
        ).fetchall():
            history.setdefault(json.dumps(h["entity_key"]), []).append(float(h["score"]))
        for x in await (
            await conn.execute(
                _q("risk_executions"), {"entity_type": card["entity_type"], "keys": keys}
            )
        ).fetchall():
            runs[json.dumps(x["entity_key"])] = dict(x)
    for r in listed:
        k = json.dumps(r["entity_key"])
        r["key_text"] = k
        r["spark"] = sparkline(history.get(k, []))
        r["runs"] = runs.get(k)
        r["id_text"] = next(iter(r["entity_key"].values())) if len(r["entity_key"]) == 1 else k
    trend = await (
        await conn.execute(_q("risk_trend"), {"scorecard_id": card["id"], "days": TREND_DAYS})
    ).fetchall()
    extra = [lv for lv in counts if lv not in levels]
    context.update(
        entity=entity,
        levels=levels + extra,
        counts=counts,
        by_level=by_level,
        per_level=PER_LEVEL,
        chart=trend_chart(
            [dict(t) for t in trend], levels + extra, TREND_DAYS, datetime.now(UTC).date()
        ),
        trend_days=TREND_DAYS,
        spark_w=SPARK_W,
        spark_h=SPARK_H,
        has_outcome=entity is not None and OUTCOME_COLUMN in entity.columns,
    )
    return _page(request, "risk.html", key, **context)
