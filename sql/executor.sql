-- The step executor's SQL (engine/executor/): its queue, its batch loads and its
-- batch records. See migrations/0019_execution_queue.sql for the queue's columns.

-- name: enqueue_executions
-- Executions that have work to do, in the queue: due now (or at their start time),
-- keeping their entity's order unless they start later. Already queued: the earlier time.
WITH queued AS (
    INSERT INTO crmflow.execution_queue AS q (execution_id, run_at, priority, entity_key, ordered)
    SELECT x.id, coalesce(x.not_before, clock_timestamp()), x.priority,
           crmflow.execution_lock(x.entity_type, x.entity_pk, x.id), x.not_before IS NULL
      FROM crmflow.executions AS x
     WHERE x.id = ANY(%(ids)s)
     ORDER BY x.id
    ON CONFLICT (execution_id) DO UPDATE
       SET run_at = least(q.run_at, excluded.run_at), ordered = q.ordered OR excluded.ordered
    RETURNING q.run_at
)
SELECT crmflow.wake_executor(%(queue)s, array_agg(DISTINCT run_at)) AS woken FROM queued;

-- name: claim
SELECT execution_id, entity_key, taken_over
  FROM crmflow.claim_executions(%(worker)s, %(limit)s, %(lease)s);

-- name: load_batch
-- The claimed executions with what a step needs: the event, the workflow's name, and the
-- steps recorded so far (as JSON, in position order). Versions are loaded apart, once
-- per process (load_versions): they never change.
SELECT x.*, w.name AS workflow_name,
       ev.op AS event_op, ev.new_row AS event_new_row, ev.old_row AS event_old_row,
       coalesce(ev.changed, crmflow.changed_columns(ev.new_row, ev.old_row)) AS event_changed,
       ev.event_name, ev.payload AS event_payload,
       (SELECT coalesce(jsonb_agg(jsonb_build_object(
                   'step_id', s.step_id, 'type', s.type, 'status', s.status,
                   'attempts', s.attempts, 'scheduled_at', s.scheduled_at,
                   'started_at', s.started_at, 'finished_at', s.finished_at,
                   'result', s.result, 'error', s.error) ORDER BY s.position), '[]'::jsonb)
          FROM crmflow.execution_steps AS s WHERE s.execution_id = x.id) AS steps
  FROM crmflow.executions AS x
  JOIN crmflow.workflows AS w ON w.id = x.workflow_id
  LEFT JOIN crmflow.outbox AS ev ON ev.id = x.event_id
 WHERE x.id = ANY(%(ids)s)
 ORDER BY x.id;

-- name: load_versions
SELECT id, definition, limits FROM crmflow.workflow_versions WHERE id = ANY(%(ids)s);

-- name: start_executions
-- Executions without start-time limits start together: running, with their step rows.
WITH started AS (
    UPDATE crmflow.executions
       SET status = 'running', started_at = coalesce(started_at, clock_timestamp()),
           not_before = NULL
     WHERE id = ANY(%(ids)s) AND status IN ('pending', 'waiting', 'running')
    RETURNING id
)
INSERT INTO crmflow.execution_steps (execution_id, step_id, position, type)
SELECT s.execution_id, s.step_id, s.position, s.type
  FROM unnest(%(execution_ids)s::bigint[], %(step_ids)s::text[], %(positions)s::int[],
              %(types)s::text[]) AS s(execution_id, step_id, position, type)
  JOIN started ON started.id = s.execution_id
ON CONFLICT (execution_id, step_id) DO NOTHING;

-- name: lock_steps
-- The step rows a batch is about to run, locked in key order (a fixed order: two
-- workers never deadlock on them), with their execution's status.
SELECT s.execution_id, s.step_id, s.status, s.attempts, x.status AS execution_status
  FROM crmflow.execution_steps AS s
  JOIN crmflow.executions AS x ON x.id = s.execution_id
  JOIN unnest(%(execution_ids)s::bigint[], %(step_ids)s::text[]) AS k(execution_id, step_id)
    ON k.execution_id = s.execution_id AND k.step_id = s.step_id
 ORDER BY s.execution_id, s.step_id
   FOR UPDATE OF s, x;

