"""Differential test: compiled SQL and the Python reference agree on random rows and trees.

Rows (NULLs included) go through the matcher's own path, typed rows rebuilt from
JSON with jsonb_populate_record, old rows included for transition operators; trees
without transitions are also run as a table scan (the scheduler's path).
"""

from __future__ import annotations

import asyncio
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg import sql
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from engine import capture, catalog, db
from engine.conditions import Compiler, parse_conditions, uses_transitions
from tests.reference import Reference

NOW = datetime(2026, 6, 15, 12, 0, tzinfo=UTC)

SCHEMA = """
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE TABLE prop (id int PRIMARY KEY, t text, n numeric, i int, b boolean, ts timestamptz,
                   d date, j jsonb, tags text[], e mood);
CREATE TABLE prop_old (LIKE prop);
"""

# Case, LIKE wildcards, quotes, backslash and non-ASCII are all in the alphabets.
ROW_ALPHA = "aAbB%_'\\é"
VALUE_ALPHA = "aAb%é"
# Pools where values and rows collide often (Hypothesis favours "simple" draws, so pure
# random text almost never makes case or wildcards matter), mixed with random text.
WORDS = ["Acme", "acme corp", "ACME", "beta", "Beta%", "b_a", "é", "aé", "", "a'b", "x\\y"]
NEEDLES = ["acme", "ACME", "a", "A", "%", "_", "é", "corp", "beta", "B", "", "'", "\\"]
texts = st.one_of(st.sampled_from(WORDS), st.text(ROW_ALPHA, max_size=4))
short_texts = st.one_of(st.sampled_from(NEEDLES), st.text(VALUE_ALPHA, max_size=2))
decimals = st.one_of(
    st.sampled_from([Decimal("0"), Decimal("1.5"), Decimal("-1"), Decimal("10"), Decimal("1.50")]),
    st.decimals(min_value=-100, max_value=100, places=2, allow_nan=False, allow_infinity=False),
)
ints = st.integers(-5, 5)
stamps = st.datetimes(
    min_value=datetime(2026, 5, 1), max_value=datetime(2026, 7, 1), timezones=st.just(UTC)
)
dates = st.dates(min_value=date(2026, 5, 1), max_value=date(2026, 7, 1))
tiers = st.sampled_from(["gold", "silver", "", "Gold"])
json_docs = st.fixed_dictionaries(
    {},
    optional={
        "tier": tiers,
        "seats": st.integers(0, 60),
        "labels": st.lists(st.sampled_from(["a", "b"]), max_size=2),
    },
)
tag_lists = st.lists(st.none() | st.sampled_from(["a", "b", "c"]), max_size=3)
moods = st.sampled_from(["sad", "ok", "happy"])

row_values = st.fixed_dictionaries(
    {
        "t": st.none() | texts,
        "n": st.none() | decimals,
        "i": st.none() | ints,
        "b": st.none() | st.booleans(),
        "ts": st.none() | stamps,
        "d": st.none() | dates,
        "j": st.none() | json_docs,
        "tags": st.none() | tag_lists,
        "e": st.none() | moods,
    }
)

regexes = st.builds(
    lambda anchor_start, parts, anchor_end: (
        ("^" if anchor_start else "") + "".join(parts) + ("$" if anchor_end else "")
    ),
    st.booleans(),
    st.lists(
        st.sampled_from(["a", "b", "A", ".", "[ab]", "a*", "(a|b)", "é", "%", " ", "c"]),
        min_size=1,
        max_size=3,
    ),
    st.booleans(),
)
durations = st.one_of(st.integers(0, 60), st.sampled_from(["12h", "3d", "2w", "90m"]))
numbers = decimals.map(str)
iso_stamps = stamps.map(lambda v: v.isoformat())
iso_dates = dates.map(str)


def pair(values: Any, key: Any = None) -> Any:
    return st.lists(values, min_size=2, max_size=2).map(lambda xs: sorted(xs, key=key))


def some(values: Any) -> Any:
    return st.lists(values, min_size=1, max_size=3)


