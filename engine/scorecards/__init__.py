"""Scorecards: versioned definitions that score entities set-based in SQL
(docs/scorecards.md). ``model`` (the definition), ``relations`` (related tables),
``compile`` (the SQL), ``store`` (apply, versions), ``run`` (scoring, real time,
schedules)."""