-- name: steps_running
-- Attempts begin: one statement for the batch; returns each attempt's number.
UPDATE crmflow.execution_steps AS s
   SET status = 'running', attempts = s.attempts + 1,
       started_at = coalesce(s.started_at, clock_timestamp()), error = NULL
  FROM unnest(%(execution_ids)s::bigint[], %(step_ids)s::text[]) AS k(execution_id, step_id)
 WHERE s.execution_id = k.execution_id AND s.step_id = k.step_id
RETURNING s.execution_id, s.step_id, s.attempts;

-- name: steps_finished
-- The outcomes of a batch of attempts: succeeded or skipped (with a result), failed for
-- good, or scheduled again (a retry at retry_at). Executions remember their first action.
WITH outcome AS (
    SELECT * FROM unnest(%(execution_ids)s::bigint[], %(step_ids)s::text[],
                         %(statuses)s::text[], %(results)s::jsonb[], %(errors)s::text[],
                         %(retry_ats)s::timestamptz[])
           AS o(execution_id, step_id, status, result, error, retry_at)
), steps AS (
    -- held: the target's circuit breaker is open; the step waits for it (retry_at), the
    -- attempt it had begun is given back
    UPDATE crmflow.execution_steps AS s
       SET status = CASE WHEN o.status = 'held' THEN 'scheduled' ELSE o.status END,
           attempts = CASE WHEN o.status = 'held' THEN greatest(s.attempts - 1, 0)
                           ELSE s.attempts END,
           result = CASE WHEN o.status NOT IN ('succeeded', 'skipped') THEN s.result
                         -- a business-hours window's note stays (engine/windows.py)
                         WHEN s.result ? 'window' AND jsonb_typeof(o.result) = 'object'
                         THEN jsonb_build_object('window', s.result -> 'window') || o.result
                         ELSE o.result END,
           error = o.error,
           -- a retry's time; otherwise the due time it had stays (delays are reported)
           scheduled_at = CASE WHEN o.status IN ('scheduled', 'held') THEN o.retry_at
                               ELSE s.scheduled_at END,
           finished_at = CASE WHEN o.status IN ('scheduled', 'held') THEN NULL
                              ELSE coalesce(%(finished_at)s, clock_timestamp()) END
      FROM outcome AS o
     WHERE s.execution_id = o.execution_id AND s.step_id = o.step_id
    RETURNING s.execution_id, s.status, s.finished_at
)
UPDATE crmflow.executions AS x
   SET first_action_at = coalesce(x.first_action_at, f.at)
  FROM (SELECT execution_id, min(finished_at) AS at FROM steps
         WHERE status = 'succeeded' GROUP BY execution_id) AS f
 WHERE x.id = f.execution_id;

-- name: steps_scheduled
-- Delayed steps: due at the moment given (counted from when the step became ready).
UPDATE crmflow.execution_steps AS s
   SET status = 'scheduled', scheduled_at = k.at
  FROM unnest(%(execution_ids)s::bigint[], %(step_ids)s::text[], %(ats)s::timestamptz[])
       AS k(execution_id, step_id, at)
 WHERE s.execution_id = k.execution_id AND s.step_id = k.step_id AND s.status = 'pending';

-- name: steps_deferred
-- Steps due outside their business-hours window (engine/windows.py): scheduled at the
-- next opening, the result saying until when and in which zone (and any fallback). A
-- NULL at: the window is open, only the note (a fallback zone) is written.
UPDATE crmflow.execution_steps AS s
   SET status = CASE WHEN k.at IS NULL THEN s.status ELSE 'scheduled' END,
       scheduled_at = coalesce(k.at, s.scheduled_at), result = k.note
  FROM unnest(%(execution_ids)s::bigint[], %(step_ids)s::text[], %(ats)s::timestamptz[],
              %(notes)s::jsonb[]) AS k(execution_id, step_id, at, note)
 WHERE s.execution_id = k.execution_id AND s.step_id = k.step_id
   AND s.status IN ('pending', 'scheduled');

