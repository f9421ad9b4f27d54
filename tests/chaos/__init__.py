"""Fault-injection tests with real processes (pytest -m chaos tests/chaos)."""
