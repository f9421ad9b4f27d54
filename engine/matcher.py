"""The matcher: pending events x active workflows → executions and their jobs.

Each batch is one transaction (sql/matcher.sql): claim events with ``FOR UPDATE SKIP
LOCKED``, evaluate every active workflow on the whole batch in one statement, insert
executions under the unique key (workflow version, event), defer their procrastinate
jobs, mark the events processed. Several matchers may run at once; a crash anywhere
replays safely.

The loop drains until the outbox is empty, then tells writers it is listening
(``crmflow.matcher_state.listening``) and waits for a NOTIFY or the poll interval,
whichever comes first. NOTIFY is only a hint: the poll alone would do, slower.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from engine import catalog, db, lifecycle, metrics, suppressions, tracing
from engine.config import Settings, get_settings
from engine.executor import queue as execution_queue
from engine.executor.runner import Runner
from engine.inline import run_inline

log = logging.getLogger(__name__)

OUTBOX_CHANNEL = "crmflow_outbox"
WORKFLOWS_CHANNEL = "crmflow_workflows"


_q = db.Queries("matcher.sql")


def catalog_error(exc: BaseException) -> bool:
    """Whether an error names a catalog problem (class 42: a table, column, type,
    function or operator missing or mismatched; 0A000: a cached plan whose row type
    changed): the plan is rebuilt and re-probed, never the events consumed."""
    state = getattr(exc, "sqlstate", None) or ""
    return state.startswith("42") or state == "0A000"


@dataclass
class MatchPlan:
    """The match statement for one generation of active workflows."""

    generation: int
    statement: str | None  # None: no active workflow reacts to events
    workflows: int = 0
    entity_types: list[str] = field(default_factory=list)
    versions: dict[int, dict[str, Any]] = field(default_factory=dict)  # id → definition, name
    entities: dict[str, catalog.EntitySchema] = field(default_factory=dict)
    broken: dict[int, str] = field(default_factory=dict)  # workflow id → why, left out
    # Broken states that changed at this build (workflow id, reason or None), to record.
    changes: list[tuple[int, str | None]] = field(default_factory=list)
    # Workflows of other environments: (environment, entity type or None for custom
    # events of any entity) whose events this matcher queues for them.
    elsewhere: list[tuple[str, str | None]] = field(default_factory=list)
    # The statement matching events queued for this environment (environment_events).
    queued_statement: str | None = None


def _branch(
    entity_type: str | None,
    versions: list[dict[str, Any]],
    entities: dict[str, catalog.EntitySchema],
) -> sql.Composable:
    cases = sql.SQL(", ").join(
        sql.SQL(_q("match_case")).format(
            predicate=db.stored_sql(v["predicate"]), version_id=sql.Literal(v["version_id"])
        )
        for v in versions
    )
    if entity_type is None:
        return sql.SQL(_q("match_branch_no_entity")).format(cases=cases)
    return sql.SQL(_q("match_branch")).format(
        table=entities[entity_type].table, cases=cases, entity_type=sql.Literal(entity_type)
    )


def _by_entity(rows: list[dict[str, Any]]) -> dict[str | None, list[dict[str, Any]]]:
    by_entity: dict[str | None, list[dict[str, Any]]] = {}
    for row in rows:
        by_entity.setdefault(row["entity_type"], []).append(row)
    return by_entity


def _current_row(entities: list[catalog.EntitySchema]) -> sql.Composable:
    """The entity's row now, as JSON, for each of these entities (match_and_enroll)."""
    cases = [
        sql.SQL(_q("current_row_case")).format(
            entity_type=sql.Literal(e.entity_type),
            table=e.table,
            pk_match=e.pk_match(),
        )
        for e in entities
    ]
    if not cases:
        return sql.SQL("NULL::jsonb")
    return sql.SQL("CASE x.entity_type {} END").format(sql.SQL(" ").join(cases))


def compose(
    conn: psycopg.AsyncConnection[Any],
    rows: list[dict[str, Any]],
    entities: dict[str, catalog.EntitySchema],
    processed: str = "mark_batch_processed",
) -> str | None:
    """The match statement of these workflow versions (all on watched entities);
    ``processed`` names its last step (``count_replayed`` for replay-events)."""
    by_entity = _by_entity(rows)
    if not by_entity:
        return None
    branches = [_branch(et, versions, entities) for et, versions in by_entity.items()]
    current_row = _current_row([e for name, e in entities.items() if name in by_entity])
    statement = sql.SQL(_q("match_and_enroll")).format(
        branches=sql.SQL("\nUNION ALL\n").join(branches),
        current_row=current_row,
        processed=sql.SQL(_q(processed)),
        not_suppressed=_not_suppressed(rows, entities),
    )
    return statement.as_string(conn)


