"""Where the step runner used to live; its parts are in :mod:`engine.executor` now.

Kept so that plugins written against ``engine.runtime`` (``StepContext``,
``RetryAfter``, ``now``) go on importing; new code imports from ``engine.executor``.
"""

from engine.executor.context import StepContext, now, with_steps
from engine.executor.errors import PermanentError, RetryAfter, Skip, StepRetryLater
from engine.executor.plans import Plan, plan_for
from engine.executor.queue import TASK_NAME
from engine.executor.runner import Runner

__all__ = [
    "TASK_NAME",
    "PermanentError",
    "Plan",
    "RetryAfter",
    "Runner",
    "Skip",
    "StepContext",
    "StepRetryLater",
    "now",
    "plan_for",
    "with_steps",
]
