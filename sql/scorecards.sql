-- Scorecards (engine/scorecards/; docs/scorecards.md). The scoring statements themselves
-- are composed per scorecard in engine/scorecards/compile.py; these are the fixed ones.

-- name: upsert_relation
INSERT INTO crmflow.scorecard_relations
       (entity_type, name, related_entity_type, key_column, time_column)
VALUES (%(entity_type)s, %(name)s, %(related_entity_type)s, %(key_column)s, %(time_column)s)
ON CONFLICT (entity_type, name) DO UPDATE
   SET related_entity_type = EXCLUDED.related_entity_type,
       key_column = EXCLUDED.key_column,
       time_column = EXCLUDED.time_column
RETURNING entity_type, name, related_entity_type, key_column, time_column, created_at;

-- name: relations
SELECT r.entity_type, r.name, r.related_entity_type, r.key_column, r.time_column,
       r.created_at, w.table_schema, w.table_name
  FROM crmflow.scorecard_relations AS r
  LEFT JOIN crmflow.watched_tables AS w ON w.entity_type = r.related_entity_type
 WHERE %(entity_type)s::text IS NULL OR r.entity_type = %(entity_type)s
 ORDER BY r.entity_type, r.name;

-- name: delete_relation
DELETE FROM crmflow.scorecard_relations
 WHERE entity_type = %(entity_type)s AND name = %(name)s
RETURNING name;

