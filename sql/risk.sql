-- The dashboard's risk page (/ui/risk, api/routes/ui_risk.py): a scorecard's entities
-- by level, with their top factors, change, trend and executions.

-- name: risk_scorecards
SELECT s.id, s.name, s.entity_type, s.current_version, s.last_run_at, v.definition
  FROM crmflow.scorecards AS s
  JOIN crmflow.scorecard_versions AS v
    ON v.scorecard_id = s.id AND v.version = s.current_version
 ORDER BY s.name;

-- name: risk_trend
-- Per day of the last %(days)s days (UTC), how many entities were at each level at the
-- end of the day: each entity's last history row before midnight.
SELECT d.day, l.level, count(*) AS n
  FROM generate_series(current_date - (%(days)s - 1), current_date, interval '1 day') AS d(day)
  CROSS JOIN LATERAL (
      SELECT DISTINCT ON (h.entity_key) h.level
        FROM crmflow.score_history AS h
       WHERE h.scorecard_id = %(scorecard_id)s AND h.scored_at < d.day + interval '1 day'
       ORDER BY h.entity_key, h.scored_at DESC, h.id DESC) AS l
 GROUP BY d.day, l.level
 ORDER BY d.day, l.level;

-- name: risk_history
-- The last scores of the listed entities, oldest first (their sparklines).
SELECT entity_key, score, scored_at
  FROM (SELECT h.entity_key, h.score, h.scored_at,
               row_number() OVER (PARTITION BY h.entity_key ORDER BY h.scored_at DESC, h.id DESC) AS n
          FROM crmflow.score_history AS h
         WHERE h.scorecard_id = %(scorecard_id)s AND h.entity_key = ANY (%(keys)s::jsonb[])) AS r
 WHERE n <= %(points)s
 ORDER BY entity_key, scored_at;

-- name: risk_executions
-- Per listed entity, its executions and the latest one.
SELECT x.entity_pk AS entity_key, count(*) AS executions, max(x.id) AS latest_id
  FROM crmflow.executions AS x
 WHERE x.entity_type = %(entity_type)s AND x.entity_pk = ANY (%(keys)s::jsonb[])
 GROUP BY x.entity_pk;
