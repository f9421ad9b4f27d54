-- Capture only what can matter (docs/design.md, "Capture keeps what can match"). The
-- capture functions keep the rows some active workflow could match; the filter of each
-- workflow version is compiled when it is saved (engine/prefilter.py) and the capture
-- functions of its entity are regenerated in the transaction that activates, pauses,
-- edits or archives it (crmflow.refresh_capture in sql/capture.sql).
--
--   workflow_versions.capture_filter  the version's filter per operation: {"insert":
--       <node>, "update": <node>, "delete": <node>}, an operation left out being one the
--       version never matches; NULL (versions saved before this migration): every row of
--       the operations its trigger type matches.
--   watched_tables.capture_all  keep every row of the table, whatever the workflows
--       (`crmflow watch TABLE --all-rows`, for audit users).
ALTER TABLE crmflow.workflow_versions ADD COLUMN capture_filter jsonb;
ALTER TABLE crmflow.watched_tables ADD COLUMN capture_all boolean NOT NULL DEFAULT false;

-- Changes to workflows mark the entities they touch; the capture of those entities is
-- regenerated before the transaction commits (at the latest by the deferred trigger;
-- engine/workflows.py runs it earlier, inside its lock-timeout retries). The bodies are
-- in sql/capture.sql (re-applied by every `crmflow migrate`), these are placeholders.
CREATE FUNCTION crmflow.note_capture_change() RETURNS trigger
    LANGUAGE plpgsql AS $$ BEGIN RETURN NULL; END $$;
CREATE FUNCTION crmflow.refresh_capture_at_commit() RETURNS trigger
    LANGUAGE plpgsql AS $$ BEGIN RETURN NULL; END $$;

CREATE TRIGGER tg_workflows__capture_change
    AFTER INSERT OR UPDATE OF status, current_version OR DELETE ON crmflow.workflows
    FOR EACH ROW EXECUTE FUNCTION crmflow.note_capture_change();
CREATE TRIGGER tg_workflow_versions__capture_change
    AFTER INSERT OR UPDATE OR DELETE ON crmflow.workflow_versions
    FOR EACH ROW EXECUTE FUNCTION crmflow.note_capture_change();
CREATE CONSTRAINT TRIGGER tg_workflows__capture_refresh
    AFTER INSERT OR UPDATE OF status, current_version OR DELETE ON crmflow.workflows
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION crmflow.refresh_capture_at_commit();
CREATE CONSTRAINT TRIGGER tg_workflow_versions__capture_refresh
    AFTER INSERT OR UPDATE OR DELETE ON crmflow.workflow_versions
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION crmflow.refresh_capture_at_commit();

-- An activation's snapshot is taken again once capture is regenerated (note_activation
-- records the workflows it activated for crmflow.refresh_capture): writes committed
-- before it were captured with the old filter and do not enroll the workflow, writes
-- committed after it were captured with the new one (or with none).
CREATE OR REPLACE FUNCTION crmflow.note_activation() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.status = 'active' AND (TG_OP = 'INSERT' OR OLD.status IS DISTINCT FROM 'active') THEN
        NEW.active_since := pg_current_snapshot();
        PERFORM set_config('crmflow.activated',
                           coalesce(current_setting('crmflow.activated', true), '') || NEW.id || ',',
                           true);
    END IF;
    RETURN NEW;
END
$$;
