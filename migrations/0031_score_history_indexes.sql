-- crmflow.score_history's indexes, cheaper to keep up (in a migration of its own: the
-- builds over an existing history do not hold 0030's locks meanwhile).
--
-- By entity: a hash index on the key. The btree on (scorecard_id, entity_key, scored_at)
-- compared jsonb keys at every insert (0.74 s per 100,000 history rows, 0.24 s hashed).
-- Its readers look up one entity's or a few entities' rows (the risk page's change and
-- sparklines, the demo's top risks), which a hash index serves; they filter the
-- scorecard and sort those few rows themselves.
DROP INDEX IF EXISTS crmflow.score_history_entity_idx;
CREATE INDEX score_history_entity_idx ON crmflow.score_history USING hash (entity_key);

-- By time, within a scorecard: the risk page's trend reads one scorecard's history up
-- to each day (the index on scored_at alone spanned every scorecard's). No retention
-- reads the history by time alone.
DROP INDEX IF EXISTS crmflow.score_history_time_idx;
CREATE INDEX score_history_time_idx ON crmflow.score_history (scorecard_id, scored_at);
