-- Retention: delete old history in small batches (engine/retention.py). Each batch is
-- its own short transaction; rows another transaction holds are skipped (SKIP LOCKED),
-- not waited for, so a prune never blocks the matcher or the step runner.

-- name: cutoff
-- One cutoff for the whole run, from the database's clock.
SELECT now() - make_interval(secs => %(older_than)s) AS cutoff;

-- name: prune_outbox_batch
-- Processed events only. An event stays while an execution it enrolled is live or
-- failed: the step runner and a retry read the event (templates' event.*). Those
-- executions are few and indexed by status; one hashed list per batch, not a lookup
-- per event (and no index on executions.event_id for every enrollment to maintain).
WITH kept AS (
    SELECT x.event_id FROM crmflow.executions AS x
     WHERE x.status IN ('pending', 'running', 'waiting') AND x.event_id IS NOT NULL
    UNION ALL
    SELECT x.event_id FROM crmflow.executions AS x
     WHERE x.status = 'failed' AND x.event_id IS NOT NULL
), doomed AS (
    SELECT o.id
      FROM crmflow.outbox AS o
     WHERE o.processed_at < %(cutoff)s
       AND o.id NOT IN (SELECT event_id FROM kept)
     ORDER BY o.processed_at
     LIMIT %(batch_size)s
       FOR UPDATE OF o SKIP LOCKED
)
DELETE FROM crmflow.outbox WHERE id IN (SELECT id FROM doomed);

-- name: count_prunable_outbox
WITH kept AS (
    SELECT x.event_id FROM crmflow.executions AS x
     WHERE x.status IN ('pending', 'running', 'waiting') AND x.event_id IS NOT NULL
    UNION ALL
    SELECT x.event_id FROM crmflow.executions AS x
     WHERE x.status = 'failed' AND x.event_id IS NOT NULL
)
SELECT count(*) AS n
  FROM crmflow.outbox AS o
 WHERE o.processed_at < %(cutoff)s
   AND o.id NOT IN (SELECT event_id FROM kept);

-- name: prune_executions_batch
-- Finished executions; their steps go with them (ON DELETE CASCADE). The steps are
-- counted from the statement's snapshot, which still sees them.
WITH doomed AS (
    SELECT x.id
      FROM crmflow.executions AS x
     WHERE x.finished_at < %(cutoff)s
       AND x.status IN ('completed', 'failed', 'cancelled', 'skipped')
     ORDER BY x.finished_at
     LIMIT %(batch_size)s
       FOR UPDATE SKIP LOCKED
), gone AS (
    DELETE FROM crmflow.executions WHERE id IN (SELECT id FROM doomed) RETURNING id
)
SELECT (SELECT count(*) FROM gone) AS executions,
       (SELECT count(*) FROM crmflow.execution_steps
         WHERE execution_id IN (SELECT id FROM gone)) AS steps;

-- name: count_prunable_executions
SELECT count(*) AS executions,
       (SELECT count(*) FROM crmflow.execution_steps AS s
          JOIN crmflow.executions AS x ON x.id = s.execution_id
         WHERE x.finished_at < %(cutoff)s
           AND x.status IN ('completed', 'failed', 'cancelled', 'skipped')) AS steps
  FROM crmflow.executions AS x
 WHERE x.finished_at < %(cutoff)s
   AND x.status IN ('completed', 'failed', 'cancelled', 'skipped');

-- name: prune_jobs_batch
-- procrastinate's finished jobs (the worker deletes successful ones itself; failed and
-- cancelled ones stay), finished before the cutoff: their last event is older. Their
-- events go with them (ON DELETE CASCADE).
WITH doomed AS (
    SELECT j.id
      FROM procrastinate_jobs AS j
     WHERE j.status::text IN ('succeeded', 'failed', 'cancelled', 'aborted')
       AND NOT EXISTS (
           SELECT 1 FROM procrastinate_events AS e
            WHERE e.job_id = j.id AND e.at >= %(cutoff)s)
     ORDER BY j.id
     LIMIT %(batch_size)s
       FOR UPDATE SKIP LOCKED
)
DELETE FROM procrastinate_jobs WHERE id IN (SELECT id FROM doomed);

-- name: count_prunable_jobs
SELECT count(*) AS n
  FROM procrastinate_jobs AS j
 WHERE j.status::text IN ('succeeded', 'failed', 'cancelled', 'aborted')
   AND NOT EXISTS (
       SELECT 1 FROM procrastinate_events AS e
        WHERE e.job_id = j.id AND e.at >= %(cutoff)s);

-- name: lock_retention
-- One worker applies automatic retention at a time; a session lock, because the run
-- spans many transactions.
SELECT pg_try_advisory_lock(hashtextextended('crmflow:retention', 0)) AS mine;

-- name: unlock_retention
SELECT pg_advisory_unlock(hashtextextended('crmflow:retention', 0)) AS released;