def _not_suppressed(
    rows: list[dict[str, Any]], entities: dict[str, catalog.EntitySchema]
) -> sql.Composable:
    """The suppression test of match_and_enroll's candidates: ``true`` when no workflow
    has ``suppress`` (nothing read), else the lists of each version as constants (a CASE
    on the version: the stored definitions are not read per event). Address entries are
    compared with the entity's ``email`` as it is now, read from its table by key:
    captured rows may leave out columns no workflow names (capture's column pruning)."""
    lists = {
        r["version_id"]: r["definition"].get("suppress")
        for r in rows
        if (r.get("definition") or {}).get("suppress")
    }
    if not lists:
        return sql.SQL("true")
    by_version = sql.SQL("CASE mt.version_id {} END").format(
        sql.SQL(" ").join(
            sql.SQL("WHEN {} THEN {}::jsonb").format(
                sql.Literal(version_id), sql.Literal(json.dumps(names))
            )
            for version_id, names in sorted(lists.items())
        )
    )
    with_email = sorted(
        {
            r["entity_type"]
            for r in rows
            if r["version_id"] in lists
            and r["entity_type"] in entities
            and "email" in entities[r["entity_type"]].columns
        }
    )
    captured = sql.SQL("coalesce(ev.new_row, ev.old_row)")
    entity_row: sql.Composable = captured
    if with_email:
        now_cases = sql.SQL(" ").join(
            sql.SQL(
                "WHEN {et} THEN (SELECT jsonb_build_object('email', t.email)"
                " FROM jsonb_populate_record(NULL::{table}, ev.pk) AS p"
                " JOIN {table} AS t ON {pk_match})"
            ).format(
                et=sql.Literal(et),
                table=entities[et].table,
                pk_match=entities[et].pk_match(),
            )
            for et in with_email
        )
        entity_row = sql.SQL("coalesce(CASE ev.entity_type {} END, {})").format(now_cases, captured)
    return suppressions.not_suppressed(
        by_version, sql.SQL("ev.entity_type"), sql.SQL("ev.pk"), entity_row
    )


def workflow_environment(row: dict[str, Any]) -> str:
    """A workflow version's environment ("production" when its definition names none)."""
    return str((row.get("definition") or {}).get("environment") or "production")


async def _compiles(
    conn: psycopg.AsyncConnection[Any],
    branches: list[sql.Composable],
    current_row: sql.Composable | None = None,
) -> str | None:
    """None if these branches (and the reading of the entities' current rows) compile
    against the catalog now, else PostgreSQL's reason."""
    branches = branches or [sql.SQL("SELECT NULL::bigint AS event_id")]
    probe = sql.SQL(_q("match_probe")).format(
        branches=sql.SQL("\nUNION ALL\n").join(branches),
        current_row=current_row or sql.SQL("NULL::jsonb"),
    )
    try:
        async with conn.transaction():  # a savepoint inside the batch's transaction
            await conn.execute(probe, {})
    except psycopg.OperationalError:
        raise  # a lock or statement timeout, a lost connection: not the workflow's fault
    except psycopg.DatabaseError as exc:
        return exc.diag.message_primary or str(exc)
    return None


