"""Enrollments (engine/lifecycle*.py, suppressions.py): goals, exit criteria, waits, their
robustness, the enrollments page, suppression lists."""
