-- An event-triggered workflow fires for writes committed after it was activated, as
-- Salesforce and HubSpot do; backfill is the explicit way to run it over rows that
-- already match. Each activation (created active, or set active again after a pause)
-- records the activating transaction's snapshot: an event whose writer had committed
-- by then (pg_visible_in_snapshot of its txid) is older than the workflow and does not
-- enroll it, even if it was still waiting in the outbox. NULL (workflows active before
-- this migration): no such limit.
ALTER TABLE crmflow.workflows ADD COLUMN active_since pg_snapshot;

CREATE FUNCTION crmflow.note_activation() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.status = 'active' AND (TG_OP = 'INSERT' OR OLD.status IS DISTINCT FROM 'active') THEN
        NEW.active_since := pg_current_snapshot();
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER tg_workflows__activation
    BEFORE INSERT OR UPDATE OF status ON crmflow.workflows
    FOR EACH ROW EXECUTE FUNCTION crmflow.note_activation();