async def find_broken(
    conn: psycopg.AsyncConnection[Any],
    rows: list[dict[str, Any]],
    entities: dict[str, catalog.EntitySchema],
) -> dict[int, str]:
    """The workflow versions among ``rows`` that do not compile against the catalog as it
    is now: workflow id → reason. One probe when all compile (the common case); else
    one per entity, then one per workflow of the entities that fail."""
    broken: dict[int, str] = {}
    healthy: list[dict[str, Any]] = []
    missing: dict[str, dict[str, Any]] | None = None
    for row in rows:
        et = row["entity_type"]
        if et is not None and et not in entities:
            if missing is None:
                missing = {s["entity_type"]: s for s in await catalog.entity_states(conn)}
            state = missing.get(et)
            if state is None:
                reason = f"{et!r} is no longer a watched entity"
            elif state["captured_on"]:
                reason = (
                    f"its table {state['table_schema']}.{state['table_name']} (entity {et!r}) "
                    f"was renamed to {state['captured_on']}; it compiles again once capture "
                    "follows the rename (the worker heals it within seconds)"
                )
            else:
                reason = (
                    f"its table {state['table_schema']}.{state['table_name']} (entity {et!r}) "
                    "no longer exists"
                )
            broken[row["workflow_id"]] = reason
        else:
            healthy.append(row)
    by_entity = _by_entity(healthy)
    if not by_entity:
        return broken
    everything = [_branch(et, v, entities) for et, v in by_entity.items()]
    in_use = [entities[et] for et in by_entity if et is not None]
    if await _compiles(conn, everything, _current_row(in_use)) is None:
        return broken
    for et, versions in by_entity.items():
        if et is not None:
            unreadable = await _compiles(conn, [], _current_row([entities[et]]))
            if unreadable is not None:  # its rows cannot be read by their key
                for v in versions:
                    broken[v["workflow_id"]] = (
                        f"the rows of {entities[et].qualified_name} cannot be read by their "
                        f"key: {unreadable}"
                    )
                continue
        if await _compiles(conn, [_branch(et, versions, entities)]) is None:
            continue
        for v in versions:
            failure = await _compiles(conn, [_branch(et, [v], entities)])
            if failure is not None:
                broken[v["workflow_id"]] = f"its conditions no longer compile: {failure}"
    return broken


async def build_plan(
    conn: psycopg.AsyncConnection[Any],
    generation: int,
    log_changes: bool = True,
    environment: str | None = None,
) -> MatchPlan:
    """The match statement of the active workflows that compile; the others are left
    out, their broken state in ``changes`` (see :func:`record_broken`). With an
    ``environment``, only that environment's workflows are matched; the others' entity
    types are in ``elsewhere`` (their events are queued for them)."""
    rows = await (await conn.execute(_q("active_event_workflows"), {})).fetchall()
    entities = await catalog.load_entities(conn)
    broken = await find_broken(conn, rows, entities)
    healthy = [r for r in rows if r["workflow_id"] not in broken]
    elsewhere: list[tuple[str, str | None]] = []
    if environment is not None:
        elsewhere = sorted(
            {
                (workflow_environment(r), r["entity_type"])
                for r in healthy
                if workflow_environment(r) != environment
            },
            key=lambda pair: (pair[0], pair[1] or ""),
        )
        healthy = [r for r in healthy if workflow_environment(r) == environment]
    changes = [
        (r["workflow_id"], broken.get(r["workflow_id"]))
        for r in rows
        if r["broken_reason"] != broken.get(r["workflow_id"])
    ]
    for wf_id, reason in changes if log_changes else []:
        if reason:
            log.warning("workflow %d is broken and left out of matching: %s", wf_id, reason)
        else:
            log.warning("workflow %d compiles again and is matched", wf_id)
    return MatchPlan(
        generation,
        compose(conn, healthy, entities),
        workflows=len(healthy),
        entity_types=sorted({e for r in healthy if (e := r["entity_type"])}),
        versions={r["version_id"]: r for r in rows},
        entities=entities,
        broken=broken,
        changes=changes,
        elsewhere=elsewhere,
        queued_statement=(
            compose(conn, healthy, entities, processed="environment_processed")
            if environment is not None
            else None
        ),
    )


async def record_broken(conn: psycopg.AsyncConnection[Any], plan: MatchPlan) -> None:
    """Record the plan's broken-state changes (and their alerts), in the caller's
    transaction: a workflow found broken misses events from the oldest pending one on,
    the batch being matched included (``broken_since_event_id``). Saving bumps the
    generation; the plan takes the new one, so it is not rebuilt for its own change."""
    if not plan.changes:
        return
    first = await (await conn.execute(_q("first_unmatched_event"), {})).fetchone()
    assert first is not None
    await conn.execute(
        _q("set_broken"),
        {
            "ids": [wf_id for wf_id, _ in plan.changes],
            "reasons": [reason for _, reason in plan.changes],
            "since": [first["id"]] * len(plan.changes),
        },
    )
    plan.changes = []
    now = await (await conn.execute(_q("first_unmatched_event"), {})).fetchone()
    if now is not None and now["generation"] == plan.generation + 1:
        plan.generation = now["generation"]


