-- Lifecycle hits kept for later (engine/lifecycle.py, sql/lifecycle.sql "round"): a
-- goal, exit or wait the matcher's round found met (or whose event arrived) while
-- another transaction held the execution's row or one of its step rows (the executor
-- running a step, another matcher's round, a session). The round never waits for such a
-- lock, and the change it evaluated is consumed with the round, so the hit itself is
-- kept here: the next round takes these rows again, the executor settles an execution's
-- rows before its next step, and the round makes such an execution due at once (it
-- waits for the lock holder, then settles them). Without them the wait ran to its
-- timeout and the goal or exit was seen only at the next step, if ever.
--
-- outcome: 'met' (the conditions held on the row the round read) or 'event' (the custom
--          event a wait expects arrived: it is not there to be read again).
-- No foreign key to the execution: its check takes a KEY SHARE lock on the execution's
-- row, which waits for the very FOR UPDATE that made the round keep the hit. The rows of
-- executions gone or finished are removed by the round that next takes them. No unique
-- key either, so that an insert never waits for another round's: duplicates are
-- settled together.
CREATE TABLE crmflow.watch_hits (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    execution_id bigint NOT NULL,
    kind text NOT NULL CHECK (kind IN ('goal', 'exit', 'wait')),
    step_id text NOT NULL DEFAULT '',
    outcome text NOT NULL CHECK (outcome IN ('met', 'event')),
    hit_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX watch_hits_execution_idx ON crmflow.watch_hits (execution_id);
