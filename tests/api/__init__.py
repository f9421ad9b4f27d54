"""The management API and the dashboard (api/): endpoints, auth, the CLI around them, dry runs,
events, executions, fuzzing, the dashboard in Chromium, sessions, offline pages."""
