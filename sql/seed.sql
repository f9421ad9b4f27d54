-- The seed (engine/seed.py): the example CRM itself is sql/install/example_crm.sql.

-- name: seed_users
-- Example users for the pre-configured workflows (deal owners, CSMs for the churn
-- playbook, managers to notify), added by `crmflow seed` only while the users table is
-- empty: a CRM's own users stay as they are. (engine/seed.py takes an advisory lock
-- first, so two seeds at once add them once.)
INSERT INTO users (name, email, role)
SELECT u.name, u.email, u.role
  FROM ROWS FROM (jsonb_to_recordset(%(users)s::jsonb) AS (name text, email text, role text))
       WITH ORDINALITY AS u(name, email, role, n)
 WHERE NOT EXISTS (SELECT 1 FROM users)
 ORDER BY u.n
RETURNING id, name, email, role;
