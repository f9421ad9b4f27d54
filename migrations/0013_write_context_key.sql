-- The key that signs the write context (depth and actor) the engine sets before its own
-- writes (crmflow.set_write_context, sql/capture.sql). Capture trusts a depth or actor
-- only with a valid signature, so a CRM session cannot opt its writes out of automation
-- (`SET crmflow.depth = '99'`) or pass them off as the engine's. Readable by crmflow's
-- roles only: the CRM's role is granted nothing in schema crmflow.
CREATE TABLE crmflow.write_context_key (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    secret text NOT NULL
);
INSERT INTO crmflow.write_context_key (secret)
VALUES (md5(gen_random_uuid()::text) || md5(gen_random_uuid()::text));
REVOKE ALL ON crmflow.write_context_key FROM PUBLIC;
