"""What an action is: a params model checked when a workflow is saved, and a ``run``.

Two kinds, which decide the delivery guarantee:

- ``database`` actions run inside the step's transaction, on the connection in
  ``ctx.conn``; their effect commits together with the step's record, so it happens
  exactly once however often the step is retried or the worker crashes.
- ``external`` actions (email, HTTP) talk to the outside world. They run before the
  step is recorded, so a crash in between runs them again: at-least-once, with
  ``ctx.idempotency_key`` sent along (Message-ID, ``Idempotency-Key`` header) so the
  receiver can drop the duplicate.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from engine.executor.errors import PermanentError, Skip
from engine.model import Issue, issues_from_pydantic

if TYPE_CHECKING:
    from engine.catalog import EntitySchema
    from engine.conditions import ValueCheck
    from engine.executor.context import StepContext


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")


__all__ = ["Action", "Params", "PermanentError", "Skip"]


class Action:
    name: ClassVar[str]
    Params: ClassVar[type[BaseModel]] = Params
    kind: ClassVar[Literal["database", "external"]] = "database"
    # Actions that can undo their effect (on_failure: compensate).
    compensable: ClassVar[bool] = False
    # The action needs an entity (a trigger with an entity_type).
    needs_entity: ClassVar[bool] = False
    # A quick database action the matcher may run in its own transaction, for a whole
    # batch at once (engine/inline.py). Opt-in: a slow one would hold up all matching.
    inline: ClassVar[bool] = False
    description: ClassVar[str] = ""

    def parse(self, params: dict[str, Any]) -> BaseModel:
        return self.Params.model_validate(params)

    def check(self, params: dict[str, Any], entity: EntitySchema | None, path: str) -> list[Issue]:
        """Issues with the step's parameters, found when the workflow is saved."""
        try:
            parsed = self.parse(params)
        except ValidationError as exc:
            return issues_from_pydantic(exc, path)
        if self.needs_entity and entity is None:
            return [Issue(f"{path}.type", f"{self.name} needs a trigger with an entity_type")]
        return self.check_entity(parsed, entity, path)

    def check_entity(self, params: Any, entity: EntitySchema | None, path: str) -> list[Issue]:
        """Catalog-aware checks (fields exist, templates parse)."""
        return []

    def value_checks(self, params: Any, entity: EntitySchema | None, path: str) -> list[ValueCheck]:
        """Values the database must accept as a column's type (checked at save time)."""
        return []

    def target_host(self, params: Any, ctx: StepContext) -> str | None:
        """External actions: the host the call goes to, the key of its circuit breaker
        (engine/breakers.py); None: no breaker (database actions, or unknown)."""
        return None

    async def run(self, ctx: StepContext, params: Any) -> dict[str, Any]:
        raise NotImplementedError

    async def run_batch(
        self, contexts: list[StepContext], params: Any
    ) -> list[dict[str, Any] | Skip]:
        """Run the step for many executions in one transaction (the matcher's, see
        engine/inline.py). Any exception undoes the whole batch, which then goes the
        normal way, one job per execution; so an override may be all-or-nothing too.
        The default runs them one after the other; actions worth it do it set-based."""
        results: list[dict[str, Any] | Skip] = []
        for ctx in contexts:
            try:
                results.append(await self.run(ctx, params))
            except Skip as skip:
                results.append(skip)
        return results

    async def commit(self, ctx: StepContext, params: Any, result: dict[str, Any]) -> dict[str, Any]:
        """External actions: runs in the transaction that records the step as succeeded
        (``ctx.conn``), e.g. to write back what a remote call returned. Exactly once."""
        return result

    async def compensate(self, ctx: StepContext, params: Any, result: dict[str, Any]) -> None:
        """Undo :meth:`run` (database actions: inside the compensation's transaction)."""
        raise NotImplementedError
