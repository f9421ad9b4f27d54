"""The statuses crmflow keeps in its tables: one ``StrEnum`` per column with a CHECK list.

Each enum holds exactly the values its column's CHECK constraint allows, in the
constraint's order (``tests/project/test_statuses.py`` reads the constraints of a migrated
database and compares). Members are ``str``: they compare equal to the stored text and
psycopg sends their value (``ExecutionStatus.FAILED == "failed"``).

- crmflow.workflows.status: :class:`WorkflowStatus`
- crmflow.executions.status: :class:`ExecutionStatus`
- crmflow.execution_steps.status: :class:`StepStatus`
- crmflow.circuit_breakers.state: :class:`BreakerState`
- crmflow.scorecards.status: :class:`ScorecardStatus`
- crmflow.workflow_changes.action: :class:`WorkflowChange`
"""

from __future__ import annotations

from enum import StrEnum


class WorkflowStatus(StrEnum):
    """A workflow's status (crmflow.workflows.status): only an active workflow fires."""

    ACTIVE = "active"
    PAUSED = "paused"
    ARCHIVED = "archived"


class ExecutionStatus(StrEnum):
    """An execution's status (crmflow.executions.status)."""

    PENDING = "pending"  # not started: behind its entity's queue, debounce or a limit
    RUNNING = "running"
    WAITING = "waiting"  # a step is scheduled (a delay or a retry)
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    SKIPPED = "skipped"


class StepStatus(StrEnum):
    """A step's status (crmflow.execution_steps.status)."""

    PENDING = "pending"
    SCHEDULED = "scheduled"  # due at scheduled_at (a delay or a retry)
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    SKIPPED = "skipped"
    COMPENSATED = "compensated"


class BreakerState(StrEnum):
    """A target host's circuit breaker (crmflow.circuit_breakers.state)."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class ScorecardStatus(StrEnum):
    """A scorecard's status (crmflow.scorecards.status): a paused one runs only when asked."""

    ACTIVE = "active"
    PAUSED = "paused"


# Live executions (never removed by retention); the others have finished.
LIVE: tuple[ExecutionStatus, ...] = (
    ExecutionStatus.PENDING,
    ExecutionStatus.RUNNING,
    ExecutionStatus.WAITING,
)
FINISHED: tuple[ExecutionStatus, ...] = tuple(s for s in ExecutionStatus if s not in LIVE)
# A step that is done: its execution goes on past it.
DONE_STEP: tuple[StepStatus, ...] = (
    StepStatus.SUCCEEDED,
    StepStatus.SKIPPED,
    StepStatus.COMPENSATED,
)


class WorkflowChange(StrEnum):
    """What a row of the audit trail records (crmflow.workflow_changes.action)."""

    CREATE = "create"
    UPDATE = "update"  # a new version (its status may change with it)
    ACTIVATE = "activate"
    PAUSE = "pause"
    ARCHIVE = "archive"
