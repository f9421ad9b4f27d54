"""The rows ``score fit`` learns from (``engine.scorecards.fit``): the scorecard's own
features (``compile_features``) as of ``as_of`` and of earlier snapshots a horizon
apart, one row per entity live at that moment, with its outcome (whether the outcome
date falls within the horizon), the days until it or until now (censored, for the
survival model), and its sample weight (a false-positive feedback label counts
``FEEDBACK_WEIGHT`` times)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import psycopg
from psycopg import sql

from engine import catalog, db
from engine.catalog import EntitySchema

if TYPE_CHECKING:  # the definition model is imported when a fit runs, not with fit.py
    from engine.scorecards.model import ScorecardDefinition

F = npt.NDArray[np.float64]

FEEDBACK_WEIGHT = 3.0


class FitError(ValueError):
    """The fit cannot be made (a missing extra, no history, no positives...)."""


@dataclass
class Samples:
    """One row per entity and snapshot: features ``x``, outcome ``y``, and the rest."""

    as_of: datetime
    keys: list[Any]  # entity_key per row (as the features query returns it)
    snapshot: list[int]  # per row: 0 for as_of, 1 for as_of - horizon, ...
    segments: list[str]  # per row
    x: F
    y: npt.NDArray[np.int64]
    weights: F  # per row: FEEDBACK_WEIGHT for a confirmed negative, else 1
    durations: F  # days from the snapshot to the outcome, or to now (censored)
    events: F  # 1.0 where the outcome happened, else 0.0
    excluded: dict[str, int]
    feedback_labels: int


async def _rows(conn: psycopg.AsyncConnection[Any], query: Any, params: Any) -> list[Any]:
    cursor = await conn.execute(query, params)
    return list(await cursor.fetchall())


def _key_value(text: str) -> Any:
    """An entity_id as text back to the JSON value a key holds (ids are numbers)."""
    try:
        return int(text)
    except ValueError:
        return text


async def checked_entity(
    conn: psycopg.AsyncConnection[Any],
    parsed: ScorecardDefinition,
    outcome: str,
    horizon_days: int,
    as_of: datetime | None,
    now: datetime,
) -> tuple[EntitySchema, datetime]:
    """The scorecard's entity and the latest snapshot's date, once the outcome column and
    the dates are known to make a fit."""
    entity = await catalog.load_entity(conn, parsed.entity_type)
    if entity is None:
        raise FitError(f"entity_type: {parsed.entity_type!r} is not watched")
    horizon = timedelta(days=horizon_days)
    if as_of is None:
        as_of = now - horizon
    if as_of.tzinfo is None:
        as_of = as_of.replace(tzinfo=UTC)
    if as_of + horizon > now + timedelta(seconds=1):
        raise FitError(
            f"--as-of {as_of:%Y-%m-%d} + horizon {horizon_days}d is after now: the outcome"
            " is not observed yet for that window; use an earlier --as-of"
        )
    spec = entity.columns.get(outcome)
    if spec is None:
        raise FitError(f"--outcome: {entity.entity_type} has no column {outcome!r}")
    if spec.kind not in ("date", "timestamp"):
        raise FitError(f"--outcome: {outcome} is {spec.type_sql}, not a date or timestamp")
    if len(entity.pk_columns) != 1:
        raise FitError(f"{entity.entity_type} has a composite key: not supported by fit")
    return entity, as_of


async def _facts(
    conn: psycopg.AsyncConnection[Any], entity: EntitySchema, outcome: str, created: str | None
) -> dict[str, tuple[Any, Any]]:
    """Per entity key (JSON text): its outcome date and its creation date (or None)."""
    pk = entity.pk_columns[0]
    outcome_rows = await _rows(
        conn,
        sql.SQL(
            "SELECT jsonb_build_object({pk_name}, {pk}) AS k, {o}::timestamptz AS o, {c} AS c"
            " FROM {t}"
        ).format(
            pk_name=sql.Literal(pk),
            pk=sql.Identifier(pk),
            o=sql.Identifier(outcome),
            c=sql.SQL("{}::timestamptz").format(sql.Identifier(created))
            if created
            else sql.SQL("NULL::timestamptz"),
            t=entity.table,
        ),
        None,
    )
    return {json.dumps(r["k"], sort_keys=True): (r["o"], r["c"]) for r in outcome_rows}


async def _false_positives(
    conn: psycopg.AsyncConnection[Any], name: str, entity: EntitySchema
) -> set[str]:
    """The keys (JSON text) of the entities labelled ``false_positive`` for the scorecard."""
    pk = entity.pk_columns[0]
    feedback = await _rows(
        conn,
        db.query("fit_feedback", "churn.sql"),
        {"scorecard": name, "entity_type": entity.entity_type},
    )
    return {
        json.dumps({pk: _key_value(r["entity_id"])}, sort_keys=True)
        for r in feedback
        if r["label"] == "false_positive"
    }


async def load_samples(
    conn: psycopg.AsyncConnection[Any],
    parsed: ScorecardDefinition,
    factors: list[str],
    entity: EntitySchema,
    outcome: str,
    horizon_days: int,
    as_of: datetime,
    now: datetime,
    created_column: str | None,
    snapshots: int,
) -> Samples:
    """The rows of every snapshot (``as_of``, then a horizon earlier, ...); entities whose
    outcome fell on or before a snapshot, or created after it, are left out of it."""
    from engine.scorecards.compile import compile_features

    name = parsed.name
    horizon = timedelta(days=horizon_days)
    created = created_column if created_column in entity.columns else None
    facts = await _facts(conn, entity, outcome, created)
    false_positive = await _false_positives(conn, name, entity)

    keys: list[Any] = []
    snapshot: list[int] = []
    segs: list[str] = []
    xs: list[list[float]] = []
    ys: list[int] = []
    durations: list[float] = []
    events: list[float] = []
    weights: list[float] = []
    excluded = {"outcome before as_of": 0, "created after as_of": 0}
    fb_used = 0
    moments = [as_of - i * horizon for i in range(max(1, snapshots))]
    for n_snap, moment in enumerate(moments):
        query, params = await compile_features(conn, parsed, moment)
        end = moment + horizon
        for r in await _rows(conn, query, params):
            k = json.dumps(r["entity_key"], sort_keys=True)
            happened, born = facts.get(k, (None, None))
            if happened is not None and happened <= moment:
                excluded["outcome before as_of"] += 1
                continue
            if born is not None and born > moment:
                excluded["created after as_of"] += 1
                continue
            positive = happened is not None and happened <= end
            keys.append(r["entity_key"])
            snapshot.append(n_snap)
            segs.append(r["segment"] or "default")
            xs.append([float(r[f]) if r[f] is not None else 0.0 for f in factors])
            ys.append(int(positive))
            if happened is not None:
                durations.append((happened - moment).total_seconds() / 86400)
                events.append(1.0)
            else:
                durations.append((now - moment).total_seconds() / 86400)
                events.append(0.0)
            w = 1.0
            if k in false_positive and not positive:
                w = FEEDBACK_WEIGHT
                fb_used += 1
            weights.append(w)
    if not ys:
        raise FitError(f"scorecard {name}: no {entity.entity_type} was live at {as_of:%Y-%m-%d}")
    return Samples(
        as_of=as_of,
        keys=keys,
        snapshot=snapshot,
        segments=segs,
        x=np.array(xs, dtype=np.float64),
        y=np.array(ys, dtype=np.int64),
        weights=np.array(weights, dtype=np.float64),
        durations=np.array(durations),
        events=np.array(events),
        excluded=excluded,
        feedback_labels=fb_used,
    )
