"""Reporting and operating (views, engine/executions.py, retention.py, tracing.py, metrics and
alerts)."""
