-- The churn scenario's feedback (docs/churn.md): labels left on a scorecard's
-- predictions (crmflow.score_feedback, migration 0028) and what `score fit` reads back.

-- name: fit_feedback
-- The latest verdict per entity of a scorecard.
SELECT DISTINCT ON (entity_id) entity_id, label, created_at
  FROM crmflow.score_feedback
 WHERE scorecard = %(scorecard)s AND entity_type = %(entity_type)s
 ORDER BY entity_id, created_at DESC, id DESC;

-- name: record_feedback
INSERT INTO crmflow.score_feedback
       (scorecard, entity_type, entity_id, label, score, level, source, note, execution_id)
VALUES (%(scorecard)s, %(entity_type)s, %(entity_id)s, %(label)s, %(score)s, %(level)s,
        %(source)s, %(note)s, %(execution_id)s)
RETURNING id;

-- name: suppress_entity
-- An entity on a suppression list until a time (crmflow.suppressions, migration 0025):
-- a second verdict extends the entry rather than adding another.
INSERT INTO crmflow.suppressions AS s (list, entity_type, entity_key, reason, until, who)
VALUES (%(list)s, %(entity_type)s, %(entity_key)s, %(reason)s, %(until)s, %(who)s)
ON CONFLICT (list, entity_type, entity_key) WHERE email IS NULL
DO UPDATE SET until = CASE WHEN s.until IS NULL THEN NULL
                           ELSE greatest(s.until, EXCLUDED.until) END,
              reason = EXCLUDED.reason, who = EXCLUDED.who
RETURNING id, until;
