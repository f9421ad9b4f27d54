-- The matcher's SQL (engine/matcher.py). Per batch, in one transaction:
--   1. claim_events: lock a batch of pending events (FOR UPDATE SKIP LOCKED);
--   2. match_and_enroll: evaluate every active workflow against the whole batch,
--      insert the executions, defer their jobs, mark the events processed.
-- A crash anywhere before COMMIT leaves the events pending and nothing enrolled;
-- after COMMIT everything is there. Replays are safe either way.

-- name: claim_events
-- Oldest pending events first. Never a cursor on the id: ids are taken at insert
-- time but commit in any order, so "everything above id N" would skip late commits.
-- Events whose entity has an earlier pending event that we could not lock (another
-- matcher holds it) stay for the next round: one entity's events are enrolled, and
-- their jobs deferred, in capture order.
-- A batch is bounded in bytes as well as rows: it keeps the oldest events whose captured
-- rows (new_row + old_row, as stored) add up to batch_bytes, and always the first one.
-- The events cut off are a suffix in id order (so an entity's order holds); their locks
-- go with this transaction. The statement timeout of the batch's later statements is
-- set here too (SET LOCAL, no round trip of its own).
WITH candidates AS MATERIALIZED (
    SELECT id, entity_type, pk,
           coalesce(pg_column_size(new_row), 0) + coalesce(pg_column_size(old_row), 0) AS bytes
      FROM crmflow.outbox
     WHERE processed_at IS NULL
     ORDER BY id
     LIMIT %(batch_size)s
       FOR UPDATE SKIP LOCKED
), sized AS (
    SELECT id, sum(bytes) OVER (ORDER BY id) - bytes AS before
      FROM candidates
), held_elsewhere AS MATERIALIZED (
    -- Pending events below our batch that we could not lock: another matcher holds
    -- them. A short range scan of the pending index (no per-entity index to maintain
    -- on every captured row).
    SELECT o.entity_type, o.pk, o.id
      FROM crmflow.outbox AS o
     WHERE o.processed_at IS NULL
       AND o.id < (SELECT max(id) FROM candidates)
       AND o.id NOT IN (SELECT id FROM candidates)
), busy AS (
    -- A matcher at work: writers need not NOTIFY. (Writes only when the flag is set and
    -- there is work, so the idle check after announcing "listening" keeps it.) Never
    -- waits for the row: when another session holds it (a matcher, a workflow save, a
    -- frozen worker), the flag is only a hint and stays as it is.
    UPDATE crmflow.matcher_state AS s SET listening = false
      FROM (SELECT singleton FROM crmflow.matcher_state
             WHERE listening AND EXISTS (SELECT 1 FROM candidates)
               FOR NO KEY UPDATE SKIP LOCKED) AS free
     WHERE s.singleton = free.singleton
)
SELECT (SELECT generation FROM crmflow.matcher_state) AS generation,
       CASE WHEN %(statement_timeout)s::text IS NOT NULL
            THEN set_config('statement_timeout', %(statement_timeout)s::text, true) END
           AS statement_timeout,
       ARRAY(
           SELECT c.id
             FROM candidates AS c
            WHERE c.id IN (SELECT id FROM sized WHERE before < %(batch_bytes)s)
              AND (c.pk IS NULL
               OR NOT EXISTS (
                    SELECT 1
                      FROM held_elsewhere AS earlier
                     WHERE earlier.entity_type = c.entity_type
                       AND earlier.pk = c.pk
                       AND earlier.id < c.id))
            ORDER BY c.id
       ) AS ids;

-- name: active_event_workflows
SELECT v.id AS version_id, v.workflow_id, v.version, v.entity_type, v.trigger_type,
       v.priority, v.predicate, v.limits, v.definition,
       w.name, w.broken_reason, w.broken_since_event_id
  FROM crmflow.workflows AS w
  JOIN crmflow.workflow_versions AS v ON v.workflow_id = w.id AND v.version = w.current_version
 WHERE w.status = 'active'
   AND v.trigger_type IN ('entity_created', 'entity_updated', 'field_updated',
                          'entity_deleted', 'event')
 ORDER BY v.entity_type NULLS LAST, v.priority DESC, v.workflow_id;

-- name: match_case
CASE WHEN {predicate} THEN {version_id} END

-- name: match_branch
-- Events of one entity type: typed rows rebuilt from the event ("n" is the entity's
-- state, the deleted row for deletes; "o" the row before an update), then every
-- workflow of that entity evaluated on them at once.
SELECT ev.id AS event_id, m.version_id
  FROM batch AS ev
 CROSS JOIN LATERAL jsonb_populate_record(NULL::{table}, coalesce(ev.new_row, ev.old_row)) AS n
 CROSS JOIN LATERAL jsonb_populate_record(NULL::{table}, ev.old_row) AS o
 CROSS JOIN LATERAL unnest(ARRAY[{cases}]::bigint[]) AS m(version_id)
 WHERE ev.entity_type = {entity_type} AND m.version_id IS NOT NULL

-- name: match_branch_no_entity
-- Workflows on custom events that name no entity type: any event of that name.
SELECT ev.id AS event_id, m.version_id
  FROM batch AS ev
 CROSS JOIN LATERAL unnest(ARRAY[{cases}]::bigint[]) AS m(version_id)
 WHERE ev.op = 'event' AND m.version_id IS NOT NULL

-- name: match_and_enroll
WITH batch AS (
    SELECT * FROM crmflow.outbox WHERE id = ANY(%(ids)s)
), matched AS (
    {branches}
), candidates AS (
    SELECT ev.id AS event_id, ev.entity_type, ev.pk, ev.depth, ev.captured_at, ev.payload,
           v.id AS version_id, v.workflow_id, v.version, v.priority,
           coalesce(v.limits ->> 'reenrollment', 'always') AS reenrollment,
           make_interval(secs => (v.limits ->> 'reenroll_after')::float8) AS reenroll_after,
           make_interval(secs => (v.limits ->> 'debounce')::float8) AS debounce
      FROM matched AS mt
      JOIN batch AS ev ON ev.id = mt.event_id
      JOIN crmflow.workflow_versions AS v ON v.id = mt.version_id
      JOIN crmflow.workflows AS w ON w.id = v.workflow_id
     -- Undo writes of on_failure: compensate (engine/runtime.py) put back what an
     -- execution changed: captured, but they enroll nothing (docs/semantics.md).
     WHERE (ev.actor IS NULL OR NOT starts_with(ev.actor, 'crmflow:compensation:'))
       -- A workflow fires for writes committed after it was activated (migration 0015).
       AND (w.active_since IS NULL OR NOT pg_visible_in_snapshot(ev.txid, w.active_since))
       -- Entities on the workflow's suppression lists do not enroll (sql/suppressions.sql).
       AND {not_suppressed}
), enrollable AS (
    -- Re-enrollment policy: "never" enrolls an entity once per workflow, "after"
    -- once per interval; within the batch the earliest event wins.
    SELECT DISTINCT ON (c.workflow_id, c.pk, c.once_key) c.*
      FROM (SELECT *, CASE WHEN reenrollment = 'always' OR pk IS NULL THEN event_id END
                      AS once_key
              FROM candidates) AS c
     WHERE c.once_key IS NOT NULL
        OR NOT EXISTS (
             SELECT 1 FROM crmflow.executions AS x
              WHERE x.workflow_id = c.workflow_id
                AND x.entity_type = c.entity_type AND x.entity_pk = c.pk
                AND (c.reenrollment = 'never' OR x.created_at > now() - c.reenroll_after))
     ORDER BY c.workflow_id, c.pk, c.once_key, c.event_id
), latest AS (
    -- Debounced workflows keep only the newest event of each entity in the batch.
    SELECT DISTINCT ON (e.workflow_id, e.pk, e.burst_key) e.*
      FROM (SELECT *, CASE WHEN debounce IS NULL OR pk IS NULL THEN event_id END AS burst_key
              FROM enrollable) AS e
     ORDER BY e.workflow_id, e.pk, e.burst_key, e.event_id DESC
), debounced AS (
    -- While an execution of the same workflow and entity has not started yet, a newer
    -- matching event joins it: it runs once, a full window after the last change.
    UPDATE crmflow.executions AS x
       SET event_id = l.event_id,
           not_before = clock_timestamp() + l.debounce
      FROM latest AS l
     WHERE l.debounce IS NOT NULL AND l.pk IS NOT NULL
       AND x.workflow_id = l.workflow_id AND x.entity_type = l.entity_type
       AND x.entity_pk = l.pk AND x.status = 'pending' AND x.started_at IS NULL
    RETURNING x.workflow_id, x.entity_pk
), enrolled AS (
    INSERT INTO crmflow.executions
           (workflow_id, workflow_version_id, workflow_version, enrollment_key, event_id,
            entity_type, entity_pk, status, priority, depth, input, triggered_at,
            not_before, finished_at, error)
    SELECT l.workflow_id, l.version_id, l.version, 'event:' || l.event_id, l.event_id,
           l.entity_type, l.pk,
           CASE WHEN l.depth >= %(max_depth)s THEN 'failed' ELSE 'pending' END,
           l.priority, l.depth, l.payload, l.captured_at,
           clock_timestamp() + l.debounce,
           CASE WHEN l.depth >= %(max_depth)s THEN clock_timestamp() END,
           CASE WHEN l.depth >= %(max_depth)s THEN
                format('loop stopped: this event was written by a chain of %%s workflow '
                       'actions (limit %%s, setting CRMFLOW_MAX_DEPTH)', l.depth, %(max_depth)s)
           END
      FROM latest AS l
     WHERE NOT EXISTS (SELECT 1 FROM debounced AS d
                        WHERE d.workflow_id = l.workflow_id AND d.entity_pk = l.pk)
     ORDER BY l.event_id, l.priority DESC, l.workflow_id
    ON CONFLICT (workflow_version_id, enrollment_key) DO NOTHING
    RETURNING id, workflow_id, workflow_version_id, workflow_version, entity_type, entity_pk,
              event_id, status, not_before, depth, input, triggered_at
), counts AS (
    SELECT event_id, count(*) AS n FROM enrolled GROUP BY event_id
), processed AS (
    {processed}
)
-- The new executions, with what steps run inline need (engine/inline.py): the event,
-- the entity as it is now, and whether an earlier execution of the entity is still
-- queued or running (then this one queues behind it). (Data-modifying CTEs always run
-- to completion, read or not; their own inserts are not visible here.)
SELECT x.*, b.op AS event_op, b.new_row AS event_new_row, b.old_row AS event_old_row,
       coalesce(b.changed, crmflow.changed_columns(b.new_row, b.old_row)) AS event_changed, b.event_name, b.payload AS event_payload,
       {current_row} AS current_row,
       (x.entity_pk IS NOT NULL AND EXISTS (
            SELECT 1 FROM crmflow.executions AS p
             WHERE p.entity_type = x.entity_type AND p.entity_pk = x.entity_pk
               AND (p.status = 'running' OR (p.status = 'pending' AND p.not_before IS NULL))
       )) AS entity_busy
  FROM enrolled AS x
  JOIN batch AS b ON b.id = x.event_id
 ORDER BY x.id;

-- name: mark_batch_processed
-- match_and_enroll's last step when matching: every event of the batch is processed.
UPDATE crmflow.outbox AS o
   SET processed_at = clock_timestamp(), matched = coalesce(c.n, 0)
  FROM batch AS b
  LEFT JOIN counts AS c ON c.event_id = b.id
 WHERE o.id = b.id

-- name: count_replayed
-- match_and_enroll's last step when replaying events (already processed) for one
-- workflow: their matched counts grow by what the replay enrolled.
UPDATE crmflow.outbox AS o
   SET matched = coalesce(o.matched, 0) + c.n
  FROM counts AS c
 WHERE o.id = c.event_id

-- name: match_probe
-- Do these branches, and the reading of the entities' current rows, compile against the
-- catalog as it is now? Parse analysis resolves every table, column, type, operator and
-- constant; nothing is read.
WITH batch AS (SELECT * FROM crmflow.outbox WHERE false)
SELECT m.*, (SELECT {current_row}
               FROM (SELECT NULL::text AS entity_type, NULL::jsonb AS entity_pk) AS x)
  FROM ({branches}) AS m LIMIT 0

-- name: first_unmatched_event
-- Where a workflow found broken now starts missing events: the oldest pending event
-- (the batch being matched included), else the next event to be captured.
SELECT coalesce((SELECT min(id) FROM crmflow.outbox WHERE processed_at IS NULL),
                (SELECT coalesce(max(id), 0) + 1 FROM crmflow.outbox)) AS id,
       (SELECT generation FROM crmflow.matcher_state) AS generation;

-- name: set_broken
-- Mark workflows broken (reason) or compiling again (NULL). broken_since_event_id keeps
-- the earliest event missed until replay-events clears it. The alert of each change is
-- raised or resolved in the same statement (an ordinary workflow delivers it).
WITH changes AS (
    SELECT * FROM unnest(%(ids)s::bigint[], %(reasons)s::text[], %(since)s::bigint[])
           AS u(id, reason, since)
), updated AS (
    UPDATE crmflow.workflows AS w
       SET broken_reason = c.reason,
           broken_at = CASE WHEN c.reason IS NOT NULL THEN coalesce(w.broken_at, now()) END,
           broken_since_event_id = CASE WHEN c.reason IS NULL THEN w.broken_since_event_id
                                        ELSE least(w.broken_since_event_id, c.since) END
      FROM changes AS c
     WHERE w.id = c.id AND w.broken_reason IS DISTINCT FROM c.reason
    RETURNING w.id, w.name, w.broken_reason
), raised AS (
    INSERT INTO crmflow.alerts (kind, subject, workflow_id, value, threshold, message)
    SELECT 'workflow_broken', u.name, u.id, 1, 0,
           format('Workflow ''%%s'' (%%s) is broken and matches nothing: %%s', u.name, u.id,
                  u.broken_reason)
      FROM updated AS u
     WHERE u.broken_reason IS NOT NULL
    ON CONFLICT (kind, subject) WHERE resolved_at IS NULL DO NOTHING
), resolved AS (
    UPDATE crmflow.alerts AS a SET resolved_at = now()
      FROM updated AS u
     WHERE u.broken_reason IS NULL AND a.kind = 'workflow_broken' AND a.subject = u.name
       AND a.resolved_at IS NULL
)
SELECT id, name, broken_reason FROM updated ORDER BY id;

-- name: broken_workflows
-- Active workflows that do not compile (health, metrics, alerts, `workflow apply`).
SELECT w.id, w.name, w.broken_reason AS reason, w.broken_at AS since,
       w.broken_since_event_id
  FROM crmflow.workflows AS w
 WHERE w.status = 'active' AND w.broken_reason IS NOT NULL
 ORDER BY w.id;

-- name: replay_workflow
SELECT w.id, w.name, w.status, w.broken_reason, w.broken_since_event_id,
       v.id AS version_id, v.entity_type
  FROM crmflow.workflows AS w
  JOIN crmflow.workflow_versions AS v ON v.workflow_id = w.id AND v.version = w.current_version
 WHERE w.id = %(id)s
   FOR NO KEY UPDATE OF w;

-- name: replay_wait_for_matchers
-- Events of the entity still pending: wait for matchers that hold them (a batch with a
-- plan from before the workflow compiled again), so the replay then sees them processed.
-- The ones nobody holds are matched by the matchers with the new plan after this commits.
SELECT count(*) AS n FROM (
    SELECT id FROM crmflow.outbox
     WHERE id >= %(since)s AND processed_at IS NULL
       AND (entity_type = %(entity_type)s OR (%(entity_type)s::text IS NULL AND op = 'event'))
       FOR UPDATE) AS held;

-- name: replay_event_ids
-- The next chunk of events the workflow may have missed: processed, of its entity
-- (custom events of any entity for a workflow on custom events without one).
SELECT array_agg(id ORDER BY id) AS ids FROM (
    SELECT id FROM crmflow.outbox
     WHERE id >= %(after)s AND processed_at IS NOT NULL
       AND (entity_type = %(entity_type)s OR (%(entity_type)s::text IS NULL AND op = 'event'))
     ORDER BY id
     LIMIT %(limit)s) AS chunk;

-- name: replay_done
UPDATE crmflow.workflows SET broken_since_event_id = NULL WHERE id = %(id)s;

-- name: current_row_case
-- The entity's row now, as JSON, for one entity type: one WHEN of the CASE that
-- match_and_enroll selects as current_row.
WHEN {entity_type} THEN (SELECT to_jsonb(t) FROM jsonb_populate_record(NULL::{table}, x.entity_pk) AS p
                          JOIN {table} AS t ON {pk_match})

-- name: record_inline
-- The step rows of executions run inline, and the executions' state: those whose steps
-- all ran are completed; the others keep "pending" (with their start time) until
-- their job runs the rest.
WITH steps AS (
    INSERT INTO crmflow.execution_steps
           (execution_id, step_id, position, type, status, attempts, started_at, finished_at,
            result)
    SELECT * FROM unnest(%(execution_ids)s::bigint[], %(step_ids)s::text[],
                         %(positions)s::int[], %(types)s::text[], %(statuses)s::text[],
                         %(attempts)s::int[], %(started)s::timestamptz[],
                         %(finished)s::timestamptz[], %(results)s::jsonb[])
)
UPDATE crmflow.executions AS x
   SET status = u.status, started_at = clock_timestamp(),
       finished_at = CASE WHEN u.status = 'completed' THEN clock_timestamp() END,
       first_action_at = u.first_action_at,
       active_seconds = CASE WHEN u.status = 'completed' THEN u.active_seconds END
  FROM unnest(%(ids)s::bigint[], %(execution_statuses)s::text[],
              %(first_actions)s::timestamptz[], %(actives)s::float8[])
       AS u(id, status, first_action_at, active_seconds)
 WHERE x.id = u.id;

-- name: mark_processed
-- Events that matched nothing (no active workflow), or whose matching failed.
UPDATE crmflow.outbox
   SET processed_at = clock_timestamp(), matched = 0, match_error = %(error)s
 WHERE id = ANY(%(ids)s);

-- name: set_listening
-- Without waiting for the row (see claim_events): if it is taken, writers go on not
-- notifying and the poll finds their events.
UPDATE crmflow.matcher_state AS s SET listening = %(listening)s
  FROM (SELECT singleton FROM crmflow.matcher_state
         WHERE listening <> %(listening)s
           FOR NO KEY UPDATE SKIP LOCKED) AS free
 WHERE s.singleton = free.singleton;

-- name: refresh_statistics
-- After a burst the planner still believes the queue tables are nearly empty, and picks
-- plans that visit every queued row (procrastinate's fetch went from 0.2 ms to 70 ms
-- per job on a 2,000-job backlog). The matcher refreshes them itself after pushing a few
-- thousand rows through; ANALYZE samples, so it costs milliseconds.
ANALYZE crmflow.outbox, crmflow.executions, crmflow.execution_steps, crmflow.execution_queue,
        procrastinate_jobs;

-- name: may_refresh_statistics
-- ANALYZE needs the tables' ownership (PostgreSQL 15; 17 adds a MAINTAIN privilege): a
-- least-privilege runtime role is not the owner, and PostgreSQL would only warn and
-- skip. Asked once per matcher, so such a role skips the refresh quietly.
SELECT coalesce(bool_and(pg_has_role(current_user, c.relowner, 'USAGE')), false) AS allowed
  FROM pg_class AS c
 WHERE c.oid IN ('crmflow.outbox'::regclass, 'crmflow.executions'::regclass,
                 'crmflow.execution_steps'::regclass, 'crmflow.execution_queue'::regclass,
                 'procrastinate_jobs'::regclass);

-- name: queue_for_environments
-- Events of this batch that active workflows of other environments watch, queued for
-- those environments' matchers (migration 0025); they are woken by a hint.
WITH queued AS (
    INSERT INTO crmflow.environment_events (environment, event_id)
    SELECT DISTINCT t.environment, o.id
      FROM crmflow.outbox AS o
      JOIN unnest(%(environments)s::text[], %(entity_types)s::text[]) AS t(environment, entity_type)
        ON o.entity_type = t.entity_type OR (t.entity_type IS NULL AND o.op = 'event')
     WHERE o.id = ANY(%(ids)s)
    ON CONFLICT DO NOTHING
    RETURNING 1
)
SELECT count(*) AS queued,
       CASE WHEN count(*) > 0 THEN pg_notify('crmflow_outbox', '') END AS hinted
  FROM queued;

-- name: claim_environment_events
-- The events queued for this environment's workflows, oldest first; each taken by one
-- matcher of the environment (SKIP LOCKED), deleted when matched (environment_processed).
-- As claim_events: an event whose entity has an earlier queued event that another
-- matcher of the environment holds stays for the next round (one entity's events enroll
-- in capture order). An event pruned from the outbox since is taken (and dropped).
WITH candidates AS MATERIALIZED (
    SELECT q.event_id
      FROM crmflow.environment_events AS q
     WHERE q.environment = %(environment)s
     ORDER BY q.event_id
     LIMIT %(batch_size)s
       FOR UPDATE SKIP LOCKED
), held_elsewhere AS MATERIALIZED (
    SELECT o.entity_type, o.pk, o.id
      FROM crmflow.environment_events AS q
      JOIN crmflow.outbox AS o ON o.id = q.event_id
     WHERE q.environment = %(environment)s
       AND q.event_id < (SELECT max(event_id) FROM candidates)
       AND q.event_id NOT IN (SELECT event_id FROM candidates)
)
SELECT (SELECT generation FROM crmflow.matcher_state) AS generation,
       ARRAY(SELECT c.event_id
               FROM candidates AS c
               LEFT JOIN crmflow.outbox AS o ON o.id = c.event_id
              WHERE o.pk IS NULL
                 OR NOT EXISTS (
                      SELECT 1 FROM held_elsewhere AS earlier
                       WHERE earlier.entity_type = o.entity_type AND earlier.pk = o.pk
                         AND earlier.id < c.event_id)
              ORDER BY c.event_id) AS ids;

-- name: environment_processed
-- match_and_enroll's last step for events queued for an environment: off the queue
-- (by id: an event that retention has pruned from the outbox since goes too).
DELETE FROM crmflow.environment_events AS q
 WHERE q.environment = %(environment)s AND q.event_id = ANY(%(ids)s)

-- name: environment_event_failed
-- An event queued for this environment whose matching fails alone: off the queue, its
-- error kept on the outbox row (as a poisoned event's, with the environment named).
WITH dropped AS (
    DELETE FROM crmflow.environment_events
     WHERE environment = %(environment)s AND event_id = %(id)s
)
UPDATE crmflow.outbox
   SET match_error = left(concat_ws('; ', match_error,
                                    format('environment %%s: %%s', %(environment)s::text, %(error)s::text)), 4000)
 WHERE id = %(id)s;

-- name: drop_environment_events
-- Queued events of an environment whose matcher has no workflow for them any more.
DELETE FROM crmflow.environment_events
 WHERE environment = %(environment)s AND event_id = ANY(%(ids)s);
