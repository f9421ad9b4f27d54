"""The row side of a scorecard's SQL: :class:`FactorBuilder` compiles the conditions
(segment ``when``, condition factors, an aggregate's ``where``) and the whitelisted
expression factors over the entity's row ``n``, and keeps what they read (the columns
of the entity and of the related tables) and the issues found on the way. The
aggregates (``engine.scorecards.aggregates``) and ``build``
(``engine.scorecards.features``) use it."""

from __future__ import annotations

from typing import Any

from psycopg import sql

from engine.catalog import EntitySchema
from engine.conditions import Compiler, ConditionError, parse_conditions
from engine.model import Issue
from engine.scorecards.model import Factor
from engine.scorecards.sqlparts import AS_OF, LoadedScorecard, columns_of, tree_columns
from engine.sqlexpr import UnsafeExpression, render_expression, validate_expression


class FactorBuilder:
    """Compiles a scorecard's conditions and row factors; collects what they read and the
    issues."""

    def __init__(self, card: LoadedScorecard) -> None:
        self.card = card
        self.d = card.definition
        self.entity = card.entity
        self.issues: list[Issue] = []
        self.columns_read: set[str] = set()
        self.related_columns: dict[str, set[str]] = {}

    # ── conditions ──

    def condition(self, raw: Any, path: str, entity: EntitySchema, alias: str) -> sql.Composable:
        try:
            tree = parse_conditions(raw, path)
        except ConditionError as exc:
            self.issues += [Issue(p, m) for p, m in exc.issues]
            return sql.SQL("false")
        compiler = Compiler(entity, allow_transitions=False, now=AS_OF)
        compiled = compiler.compile(tree, alias)
        self.issues += [Issue(p, m) for p, m in compiler.issues]
        cols = tree_columns(tree, entity)
        if entity is self.entity:
            self.columns_read |= cols
        else:
            self.related_columns.setdefault(entity.entity_type, set()).update(cols)
        return compiled

    # ── row factors ──

    def row_value(self, f: Factor, path: str) -> sql.Composable:
        if f.condition is not None:
            cond = self.condition(f.condition, f"{path}.condition", self.entity, "n")
            return sql.SQL("CASE WHEN {} THEN 1.0 ELSE 0.0 END").format(cond)
        assert f.expression is not None
        source = f.expression.sql
        try:
            validate_expression(source, self.entity.columns)
            rendered = render_expression(source, "n")
        except UnsafeExpression as exc:
            self.issues.append(Issue(f"{path}.expression.sql", str(exc)))
            return sql.SQL("NULL")
        self.columns_read |= columns_of(source, self.entity)
        if f.id in self.card.boolean_factors:
            return sql.SQL("(CASE WHEN ({e}) THEN 1.0 WHEN NOT ({e}) THEN 0.0 END)").format(
                e=sql.SQL(rendered)
            )
        return sql.SQL("({})").format(sql.SQL(rendered))
