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

-- The executor's claim (engine/executor/queue.py): up to "max_rows" due executions, in
-- priority then due order, leased to "worker" for "lease" seconds. An execution is not
-- claimed while another of its entity is leased, or while an earlier one of its entity
-- keeps event order (ordered). Claims are serialised by an advisory lock, taken before
-- the claim's snapshot (a plpgsql statement gets a new one): two workers claiming at the
-- same moment would otherwise each miss the other's fresh leases and could run two
-- executions of one entity side by side. A claim takes a few milliseconds.
-- taken_over: the worker whose lease on it ran out (it died or froze), if any.
DO $$
BEGIN
    -- (a development version returned no taken_over: its result type cannot be replaced)
    IF EXISTS (SELECT 1 FROM pg_proc
                WHERE proname = 'claim_executions' AND pronamespace = 'crmflow'::regnamespace
                  AND pg_get_function_result(oid) NOT LIKE '%taken_over%') THEN
        DROP FUNCTION crmflow.claim_executions(text, integer, double precision);
    END IF;
END
$$;
CREATE OR REPLACE FUNCTION crmflow.claim_executions(worker text, max_rows integer, lease double precision)
    RETURNS TABLE (execution_id bigint, entity_key text, taken_over text)
    LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(hashtextextended('crmflow:executor:claim', 0));
    RETURN QUERY
    WITH due AS (
        SELECT q.execution_id, q.leased_by AS previous
          FROM crmflow.execution_queue AS q
         WHERE q.run_at <= clock_timestamp()
           AND (q.leased_until IS NULL OR q.leased_until < clock_timestamp())
           AND NOT EXISTS (
                   SELECT 1 FROM crmflow.execution_queue AS e
                    WHERE e.entity_key = q.entity_key AND e.execution_id <> q.execution_id
                      AND (e.leased_until >= clock_timestamp()
                           OR (e.ordered AND e.execution_id < q.execution_id)))
         ORDER BY q.priority DESC, q.run_at, q.execution_id
         LIMIT max_rows
           FOR UPDATE OF q SKIP LOCKED)
    UPDATE crmflow.execution_queue AS q
       SET leased_by = worker,
           leased_until = clock_timestamp() + make_interval(secs => lease)
      FROM due
     WHERE q.execution_id = due.execution_id
    RETURNING q.execution_id, q.entity_key, due.previous;
END
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