-- name: relation_users
-- Scorecards whose current version reads a relation (it cannot be removed then).
SELECT s.name
  FROM crmflow.scorecards AS s
  JOIN crmflow.scorecard_versions AS v ON v.scorecard_id = s.id AND v.version = s.current_version
 WHERE s.entity_type = %(entity_type)s
   AND EXISTS (SELECT 1 FROM jsonb_array_elements(v.definition -> 'factors') AS f
                WHERE f #>> '{aggregate,relation}' = %(name)s)
 ORDER BY s.name;

-- name: lock_scorecard_by_name
SELECT id, name, entity_type, status, current_version
  FROM crmflow.scorecards WHERE name = %(name)s FOR UPDATE;

-- name: insert_scorecard
INSERT INTO crmflow.scorecards (name, entity_type, status, schedule, realtime, next_run_at)
VALUES (%(name)s, %(entity_type)s, %(status)s, %(schedule)s, %(realtime)s, %(next_run_at)s)
RETURNING id;

-- name: update_scorecard_head
UPDATE crmflow.scorecards
   SET entity_type = %(entity_type)s, status = %(status)s, current_version = %(version)s,
       schedule = %(schedule)s, realtime = %(realtime)s,
       next_run_at = CASE WHEN schedule IS NOT DISTINCT FROM %(schedule)s
                          THEN coalesce(next_run_at, %(next_run_at)s) ELSE %(next_run_at)s END,
       updated_at = now()
 WHERE id = %(id)s;

-- name: current_scorecard_version
SELECT version, definition_hash FROM crmflow.scorecard_versions
 WHERE scorecard_id = %(id)s ORDER BY version DESC LIMIT 1;

-- name: insert_scorecard_version
INSERT INTO crmflow.scorecard_versions (scorecard_id, version, definition, definition_hash, columns_read)
VALUES (%(id)s, %(version)s, %(definition)s, %(definition_hash)s, %(columns_read)s);

-- name: clear_score_sources
DELETE FROM crmflow.score_sources WHERE scorecard_id = %(id)s;

-- name: insert_score_source
INSERT INTO crmflow.score_sources
       (scorecard_id, source_entity, key_column, entity_key_column, columns)
VALUES (%(id)s, %(source_entity)s, %(key_column)s, %(entity_key_column)s, %(columns)s)
ON CONFLICT (scorecard_id, source_entity) DO NOTHING;

-- name: list_scorecards
SELECT s.id, s.name, s.entity_type, s.status, s.current_version, s.schedule, s.realtime,
       s.next_run_at, s.last_run_at, s.created_at, s.updated_at,
       (SELECT count(*) FROM crmflow.score_latest AS l WHERE l.scorecard_id = s.id) AS scored,
       (SELECT jsonb_object_agg(level, n) FROM (
            SELECT l.level, count(*) AS n FROM crmflow.score_latest AS l
             WHERE l.scorecard_id = s.id GROUP BY l.level) AS b) AS levels
  FROM crmflow.scorecards AS s
 ORDER BY s.name;

-- name: get_scorecard
SELECT s.id, s.name, s.entity_type, s.status, s.current_version, s.schedule, s.realtime,
       s.next_run_at, s.last_run_at, s.created_at, s.updated_at,
       v.definition, v.columns_read
  FROM crmflow.scorecards AS s
  JOIN crmflow.scorecard_versions AS v ON v.scorecard_id = s.id AND v.version = s.current_version
 WHERE s.name = %(name)s;

-- name: scorecard_by_id
SELECT s.id, s.name, s.entity_type, s.status, s.current_version, s.schedule, s.realtime,
       v.definition
  FROM crmflow.scorecards AS s
  JOIN crmflow.scorecard_versions AS v ON v.scorecard_id = s.id AND v.version = s.current_version
 WHERE s.id = %(id)s;

-- name: scorecard_versions
SELECT version, definition_hash, columns_read, created_at
  FROM crmflow.scorecard_versions WHERE scorecard_id = %(id)s ORDER BY version;

-- name: lock_scorecard_run
-- One scoring statement per scorecard at a time (history rows would double otherwise).
-- The full runs (daily, by hand) wait for it.
SELECT pg_advisory_xact_lock(1935896436, %(id)s::integer);

-- name: try_lock_scorecard_run
-- The same lock for a real-time rescore, which never waits: a full run may hold it for
-- minutes (the rescore puts its keys back for a later round).
SELECT pg_try_advisory_xact_lock(1935896436, %(id)s::integer) AS locked;

-- name: scorecard_ran
UPDATE crmflow.scorecards SET last_run_at = now() WHERE id = %(id)s;

-- name: note_score_events
-- The matcher, in the transaction claiming events: the keys of the entities that events
-- of a real-time scorecard's sources concern (its own table: the event's key, when an
-- update changed a column it reads; a related table: the key column, old and new).
WITH queued AS (
INSERT INTO crmflow.score_queue (scorecard_id, entity_key)
SELECT DISTINCT s.scorecard_id, k.key
  FROM crmflow.outbox AS o
  JOIN crmflow.score_sources AS s ON s.source_entity = o.entity_type
  JOIN crmflow.scorecards AS sc ON sc.id = s.scorecard_id
 CROSS JOIN LATERAL (
        SELECT o.pk AS key
         WHERE s.key_column IS NULL AND o.pk IS NOT NULL
           -- the scorecard's own writes change only columns it does not read
           AND o.actor IS DISTINCT FROM 'crmflow:scorecard:' || sc.name
           AND (o.op <> 'update' OR s.columns IS NULL OR CASE
                WHEN o.changed IS NOT NULL THEN o.changed && s.columns
                -- no list of changed columns kept: compare the rows (no old row: changed)
                ELSE EXISTS (SELECT 1 FROM unnest(s.columns) AS c
                              WHERE o.new_row -> c IS DISTINCT FROM o.old_row -> c) END)
        UNION
        SELECT jsonb_build_object(s.entity_key_column, r.v -> s.key_column)
          FROM (VALUES (o.new_row), (o.old_row)) AS r(v)
         WHERE s.key_column IS NOT NULL
           AND jsonb_typeof(r.v -> s.key_column) IN ('number', 'string')
       ) AS k
 WHERE o.id = ANY(%(ids)s) AND o.op IN ('insert', 'update', 'delete')
ON CONFLICT DO NOTHING
RETURNING 1
)
-- The worker's scorecard loop listens (delivered when the matcher's transaction commits).
SELECT pg_notify('crmflow_scores', '') FROM (SELECT 1 FROM queued LIMIT 1) AS q;

-- name: has_score_sources
SELECT EXISTS (SELECT 1 FROM crmflow.score_sources) AS present;

