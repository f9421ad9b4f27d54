-- The scheduler's SQL (engine/scheduler.py): scheduled (cron) and date-relative
-- workflows enroll the rows their conditions select, once per tick.

-- name: active_timed_workflows
SELECT w.id AS workflow_id, v.id AS version_id, v.version, v.entity_type, v.trigger_type,
       v.definition, s.workflow_version_id AS scheduled_version
  FROM crmflow.workflows AS w
  JOIN crmflow.workflow_versions AS v ON v.workflow_id = w.id AND v.version = w.current_version
  LEFT JOIN crmflow.schedules AS s ON s.workflow_id = w.id
 WHERE w.status = 'active' AND v.trigger_type IN ('scheduled', 'date_relative');

-- name: upsert_schedule
INSERT INTO crmflow.schedules (workflow_id, workflow_version_id, next_run_at)
VALUES (%(workflow_id)s, %(version_id)s, %(next_run_at)s)
ON CONFLICT (workflow_id) DO UPDATE
   SET workflow_version_id = EXCLUDED.workflow_version_id, next_run_at = EXCLUDED.next_run_at;

-- name: drop_inactive_schedules
DELETE FROM crmflow.schedules AS s
 WHERE NOT EXISTS (
        SELECT 1 FROM crmflow.workflows AS w
          JOIN crmflow.workflow_versions AS v
            ON v.workflow_id = w.id AND v.version = w.current_version
         WHERE w.id = s.workflow_id AND w.status = 'active'
           AND v.trigger_type IN ('scheduled', 'date_relative'));

-- name: claim_due_schedules
-- Due ticks, each taken by one worker: SKIP LOCKED lets the others move on.
SELECT s.workflow_id, s.next_run_at, v.id AS version_id, v.version, v.entity_type,
       v.trigger_type, v.definition, v.predicate, v.priority, v.limits
  FROM crmflow.schedules AS s
  JOIN crmflow.workflow_versions AS v ON v.id = s.workflow_version_id
 WHERE s.next_run_at <= clock_timestamp()
   -- Each environment's workers run its workflows' ticks (CRMFLOW_ENVIRONMENT).
   AND coalesce(v.definition ->> 'environment', 'production') = %(environment)s
 ORDER BY s.next_run_at
 LIMIT 20
   FOR UPDATE OF s SKIP LOCKED;

-- name: schedule_ran
UPDATE crmflow.schedules
   SET next_run_at = %(next_run_at)s, last_run_at = clock_timestamp(), last_enrolled = %(enrolled)s
 WHERE workflow_id = %(workflow_id)s;

-- name: enroll_rows
-- Rows of the entity's table that match, enrolled under a key that makes this tick
-- (or this date value) enroll each row once, however many workers try.
WITH enrolled AS (
    INSERT INTO crmflow.executions
           (workflow_id, workflow_version_id, workflow_version, enrollment_key, entity_type,
            entity_pk, priority, depth, input, triggered_at)
    SELECT %(workflow_id)s, %(version_id)s, %(version)s, {key}, %(entity_type)s, {pk},
           %(priority)s, 0, %(input)s, %(triggered_at)s
      FROM {table} AS n
     WHERE {predicate} AND {extra}
     ORDER BY {pk_order}
    ON CONFLICT (workflow_version_id, enrollment_key) DO NOTHING
    RETURNING id, entity_type, entity_pk
), queued AS (
    INSERT INTO crmflow.execution_queue (execution_id, priority, entity_key)
    SELECT x.id, %(priority)s, crmflow.execution_lock(x.entity_type, x.entity_pk, x.id)
      FROM enrolled AS x ORDER BY x.id
    RETURNING run_at
), deferred AS (
    SELECT count(*) AS n,
           crmflow.wake_executor(%(queue)s, array_agg(DISTINCT run_at)) AS woken
      FROM queued
)
SELECT (SELECT count(*) FROM enrolled) AS enrolled,
       (SELECT n FROM deferred) AS deferred,
       (SELECT array_agg(id ORDER BY id) FROM enrolled) AS execution_ids;

-- name: enroll_nothing
-- A scheduled or manual workflow about no entity: one execution per tick or run.
-- The final SELECT must read "deferred": a plain SELECT CTE that nobody reads is never
-- evaluated, so its job would never be deferred (the execution stuck in `pending`).
WITH enrolled AS (
    INSERT INTO crmflow.executions
           (workflow_id, workflow_version_id, workflow_version, enrollment_key, priority,
            depth, input, triggered_at)
    VALUES (%(workflow_id)s, %(version_id)s, %(version)s, %(key)s, %(priority)s, 0, %(input)s,
            %(triggered_at)s)
    ON CONFLICT (workflow_version_id, enrollment_key) DO NOTHING
    RETURNING id, entity_type, entity_pk
), queued AS (
    INSERT INTO crmflow.execution_queue (execution_id, priority, entity_key)
    SELECT x.id, %(priority)s, crmflow.execution_lock(x.entity_type, x.entity_pk, x.id)
      FROM enrolled AS x ORDER BY x.id
    RETURNING run_at
), deferred AS (
    SELECT count(*) AS n,
           crmflow.wake_executor(%(queue)s, array_agg(DISTINCT run_at)) AS woken
      FROM queued
)
SELECT (SELECT count(*) FROM enrolled) AS enrolled,
       (SELECT n FROM deferred) AS deferred,
       (SELECT array_agg(id) FROM enrolled) AS execution_ids;

-- name: workflow_for_run
SELECT w.id AS workflow_id, w.status, v.id AS version_id, v.version, v.entity_type,
       v.trigger_type, v.definition, v.predicate, v.priority, v.limits
  FROM crmflow.workflows AS w
  JOIN crmflow.workflow_versions AS v ON v.workflow_id = w.id AND v.version = w.current_version
 WHERE w.id = %(id)s;
