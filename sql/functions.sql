-- Helper functions of the engine, (re)installed by `crmflow migrate`.

-- name: install
-- The procrastinate lock of an execution's step-running jobs: the entity's, so one
-- entity's executions run one at a time in event order ("crmflow:lead:{"id": 42}");
-- an execution about no entity is serialised with itself only.
CREATE OR REPLACE FUNCTION crmflow.execution_lock(entity_type text, pk jsonb, execution_id bigint)
    RETURNS text
    LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN pk IS NOT NULL THEN 'crmflow:' || entity_type || ':' || pk::text
                ELSE 'crmflow:execution:' || execution_id END
$$;

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
