-- The rows a scoring run writes, crmflow.score_latest and crmflow.score_history, lose
-- their foreign key to crmflow.scorecards: its check ran once per row written, 0.8 s per
-- 100,000 rows and table, about a third of a first full run's own writes. The engine
-- writes these rows only for a scorecard it has just loaded, under that scorecard's run
-- lock, and scorecards are never deleted by the engine (versions are kept); the cascade
-- the keys gave a scorecard deleted by hand is kept by the trigger below.
ALTER TABLE crmflow.score_latest DROP CONSTRAINT IF EXISTS score_latest_scorecard_id_fkey;
ALTER TABLE crmflow.score_history DROP CONSTRAINT IF EXISTS score_history_scorecard_id_fkey;

CREATE FUNCTION crmflow.scorecard_deleted() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM crmflow.score_latest WHERE scorecard_id = OLD.id;
    DELETE FROM crmflow.score_history WHERE scorecard_id = OLD.id;
    RETURN OLD;
END
$$;

CREATE TRIGGER scorecard_deleted AFTER DELETE ON crmflow.scorecards
    FOR EACH ROW EXECUTE FUNCTION crmflow.scorecard_deleted();

