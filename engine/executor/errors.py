"""What steps raise and how failures are told: shared by actions and the executor.

This module imports nothing of the engine, so actions can import it without a cycle.
"""

from __future__ import annotations

import asyncio
import json
from datetime import datetime
from typing import Any

import psycopg


class Skip(Exception):
    """Raised by an action that decides not to run; the step is ``skipped`` with the reason."""


class PermanentError(Exception):
    """An error that retrying cannot fix (bad configuration, 4xx): no further attempts."""


class RetryAfter(Exception):
    """Raised by an action asked to come back later (HTTP 429/503 Retry-After)."""

    def __init__(self, message: str, seconds: float | None) -> None:
        super().__init__(message)
        self.seconds = seconds


class StepRetryLater(Exception):
    """The execution has nothing to do before ``retry_at`` (a back-off, a lost database)."""

    def __init__(self, execution_id: int, retry_at: datetime) -> None:
        super().__init__(f"execution {execution_id}: step retry at {retry_at.isoformat()}")
        self.execution_id = execution_id
        self.retry_at = retry_at


def describe(exc: BaseException) -> str:
    """An error as the step's history shows it."""
    if isinstance(exc, TimeoutError | asyncio.TimeoutError):
        return "timed out"
    if isinstance(exc, psycopg.Error) and exc.diag.message_primary:
        return f"{type(exc).__name__}: {exc.diag.message_primary}"
    text = str(exc) or type(exc).__name__
    return text[:2000]


def jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))