# Every (field, operator) the test covers, with the strategy of its value (None: valueless).
TEMPLATES: list[tuple[str, str, Any]] = [
    *[
        ("t", op, short_texts)
        for op in (
            "equals",
            "not_equals",
            "contains",
            "not_contains",
            "starts_with",
            "ends_with",
            "greater_than",
            "less_or_equal",
            "changed_to",
            "changed_from",
        )
    ],
    ("t", "matches", regexes),
    ("t", "in", some(short_texts)),
    ("t", "not_in", some(texts)),
    ("t", "between", pair(short_texts)),
    *[
        (f, op, None)
        for f in ("t", "n", "i", "b", "ts", "d", "j", "tags", "e")
        for op in ("is_empty", "is_not_empty", "changed")
    ],
    *[
        (f, op, vs)
        for f, vs in (("n", numbers), ("i", ints))
        for op in (
            "equals",
            "not_equals",
            "greater_than",
            "less_than",
            "greater_or_equal",
            "less_or_equal",
            "changed_to",
        )
    ],
    *[(f, op, some(vs)) for f, vs in (("n", numbers), ("i", ints)) for op in ("in", "not_in")],
    ("n", "between", pair(numbers, key=Decimal)),
    ("i", "between", pair(ints)),
    ("b", "equals", st.booleans()),
    ("b", "not_equals", st.booleans()),
    ("b", "changed_from", st.booleans()),
    *[
        (f, op, vs)
        for f, vs in (("ts", iso_stamps), ("d", iso_dates))
        for op in ("greater_than", "less_than", "equals")
    ],
    *[(f, op, durations) for f in ("ts", "d") for op in ("older_than", "within_last")],
    ("ts", "between", pair(iso_stamps)),
    ("d", "between", pair(iso_dates)),
    ("j", "contains", json_docs),
    ("j", "not_contains", json_docs),
    ("j", "equals", json_docs),
    ("j.tier", "equals", tiers),
    ("j.tier", "not_equals", tiers),
    ("j.tier", "in", some(tiers)),
    ("j.tier", "starts_with", tiers),
    ("j.tier", "contains", tiers),
    ("j.tier", "greater_than", tiers),
    ("j.tier", "is_empty", None),
    ("j.seats", "equals", st.integers(0, 60)),
    ("j.seats", "greater_than", st.integers(0, 60)),
    ("j.seats", "less_or_equal", st.integers(0, 60)),
    ("j.seats", "between", pair(st.integers(0, 60))),
    ("j.labels", "contains", st.sampled_from(["a", "b"])),
    ("j.labels", "is_empty", None),
    ("tags", "contains", st.sampled_from(["a", "b", "c"])),
    ("tags", "not_contains", st.sampled_from(["a", "b", "c"])),
    ("tags", "in", some(st.sampled_from(["a", "b", "c"]))),
    ("tags", "not_in", some(st.sampled_from(["a", "b", "c"]))),
    ("tags", "equals", st.lists(st.sampled_from(["a", "b"]), max_size=2)),
    *[("e", op, moods) for op in ("equals", "not_equals", "greater_than", "less_or_equal")],
    ("e", "in", some(moods)),
]


def leaf(template: tuple[str, str, Any], value: Any) -> dict[str, Any]:
    field, op, strategy = template
    return {"field": field, "operator": op, **({"value": value} if strategy is not None else {})}


def _drawn(i: int) -> Any:
    strategy = TEMPLATES[i][2]
    return (strategy if strategy is not None else st.none()).map(lambda v: leaf(TEMPLATES[i], v))


random_leaf = st.integers(0, len(TEMPLATES) - 1).flatmap(_drawn)
# Each example also evaluates every template once, so no operator goes unexercised.
every_leaf = st.tuples(*[_drawn(i) for i in range(len(TEMPLATES))]).map(list)

trees = st.recursive(
    random_leaf,
    lambda children: st.one_of(
        st.lists(children, max_size=3),
        st.builds(lambda xs: {"all": xs}, st.lists(children, max_size=3)),
        st.builds(lambda xs: {"any": xs}, st.lists(children, max_size=3)),
        st.builds(lambda x: {"not": x}, children),
    ),
    max_leaves=8,
)


