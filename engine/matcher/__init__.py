"""The matcher: pending events x active workflows → executions and their jobs.

Each batch is one transaction (sql/matcher.sql): claim events with ``FOR UPDATE SKIP
LOCKED``, evaluate every active workflow on the whole batch in one statement, insert
executions under the unique key (workflow version, event), defer their procrastinate
jobs, mark the events processed. Several matchers may run at once; a crash anywhere
replays safely.

The loop drains until the outbox is empty, then tells writers it is listening
(``crmflow.matcher_state.listening``) and waits for a NOTIFY or the poll interval,
whichever comes first. NOTIFY is only a hint: the poll alone would do, slower.
"""

from engine.matcher.broken import broken_workflows, record_broken, refresh_broken, replay_events
from engine.matcher.loop import Matcher
from engine.matcher.plan import MatchPlan, build_plan, catalog_error, compose, find_broken
from engine.matcher.rounds import BatchResult
from engine.matcher.signals import OUTBOX_CHANNEL, WORKFLOWS_CHANNEL, conflict_kind

__all__ = [
    "OUTBOX_CHANNEL",
    "WORKFLOWS_CHANNEL",
    "BatchResult",
    "MatchPlan",
    "Matcher",
    "broken_workflows",
    "build_plan",
    "catalog_error",
    "compose",
    "conflict_kind",
    "find_broken",
    "record_broken",
    "refresh_broken",
    "replay_events",
]
