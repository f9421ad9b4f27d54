-- The step executor's queue (engine/executor/): one row per live execution with work to
-- do now or later. The executor claims many due rows in one statement, runs their steps
-- set-based where it can, and records every row's next wake-up in one statement per
-- batch; procrastinate jobs only wake it up (a job per due moment, not per execution).
--
-- entity_key: the execution's entity ("crmflow:lead:{...}") or the execution itself.
-- ordered:    the execution keeps its entity's event order (a start or an immediate
--             step): no later execution of the entity is claimed before it. A row that
--             waits for a time (a delay, a retry back-off, a rate limit) is not ordered,
--             so a step delayed three days never holds back the entity's later events.
-- leased_*:   the worker running it, until when (renewed while it runs); a lease that
--             ran out (a worker that died or froze) makes the row claimable again.
CREATE TABLE crmflow.execution_queue (
    execution_id bigint PRIMARY KEY REFERENCES crmflow.executions (id) ON DELETE CASCADE,
    run_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    priority integer NOT NULL DEFAULT 0,
    entity_key text NOT NULL,
    ordered boolean NOT NULL DEFAULT true,
    leased_by text,
    leased_until timestamptz
) WITH (fillfactor = 70);

-- The claim reads due rows in priority order; the entity check reads the entity's rows.
CREATE INDEX execution_queue_due_idx
    ON crmflow.execution_queue (priority DESC, run_at, execution_id);
CREATE INDEX execution_queue_run_at_idx ON crmflow.execution_queue (run_at);
CREATE INDEX execution_queue_entity_idx ON crmflow.execution_queue (entity_key, execution_id);

ALTER TABLE crmflow.execution_queue SET (
    autovacuum_vacuum_threshold = 500, autovacuum_vacuum_scale_factor = 0.02,
    autovacuum_analyze_threshold = 500, autovacuum_analyze_scale_factor = 0.02);

-- Live executions of an earlier version (queued as one procrastinate job each) move to
-- the queue; their old jobs find them there and only wake the executor.
INSERT INTO crmflow.execution_queue (execution_id, run_at, priority, entity_key, ordered)
SELECT x.id,
       coalesce(x.not_before,
                (SELECT min(s.scheduled_at) FROM crmflow.execution_steps AS s
                  WHERE s.execution_id = x.id AND s.status = 'scheduled'),
                clock_timestamp()),
       x.priority,
       CASE WHEN x.entity_pk IS NOT NULL THEN 'crmflow:' || x.entity_type || ':' || x.entity_pk::text
            ELSE 'crmflow:execution:' || x.id END,
       x.not_before IS NULL
  FROM crmflow.executions AS x
 WHERE x.status IN ('pending', 'running', 'waiting')
ON CONFLICT DO NOTHING;
