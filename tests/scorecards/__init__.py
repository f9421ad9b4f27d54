"""Scorecards and churn (engine/scorecards/, churn_history.py): definitions, scoring, the CLI,
fit, the churn history, playbook and risk page."""
