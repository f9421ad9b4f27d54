"""Workflow definitions (engine/model/, workflows.py, audit.py, the workflow commands):
validation with paths, names, bad input on every surface, versions, the audit trail, export."""
