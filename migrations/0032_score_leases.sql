-- The keys a real-time rescoring round took from crmflow.score_queue, leased to the round
-- until it has rescored them (engine/scorecards/run.py, rescore_queued). A round that
-- fails puts its keys back itself; one whose worker was killed cannot, so its keys'
-- lease runs out and the next round puts them back (sql/scorecards.sql
-- "requeue_expired_leases"). Rescoring twice is harmless (a rescore is idempotent), so
-- a lease that ran out under a slow round costs only a repeat.
CREATE TABLE crmflow.score_leases (
    round_id uuid NOT NULL,
    scorecard_id bigint NOT NULL REFERENCES crmflow.scorecards (id) ON DELETE CASCADE,
    entity_key jsonb NOT NULL,
    lease_until timestamptz NOT NULL,
    PRIMARY KEY (round_id, scorecard_id, entity_key)
);
CREATE INDEX score_leases_until_idx ON crmflow.score_leases (lease_until);
