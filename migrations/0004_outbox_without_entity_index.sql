-- The claim's per-entity order check now scans the pending events below its batch
-- (sql/matcher.sql, claim_events) instead of probing an index on (entity_type, pk):
-- that index cost about as much as the rest of a captured row to maintain.
DROP INDEX crmflow.outbox_pending_entity_idx;
