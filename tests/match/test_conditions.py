"""Each operator and group on every common column type, with NULLs, against SQL and the
Python reference evaluator; and the compiler's refusals."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
from psycopg import sql

from engine import capture, catalog
from engine.conditions import Compiler, ConditionError, parse_conditions
from tests.reference import Reference

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)

SCHEMA = """
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE TABLE samples (
    id int PRIMARY KEY, t text, n numeric, i int, b boolean, ts timestamptz, d date,
    j jsonb, tags text[], e mood, u uuid
);
INSERT INTO samples VALUES
 (1, 'Acme Corp', 10.5, 10, true, '2026-11-20 10:00Z', '2026-11-20',
  '{"tier": "gold", "seats": 5, "labels": ["vip"]}', '{vip,eu}', 'happy',
  '00000000-0000-0000-0000-000000000001'),
 (2, 'beta llc', 3, 3, false, '2026-01-01 00:00Z', '2026-01-01',
  '{"tier": "silver", "seats": 50}', '{}', 'sad', NULL),
 (3, '', 0, 0, NULL, NULL, NULL, '{}', NULL, NULL, NULL),
 (4, NULL, NULL, NULL, NULL, NULL, NULL, NULL, '{us}', 'ok', NULL);
"""

ALL = {1, 2, 3, 4}

CASES: list[tuple[Any, set[int]]] = [
    # text
    ({"field": "t", "operator": "equals", "value": "Acme Corp"}, {1}),
    ({"field": "t", "operator": "not_equals", "value": "Acme Corp"}, {2, 3, 4}),
    ({"field": "t", "operator": "contains", "value": "ACME"}, {1}),
    ({"field": "t", "operator": "not_contains", "value": "acme"}, {2, 3, 4}),
    ({"field": "t", "operator": "starts_with", "value": "BETA"}, {2}),
    ({"field": "t", "operator": "ends_with", "value": "corp"}, {1}),
    ({"field": "t", "operator": "matches", "value": "^[ab]"}, {2}),
    ({"field": "t", "operator": "in", "value": ["beta llc", "x"]}, {2}),
    ({"field": "t", "operator": "not_in", "value": ["beta llc"]}, {1, 3, 4}),
    ({"field": "t", "operator": "is_empty"}, {3, 4}),
    ({"field": "t", "operator": "is_not_empty"}, {1, 2}),
    ({"field": "t", "operator": "greater_than", "value": "B"}, {2}),  # code point order
    ({"field": "t", "operator": "between", "value": ["A", "C"]}, {1}),
    ({"field": "t", "operator": "contains", "value": "50%"}, set()),  # no LIKE wildcards
    # numeric
    ({"field": "n", "operator": "greater_than", "value": 5}, {1}),
    ({"field": "n", "operator": "less_or_equal", "value": "3"}, {2, 3}),
    ({"field": "n", "operator": "between", "value": [0, 3]}, {2, 3}),
    ({"field": "n", "operator": "equals", "value": 10.5}, {1}),
    ({"field": "n", "operator": "in", "value": [3, 0]}, {2, 3}),
    ({"field": "n", "operator": "is_empty"}, {4}),
    # integer
    ({"field": "i", "operator": "greater_or_equal", "value": 3}, {1, 2}),
    ({"field": "i", "operator": "less_than", "value": 3}, {3}),
    ({"field": "i", "operator": "not_in", "value": [10]}, {2, 3, 4}),
    # boolean
    ({"field": "b", "operator": "equals", "value": True}, {1}),
    ({"field": "b", "operator": "equals", "value": False}, {2}),
    ({"field": "b", "operator": "not_equals", "value": True}, {2, 3, 4}),
    ({"field": "b", "operator": "is_empty"}, {3, 4}),
    # timestamptz
    ({"field": "ts", "operator": "within_last", "value": "7d"}, {1}),
    ({"field": "ts", "operator": "older_than", "value": "30 days"}, {2}),
    ({"field": "ts", "operator": "greater_than", "value": "2026-06-01T00:00:00Z"}, {1}),
    ({"field": "ts", "operator": "is_empty"}, {3, 4}),
    # date
    ({"field": "d", "operator": "older_than", "value": 2}, {2}),
    ({"field": "d", "operator": "within_last", "value": 2}, {1}),
    ({"field": "d", "operator": "equals", "value": "2026-01-01"}, {2}),
    ({"field": "d", "operator": "less_than", "value": "2026-06-01"}, {2}),
    # jsonb column and values inside it
    ({"field": "j", "operator": "contains", "value": {"tier": "gold"}}, {1}),
    ({"field": "j", "operator": "equals", "value": {}}, {3}),
    ({"field": "j", "operator": "is_empty"}, {3, 4}),
    ({"field": "j.tier", "operator": "equals", "value": "silver"}, {2}),
    ({"field": "j.tier", "operator": "in", "value": ["gold", "bronze"]}, {1}),
    ({"field": "j.seats", "operator": "greater_than", "value": 10}, {2}),
    ({"field": "j.seats", "operator": "between", "value": [1, 5]}, {1}),
    ({"field": "j.tier", "operator": "starts_with", "value": "G"}, {1}),
    ({"field": "j.labels", "operator": "contains", "value": "vip"}, {1}),
    ({"field": "j.missing", "operator": "is_empty"}, ALL),
    ({"field": "j.tier", "operator": "not_equals", "value": "gold"}, {2, 3, 4}),
    # arrays
    ({"field": "tags", "operator": "contains", "value": "vip"}, {1}),
    ({"field": "tags", "operator": "not_contains", "value": "vip"}, {2, 3, 4}),
    ({"field": "tags", "operator": "in", "value": ["us", "eu"]}, {1, 4}),
    ({"field": "tags", "operator": "is_empty"}, {2, 3}),
    ({"field": "tags", "operator": "equals", "value": ["vip", "eu"]}, {1}),
    # enum (ordered as declared: sad < ok < happy)
    ({"field": "e", "operator": "equals", "value": "happy"}, {1}),
    ({"field": "e", "operator": "greater_than", "value": "sad"}, {1, 4}),
    ({"field": "e", "operator": "in", "value": ["ok"]}, {4}),
    ({"field": "e", "operator": "is_empty"}, {3}),
    # uuid
    ({"field": "u", "operator": "equals", "value": "00000000-0000-0000-0000-000000000001"}, {1}),
    ({"field": "u", "operator": "is_empty"}, {2, 3, 4}),
    # groups
    (
        [
            {"field": "t", "operator": "is_not_empty"},
            {"field": "n", "operator": "greater_than", "value": 5},
        ],
        {1},
    ),
    (
        {
            "any": [
                {"field": "b", "operator": "equals", "value": False},
                {"field": "e", "operator": "equals", "value": "ok"},
            ]
        },
        {2, 4},
    ),
    ({"not": {"field": "b", "operator": "equals", "value": True}}, {2, 3, 4}),
    (
        {
            "not": {
                "any": [
                    {"field": "i", "operator": "greater_than", "value": 5},
                    {"field": "t", "operator": "is_empty"},
                ]
            }
        },
        {2},
    ),
    ({"all": []}, ALL),
    ({"any": []}, set()),
    ([], ALL),
]

SQL_CASES: list[tuple[Any, set[int]]] = [
    ({"sql": "i * 2 > 5"}, {1, 2}),
    ({"sql": "t IS NULL"}, {4}),
    ({"sql": "lower(t) LIKE '%corp'"}, {1}),
    ({"sql": "coalesce(n, 0) < 1 AND e IS DISTINCT FROM 'happy'"}, {3, 4}),
]


@pytest.fixture
async def samples(conn: psycopg.AsyncConnection[Any]) -> catalog.EntitySchema:
    await conn.execute(SCHEMA)
    await capture.watch(conn, "samples")
    entity = await catalog.load_entity(conn, "sample")
    assert entity is not None
    return entity


async def matching(
    conn: psycopg.AsyncConnection[Any], entity: catalog.EntitySchema, raw: Any
) -> set[int]:
    compiler = Compiler(entity, now=sql.SQL("CAST({} AS timestamptz)").format(sql.Literal(NOW)))
    predicate = compiler.compile(parse_conditions(raw))
    assert compiler.issues == []
    await conn.execute("SET TIME ZONE 'UTC'")
    rows = await (
        await conn.execute(
            sql.SQL("SELECT id FROM samples AS n WHERE {} ORDER BY id").format(predicate)
        )
    ).fetchall()
    return {r["id"] for r in rows}


async def test_operator_matrix(
    conn: psycopg.AsyncConnection[Any], samples: catalog.EntitySchema
) -> None:
    rows = await (await conn.execute("SELECT * FROM samples ORDER BY id")).fetchall()
    reference = Reference(samples, NOW)
    failures = []
    for raw, expected in CASES:
        got_sql = await matching(conn, samples, raw)
        got_ref = {r["id"] for r in rows if reference.evaluate(parse_conditions(raw), r)}
        if got_sql != expected or got_ref != expected:
            failures.append(
                f"{raw}: sql {sorted(got_sql)}, reference {sorted(got_ref)}, "
                f"expected {sorted(expected)}"
            )
    assert failures == []


async def test_sql_conditions(
    conn: psycopg.AsyncConnection[Any], samples: catalog.EntitySchema
) -> None:
    for raw, expected in SQL_CASES:
        assert await matching(conn, samples, raw) == expected, raw


@pytest.mark.parametrize(
    ("raw", "path", "message"),
    [
        (
            {"field": "nope", "operator": "equals", "value": 1},
            "conditions.field",
            "no field 'nope'",
        ),
        ({"field": "tt", "operator": "equals", "value": 1}, "conditions.field", "did you mean 't'"),
        (
            {"field": "b", "operator": "contains", "value": "x"},
            "conditions.operator",
            "does not apply",
        ),
        (
            {"field": "t", "operator": "sounds_like", "value": "x"},
            "conditions.operator",
            "unknown operator",
        ),
        (
            {"field": "t", "operator": "equal", "value": "x"},
            "conditions.operator",
            "did you mean 'equals'",
        ),
        ({"field": "t", "operator": "equals"}, "conditions.value", "needs a value"),
        ({"field": "t", "operator": "equals", "value": None}, "conditions.value", "needs a value"),
        ({"field": "t", "operator": "in", "value": []}, "conditions.value", "non-empty list"),
        ({"field": "t", "operator": "between", "value": [1]}, "conditions.value", "[low, high]"),
        ({"field": "t", "operator": "is_empty", "value": 3}, "conditions.value", "takes no value"),
        (
            {"field": "ts", "operator": "older_than", "value": "soon"},
            "conditions.value",
            "not a duration",
        ),
        ({"sql": "(SELECT 1) = 1"}, "conditions.sql", "SubLink"),
        ({"sql": "pg_sleep(10) IS NULL"}, "conditions.sql", "pg_sleep"),
        ({"all": {"field": "t"}}, "conditions.all", "takes a list"),
        ({"any": [], "extra": 1}, "conditions", "takes no other keys"),
        (
            {"field": "t", "operator": "equals", "value": "x", "vlaue": 2},
            "conditions",
            "unknown keys",
        ),
        (
            [
                {"field": "t", "operator": "equals", "value": "x"},
                {"field": "zz", "operator": "equals", "value": "y"},
            ],
            "conditions[1].field",
            "no field",
        ),
    ],
)
async def test_refusals_name_the_path(
    samples: catalog.EntitySchema, raw: Any, path: str, message: str
) -> None:
    issues: list[tuple[str, str]] = []
    try:
        tree = parse_conditions(raw)
    except ConditionError as exc:
        issues = exc.issues
    else:
        compiler = Compiler(samples)
        compiler.compile(tree)
        issues = compiler.issues
    assert any(p == path and message in m for p, m in issues), issues


async def test_transitions_need_an_old_row(samples: catalog.EntitySchema) -> None:
    compiler = Compiler(samples, allow_transitions=False)
    compiler.compile(parse_conditions({"field": "t", "operator": "changed"}))
    assert "needs an update trigger" in compiler.issues[0][1]


def test_nesting_and_size_limits() -> None:
    deep: Any = {"field": "t", "operator": "is_empty"}
    for _ in range(30):
        deep = {"not": deep}
    with pytest.raises(ConditionError, match="deeper"):
        parse_conditions(deep)
    with pytest.raises(ConditionError, match="more than 300"):
        parse_conditions([{"field": "t", "operator": "is_empty"}] * 301)
