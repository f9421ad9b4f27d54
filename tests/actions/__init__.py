"""The actions (engine/actions/, netpolicy.py, http.py, the plugins): database and external
actions, dedupe_key, split, the SSRF policy, shared HTTP clients, entry points."""
