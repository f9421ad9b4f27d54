"""Scorecards: versioned definitions that score entities set-based in SQL
(docs/scorecards.md). ``model`` (the definition), ``relations`` (related tables),
``store`` (apply, versions), ``run`` (scoring runs, real time, schedules); the SQL:
``compile`` (the public entry point, re-exporting the builders), ``sqlparts`` (shared
types and fragments), ``row_factors`` (conditions, expression factors), ``aggregates``
(grouped CTEs per related table), ``features`` (``build``, ``compile_features``),
``scoring`` (score, level, top factors, days, ``compile_scoring``), ``entity_writes``
(``compile_write_chunk``); ``score fit``: ``fit`` (the fit, ``FitResult``, importance,
``save``), ``fit_samples`` (rows per snapshot), ``fit_models`` (logistic per segment,
Weibull survival, AUC/Brier/reliability)."""