-- name: take_score_queue
-- Up to %(limit)s queued keys, oldest first, taken (deleted) in a short transaction of
-- their own and leased to the round %(round_id)s for %(lease)s seconds; the round ends
-- the lease when it has rescored them (release_score_lease), and a failed rescore puts
-- them back (requeue_scores). A key the matcher queues again meanwhile is a new row of
-- the queue: rescored again, as its entity may have changed after the round read it.
WITH taken AS (
DELETE FROM crmflow.score_queue AS q
 USING (SELECT scorecard_id, entity_key FROM crmflow.score_queue
         WHERE NOT (scorecard_id = ANY(%(skip)s::bigint[]))
         ORDER BY queued_at LIMIT %(limit)s FOR UPDATE SKIP LOCKED) AS t
 WHERE q.scorecard_id = t.scorecard_id AND q.entity_key = t.entity_key
RETURNING q.scorecard_id, q.entity_key
), leased AS (
INSERT INTO crmflow.score_leases (round_id, scorecard_id, entity_key, lease_until)
SELECT %(round_id)s, scorecard_id, entity_key, now() + make_interval(secs => %(lease)s)
  FROM taken
)
SELECT scorecard_id, entity_key FROM taken;

-- name: release_score_lease
-- The round %(round_id)s has rescored (or put back) scorecard %(id)s's keys.
DELETE FROM crmflow.score_leases WHERE round_id = %(round_id)s AND scorecard_id = %(id)s;

-- name: requeue_expired_leases
-- Keys whose round's lease ran out (its worker was killed, or it is slower than its
-- lease: then they are rescored twice) go back to the queue.
WITH expired AS (
DELETE FROM crmflow.score_leases WHERE lease_until < now()
RETURNING scorecard_id, entity_key
)
INSERT INTO crmflow.score_queue (scorecard_id, entity_key)
SELECT DISTINCT scorecard_id, entity_key FROM expired
ON CONFLICT DO NOTHING;

-- name: requeue_scores
INSERT INTO crmflow.score_queue (scorecard_id, entity_key)
SELECT %(id)s, k FROM jsonb_array_elements(%(keys)s::jsonb) AS k
ON CONFLICT DO NOTHING;

-- name: pending_scorecards
-- Scorecards with entity writes left pending (rows a CRM writer held locked).
SELECT DISTINCT scorecard_id FROM crmflow.score_latest WHERE pending;

-- name: mark_rows_pending
-- Entity writes that failed (engine/scorecards/run.py, write_rows): their rows by id.
UPDATE crmflow.score_latest AS l SET pending = true
  FROM unnest(CAST(%(rows)s AS tid[])) AS r(row_id)
 WHERE l.ctid = r.row_id AND l.scorecard_id = %(scorecard_id)s AND NOT l.pending;

-- name: pending_rows
-- Their row ids (the entity writes fetch the rows by them: engine/scorecards/entity_writes.py).
SELECT ctid::text AS row_id FROM crmflow.score_latest
 WHERE scorecard_id = %(id)s AND pending ORDER BY ctid;

-- name: due_scorecards
-- The next due scorecard, locked by the caller's transaction (SKIP LOCKED: one worker
-- claims it), which claims it; one at a time, so that a claim starts with its run.
SELECT id, name, schedule, next_run_at FROM crmflow.scorecards
 WHERE status = 'active' AND schedule IS NOT NULL AND next_run_at <= now()
 ORDER BY next_run_at
 LIMIT 1
   FOR UPDATE SKIP LOCKED;

-- name: set_next_run
UPDATE crmflow.scorecards SET next_run_at = %(next_run_at)s WHERE id = %(id)s;

-- name: held_up_by
-- The sessions waiting for a lock on a table outside crmflow's schema that session
-- %(pid)s (a full scoring run) holds: an ALTER TABLE of a CRM table it reads, say, which
-- every writer of that table then queues behind. engine/scorecards/run.py gives way.
-- pg_locks and pg_blocking_pids take the lock manager's locks: they are read only when
-- some session waits for a lock at all (pg_stat_activity, which takes none), ten
-- times a second otherwise.
WITH waiting AS MATERIALIZED (
SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND pid <> %(pid)s
)
SELECT count(DISTINCT w.pid) AS waiting,
       string_agg(DISTINCT w.relation::regclass::text, ', ') AS tables
  FROM pg_locks AS w
  JOIN pg_class AS c ON c.oid = w.relation
 WHERE EXISTS (SELECT 1 FROM waiting)
   AND w.pid IN (SELECT pid FROM waiting)
   AND NOT w.granted AND w.locktype = 'relation'
   AND c.relnamespace <> 'crmflow'::regnamespace
   AND %(pid)s = ANY (pg_blocking_pids(w.pid));

