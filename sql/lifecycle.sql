-- Enrollment lifecycle (engine/lifecycle.py and its lifecycle_* modules): goals, exit
-- criteria and wait_until steps, evaluated by the matcher on the watched entities'
-- captured changes. See
-- migrations/0023_lifecycle_watches.sql for crmflow.watches.

-- name: watched_versions
-- The workflow versions whose goal, exit_when or wait_until conditions a matcher round
-- evaluates: the current version of each workflow that is not archived, and older
-- versions that still have live executions (they keep the version they started with).
SELECT v.id AS version_id, v.workflow_id, v.entity_type, v.definition
  FROM crmflow.workflow_versions AS v
  JOIN crmflow.workflows AS w ON w.id = v.workflow_id
 WHERE v.entity_type IS NOT NULL
   AND (v.definition ? 'goal' OR v.definition ? 'exit_when'
        OR jsonb_path_exists(v.definition, '$.actions[*].wait_until'))
   AND ((v.version = w.current_version AND w.status <> 'archived')
        OR EXISTS (SELECT 1 FROM crmflow.executions AS x
                    WHERE x.workflow_id = v.workflow_id AND x.workflow_version_id = v.id
                      AND x.status IN ('pending', 'running', 'waiting')))
 ORDER BY v.id;

-- name: round_case
WHEN w.workflow_version_id = {version_id} AND w.kind = {kind} AND w.step_id = {step_id}
THEN coalesce({predicate}, false)

-- name: round_branch
-- The watches hit by the round's events of one entity type: a wait for a custom event
-- by that event; a condition (goal, exit_when, wait_until) by the entity's row as it is
-- now, read by its key (the captured row may hold only some columns), "n" as in the
-- match statement.
SELECT w.execution_id, w.kind, w.step_id,
       CASE WHEN w.event_name IS NOT NULL THEN 'event' ELSE 'met' END AS outcome
  FROM batch AS ev
  JOIN crmflow.watches AS w ON w.entity_type = ev.entity_type AND w.entity_pk = ev.pk
 CROSS JOIN LATERAL jsonb_populate_record(NULL::{table}, ev.pk) AS p
  LEFT JOIN {table} AS n ON w.event_name IS NULL AND {pk_match}
 WHERE ev.entity_type = {entity_type}
   AND CASE WHEN w.event_name IS NOT NULL
            THEN ev.op = 'event' AND ev.event_name = w.event_name
            WHEN n IS NULL THEN false
            ELSE CASE {cases} ELSE false END END

