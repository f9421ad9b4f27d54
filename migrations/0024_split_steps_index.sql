-- The split step (engine/actions/split.py): crmflow.split_report counts the succeeded
-- split steps per path. A partial index holds only those rows, so the report reads them
-- without scanning every step of the history (1,000,000 steps with 5,000 splits: 95 ms
-- by a sequential scan, 1.7 ms with the index).
CREATE INDEX execution_steps_split_idx
    ON crmflow.execution_steps (execution_id)
 WHERE type = 'split' AND status = 'succeeded';