-- name: executions_finished
-- Executions whose steps are all done: completed (or failed), with their active time.
UPDATE crmflow.executions AS x
   SET status = k.status, error = coalesce(k.error, x.error), finished_at = clock_timestamp(),
       not_before = NULL,
       active_seconds = (SELECT sum(extract(epoch FROM s.finished_at - s.started_at))
                           FROM crmflow.execution_steps AS s WHERE s.execution_id = x.id)
  FROM unnest(%(ids)s::bigint[], %(statuses)s::text[], %(errors)s::text[]) AS k(id, status, error)
 WHERE x.id = k.id AND x.status IN ('pending', 'running', 'waiting');

-- name: executions_waiting
UPDATE crmflow.executions SET status = 'waiting'
 WHERE id = ANY(%(ids)s) AND status IN ('pending', 'running');

-- name: settle
-- The end of a batch, for every execution it claimed: gone from the queue (finished, or
-- nothing to wake it), or due again at run_at (ordered: it keeps its entity's order).
-- Only rows this worker still leases: one whose lease ran out belongs to its new worker.
WITH k AS (
    SELECT * FROM unnest(%(ids)s::bigint[], %(run_ats)s::timestamptz[], %(ordered)s::boolean[])
           AS k(id, run_at, ordered)
), gone AS (
    DELETE FROM crmflow.execution_queue AS q USING k
     WHERE q.execution_id = k.id AND k.run_at IS NULL AND q.leased_by = %(worker)s
), again AS (
    UPDATE crmflow.execution_queue AS q
       SET run_at = k.run_at, ordered = k.ordered, leased_by = NULL, leased_until = NULL
      FROM k
     WHERE q.execution_id = k.id AND k.run_at IS NOT NULL AND q.leased_by = %(worker)s
    RETURNING q.run_at
)
SELECT crmflow.wake_executor(%(queue)s, array_agg(DISTINCT run_at)) AS woken FROM again;

-- name: renew_leases
UPDATE crmflow.execution_queue
   SET leased_until = clock_timestamp() + make_interval(secs => %(lease)s)
 WHERE execution_id = ANY(%(ids)s) AND leased_by = %(worker)s;

-- name: release_leases
UPDATE crmflow.execution_queue SET leased_by = NULL, leased_until = NULL
 WHERE execution_id = ANY(%(ids)s) AND leased_by = %(worker)s;

-- name: due_soon
-- When the next queued execution is due (for a drainer deciding whether to linger).
SELECT min(run_at) AS at FROM crmflow.execution_queue
 WHERE leased_until IS NULL OR leased_until < clock_timestamp();

-- name: unqueue
DELETE FROM crmflow.execution_queue WHERE execution_id = %(id)s;

-- name: next_wake
-- After the careful path ran executions one by one: when each is due again (NULL: out
-- of the queue), and whether it keeps its entity's order then (it has work now).
-- An execution with hits a lifecycle round kept (crmflow.watch_hits) is due now: the
-- round could not take it while this executor held it, and made it due, which the
-- settle that follows this would otherwise undo.
SELECT x.id,
       CASE WHEN x.status NOT IN ('pending', 'running', 'waiting') THEN NULL
            WHEN EXISTS (SELECT 1 FROM crmflow.watch_hits AS h WHERE h.execution_id = x.id)
                 THEN clock_timestamp()
            WHEN x.not_before > clock_timestamp() THEN x.not_before
            WHEN x.status = 'waiting' THEN coalesce(
                 (SELECT min(s.scheduled_at) FROM crmflow.execution_steps AS s
                   WHERE s.execution_id = x.id AND s.status = 'scheduled'), clock_timestamp())
            ELSE clock_timestamp() END AS run_at,
       x.status IN ('pending', 'running')
           AND NOT coalesce(x.not_before > clock_timestamp(), false) AS ordered
  FROM crmflow.executions AS x
 WHERE x.id = ANY(%(ids)s);

-- name: entity_rows
-- The entities of a batch as they are now ({row}: to_jsonb(t), or NULL when only which
-- rows exist matters; {lock}: FOR UPDATE OF t SKIP LOCKED for steps that write them, in
-- key order; a row another transaction holds is left out).
SELECT jsonb_build_object({pairs}) AS pk, {row} AS row
  FROM {table} AS t
 WHERE ({t_cols}) IN (SELECT {p_cols} FROM jsonb_populate_recordset(NULL::{table}, %(pks)s) AS p)
 ORDER BY {t_cols} {lock}

-- name: wake_kept_hits
-- The worker's sweep, before wake_due: executions with hits a lifecycle round kept
-- (crmflow.watch_hits) are due now. A round that kept a hit and committed after the
-- executor's last look at it (the executor then put its own timeout over the round's
-- "due now") would otherwise wait for a round with an event about the same execution,
-- or for the timeout. Rows a drainer holds are left to it (SKIP LOCKED: never waits).
WITH due AS (
    SELECT q.execution_id
      FROM crmflow.execution_queue AS q
     WHERE q.execution_id IN (SELECT h.execution_id FROM crmflow.watch_hits AS h)
       AND q.run_at > clock_timestamp()
       AND (q.leased_until IS NULL OR q.leased_until < clock_timestamp())
       FOR UPDATE SKIP LOCKED
)
UPDATE crmflow.execution_queue AS q SET run_at = clock_timestamp()
  FROM due WHERE q.execution_id = due.execution_id;