@pytest.fixture
def prop_db(db_url: str) -> Any:
    async def setup() -> catalog.EntitySchema:
        async with await db.connect(db_url, autocommit=True) as conn:
            await conn.execute(SCHEMA)
            await capture.watch(conn, "prop")
            entity = await catalog.load_entity(conn, "prop")
            assert entity is not None
            return entity

    entity = asyncio.run(setup())
    with psycopg.connect(db_url, autocommit=True, row_factory=dict_row) as conn:
        conn.execute("SET TIME ZONE 'UTC'")
        yield conn, entity


def insert(
    conn: psycopg.Connection[Any], table: str, rows: list[tuple[int, dict[str, Any]]]
) -> None:
    with conn.cursor() as cur:
        cur.executemany(
            sql.SQL(
                "INSERT INTO {} (id, t, n, i, b, ts, d, j, tags, e) VALUES "
                "(%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
            ).format(sql.Identifier(table)),
            [
                (
                    i,
                    r["t"],
                    r["n"],
                    r["i"],
                    r["b"],
                    r["ts"],
                    r["d"],
                    None if r["j"] is None else Jsonb(r["j"]),
                    r["tags"],
                    r["e"],
                )
                for i, r in rows
            ],
        )


EVENT_PATH = """
SELECT p.id, {columns}
  FROM prop AS p
  LEFT JOIN prop_old AS po ON po.id = p.id
 CROSS JOIN LATERAL jsonb_populate_record(NULL::prop, to_jsonb(p)) AS n
 CROSS JOIN LATERAL jsonb_populate_record(NULL::prop, to_jsonb(po)) AS o
 CROSS JOIN LATERAL (SELECT CASE WHEN po.id IS NULL THEN 'insert' ELSE 'update' END AS op) AS ev
"""
SCAN_PATH = "SELECT n.id, {columns} FROM prop AS n"


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    rows=st.lists(st.tuples(row_values, st.none() | row_values), min_size=1, max_size=30),
    tree_list=st.lists(trees, min_size=1, max_size=8),
    leaf_list=every_leaf,
)
def test_sql_agrees_with_reference(
    prop_db: Any, rows: list[Any], tree_list: list[Any], leaf_list: list[Any]
) -> None:
    conn, entity = prop_db
    conn.execute("TRUNCATE prop, prop_old")
    insert(conn, "prop", [(i, new) for i, (new, _) in enumerate(rows)])
    insert(conn, "prop_old", [(i, old) for i, (_, old) in enumerate(rows) if old is not None])
    typed = {r["id"]: r for r in conn.execute("SELECT * FROM prop").fetchall()}
    olds = {r["id"]: r for r in conn.execute("SELECT * FROM prop_old").fetchall()}
    reference = Reference(entity, NOW)
    now_sql = sql.SQL("CAST({} AS timestamptz)").format(sql.Literal(NOW))

    conditions = [parse_conditions(raw) for raw in [*tree_list, *leaf_list]]
    predicates = []
    for raw, tree in zip([*tree_list, *leaf_list], conditions, strict=True):
        compiler = Compiler(entity, now=now_sql)
        predicates.append(compiler.compile(tree))
        assert compiler.issues == [], (raw, compiler.issues)
    # One statement evaluates every condition on every row: a boolean column each.
    columns = sql.SQL(", ").join(
        sql.SQL("({}) AS {}").format(p, sql.Identifier(f"c{k}")) for k, p in enumerate(predicates)
    )
    by_event = {r["id"]: r for r in conn.execute(sql.SQL(EVENT_PATH).format(columns=columns))}
    plain = [k for k, tree in enumerate(conditions) if not uses_transitions(tree)]
    by_scan = {}
    if plain:
        scan_columns = sql.SQL(", ").join(
            sql.SQL("({}) AS {}").format(predicates[k], sql.Identifier(f"c{k}")) for k in plain
        )
        by_scan = {
            r["id"]: r for r in conn.execute(sql.SQL(SCAN_PATH).format(columns=scan_columns))
        }
    for k, tree in enumerate(conditions):
        raw = [*tree_list, *leaf_list][k]
        for i, row in typed.items():
            expected = reference.evaluate(
                tree, row, olds.get(i), "update" if i in olds else "insert"
            )
            assert by_event[i][f"c{k}"] is expected, (raw, row, olds.get(i))
            if k in plain:
                assert by_scan[i][f"c{k}"] is expected, (raw, row, "scan")
