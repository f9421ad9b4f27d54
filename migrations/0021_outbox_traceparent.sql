-- The CRM writer's trace (engine/tracing.py; docs/operations.md, "Tracing"): an
-- application that traces its writes may run
--     SET LOCAL crmflow.traceparent = '00-<trace id>-<span id>-01'
-- in its transaction; each row the capture records keeps it (a column default, evaluated
-- in the writer's transaction by the capture's INSERT), and the executions those rows
-- enroll link to that span. Unset, the column stays NULL. At most the 55 characters of
-- a W3C traceparent are kept; the matcher checks the form before linking.
ALTER TABLE crmflow.outbox ADD COLUMN traceparent text
    DEFAULT nullif(left(current_setting('crmflow.traceparent', true), 55), '');
