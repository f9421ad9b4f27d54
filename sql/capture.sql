-- Capture's queries (engine/capture.py, engine/capture_demands.py, engine/prefilter.py);
-- the capture functions themselves are sql/install/capture.sql, the DDL event trigger
-- sql/install/event_trigger.sql.

-- name: install_capture
SELECT crmflow.install_capture(%(entity_type)s, %(relid)s::oid::regclass, %(pk_columns)s::text[]);

-- name: generate_capture
SELECT crmflow.generate_capture(%(entity_type)s, %(pk_columns)s::text[]);

-- name: bound_lock_wait
-- Heal's lock waits are short: a partition busy now is captured on the next round, and
-- writers never queue behind a trigger creation for long. Returns the setting it
-- replaced, put back after the heal (the caller's transaction may go on).
SELECT current_setting('lock_timeout') AS previous,
       set_config('lock_timeout', %(lock_timeout)s, true) AS now;

-- name: restore_lock_wait
SELECT set_config('lock_timeout', %(lock_timeout)s, true);

-- name: heal_capture
SELECT entity_type, change FROM crmflow.heal_capture();

-- name: capture_tree
SELECT rel::text AS relation FROM crmflow.capture_tree(%(relid)s::oid::regclass) AS rel;

-- name: captured_relations
-- Every relation carrying an entity's triggers (the table, its partitions, and any that
-- drifted away), so unwatch removes them all.
SELECT t.tgrelid::regclass::text AS relation
  FROM pg_trigger AS t
 WHERE t.tgname = 'tg_crmflow__insert'
   AND t.tgfoid = to_regprocedure(format('crmflow.%%I()', 'tg_' || %(entity_type)s || '__insert'))
 ORDER BY t.tgrelid;

-- name: may_create_event_trigger
SELECT rolsuper AS allowed FROM pg_roles WHERE rolname = current_user;

-- name: drop_trigger
DROP TRIGGER IF EXISTS {trigger} ON {table};

-- name: drop_function
DROP FUNCTION IF EXISTS {function}();

-- name: drop_sequence
DROP SEQUENCE IF EXISTS {sequence};

-- ── Capture demands (migration 0022; engine/capture_demands.py set_capture_demand) ──

-- name: clear_capture_demand
DELETE FROM crmflow.capture_demands
 WHERE demand = %(demand)s AND (%(entity_type)s::text IS NULL OR entity_type = %(entity_type)s);

-- name: insert_capture_demand
INSERT INTO crmflow.capture_demands (demand, entity_type, operation, columns)
SELECT %(demand)s, %(entity_type)s, op, %(columns)s::text[]
  FROM unnest(%(operations)s::text[]) AS op;

-- name: refresh_capture
SELECT crmflow.refresh_capture();

-- name: set_capture_all_columns
UPDATE crmflow.watched_tables SET capture_all_columns = %(all_columns)s
 WHERE entity_type = %(entity_type)s;
