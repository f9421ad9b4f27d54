-- dedupe_key of create_task and send_notification (engine/actions/dedupe.py, migration 0025).

-- name: lock_keys
-- The keys' rows, created when missing, locked in key order (the caller sorts them): a
-- concurrent step with one of these keys waits here until this transaction ends.
INSERT INTO crmflow.dedupe_keys AS d (kind, dedupe_key, workflow_id, execution_id)
SELECT %(kind)s, k.key, %(workflow_id)s, %(execution_id)s
  FROM unnest(%(keys)s::text[]) WITH ORDINALITY AS k(key, n)
 ORDER BY k.n
ON CONFLICT (kind, dedupe_key) DO UPDATE SET updated_at = now();

-- name: open_items
-- The CRM rows this key made that are still open (the open column NULL), locked.
SELECT t.id
  FROM crmflow.dedupe_keys AS d
  JOIN {table} AS t ON t.id = ANY (d.item_ids)
 WHERE d.kind = %(kind)s AND d.dedupe_key = %(key)s AND t.{open_column} IS NULL
 ORDER BY t.id
   FOR UPDATE OF t;

-- name: remember
-- The items the key made now (a new item), or one more update of the same ones.
UPDATE crmflow.dedupe_keys
   SET item_ids = %(ids)s::bigint[], updated_at = now(),
       updates = CASE WHEN %(updated)s THEN updates + 1 ELSE 0 END,
       workflow_id = %(workflow_id)s, execution_id = %(execution_id)s
 WHERE kind = %(kind)s AND dedupe_key = %(key)s;
