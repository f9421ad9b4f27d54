-- Retention (engine/retention.py, `crmflow prune`, the worker's automatic retention):
-- find old processed events and old finished executions without scanning the tables.
-- Both columns are set by updates that were not HOT already (they change the predicate
-- of a partial index), so each costs one more index entry, not a heavier update.
CREATE INDEX outbox_processed_at_idx ON crmflow.outbox (processed_at)
    WHERE processed_at IS NOT NULL;
CREATE INDEX executions_finished_at_idx ON crmflow.executions (finished_at)
    WHERE finished_at IS NOT NULL;
-- "Is this event still needed by a live or failed execution?", asked per pruned event.
CREATE INDEX executions_event_idx ON crmflow.executions (event_id)
    WHERE event_id IS NOT NULL;