-- name: round
-- One statement per matcher round, in the round's transaction: the watches its events
-- hit, and the hits earlier rounds kept (crmflow.watch_hits), then
--   goal met:       the execution ends completed (goal_met_at), its open steps skipped;
--   exit criteria:  it ends cancelled ("exit criteria"), its open steps skipped;
--   (goal first when both hold), and either way its queue entry (its wake-up) is gone;
--   wait_until met or its event arrived: the waiting step is due now with its outcome.
-- Executions and their step rows are locked in key order, {skip_locked} ("SKIP LOCKED"
-- in the matcher: it never waits for the executor; nothing when the executor settles
-- one execution's kept hits, engine/lifecycle_executor.py settle_kept: it waits for the holder).
-- A hit on an execution another transaction holds is not lost with the round's events:
-- it is kept in crmflow.watch_hits, and the execution is due at once, so the executor
-- settles it as soon as the holder lets go (or its own next step does, or the next
-- round). %(execution_id)s: only that execution's kept hits (NULL: all of them).
WITH batch AS (
    SELECT id, entity_type, pk, op, event_name
      FROM crmflow.outbox
     WHERE id = ANY(%(ids)s) AND pk IS NOT NULL
), found AS (
    SELECT DISTINCT ON (h.execution_id, h.kind, h.step_id)
           h.execution_id, h.kind, h.step_id, h.outcome
      FROM ({branches}) AS h
     ORDER BY h.execution_id, h.kind, h.step_id, h.outcome DESC
), kept_before AS MATERIALIZED (
    -- (always SKIP LOCKED in the matcher: a row another round holds is that round's)
    SELECT p.id, p.execution_id, p.kind, p.step_id, p.outcome
      FROM crmflow.watch_hits AS p
     WHERE %(execution_id)s::bigint IS NULL OR p.execution_id = %(execution_id)s::bigint
     ORDER BY p.id
       FOR UPDATE {skip_locked}
), hit AS (
    SELECT DISTINCT ON (h.execution_id, h.kind, h.step_id) h.*
      FROM (SELECT execution_id, kind, step_id, outcome FROM found
            UNION ALL
            SELECT execution_id, kind, step_id, outcome FROM kept_before) AS h
     ORDER BY h.execution_id, h.kind, h.step_id, h.outcome DESC
), locked AS MATERIALIZED (
    SELECT x.id
      FROM crmflow.executions AS x
     WHERE x.id IN (SELECT execution_id FROM hit)
       AND x.status IN ('pending', 'running', 'waiting')
     ORDER BY x.id
       FOR NO KEY UPDATE {skip_locked}
), steps_locked AS MATERIALIZED (
    SELECT s.execution_id, s.step_id
      FROM crmflow.execution_steps AS s
     WHERE s.execution_id IN (SELECT id FROM locked)
     ORDER BY s.execution_id, s.step_id
       FOR UPDATE {skip_locked}
), free AS MATERIALIZED (
    SELECT l.id
      FROM locked AS l
     WHERE (SELECT count(*) FROM crmflow.execution_steps AS s WHERE s.execution_id = l.id)
         = (SELECT count(*) FROM steps_locked AS k WHERE k.execution_id = l.id)
), held AS MATERIALIZED (
    -- the live executions hit that another transaction holds: their hits wait
    SELECT x.id
      FROM crmflow.executions AS x
     WHERE x.id IN (SELECT execution_id FROM hit)
       AND x.id NOT IN (SELECT id FROM free)
       AND x.status IN ('pending', 'running', 'waiting')
), ending AS (
    SELECT DISTINCT ON (h.execution_id) h.execution_id, h.kind
      FROM hit AS h
      JOIN free AS f ON f.id = h.execution_id
     WHERE h.kind IN ('goal', 'exit')
     ORDER BY h.execution_id, h.kind = 'exit'
), ended AS (
    UPDATE crmflow.executions AS x
       SET status = CASE WHEN e.kind = 'goal' THEN 'completed' ELSE 'cancelled' END,
           goal_met_at = CASE WHEN e.kind = 'goal' THEN clock_timestamp() END,
           error = CASE WHEN e.kind = 'exit' THEN 'exit criteria' ELSE x.error END,
           finished_at = clock_timestamp(), not_before = NULL,
           active_seconds = (SELECT sum(extract(epoch FROM s.finished_at - s.started_at))
                               FROM crmflow.execution_steps AS s WHERE s.execution_id = x.id)
      FROM ending AS e
     WHERE x.id = e.execution_id
    RETURNING x.id, e.kind
), skipped AS (
    UPDATE crmflow.execution_steps AS s
       SET status = 'skipped', finished_at = clock_timestamp(),
           result = coalesce(s.result, '{{}}'::jsonb) || jsonb_build_object(
               'reason', CASE WHEN e.kind = 'goal' THEN 'goal met' ELSE 'exit criteria' END)
      FROM ending AS e
     WHERE s.execution_id = e.execution_id AND s.status IN ('pending', 'scheduled')
), woken AS (
    UPDATE crmflow.execution_steps AS s
       SET result = jsonb_build_object('outcome', h.outcome), scheduled_at = clock_timestamp()
      FROM hit AS h
      JOIN free AS f ON f.id = h.execution_id
     WHERE h.kind = 'wait' AND s.execution_id = h.execution_id AND s.step_id = h.step_id
       AND s.status = 'scheduled' AND NOT (coalesce(s.result, '{{}}'::jsonb) ? 'outcome')
       AND NOT EXISTS (SELECT 1 FROM ending AS e WHERE e.execution_id = h.execution_id)
    RETURNING s.execution_id, s.step_id
), unqueued AS (
    DELETE FROM crmflow.execution_queue AS q USING ending AS e
     WHERE q.execution_id = e.execution_id
), requeued AS (
    UPDATE crmflow.execution_queue AS q SET run_at = clock_timestamp()
      FROM woken AS k
     WHERE q.execution_id = k.execution_id
    RETURNING q.run_at
), unwatched AS (
    -- the watches done with: those of ended executions, the waits that were met, and
    -- those of executions that finished some other way
    DELETE FROM crmflow.watches AS w
     USING hit AS h
     WHERE w.execution_id = h.execution_id
       AND (EXISTS (SELECT 1 FROM ending AS e WHERE e.execution_id = w.execution_id)
            OR EXISTS (SELECT 1 FROM woken AS k
                        WHERE k.execution_id = w.execution_id AND w.kind = 'wait'
                          AND k.step_id = w.step_id)
            OR NOT EXISTS (SELECT 1 FROM crmflow.executions AS x
                            WHERE x.id = w.execution_id
                              AND x.status IN ('pending', 'running', 'waiting')))
), kept AS (
    -- the hits of this round's events on held executions, for later (once each)
    INSERT INTO crmflow.watch_hits (execution_id, kind, step_id, outcome)
    SELECT h.execution_id, h.kind, h.step_id, h.outcome
      FROM found AS h
     WHERE h.execution_id IN (SELECT id FROM held)
       AND NOT EXISTS (SELECT 1 FROM kept_before AS p
                        WHERE p.execution_id = h.execution_id AND p.kind = h.kind
                          AND p.step_id = h.step_id)
     ORDER BY h.execution_id, h.kind, h.step_id
), settled AS (
    -- the kept hits taken again: settled above, or their execution is over
    DELETE FROM crmflow.watch_hits AS p
     USING kept_before AS b
     WHERE p.id = b.id AND b.execution_id NOT IN (SELECT id FROM held)
), due AS (
    -- held executions are due at once: the executor waits for the holder, then settles
    -- their kept hits before anything else (SKIP LOCKED: a queue row locked now is the
    -- executor's, which settles them before its next step)
    SELECT q.execution_id
      FROM crmflow.execution_queue AS q
     WHERE q.execution_id IN (SELECT id FROM held) AND q.run_at > clock_timestamp()
     ORDER BY q.execution_id
       FOR UPDATE SKIP LOCKED
), made_due AS (
    UPDATE crmflow.execution_queue AS q SET run_at = clock_timestamp()
      FROM due AS d
     WHERE q.execution_id = d.execution_id
    RETURNING q.run_at
)
SELECT (SELECT count(*) FROM ended WHERE kind = 'goal') AS goals,
       (SELECT count(*) FROM ended WHERE kind = 'exit') AS exits,
       (SELECT count(*) FROM woken) AS waits,
       (SELECT count(*) FROM held) AS held,
       crmflow.wake_executor(%(queue)s, (SELECT array_agg(DISTINCT run_at)
                                           FROM (SELECT run_at FROM requeued
                                                 UNION ALL
                                                 SELECT run_at FROM made_due) AS r))
           AS woken;

-- name: no_hits
-- The round's branches when only kept hits are settled (the executor's settle_kept).
SELECT NULL::bigint AS execution_id, NULL::text AS kind, NULL::text AS step_id,
       NULL::text AS outcome
 WHERE false

-- name: has_kept_hits
SELECT EXISTS (SELECT 1 FROM crmflow.watch_hits WHERE execution_id = %(id)s) AS kept;

-- name: round_probe
-- Does the round statement's every branch compile against the catalog as it is now?
WITH batch AS (SELECT id, entity_type, pk, op, event_name FROM crmflow.outbox WHERE false)
SELECT h.* FROM ({branches}) AS h LIMIT 0;

-- name: round_try
-- The round's hits of some branches on the events %(ids)s, evaluated and counted but
-- not acted on: which version's conditions fail on them (engine/lifecycle_round.py _narrow)?
WITH batch AS (
    SELECT id, entity_type, pk, op, event_name
      FROM crmflow.outbox
     WHERE id = ANY(%(ids)s) AND pk IS NOT NULL
)
SELECT count(*) AS hits FROM ({branches}) AS h;

-- name: mark_broken
-- Workflows whose goal, exit_when or wait_until conditions the matcher's round set
-- apart (they fail at run time, or no longer compile): marked broken with the reason
-- and an alert; they still enroll, so nothing is to be replayed (broken_since_event_id
-- untouched). A workflow already broken keeps its reason. (The workflows trigger bumps
-- the generation at the end of the statement: read it with "generation".)
WITH changes AS (
    SELECT * FROM unnest(%(ids)s::bigint[], %(reasons)s::text[]) AS u(id, reason)
), updated AS (
    UPDATE crmflow.workflows AS w
       SET broken_reason = c.reason, broken_at = coalesce(w.broken_at, now())
      FROM changes AS c
     WHERE w.id = c.id AND w.status = 'active' AND w.broken_reason IS NULL
    RETURNING w.id, w.name, w.broken_reason
), raised AS (
    INSERT INTO crmflow.alerts (kind, subject, workflow_id, value, threshold, message)
    SELECT 'workflow_broken', u.name, u.id, 1, 0,
           format('Workflow ''%%s'' (%%s) still enrolls, but the matcher no longer '
                  'evaluates its goal, exit_when and wait_until (checked before each step '
                  'only; waits end at their timeout): %%s', u.name, u.id, u.broken_reason)
      FROM updated AS u
    ON CONFLICT (kind, subject) WHERE resolved_at IS NULL DO NOTHING
    RETURNING 1
)
SELECT (SELECT count(*) FROM updated) AS marked, (SELECT count(*) FROM raised) AS raised;

-- name: generation
SELECT generation FROM crmflow.matcher_state;

-- name: add_watches
-- An execution starts waiting: what the matcher watches for it (already there: kept);
-- returns the rows written (a new watch: the change before it may have gone unseen).
INSERT INTO crmflow.watches
       (execution_id, kind, step_id, workflow_version_id, entity_type, entity_pk, event_name)
SELECT x.id, k.kind, k.step_id, x.workflow_version_id, x.entity_type, x.entity_pk, k.event_name
  FROM crmflow.executions AS x
 CROSS JOIN unnest(%(kinds)s::text[], %(step_ids)s::text[], %(event_names)s::text[])
       AS k(kind, step_id, event_name)
 WHERE x.id = %(id)s AND x.entity_pk IS NOT NULL
ON CONFLICT (execution_id, kind, step_id) DO NOTHING
RETURNING kind;

-- name: end_execution
-- The executor's check before a step found the goal met (kind 'goal') or the exit
-- criteria met ('exit'): the same ending as the matcher's round, for one execution.
WITH ended AS (
    UPDATE crmflow.executions AS x
       SET status = CASE WHEN %(kind)s = 'goal' THEN 'completed' ELSE 'cancelled' END,
           goal_met_at = CASE WHEN %(kind)s = 'goal' THEN clock_timestamp() END,
           error = CASE WHEN %(kind)s = 'exit' THEN 'exit criteria' ELSE x.error END,
           finished_at = clock_timestamp(), not_before = NULL,
           active_seconds = (SELECT sum(extract(epoch FROM s.finished_at - s.started_at))
                               FROM crmflow.execution_steps AS s WHERE s.execution_id = x.id)
     WHERE x.id = %(id)s AND x.status IN ('pending', 'running', 'waiting')
    RETURNING x.id
), skipped AS (
    UPDATE crmflow.execution_steps AS s
       SET status = 'skipped', finished_at = clock_timestamp(),
           result = coalesce(s.result, '{}'::jsonb) || jsonb_build_object(
               'reason', CASE WHEN %(kind)s = 'goal' THEN 'goal met' ELSE 'exit criteria' END)
      FROM ended
     WHERE s.execution_id = ended.id AND s.status IN ('pending', 'scheduled')
), unwatched AS (
    DELETE FROM crmflow.watches AS w USING ended WHERE w.execution_id = ended.id
), unkept AS (
    DELETE FROM crmflow.watch_hits AS p USING ended WHERE p.execution_id = ended.id
)
DELETE FROM crmflow.execution_queue AS q USING ended
 WHERE q.execution_id = ended.id
   AND (q.leased_by IS NULL OR q.leased_until < clock_timestamp());

-- name: wait_state
SELECT result, scheduled_at FROM crmflow.execution_steps
 WHERE execution_id = %(id)s AND step_id = %(step_id)s;

-- name: drop_wait_watch
DELETE FROM crmflow.watches
 WHERE execution_id = %(id)s AND kind = 'wait' AND step_id = %(step_id)s;

-- name: list_enrollments
-- A workflow's enrollments (crmflow.enrollments), newest first, one state or all; with
-- the count of each state (for the filter).
SELECT e.execution_id, e.workflow_id, e.workflow_version, e.entity_type, e.entity_id,
       e.entity_pk, e.state, e.current_step, e.waiting_until, e.enrolled_at, e.finished_at,
       e.goal_met_at, e.reason
  FROM crmflow.enrollments AS e
 WHERE e.workflow_id = %(workflow_id)s
   AND (%(state)s::text IS NULL OR e.state = %(state)s::text)
   AND (%(before_id)s::bigint IS NULL OR e.execution_id < %(before_id)s::bigint)
 ORDER BY e.execution_id DESC
 LIMIT %(limit)s;

-- name: enrollment_counts
SELECT e.state, count(*) AS n
  FROM crmflow.enrollments AS e
 WHERE e.workflow_id = %(workflow_id)s
 GROUP BY e.state;
