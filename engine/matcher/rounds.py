"""The bodies of one matcher round, for :class:`engine.matcher.loop.Matcher` to call.

A round claims a batch of outbox events (``_claim``, rebuilding the plan when the
workflows changed), queues those other environments watch, runs the lifecycle round
(goals, exits, waits) and the real-time rescoring notes, evaluates the plan's one
statement and starts what it enrolled (inline steps, then the execution queue). The
same round is run three ways (``_batch``): plainly (the common case, no savepoints),
carefully (each part in a savepoint, after the plain round failed) and one event at a
time (``_batch_slowly``, after a timeout or a failure the careful round could not
isolate, naming the failing workflows). The environment queue has its round too
(``_environment_batch``).

Apart from the loop (engine/matcher/loop.py: retries, metrics, statistics, listening)
because the loop reads as a loop only without these bodies; ``MatchRounds`` is a base
class of ``Matcher`` rather than a set of functions so that each round's statements stay
bound methods (no extra call layer on the hot path) and tests keep calling
``matcher._batch``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from engine import catalog, db, lifecycle, tracing
from engine.config import Settings
from engine.executor import queue as execution_queue
from engine.executor.runner import Runner
from engine.inline import run_inline
from engine.matcher.broken import record_broken
from engine.matcher.plan import MatchPlan, build_plan, catalog_error

log = logging.getLogger("engine.matcher")

_q = db.Queries("matcher.sql")


@dataclass
class BatchResult:
    claimed: int = 0
    enrolled: int = 0
    errors: int = 0


class MatchRounds:
    """The round bodies; :class:`engine.matcher.loop.Matcher` sets these attributes."""

    settings: Settings
    plan: MatchPlan | None
    round: lifecycle.RoundPlan | None
    runner: Runner  # for steps run inline
    broken_recheck: float
    _built_at: float
    _batch_started: int  # the batch's start, for its span (engine/tracing.py)

    async def _claim(self, conn: psycopg.AsyncConnection[Any]) -> list[int]:
        timeout = self.settings.matcher_statement_timeout
        row = await (
            await conn.execute(
                _q("claim_events"),
                {
                    "batch_size": self.settings.matcher_batch_size,
                    "batch_bytes": self.settings.matcher_batch_bytes,
                    "statement_timeout": f"{max(1, round(timeout * 1000))}ms" if timeout else None,
                },
            )
        ).fetchone()
        assert row is not None
        if (
            self.plan is None
            or self.plan.generation != row["generation"]
            # A schema fix bumps no generation: probe broken workflows again now and then.
            or (self.plan.broken and time.monotonic() - self._built_at >= self.broken_recheck)
        ):
            await self._rebuild(conn, row["generation"])
        return list(row["ids"])

    async def _rebuild(self, conn: psycopg.AsyncConnection[Any], generation: int) -> None:
        self.plan = await build_plan(conn, generation, environment=self.settings.environment)
        self._built_at = time.monotonic()
        self.round = await lifecycle.build_round(conn, self.plan.entities)
        # a workflow whose lifecycle conditions the round sets apart stays broken
        kept = lifecycle.broken_workflows(self.round)
        self.plan.changes = [(w, r) for w, r in self.plan.changes if r or w not in kept]
        await record_broken(conn, self.plan)
        await self._record_lifecycle_broken(conn)
        log.info(
            "matching %d active workflows on %s%s",
            self.plan.workflows,
            ", ".join(self.plan.entity_types) or "custom events",
            f" ({len(self.plan.broken)} broken, left out)" if self.plan.broken else "",
        )

    async def _lifecycle(
        self, conn: psycopg.AsyncConnection[Any], ids: list[int], careful: bool
    ) -> None:
        """Goals, exit criteria and waits hit by the batch's events (engine/lifecycle.py):
        one statement, none while nothing is watched. Redoing a failed batch step by step,
        a failure here is logged and left to the executor's checks."""
        if self.round is None or self.round.statement is None:
            return
        if not careful:
            await lifecycle.run_round(conn, self.round, ids, self.settings.queue_name)
            return
        try:
            # a version whose conditions fail on these events is set apart, the round
            # runs again without it
            await lifecycle.run_round_carefully(conn, self.round, ids, self.settings.queue_name)
        except psycopg.OperationalError as exc:
            if not isinstance(exc, psycopg.errors.QueryCanceled):
                raise
            log.warning("goals, exits and waits of a batch left to the executor: %s", exc)
        except psycopg.DatabaseError as exc:
            log.warning("goals, exits and waits of a batch left to the executor: %s", exc)
        await self._record_lifecycle_broken(conn)

    async def _record_lifecycle_broken(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Mark the workflows the round set apart broken; the plan takes the generation
        this bumps (the match statement is unchanged: no rebuild for it)."""
        if self.round is None or self.plan is None:
            return
        generation = await lifecycle.record_broken(conn, self.round)
        if generation == self.plan.generation + 1:
            self.plan.generation = generation

    async def _rescore(
        self, conn: psycopg.AsyncConnection[Any], ids: list[int], careful: bool
    ) -> None:
        """Queue the entities the batch's events concern for real-time scorecards
        (engine/scorecards/run.py; no statement while none is real-time). Redoing a
        failed batch step by step, a failure here is logged, not the batch's."""
        from engine.scorecards.run import note_events

        assert self.plan is not None
        if not careful:
            await note_events(conn, ids, self.plan.generation)
            return
        try:
            async with conn.transaction():
                await note_events(conn, ids, self.plan.generation)
        except psycopg.DatabaseError as exc:
            log.warning("real-time rescoring of a batch's entities skipped: %s", exc)

    def _params(self, ids: list[int]) -> dict[str, Any]:
        return {
            "ids": ids,
            "queue": self.settings.queue_name,
            "max_depth": self.settings.max_depth,
            "environment": self.settings.environment,
        }

    async def _queue_elsewhere(self, conn: psycopg.AsyncConnection[Any], ids: list[int]) -> None:
        """Queue the claimed events that other environments' workflows watch, in the
        batch's transaction (nothing to do, no statement, while all are of one)."""
        assert self.plan is not None
        if not self.plan.elsewhere or not ids:
            return
        await conn.execute(
            _q("queue_for_environments"),
            {
                "ids": ids,
                "environments": [env for env, _ in self.plan.elsewhere],
                "entity_types": [et for _, et in self.plan.elsewhere],
            },
        )

    async def _run_environment_batch(self, conn: psycopg.AsyncConnection[Any]) -> BatchResult:
        """The batch of queued events, if any (an empty claim is one cheap statement). A
        failing batch is left queued and logged; the outbox's batches go on."""
        try:
            async with conn.transaction():
                return await self._environment_batch(conn)
        except (psycopg.OperationalError, psycopg.InterfaceError):
            raise
        except psycopg.DatabaseError as exc:
            if catalog_error(exc):  # schema drift: the next batch rebuilds and re-probes
                self.plan = None
                log.warning("matching queued events failed (%s); re-probing", exc)
                return BatchResult()
            log.warning("matching queued events failed (%s); one at a time", exc)
        async with conn.transaction():
            return await self._environment_batch(conn, one_by_one=True)

    async def _environment_batch(
        self, conn: psycopg.AsyncConnection[Any], one_by_one: bool = False
    ) -> BatchResult:
        """Match the events other environments' matchers queued for this environment's
        workflows (crmflow.environment_events), in one transaction; ``one_by_one``, each
        in a savepoint, a failing one dropped from the queue with its error recorded on
        its outbox row (as the outbox's poisoned events are)."""
        row = await (
            await conn.execute(
                _q("claim_environment_events"),
                {
                    "environment": self.settings.environment,
                    "batch_size": self.settings.matcher_batch_size,
                },
            )
        ).fetchone()
        assert row is not None
        ids = list(row["ids"])
        if not ids:
            return BatchResult()
        if self.plan is None or self.plan.generation != row["generation"]:
            await self._rebuild(conn, row["generation"])
        assert self.plan is not None
        self._batch_started = tracing.clock()
        if self.plan.queued_statement is None:
            await conn.execute(
                _q("drop_environment_events"),
                {"environment": self.settings.environment, "ids": ids},
            )
            return BatchResult(claimed=len(ids))
        if not one_by_one:
            enrolled = await (
                await conn.execute(self.plan.queued_statement, self._params(ids))
            ).fetchall()
            await self._start(conn, enrolled, careful=True)
            return BatchResult(claimed=len(ids), enrolled=len(enrolled))
        result = BatchResult(claimed=len(ids))
        for event_id in ids:
            try:
                async with conn.transaction():
                    enrolled = await (
                        await conn.execute(self.plan.queued_statement, self._params([event_id]))
                    ).fetchall()
                    await self._start(conn, enrolled, careful=True)
                result.enrolled += len(enrolled)
            except psycopg.OperationalError:
                raise
            except psycopg.DatabaseError as exc:
                result.errors += 1
                await conn.execute(
                    _q("environment_event_failed"),
                    {
                        "environment": self.settings.environment,
                        "id": event_id,
                        "error": exc.diag.message_primary or str(exc),
                    },
                )
        return result

    async def _batch(
        self, conn: psycopg.AsyncConnection[Any], careful: bool, one_by_one: bool = False
    ) -> BatchResult:
        self._batch_started = tracing.clock()
        ids = await self._claim(conn)
        if not ids:
            return BatchResult()
        assert self.plan is not None
        await self._queue_elsewhere(conn, ids)
        await self._lifecycle(conn, ids, careful)
        await self._rescore(conn, ids, careful)
        if self.plan.statement is None:
            await conn.execute(_q("mark_processed"), {"ids": ids, "error": None})
            return BatchResult(claimed=len(ids))
        if one_by_one:  # the batch timed out whole: do not wait for that a second time
            return await self._batch_slowly(conn, ids)
        if not careful:
            enrolled = await (await conn.execute(self.plan.statement, self._params(ids))).fetchall()
            await self._start(conn, enrolled, careful=False)
            return BatchResult(claimed=len(ids), enrolled=len(enrolled))
        for attempt in (1, 2):
            try:
                async with conn.transaction():  # a savepoint: a failure keeps the claim's locks
                    enrolled = await (
                        await conn.execute(self.plan.statement, self._params(ids))
                    ).fetchall()
                break
            except psycopg.errors.QueryCanceled:
                log.warning("batch match timed out; matching one event at a time")
                return await self._batch_slowly(conn, ids)
            except psycopg.OperationalError:
                raise
            except psycopg.DatabaseError as exc:
                if attempt == 1 and catalog_error(exc):
                    # Schema drift since the plan was built: probe again (the broken
                    # workflows leave the plan) and match the batch with the new one.
                    log.warning("batch match failed (%s); re-probing the workflows", exc)
                    await self._rebuild(conn, self.plan.generation)
                    if self.plan.statement is None:
                        await conn.execute(_q("mark_processed"), {"ids": ids, "error": None})
                        return BatchResult(claimed=len(ids))
                    continue
                # One event or workflow broke the set-based statement (a sql condition
                # dividing by zero, say). Match this batch event by event so the others
                # still enroll and the culprits are recorded instead of blocking the
                # outbox forever.
                log.warning("batch match failed (%s); matching one event at a time", exc)
                return await self._batch_slowly(conn, ids)
        await self._start(conn, enrolled, careful=True)
        return BatchResult(claimed=len(ids), enrolled=len(enrolled))

    async def _start(
        self, conn: psycopg.AsyncConnection[Any], enrolled: list[dict[str, Any]], careful: bool
    ) -> None:
        """Run what can run inline, then defer jobs for everything else, in id order."""
        assert self.plan is not None
        await tracing.enrolled(conn, enrolled, self._batch_started)
        done: set[int] = set()
        if self.settings.inline_steps and enrolled:
            done = await run_inline(
                conn, self.runner, enrolled, self.plan.versions, self.plan.entities, careful
            )
        waiting = [e["id"] for e in enrolled if e["status"] == "pending" and e["id"] not in done]
        if waiting:
            await execution_queue.enqueue(conn, waiting, self.settings.queue_name)

    async def _batch_slowly(
        self, conn: psycopg.AsyncConnection[Any], ids: list[int]
    ) -> BatchResult:
        result = BatchResult(claimed=len(ids))
        assert self.plan is not None and self.plan.statement is not None
        for event_id in ids:
            try:
                async with conn.transaction():
                    enrolled = await (
                        await conn.execute(self.plan.statement, self._params([event_id]))
                    ).fetchall()
                    await self._start(conn, enrolled, careful=True)
                result.enrolled += len(enrolled)
                continue
            except psycopg.errors.QueryCanceled:
                error = (
                    "matching this event took longer than the batch statement timeout "
                    f"({self.settings.matcher_statement_timeout:g}s, setting "
                    "CRMFLOW_MATCHER_STATEMENT_TIMEOUT); it enrolled in no workflow"
                )
            except psycopg.OperationalError:
                raise
            except psycopg.DatabaseError as exc:
                error = await self._per_workflow(conn, event_id, exc)
            result.errors += 1
            await conn.execute(_q("mark_processed"), {"ids": [event_id], "error": error})
        return result

    async def _per_workflow(
        self, conn: psycopg.AsyncConnection[Any], event_id: int, exc: psycopg.Error
    ) -> str:
        """Name the workflows whose predicate fails on this event."""
        rows = await (await conn.execute(_q("active_event_workflows"), {})).fetchall()
        failing = []
        for row in rows:
            probe = sql.SQL(
                "SELECT 1 FROM crmflow.outbox AS ev"
                " CROSS JOIN LATERAL"
                " jsonb_populate_record(NULL::{t}, coalesce(ev.new_row, ev.old_row)) AS n"
                " CROSS JOIN LATERAL jsonb_populate_record(NULL::{t}, ev.old_row) AS o"
                " WHERE ev.id = {id} AND ev.entity_type = {et} AND ({p})"
            )
            entity = (
                await catalog.load_entity(conn, row["entity_type"]) if row["entity_type"] else None
            )
            if entity is None:
                continue
            try:
                async with conn.transaction():
                    await conn.execute(
                        probe.format(
                            t=entity.table,
                            id=sql.Literal(event_id),
                            et=sql.Literal(row["entity_type"]),
                            p=sql.SQL(row["predicate"]),
                        )
                    )
            except psycopg.Error as wf_exc:
                failing.append(
                    f"workflow {row['workflow_id']} ({row['name']}): "
                    f"{wf_exc.diag.message_primary or wf_exc}"
                )
        return "; ".join(failing) or (exc.diag.message_primary or str(exc))