async def refresh_broken(conn: psycopg.AsyncConnection[Any]) -> list[dict[str, Any]]:
    """Probe the active workflows now (as a plan build does), record which are broken,
    and return the broken ones (``workflow apply`` warns about them)."""
    async with conn.transaction():
        row = await (await conn.execute(_q("first_unmatched_event"), {})).fetchone()
        assert row is not None
        await record_broken(conn, await build_plan(conn, row["generation"], log_changes=False))
    return await (await conn.execute(_q("broken_workflows"), {})).fetchall()


async def broken_workflows(conn: psycopg.AsyncConnection[Any]) -> list[dict[str, Any]]:
    """Active workflows marked broken (health, metrics, alerts)."""
    return await (await conn.execute(_q("broken_workflows"), {})).fetchall()


REPLAY_CHUNK = 500  # events per replay transaction


async def replay_events(
    conn: psycopg.AsyncConnection[Any], workflow_id: int, settings: Settings | None = None
) -> dict[str, Any]:
    """Re-match workflow ``workflow_id`` alone over the events it may have missed while
    broken (its entity's events since ``broken_since_event_id``), once it compiles again.

    Clears its broken state first, in a transaction of its own, so that matchers take it
    into their plans from then on; then waits for batches still matching its entity's
    events with an older plan, and enrolls it on the processed events since the break, in
    chunks of a transaction each. Idempotent: the enrollment key (version, event) lets no
    event enroll twice, so a replay cut short is run again.
    Raises :class:`workflows.StillBroken` while it does not compile."""
    from engine import workflows

    settings = settings or get_settings()
    async with conn.transaction():
        wf = await (await conn.execute(_q("replay_workflow"), {"id": workflow_id})).fetchone()
        if wf is None or wf["status"] == "archived":
            raise workflows.WorkflowNotFound(workflow_id)
        if wf["status"] != "active":
            raise workflows.ReplayRefused(
                f"workflow {workflow_id} is {wf['status']}: activate it to replay its events"
            )
        rows = [
            r
            for r in await (await conn.execute(_q("active_event_workflows"), {})).fetchall()
            if r["workflow_id"] == workflow_id
        ]
        if not rows:
            raise workflows.ReplayRefused(
                f"workflow {workflow_id} is not triggered by events: nothing to replay"
            )
        entities = await catalog.load_entities(conn)
        reason = (await find_broken(conn, rows, entities)).get(workflow_id)
        plan = MatchPlan(0, None, changes=[(workflow_id, reason)])
        if reason != wf["broken_reason"]:
            await record_broken(conn, plan)
    if reason is not None:
        raise workflows.StillBroken(f"workflow {workflow_id} is still broken: {reason}")
    since = wf["broken_since_event_id"]
    report = {"workflow_id": workflow_id, "since_event_id": since, "events": 0, "enrolled": 0}
    if since is None:
        return report  # nothing missed (or replayed already)
    statement = compose(conn, rows, entities, processed="count_replayed")
    assert statement is not None
    entity_type = rows[0]["entity_type"]
    async with conn.transaction():  # held only until those batches are done
        await conn.execute(
            _q("replay_wait_for_matchers"), {"since": since, "entity_type": entity_type}
        )
    after = since
    while True:  # a transaction per chunk; a replay cut short is simply run again
        async with conn.transaction():
            chunk = await (
                await conn.execute(
                    _q("replay_event_ids"),
                    {"after": after, "entity_type": entity_type, "limit": REPLAY_CHUNK},
                )
            ).fetchone()
            ids = list(chunk["ids"] or []) if chunk else []
            if not ids:
                await conn.execute(_q("replay_done"), {"id": workflow_id})
                break
            enrolled = await (
                await conn.execute(
                    statement,
                    {"ids": ids, "queue": settings.queue_name, "max_depth": settings.max_depth},
                )
            ).fetchall()
            waiting = [e["id"] for e in enrolled if e["status"] == "pending"]
            if waiting:
                await execution_queue.enqueue(conn, waiting, settings.queue_name)
        report["events"] += len(ids)
        report["enrolled"] += len(enrolled)
        after = ids[-1] + 1
    log.warning(
        "workflow %d: replayed %d events since event %d, %d enrolled",
        workflow_id,
        report["events"],
        since,
        report["enrolled"],
    )
    return report


@dataclass
class BatchResult:
    claimed: int = 0
    enrolled: int = 0
    errors: int = 0


