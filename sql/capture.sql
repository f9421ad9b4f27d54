-- Capture: statement-level AFTER triggers with transition tables copy each changed
-- row into crmflow.outbox in the writer's own transaction (a rollback captures
-- nothing). One INSERT ... SELECT per statement, so a 100k-row INSERT ... SELECT
-- pays one trigger call, not 100k.
--
-- The "install" block is (re)applied by `crmflow migrate`. The other blocks are
-- templates completed by engine/capture.py with psycopg.sql (identifiers quoted,
-- literals escaped) into one function and one trigger per table and operation:
-- crmflow.tg_<schema>_<table>__<op>() and the trigger tg_<table>__<op>.

-- name: install
-- The depth and actor of the current write, set by the engine with set_config(..., true)
-- in an action's transaction. People's writes have depth 0 and the session user as actor.
CREATE OR REPLACE FUNCTION crmflow.current_depth() RETURNS integer
    LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT coalesce(nullif(current_setting('crmflow.depth', true), '')::integer, 0)
$$;

CREATE OR REPLACE FUNCTION crmflow.current_actor() RETURNS text
    LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT coalesce(nullif(current_setting('crmflow.actor', true), ''), session_user::text)
$$;

-- The wake-up hint. NOTIFY takes a cluster-wide lock at commit that serialises
-- notifying transactions, so writers only notify while a matcher says it is idle
-- and listening. A busy matcher keeps draining without hints; the poll loop covers
-- the short race around going idle. NOTIFY folds duplicates within a transaction.
CREATE OR REPLACE FUNCTION crmflow.wake_matcher() RETURNS void
    LANGUAGE plpgsql AS $$
BEGIN
    IF (SELECT listening FROM crmflow.matcher_state) THEN
        PERFORM pg_notify('crmflow_outbox', '');
    END IF;
END
$$;

-- name: insert_function
CREATE OR REPLACE FUNCTION {function}() RETURNS trigger
    LANGUAGE plpgsql AS $crmflow_capture$
DECLARE
    -- The depth and actor of this write (see crmflow.current_depth), read once per
    -- statement, not per row; plain code, not function calls, on the writer's path.
    write_depth integer := coalesce(nullif(current_setting('crmflow.depth', true), '')::integer, 0);
    write_actor text := coalesce(nullif(current_setting('crmflow.actor', true), ''), session_user);
BEGIN
    INSERT INTO crmflow.outbox (entity_type, op, pk, new_row, depth, actor)
    SELECT {entity_type}, 'insert', {pk_new}, to_jsonb(n), write_depth, write_actor
      FROM new_rows AS n;
    IF (SELECT listening FROM crmflow.matcher_state) THEN  -- crmflow.wake_matcher, inlined
        PERFORM pg_notify('crmflow_outbox', '');
    END IF;
    RETURN NULL;
END
$crmflow_capture$;

-- name: update_function
-- Rows are paired old/new by primary key. A row whose key itself changed has no
-- pair: it is captured as the delete of the old key and the insert of the new one.
-- Updates that change no column are not captured.
CREATE OR REPLACE FUNCTION {function}() RETURNS trigger
    LANGUAGE plpgsql AS $crmflow_capture$
DECLARE
    write_depth integer := coalesce(nullif(current_setting('crmflow.depth', true), '')::integer, 0);
    write_actor text := coalesce(nullif(current_setting('crmflow.actor', true), ''), session_user);
BEGIN
    INSERT INTO crmflow.outbox (entity_type, op, pk, new_row, old_row, changed, depth, actor)
    SELECT {entity_type}, c.op, c.pk, c.new_row, c.old_row, c.changed, write_depth, write_actor
      FROM (
            SELECT 'update' AS op, {pk_new} AS pk, j.new_row, j.old_row,
                   ARRAY(SELECT k.key FROM jsonb_each(j.new_row) AS k
                          WHERE k.value IS DISTINCT FROM j.old_row -> k.key
                          ORDER BY k.key) AS changed,
                   0 AS part
              FROM new_rows AS n
              JOIN old_rows AS o ON {pk_join}
             CROSS JOIN LATERAL (SELECT to_jsonb(n) AS new_row, to_jsonb(o) AS old_row) AS j
             WHERE j.new_row IS DISTINCT FROM j.old_row
            UNION ALL
            SELECT 'delete', {pk_old}, NULL, to_jsonb(o), NULL, 1
              FROM old_rows AS o
             WHERE NOT EXISTS (SELECT 1 FROM new_rows AS n WHERE {pk_join})
            UNION ALL
            SELECT 'insert', {pk_new}, to_jsonb(n), NULL, NULL, 2
              FROM new_rows AS n
             WHERE NOT EXISTS (SELECT 1 FROM old_rows AS o WHERE {pk_join})
           ) AS c
     ORDER BY c.part;
    IF (SELECT listening FROM crmflow.matcher_state) THEN  -- crmflow.wake_matcher, inlined
        PERFORM pg_notify('crmflow_outbox', '');
    END IF;
    RETURN NULL;
END
$crmflow_capture$;

-- name: delete_function
CREATE OR REPLACE FUNCTION {function}() RETURNS trigger
    LANGUAGE plpgsql AS $crmflow_capture$
DECLARE
    write_depth integer := coalesce(nullif(current_setting('crmflow.depth', true), '')::integer, 0);
    write_actor text := coalesce(nullif(current_setting('crmflow.actor', true), ''), session_user);
BEGIN
    INSERT INTO crmflow.outbox (entity_type, op, pk, old_row, depth, actor)
    SELECT {entity_type}, 'delete', {pk_old}, to_jsonb(o), write_depth, write_actor
      FROM old_rows AS o;
    IF (SELECT listening FROM crmflow.matcher_state) THEN  -- crmflow.wake_matcher, inlined
        PERFORM pg_notify('crmflow_outbox', '');
    END IF;
    RETURN NULL;
END
$crmflow_capture$;

-- name: insert_trigger
CREATE TRIGGER {trigger} AFTER INSERT ON {table}
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION {function}();

-- name: update_trigger
CREATE TRIGGER {trigger} AFTER UPDATE ON {table}
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION {function}();

-- name: delete_trigger
CREATE TRIGGER {trigger} AFTER DELETE ON {table}
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION {function}();

-- name: drop_trigger
DROP TRIGGER IF EXISTS {trigger} ON {table};

-- name: drop_function
DROP FUNCTION IF EXISTS {function}();
