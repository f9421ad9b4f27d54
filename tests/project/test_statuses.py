"""engine/statuses.py matches the CHECK constraints of a migrated database exactly: every
status or state column of crmflow's tables that lists its values has its enum, with the
same values in the same order."""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Any

import psycopg

from engine.statuses import (
    DONE_STEP,
    FINISHED,
    LIVE,
    BreakerState,
    ExecutionStatus,
    ScorecardStatus,
    StepStatus,
    WorkflowStatus,
)

ENUMS: dict[tuple[str, str], type[StrEnum]] = {
    ("workflows", "status"): WorkflowStatus,
    ("executions", "status"): ExecutionStatus,
    ("execution_steps", "status"): StepStatus,
    ("circuit_breakers", "state"): BreakerState,
    ("scorecards", "status"): ScorecardStatus,
}

# The CHECK constraints on one column each of crmflow's tables (pg_constraint), with their
# definitions as PostgreSQL prints them: CHECK ((status = ANY (ARRAY['a'::text, ...]))).
CHECKS = """
SELECT c.relname AS table_name, a.attname AS column_name, k.conname,
       pg_get_constraintdef(k.oid) AS definition
  FROM pg_constraint k
  JOIN pg_class c ON c.oid = k.conrelid
  JOIN pg_namespace n ON n.oid = c.relnamespace
  JOIN pg_attribute a ON a.attrelid = k.conrelid AND a.attnum = k.conkey[1]
 WHERE n.nspname = 'crmflow' AND k.contype = 'c' AND cardinality(k.conkey) = 1
 ORDER BY 1, 2, 3
"""
_LIST = re.compile(r"^CHECK \(\((\w+) = ANY \(ARRAY\[(.*)\]\)\)\)$")
_VALUE = re.compile(r"'((?:[^']|'')*)'::text")


def listed_values(definition: str) -> tuple[str, list[str]] | None:
    """``(column, values)`` of a CHECK (column IN (...)), None for any other CHECK."""
    match = _LIST.match(definition)
    if not match:
        return None
    return match.group(1), [v.replace("''", "'") for v in _VALUE.findall(match.group(2))]


async def test_the_status_enums_are_the_check_constraints(
    conn: psycopg.AsyncConnection[Any],
) -> None:
    rows = await (await conn.execute(CHECKS)).fetchall()
    found: dict[tuple[str, str], list[str]] = {}
    for row in rows:
        if row["column_name"] not in ("status", "state"):
            continue
        listed = listed_values(row["definition"])
        if listed is None:  # e.g. CHECK (state = 'closed' OR retry_at IS NOT NULL)
            continue
        column, values = listed
        assert column == row["column_name"], row
        found[(row["table_name"], column)] = values
    assert set(found) == set(ENUMS), (
        "a status column with a CHECK list and no enum in engine/statuses.py, or an enum"
        f" whose column is gone: {sorted(set(found) ^ set(ENUMS))}"
    )
    for key, enum in ENUMS.items():
        assert [m.value for m in enum] == found[key], (key, found[key])


def test_the_parser_reads_what_postgresql_prints() -> None:
    assert listed_values("CHECK ((status = ANY (ARRAY['a'::text, 'it''s'::text])))") == (
        "status",
        ["a", "it's"],
    )
    assert listed_values("CHECK (((state = 'closed'::text) OR (retry_at IS NOT NULL)))") is None


def test_the_groups_partition_the_statuses() -> None:
    assert set(LIVE) | set(FINISHED) == set(ExecutionStatus)
    assert not set(LIVE) & set(FINISHED)
    assert set(DONE_STEP) <= set(StepStatus)
    assert ExecutionStatus.FAILED == "failed" and f"{StepStatus.SUCCEEDED}" == "succeeded"
