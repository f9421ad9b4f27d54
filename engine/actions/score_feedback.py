"""score_feedback: a verdict on a scorecard's prediction, from a work item (database action).

The step runs on the item that carries the verdict (a churn-risk task closed with
``outcome = 'false_positive'``, say); the entity judged is the one the item is about
(the task's ``entity_type`` and ``entity_id`` columns). It records the label in
``crmflow.score_feedback`` (``crmflow score fit`` reads it) and, with ``suppress``, puts
that entity on a suppression list for a while, so the playbook that raised the alarm
leaves it alone (docs/churn.md).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any, Literal

from psycopg import sql
from psycopg.types.json import Jsonb
from pydantic import BaseModel, Field

from engine import catalog, db
from engine.actions.base import Action, Params, PermanentError
from engine.executor.context import StepContext, now
from engine.model import Duration, Issue, SuppressList


class Suppress(BaseModel):
    model_config = {"extra": "forbid"}

    list: SuppressList
    # How long the entity stays on the list ("30d"); null: until removed.
    for_: Duration | None = Field(None, alias="for")


class ScoreFeedbackParams(Params):
    scorecard: str = Field(min_length=1, max_length=63)
    label: Literal["false_positive", "true_positive"] = "false_positive"
    # The item's columns naming the entity judged.
    subject_type_field: str = "entity_type"
    subject_id_field: str = "entity_id"
    suppress: Suppress | None = None
    note: str | None = Field(None, max_length=1000)  # template


_q = db.Queries("churn.sql")


class ScoreFeedback(Action):
    name = "score_feedback"
    Params = ScoreFeedbackParams
    needs_entity = True
    description = (
        "Record a verdict on a scorecard's prediction for the entity a work item is about,"
        " and optionally suppress that entity from workflows for a while."
    )

    def check_entity(self, params: Any, entity: Any, path: str) -> list[Issue]:
        issues = []
        for key in ("subject_type_field", "subject_id_field"):
            column = getattr(params, key)
            if column not in entity.columns:
                issues.append(
                    Issue(f"{path}.{key}", f"{entity.entity_type} has no column {column!r}")
                )
        return issues

    async def run(self, ctx: StepContext, params: Any) -> dict[str, Any]:
        conn = ctx.require_conn()
        row = ctx.row or {}
        subject_type = row.get(params.subject_type_field)
        subject_id = row.get(params.subject_id_field)
        if not subject_type or subject_id is None:
            raise PermanentError(
                f"{params.subject_type_field}/{params.subject_id_field} of"
                f" {ctx.execution.get('entity_type')} {ctx.entity_id} name no entity"
            )
        subject = await catalog.load_entity(conn, str(subject_type))
        if subject is None or len(subject.pk_columns) != 1:
            raise PermanentError(f"{subject_type!r} is not a watched entity with a one-column key")
        pk = subject.pk_columns[0]
        key_row = await (
            await conn.execute(
                sql.SQL("SELECT jsonb_build_object({name}, CAST(%(id)s AS {type})) AS k").format(
                    name=sql.Literal(pk), type=sql.SQL(subject.columns[pk].type_sql)
                ),
                {"id": str(subject_id)},
            )
        ).fetchone()
        assert key_row is not None
        entity_key = key_row["k"]
        score = await self._latest(ctx, params.scorecard, str(subject_type), entity_key)
        source = f"{ctx.execution.get('entity_type')}:{ctx.entity_id}"
        fb = await (
            await conn.execute(
                _q("record_feedback"),
                {
                    "scorecard": params.scorecard,
                    "entity_type": subject_type,
                    "entity_id": str(subject_id),
                    "label": params.label,
                    "score": score.get("score"),
                    "level": score.get("level"),
                    "source": source,
                    "note": ctx.render(params.note),
                    "execution_id": ctx.execution_id,
                },
            )
        ).fetchone()
        assert fb is not None
        result: dict[str, Any] = {"feedback_id": fb["id"], "entity_key": entity_key}
        if params.suppress is not None:
            until = None
            if params.suppress.for_ is not None:
                until = now() + timedelta(seconds=params.suppress.for_)
            s = await (
                await conn.execute(
                    _q("suppress_entity"),
                    {
                        "list": params.suppress.list,
                        "entity_type": subject_type,
                        "entity_key": Jsonb(entity_key),
                        "reason": f"{params.label} on {params.scorecard} ({source})",
                        "until": until,
                        "who": f"crmflow:workflow:{ctx.workflow_id}",
                    },
                )
            ).fetchone()
            assert s is not None
            result["suppression_id"] = s["id"]
            result["until"] = s["until"].isoformat() if s["until"] else None
        return result

    async def _latest(
        self, ctx: StepContext, scorecard: str, entity_type: str, entity_key: Any
    ) -> dict[str, Any]:
        """The entity's current score and level, when the scorecard has scored it."""
        conn = ctx.require_conn()
        found = await (
            await conn.execute(
                "SELECT to_regclass('crmflow.score_latest') IS NOT NULL"
                " AND to_regclass('crmflow.scorecards') IS NOT NULL AS ok"
            )
        ).fetchone()
        if not (found and found["ok"]):
            return {}
        row = await (
            await conn.execute(
                "SELECT l.score, l.level FROM crmflow.score_latest AS l"
                " JOIN crmflow.scorecards AS s ON s.id = l.scorecard_id"
                " WHERE s.name = %(name)s AND l.entity_key = %(key)s",
                {"name": scorecard, "key": Jsonb(entity_key)},
            )
        ).fetchone()
        return dict(row) if row else {}


ACTION = ScoreFeedback()
