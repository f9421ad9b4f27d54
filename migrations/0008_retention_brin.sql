-- Retention without hot-path cost. 0006 added three btree indexes so retention could
-- find old rows without scanning; each cost an index entry per processed event or
-- finished execution, paid by the matcher and the step runner on every enrollment.
-- Replace them with one BRIN index on outbox (captured_at): set once at insert (never
-- by the matcher's update), in insertion order, so the index is a few pages and costs
-- writers next to nothing. Old executions are found through executions_day_idx (their
-- trigger day) and the events that live or failed executions still need through the
-- status indexes (sql/retention.sql), as one hashed list per batch.
DROP INDEX crmflow.outbox_processed_at_idx;
DROP INDEX crmflow.executions_finished_at_idx;
DROP INDEX crmflow.executions_event_idx;
CREATE INDEX outbox_captured_at_brin ON crmflow.outbox USING brin (captured_at);
