-- Backfill (engine/backfill.py): enroll the rows of an event workflow's entity that
-- match it now. One batch per transaction, keyed by primary key (the next batch starts
-- after the last key seen). The rows are read, never locked: a CRM writer updating a row
-- of the batch goes on at once. Each row enrolls once per workflow, whatever its version
-- ('backfill:<pk>', unique per workflow: migration 0026).

-- name: backfill_chosen
-- The CTEs both statements share: a batch of rows in key order, whether each matches,
-- and the matching ones that may enroll: not enrolled by a backfill before, allowed by
-- the re-enrollment policy and by the workflow's suppression lists (tested on the row),
-- at most "room" of them (NULL: no limit). (No braces or placeholders in these
-- comments: they are format fields.)
scanned AS MATERIALIZED (
    SELECT {pk} AS pk, coalesce({predicate}, false) AS hit, {allowed} AS allowed,
           {pk_columns}
      FROM {table} AS n
     WHERE {after}
     ORDER BY {pk_order}
     LIMIT %(batch_size)s
), chosen AS (
    SELECT s.pk, 'backfill:' || s.pk::text AS enrollment_key
      FROM scanned AS s
     WHERE s.hit AND s.allowed
       -- A lookup per row (a scalar subquery is never made a join): an anti-join would
       -- hash every key the workflow's backfills ever enrolled, at each batch.
       AND (SELECT x.id FROM crmflow.executions AS x
             WHERE x.workflow_id = %(workflow_id)s
               AND x.enrollment_key = 'backfill:' || s.pk::text
               AND x.enrollment_key LIKE 'backfill:%%'
             LIMIT 1) IS NULL
       AND {reenrollment}
     ORDER BY {scanned_order}
     LIMIT %(room)s
), last AS (
    SELECT s.pk FROM scanned AS s ORDER BY {scanned_order_desc} LIMIT 1
)

-- name: backfill_count
-- A dry run's batch: what it would enroll, writing nothing.
WITH {chosen}
SELECT (SELECT count(*) FROM scanned) AS scanned,
       (SELECT count(*) FROM scanned WHERE hit) AS matched,
       (SELECT count(*) FROM chosen) AS enrolled,
       (SELECT pk FROM last) AS last_pk,
       NULL::bigint[] AS execution_ids;

-- name: backfill_enroll
-- A batch: the executions, queued for the executor as the scheduler's are (a wake-up
-- job per due moment); the final SELECT reads "deferred" so that it runs.
WITH {chosen}, enrolled AS (
    INSERT INTO crmflow.executions
           (workflow_id, workflow_version_id, workflow_version, enrollment_key, entity_type,
            entity_pk, priority, depth, input, triggered_at)
    SELECT %(workflow_id)s, %(version_id)s, %(version)s, c.enrollment_key, %(entity_type)s,
           c.pk, %(priority)s, 0, NULL, %(triggered_at)s
      FROM chosen AS c
    ON CONFLICT DO NOTHING
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
SELECT (SELECT count(*) FROM scanned) AS scanned,
       (SELECT count(*) FROM scanned WHERE hit) AS matched,
       (SELECT count(*) FROM enrolled) AS enrolled,
       (SELECT n FROM deferred) AS deferred,
       (SELECT pk FROM last) AS last_pk,
       (SELECT array_agg(id ORDER BY id) FROM enrolled) AS execution_ids;

-- name: backfill_workflow
SELECT w.id AS workflow_id, w.name, w.status, v.id AS version_id, v.version, v.entity_type,
       v.trigger_type, v.priority, v.limits, v.definition
  FROM crmflow.workflows AS w
  JOIN crmflow.workflow_versions AS v ON v.workflow_id = w.id AND v.version = w.current_version
 WHERE w.id = %(id)s;

-- name: backfill_still_current
-- Checked in each batch's transaction: the workflow is still active at the version the
-- backfill started with (a pause, an archive or a new version stops it).
SELECT (status = 'active' AND current_version = %(version)s) AS current
  FROM crmflow.workflows
 WHERE id = %(workflow_id)s;

-- name: backfill_estimate
-- The table's size for the progress bar: the planner's estimate, or a count when the
-- table was never analysed.
SELECT CASE WHEN c.reltuples >= 0 THEN c.reltuples::bigint END AS estimate
  FROM pg_class AS c
 WHERE c.oid = %(table)s::regclass;
