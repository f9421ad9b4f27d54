-- The careful path's SQL: one execution at a time (engine/executor/runner.py, flow.py,
-- compensation.py). The batch loop's is in executor.sql.

-- name: load_execution
SELECT x.*, v.definition, v.limits,
       crmflow.execution_lock(x.entity_type, x.entity_pk, x.id) AS lock,
       ev.op AS event_op, ev.new_row AS event_new_row, ev.old_row AS event_old_row,
       coalesce(ev.changed, crmflow.changed_columns(ev.new_row, ev.old_row)) AS event_changed, ev.event_name, ev.payload AS event_payload,
       w.name AS workflow_name
  FROM crmflow.executions AS x
  JOIN crmflow.workflow_versions AS v ON v.id = x.workflow_version_id
  JOIN crmflow.workflows AS w ON w.id = x.workflow_id
  LEFT JOIN crmflow.outbox AS ev ON ev.id = x.event_id
 WHERE x.id = %(id)s;

-- name: lock_workflow_starts
-- Serialises the flow-control checks of one workflow's starts (rate, concurrency).
SELECT pg_advisory_xact_lock(hashtextextended('crmflow:workflow:' || %(workflow_id)s::text, 0));

-- name: lock_execution
SELECT status, not_before FROM crmflow.executions WHERE id = %(id)s FOR UPDATE;

-- name: started_last_minute
-- Starts in the sliding minute, and when the oldest of them leaves it.
SELECT count(*) AS n, min(started_at) + interval '1 minute' AS frees_at
  FROM crmflow.executions
 WHERE workflow_id = %(workflow_id)s AND started_at > clock_timestamp() - interval '1 minute'
   AND flow_key IS NOT DISTINCT FROM %(key)s::text AND id <> %(id)s;

-- name: running_count
SELECT count(*) AS n FROM crmflow.executions
 WHERE workflow_id = %(workflow_id)s AND status = 'running'
   AND flow_key IS NOT DISTINCT FROM %(key)s::text AND id <> %(id)s;

-- name: set_flow_key
UPDATE crmflow.executions SET flow_key = %(key)s WHERE id = %(id)s;

-- name: start_execution
UPDATE crmflow.executions
   SET status = 'running', started_at = coalesce(started_at, clock_timestamp()), not_before = NULL
 WHERE id = %(id)s AND status IN ('pending', 'waiting', 'running')
RETURNING started_at;

-- name: ensure_steps
INSERT INTO crmflow.execution_steps (execution_id, step_id, position, type)
SELECT %(id)s, s.step_id, s.position, s.type
  FROM unnest(%(step_ids)s::text[], %(types)s::text[]) WITH ORDINALITY AS s(step_id, type, position)
ON CONFLICT (execution_id, step_id) DO NOTHING;

-- name: load_steps
SELECT step_id, type, status, attempts, scheduled_at, started_at, finished_at, result, error
  FROM crmflow.execution_steps
 WHERE execution_id = %(id)s
 ORDER BY position;

-- name: lock_step
SELECT s.status, s.attempts, s.result, x.status AS execution_status
  FROM crmflow.execution_steps AS s
  JOIN crmflow.executions AS x ON x.id = s.execution_id
 WHERE s.execution_id = %(id)s AND s.step_id = %(step_id)s
   FOR UPDATE OF s, x;

-- name: step_running
UPDATE crmflow.execution_steps
   SET status = 'running', attempts = attempts + 1,
       started_at = coalesce(started_at, clock_timestamp()), error = NULL
 WHERE execution_id = %(id)s AND step_id = %(step_id)s
RETURNING attempts;

-- name: step_succeeded
-- The execution remembers when its first action succeeded (event -> first action).
WITH step AS (
    UPDATE crmflow.execution_steps
       SET status = 'succeeded', error = NULL,
           -- a business-hours window's note stays (engine/windows.py)
           result = CASE WHEN result ? 'window' AND jsonb_typeof(%(result)s::jsonb) = 'object'
                         THEN jsonb_build_object('window', result -> 'window') || %(result)s
                         ELSE %(result)s END,
           finished_at = clock_timestamp()
     WHERE execution_id = %(id)s AND step_id = %(step_id)s
    RETURNING finished_at
)
UPDATE crmflow.executions
   SET first_action_at = coalesce(first_action_at, (SELECT finished_at FROM step))
 WHERE id = %(id)s;

-- name: step_skipped
UPDATE crmflow.execution_steps
   SET status = 'skipped', finished_at = clock_timestamp(),
       result = CASE WHEN result ? 'window' AND jsonb_typeof(%(result)s::jsonb) = 'object'
                     THEN jsonb_build_object('window', result -> 'window') || %(result)s
                     ELSE %(result)s END
 WHERE execution_id = %(id)s AND step_id = %(step_id)s;

