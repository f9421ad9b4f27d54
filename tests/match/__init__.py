"""Matching (engine/matcher/, conditions/, inline.py, scheduler.py, backfill.py): the matcher's
rounds, conditions and their SQL, broken workflows, inline steps, environments, schedules,
backfill."""