-- name: wake_due
-- The worker's sweep (every second): due work that no drainer is running gets a wake-up.
SELECT crmflow.wake_executor(%(queue)s, ARRAY[clock_timestamp()])
 WHERE EXISTS (SELECT 1 FROM crmflow.execution_queue
                WHERE run_at <= clock_timestamp()
                  AND (leased_until IS NULL OR leased_until < clock_timestamp()))
   AND NOT EXISTS (SELECT 1 FROM procrastinate_jobs
                    WHERE task_name = 'crmflow.run_steps' AND status IN ('todo', 'doing')
                      AND (scheduled_at IS NULL OR scheduled_at <= clock_timestamp()));

-- name: evaluate_batch
-- A step's "when" for a group of executions at once: each with its entity now (n) and
-- the results of its earlier steps (s.steps).
SELECT k.id, coalesce({predicate}, false) AS ok
  FROM unnest(%(ids)s::bigint[], %(rows)s::jsonb[], %(steps)s::jsonb[]) AS k(id, row, steps)
 CROSS JOIN LATERAL jsonb_populate_record(NULL::{table}, k.row) AS n
 CROSS JOIN LATERAL (SELECT k.steps AS steps) AS s;

-- name: evaluate_batch_no_entity
SELECT k.id, coalesce({predicate}, false) AS ok
  FROM unnest(%(ids)s::bigint[], %(steps)s::jsonb[]) AS k(id, steps)
 CROSS JOIN LATERAL (SELECT k.steps AS steps) AS s;

-- name: wake_held_back
-- Slots freed under max_concurrent (engine/executor/flow.py): per workflow, as many held-
-- back executions (queued for later with a not_before, not leased) as it has free slots
-- are due now.
WITH w AS (
    SELECT * FROM unnest(%(workflow_ids)s::bigint[], %(limits)s::int[]) AS w(id, lim)
), held AS (
    -- with limits.key, slots are per key: a held-back execution whose key has one free
    SELECT h.execution_id
      FROM w
     CROSS JOIN LATERAL (
           SELECT q.execution_id
             FROM crmflow.execution_queue AS q
             JOIN crmflow.executions AS x ON x.id = q.execution_id
            WHERE x.workflow_id = w.id AND x.not_before > clock_timestamp()
              AND x.status IN ('pending', 'waiting') AND q.leased_until IS NULL
              AND (SELECT count(*) FROM crmflow.executions AS r
                    WHERE r.workflow_id = w.id AND r.status = 'running'
                      AND r.flow_key IS NOT DISTINCT FROM x.flow_key) < w.lim
            ORDER BY q.priority DESC, q.execution_id
            LIMIT w.lim) AS h
), due AS (
    UPDATE crmflow.executions AS x SET not_before = NULL FROM held WHERE x.id = held.execution_id
)
UPDATE crmflow.execution_queue AS q
   SET run_at = clock_timestamp()
  FROM held
 WHERE q.execution_id = held.execution_id;

-- name: vacuum_queue
-- The queue's rows are updated a few times each (lease, settle) and deleted: its dead
-- rows are cleared every half minute (the table is small; milliseconds), whether or not
-- autovacuum runs. A role that does not own it is skipped by PostgreSQL with a warning.
VACUUM (ANALYZE) crmflow.execution_queue;