# Rows through the queue tables after which the matcher refreshes their statistics.
ANALYZE_EVERY = 5_000
# Seconds between two probes of broken workflows (fixed schema: they compile again).
BROKEN_RECHECK = 10.0


class Matcher:
    def __init__(self, pool: db.Pool, settings: Settings | None = None) -> None:
        self.pool = pool
        self.settings = settings or get_settings()
        self.plan: MatchPlan | None = None
        self.round: lifecycle.RoundPlan | None = None  # goals, exits, waits (engine/lifecycle.py)
        self.totals = BatchResult()
        self._since_analyze = ANALYZE_EVERY  # analyze on the first busy batch too
        self._analyze_allowed: bool | None = None  # may this role ANALYZE? (asked once)
        self.runner = Runner(pool, self.settings)  # for steps run inline
        self.broken_recheck = BROKEN_RECHECK
        self._built_at = 0.0
        self._batch_started = 0  # the batch's start, for its span (engine/tracing.py)

    async def run_once(self) -> BatchResult:
        """Claim and process one batch; returns what it did (claimed 0: nothing pending)."""
        started = time.perf_counter()
        async with self.pool.connection() as conn:
            try:
                # The common case first, without savepoints: each costs two round trips.
                async with conn.transaction():
                    result = await self._batch(conn, careful=False)
            except psycopg.errors.QueryCanceled as exc:
                # The batch's statement timeout: redo it step by step, where the slow
                # event is matched alone (under the same timeout) and recorded.
                log.info("batch timed out (%s); redoing it one event at a time", exc)
                async with conn.transaction():
                    result = await self._batch(conn, careful=True, one_by_one=True)
            except (psycopg.OperationalError, psycopg.InterfaceError):
                raise
            except Exception as exc:
                # Rolled back whole; redo the batch with savepoints, so that a broken
                # predicate or inline step is isolated instead of failing everything.
                # A catalog error (a column, table or type gone) means schema drift:
                # rebuild the plan, whose probes leave the broken workflows out.
                if catalog_error(exc):
                    self.plan = None
                log.info("batch failed (%s); redoing it step by step", exc)
                async with conn.transaction():
                    result = await self._batch(conn, careful=True)
            queued = await self._run_environment_batch(conn)
            result.claimed += queued.claimed
            result.enrolled += queued.enrolled
            result.errors += queued.errors
            result = self._count(result)
            if result.claimed:
                metrics.EVENTS_MATCHED.inc(result.claimed)
                metrics.EXECUTIONS_ENROLLED.inc(result.enrolled)
                metrics.MATCH_ERRORS.inc(result.errors)
                metrics.BATCH_SECONDS.observe(time.perf_counter() - started)
            self._since_analyze += result.claimed
            if self._since_analyze >= ANALYZE_EVERY and result.claimed >= 100:
                self._since_analyze = 0
                if await self._may_analyze(conn):
                    async with conn.transaction():  # committed, or the statistics roll back
                        await conn.execute(_q("refresh_statistics"), {})
        return result

    async def _may_analyze(self, conn: psycopg.AsyncConnection[Any]) -> bool:
        """Whether this role may ANALYZE the queue tables (it owns them); asked once."""
        if self._analyze_allowed is None:
            row = await (await conn.execute(_q("may_refresh_statistics"), {})).fetchone()
            self._analyze_allowed = bool(row and row["allowed"])
            if not self._analyze_allowed:
                log.debug(
                    "not refreshing the queue tables' statistics: this role does not own them "
                    "(autovacuum's ANALYZE still runs)"
                )
        return self._analyze_allowed

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
        await record_broken(conn, self.plan)
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
            async with conn.transaction():
                await lifecycle.run_round(conn, self.round, ids, self.settings.queue_name)
        except psycopg.OperationalError as exc:
            if not isinstance(exc, psycopg.errors.QueryCanceled):
                raise
            log.warning("goals, exits and waits of a batch left to the executor: %s", exc)
        except psycopg.DatabaseError as exc:
            log.warning("goals, exits and waits of a batch left to the executor: %s", exc)

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

    def _count(self, result: BatchResult) -> BatchResult:  # running totals for metrics
        self.totals.claimed += result.claimed
        self.totals.enrolled += result.enrolled
        self.totals.errors += result.errors
        return result

    async def drain(self) -> BatchResult:
        """Process batches until nothing is pending (used by tests and `crmflow demo`)."""
        total = BatchResult()
        while True:
            r = await self.run_once()
            total.claimed += r.claimed
            total.enrolled += r.enrolled
            total.errors += r.errors
            if r.claimed == 0:
                return total

    async def _set_listening(self, listening: bool) -> None:
        async with self.pool.connection() as conn:
            await conn.execute(_q("set_listening"), {"listening": listening})

    async def run(self, stop: asyncio.Event, url: str) -> None:
        """Drain, then wait for a hint or the poll interval; until ``stop`` is set."""
        listener = _Listener(url, [OUTBOX_CHANNEL, WORKFLOWS_CHANNEL])
        conflicts = 0  # in a row
        try:
            while not stop.is_set():
                try:
                    # A claim that finds work also tells writers to stop hinting, in the
                    # same transaction: a wake-up costs one commit, not two.
                    await self.drain()
                    conflicts = 0
                    await self._set_listening(True)
                    # Writers that checked the flag just before it flipped did not notify:
                    # one more look closes that window (the poll covers what is left).
                    if (await self.run_once()).claimed:
                        continue
                    await listener.wait(self.settings.matcher_poll_interval, stop)
                except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
                    kind = conflict_kind(exc)
                    if kind is None:
                        log.warning("matcher lost the database (%s); retrying", exc)
                        await _sleep_or_stop(stop, 1.0)
                        continue
                    # The batch was rolled back whole (nothing of it happened): redo it
                    # at once, after a short jittered pause so two colliding matchers
                    # do not collide again.
                    conflicts += 1
                    metrics.MATCHER_CONFLICTS.labels(kind).inc()
                    delay = conflict_backoff(conflicts)
                    log.warning(
                        "matcher batch rolled back by a %s (%s); retrying in %.0f ms",
                        kind.replace("_", " "),
                        (exc.diag.message_primary if isinstance(exc, psycopg.Error) else None)
                        or exc,
                        delay * 1000,
                    )
                    await _sleep_or_stop(stop, delay)
                except Exception:
                    log.exception("matcher batch failed; retrying")
                    await _sleep_or_stop(stop, 1.0)
        finally:
            await listener.close()


