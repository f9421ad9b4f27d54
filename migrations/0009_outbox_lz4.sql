-- Captured rows are compressed with lz4 where the server has it (PostgreSQL 14+ built
-- with lz4, as Debian's and most distributions' are): the writer pays the compression
-- of every wide row it captures, and lz4 costs a fraction of the default pglz
-- (measured here: 1,000 captured 500-column rows, new and old, 0.70 s with pglz against
-- 0.16 s with lz4, to_jsonb included). A catalog change only: no rewrite, existing
-- rows stay as they are. Without lz4 the server keeps pglz.
DO $$
BEGIN
    ALTER TABLE crmflow.outbox
        ALTER COLUMN new_row SET COMPRESSION lz4,
        ALTER COLUMN old_row SET COMPRESSION lz4,
        ALTER COLUMN payload SET COMPRESSION lz4;
EXCEPTION WHEN feature_not_supported OR invalid_parameter_value THEN
    RAISE NOTICE 'this server has no lz4: captured rows stay compressed with pglz';
END
$$;