-- name: step_attempt_failed
-- A failed attempt: status 'scheduled' when another attempt follows, 'failed' otherwise.
UPDATE crmflow.execution_steps
   SET status = %(status)s, error = %(error)s, scheduled_at = %(retry_at)s,
       finished_at = CASE WHEN %(status)s = 'failed' THEN clock_timestamp() END
 WHERE execution_id = %(id)s AND step_id = %(step_id)s
RETURNING attempts;

-- name: step_scheduled
UPDATE crmflow.execution_steps
   SET status = 'scheduled', scheduled_at = %(scheduled_at)s
 WHERE execution_id = %(id)s AND step_id = %(step_id)s AND status = 'pending';

-- name: step_held
-- An external step whose host's circuit breaker is open waits for it (engine/breakers.py).
UPDATE crmflow.execution_steps
   SET status = 'scheduled', scheduled_at = %(scheduled_at)s,
       error = 'waiting: the circuit breaker of its host is open'
 WHERE execution_id = %(id)s AND step_id = %(step_id)s
   AND status IN ('pending', 'scheduled', 'running');

-- name: step_compensated
UPDATE crmflow.execution_steps
   SET status = 'compensated', error = %(error)s
 WHERE execution_id = %(id)s AND step_id = %(step_id)s;

-- name: set_execution_status
UPDATE crmflow.executions
   SET status = %(status)s,
       error = coalesce(%(error)s, error),
       finished_at = CASE WHEN %(status)s IN ('completed', 'failed', 'cancelled', 'skipped')
                          THEN clock_timestamp() END,
       -- how long its steps ran, without the waits (for the reports)
       active_seconds = CASE WHEN %(status)s IN ('completed', 'failed', 'cancelled', 'skipped')
                             THEN (SELECT sum(extract(epoch FROM s.finished_at - s.started_at))
                                     FROM crmflow.execution_steps AS s
                                    WHERE s.execution_id = %(id)s) END,
       not_before = %(not_before)s
 WHERE id = %(id)s AND status IN ('pending', 'running', 'waiting')
RETURNING id;

-- name: evaluate
SELECT {predicate} AS ok
  FROM jsonb_populate_record(NULL::{table}, %(row)s::jsonb) AS n
 CROSS JOIN (SELECT %(steps)s::jsonb AS steps) AS s;

-- name: evaluate_no_entity
SELECT {predicate} AS ok FROM (SELECT %(steps)s::jsonb AS steps) AS s;

-- name: moment_of_field
SELECT CAST(n.{field} AS timestamptz) + make_interval(secs => %(offset)s) AS at
  FROM jsonb_populate_record(NULL::{table}, %(row)s::jsonb) AS n;

-- name: set_write_context
-- Writes made by an action carry the execution's depth and say who made them, signed
-- for this transaction (sql/install/capture.sql: capture trusts only a signed context).
SELECT crmflow.set_write_context(%(depth)s::integer, %(actor)s);

-- name: cancel_execution
UPDATE crmflow.executions
   SET status = 'cancelled', finished_at = clock_timestamp(),
       error = coalesce(%(reason)s, 'cancelled')
 WHERE id = %(id)s AND status IN ('pending', 'running', 'waiting')
RETURNING id;

-- name: replay_execution
-- Replay from the failed step: failed steps go back to pending (history of the
-- earlier run stays in the error until the new attempt), the execution to pending.
-- Lifecycle hits kept for the failed run (crmflow.watch_hits) are dropped: they were
-- about the entity then, and the replay checks the goal and exit before each step.
WITH dropped_hits AS (
    DELETE FROM crmflow.watch_hits
     WHERE execution_id = %(id)s
       AND EXISTS (SELECT 1 FROM crmflow.executions WHERE id = %(id)s AND status = 'failed')
), reset AS (
    UPDATE crmflow.execution_steps
       SET status = 'pending', scheduled_at = NULL, finished_at = NULL, attempts = 0,
           error = 'replayed after: ' || coalesce(error, 'failure')
     WHERE execution_id = %(id)s AND status = 'failed'
    RETURNING step_id
)
UPDATE crmflow.executions
   SET status = 'pending', finished_at = NULL, error = NULL, replays = replays + 1
 WHERE id = %(id)s AND status = 'failed'
RETURNING id, entity_type, entity_pk, (SELECT count(*) FROM reset) AS steps_reset;

-- name: register_worker
INSERT INTO crmflow.workers (hostname, pid) VALUES (%(hostname)s, %(pid)s) RETURNING id;

-- name: heartbeat
UPDATE crmflow.workers SET last_heartbeat = now() WHERE id = %(id)s;

-- name: worker_stopped
UPDATE crmflow.workers SET stopped_at = now(), last_heartbeat = now() WHERE id = %(id)s;

-- name: doing_jobs_of_workers
-- Jobs procrastinate holds as running for these workers (engine/worker.py, orphans).
SELECT id FROM procrastinate_jobs WHERE status = 'doing' AND worker_id = ANY(%(worker_ids)s);