def conflict_kind(exc: BaseException) -> str | None:
    """What kind of lock conflict rolled back a transaction: ``deadlock`` (40P01),
    ``serialization`` (the rest of class 40), ``lock_timeout`` (55P03),
    ``statement_timeout`` (57014); None for anything else (a lost connection...)."""
    state = getattr(exc, "sqlstate", None)
    if not state:
        return None
    if state == "40P01":
        return "deadlock"
    if state.startswith("40"):
        return "serialization"
    if state == "55P03":
        return "lock_timeout"
    if state == "57014":
        return "statement_timeout"
    return None


CONFLICT_BACKOFF = 0.01  # s, the first retry after a conflict
CONFLICT_BACKOFF_MAX = 1.0


def conflict_backoff(in_a_row: int) -> float:
    """10 ms, doubling with each conflict in a row up to 1 s, jittered by ±50 %."""
    base: float = min(CONFLICT_BACKOFF_MAX, CONFLICT_BACKOFF * 2 ** min(in_a_row - 1, 10))
    return base * random.uniform(0.5, 1.5)


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


class _Listener:
    """A LISTEN connection that reconnects on its own; losing it only slows to the poll."""

    def __init__(self, url: str, channels: list[str]) -> None:
        self.url = url
        self.channels = channels
        self.conn: psycopg.AsyncConnection[Any] | None = None
        self.backoff = 0.5

    async def _connect(self) -> psycopg.AsyncConnection[Any]:
        conn = await db.connect(self.url, autocommit=True)
        for channel in self.channels:
            await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
        self.backoff = 0.5
        return conn

    async def wait(self, timeout: float, stop: asyncio.Event) -> None:
        if self.conn is None or self.conn.closed:
            try:
                self.conn = await self._connect()
            except psycopg.Error as exc:
                log.warning("LISTEN connection failed (%s); polling", exc)
                self.conn = None
                await _sleep_or_stop(stop, min(timeout, self.backoff))
                self.backoff = min(self.backoff * 2, 30.0)
                return
        try:
            async for _ in self.conn.notifies(timeout=timeout, stop_after=1):
                break
        except psycopg.Error as exc:
            log.warning("LISTEN connection lost (%s); reconnecting", exc)
            await self.close()

    async def close(self) -> None:
        if self.conn is not None:
            with contextlib.suppress(psycopg.Error):
                await self.conn.close()
            self.conn = None
