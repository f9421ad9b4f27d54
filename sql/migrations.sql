-- The migration ledger (engine/migrations.py): crmflow.schema_migrations holds each
-- applied migration's version and checksum.

-- name: bootstrap_migrations
CREATE SCHEMA IF NOT EXISTS crmflow;
CREATE TABLE IF NOT EXISTS crmflow.schema_migrations (
    version text PRIMARY KEY,
    checksum text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);

-- name: applied_migrations
SELECT version, checksum, applied_at FROM crmflow.schema_migrations ORDER BY version;

-- name: record_migration
INSERT INTO crmflow.schema_migrations (version, checksum) VALUES (%(version)s, %(checksum)s);

-- name: migration_timeouts
-- Migrations may run long and wait for a concurrent migrate: the engine session's
-- statement and lock timeouts (engine.db.configure) do not apply.
SET LOCAL statement_timeout = 0;
SET LOCAL lock_timeout = 0;

-- name: migration_lock
-- One migrate at a time.
SELECT pg_advisory_xact_lock(%(lock)s);

-- name: ledger_exists
SELECT to_regclass('crmflow.schema_migrations') IS NOT NULL AS x;

-- name: alerts_table_exists
SELECT to_regclass('crmflow.alerts') IS NOT NULL AS x;

-- name: procrastinate_schema
-- procrastinate's SQL names its objects without a schema: point it at ours.
CREATE SCHEMA IF NOT EXISTS {schema};
SET LOCAL search_path TO {schema}, public;

-- name: procrastinate_installed
SELECT to_regclass(format('%%I.procrastinate_jobs', %(schema)s::text)) IS NOT NULL AS x;

-- name: reset_search_path
RESET search_path;

-- name: procrastinate_wakeups
-- procrastinate wakes workers when a job is inserted, not when a lock frees up: a job
-- queued behind another of the same entity would wait for the next poll (up to the
-- polling interval per job, so a busy entity would crawl). When a job holding a lock
-- leaves "doing" and a due job waits on that lock, announce it the way procrastinate
-- announces new jobs. The partial index keeps the check cheap under a large backlog.
-- (Completed on the procrastinate schema by engine/migrations.py.)
-- procrastinate's jobs table churns (a row in and out per job): keep its statistics and
-- dead rows in check sooner than the defaults would.
ALTER TABLE {schema}.procrastinate_jobs SET (
    autovacuum_analyze_threshold = 500, autovacuum_analyze_scale_factor = 0.02,
    autovacuum_vacuum_threshold = 500, autovacuum_vacuum_scale_factor = 0.02);

CREATE INDEX IF NOT EXISTS crmflow_todo_lock_idx ON {schema}.procrastinate_jobs (lock)
    WHERE status = 'todo' AND lock IS NOT NULL;

CREATE OR REPLACE FUNCTION crmflow.wake_lock_successor() RETURNS trigger
    LANGUAGE plpgsql AS $$
DECLARE
    successor bigint;
BEGIN
    SELECT j.id INTO successor
      FROM {schema}.procrastinate_jobs AS j
     WHERE j.lock = OLD.lock AND j.status = 'todo'
       AND (j.scheduled_at IS NULL OR j.scheduled_at <= now())
     LIMIT 1;
    IF successor IS NOT NULL THEN
        PERFORM pg_notify('procrastinate_queue_v1#' || OLD.queue_name,
                          json_build_object('type', 'job_inserted', 'job_id', successor)::text);
    END IF;
    RETURN NULL;
END
$$;

DROP TRIGGER IF EXISTS crmflow_wake_lock_successor_update ON {schema}.procrastinate_jobs;
CREATE TRIGGER crmflow_wake_lock_successor_update
    AFTER UPDATE OF status ON {schema}.procrastinate_jobs
    FOR EACH ROW WHEN (OLD.status = 'doing' AND NEW.status <> 'doing' AND OLD.lock IS NOT NULL)
    EXECUTE FUNCTION crmflow.wake_lock_successor();

DROP TRIGGER IF EXISTS crmflow_wake_lock_successor_delete ON {schema}.procrastinate_jobs;
CREATE TRIGGER crmflow_wake_lock_successor_delete
    AFTER DELETE ON {schema}.procrastinate_jobs
    FOR EACH ROW WHEN (OLD.status = 'doing' AND OLD.lock IS NOT NULL)
    EXECUTE FUNCTION crmflow.wake_lock_successor();

-- Wake-ups of the step executor: a procrastinate job "crmflow.run_steps" per due moment
-- (rounded up to a quarter second), however many executions are due then. At most one
-- job waits per moment (its queueing lock); one already waiting is enough.
CREATE OR REPLACE FUNCTION crmflow.wake_executor(queue text, moments timestamptz[])
    RETURNS integer
    LANGUAGE plpgsql AS $$
DECLARE
    moment timestamptz;
    wake_lock text;
    woken integer := 0;
BEGIN
    FOR moment IN
        SELECT DISTINCT CASE WHEN m <= clock_timestamp() THEN NULL
                             ELSE to_timestamp(ceil(extract(epoch FROM m) * 4) / 4) END
          FROM unnest(moments) AS m
    LOOP
        wake_lock := 'crmflow:steps:' || coalesce((extract(epoch FROM moment) * 4)::bigint::text, 'now');
        CONTINUE WHEN EXISTS (SELECT 1 FROM {schema}.procrastinate_jobs AS j
                               WHERE j.queueing_lock = wake_lock AND j.status = 'todo');
        BEGIN
            PERFORM {schema}.procrastinate_defer_jobs_v1(ARRAY[
                ROW(queue, 'crmflow.run_steps', 0, NULL, wake_lock, '{{}}'::jsonb, moment
                )::{schema}.procrastinate_job_to_defer_v1]);
            woken := woken + 1;
        EXCEPTION WHEN unique_violation THEN
            NULL;  -- another transaction queued the same wake-up
        END;
    END LOOP;
    RETURN woken;
END
$$;
