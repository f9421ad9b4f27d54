"""The split step (engine/actions/split.py): a deterministic path per (workflow, entity),
the same in Python and SQL, distributed as weighted, kept across re-enrollment and
edits, run end to end in the executor's waves and inline, reported per path."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from engine import apikeys, db, metrics
from engine.actions.split import choose, split_key
from engine.config import Settings
from engine.executor.batch import BatchExecutor
from engine.executor.runner import Runner
from engine.matcher import Matcher
from engine.model import DefinitionError
from engine.windows import DAYS
from tests.api.test_dashboard import (
    CHROMIUM,
    Dashboard,
    browser,  # noqa: F401 (a fixture)
    in_a_thread,
    log_in,
    page,  # noqa: F401 (a fixture)
    sql_rows,
    start_api,
)
from tests.helpers import apply, fetch, install_test_crm, value, wait_executions_settled
from tests.paths import REPO


def ab_workflow(paths: dict[str, int], **extra: Any) -> dict[str, Any]:
    return {
        "name": extra.pop("name", "A/B welcome"),
        "trigger": extra.pop("trigger", {"type": "entity_created", "entity_type": "lead"}),
        "actions": [
            {"id": "ab", "type": "split", "paths": paths},
            *[
                {
                    "id": f"on_{name}",
                    "type": "create_task",
                    "title": f"{name} {{{{ entity.name }}}}",
                    "depends_on": ["ab"],
                    "when": {"field": "steps.ab.result.path", "operator": "equals", "value": name},
                }
                for name in sorted(paths)
            ],
        ],
        **extra,
    }


async def run_all(pool: AsyncConnectionPool, settings: Settings) -> None:
    await Matcher(pool, settings).drain()
    await BatchExecutor(pool, Runner(pool, settings), settings, "w").drain(seconds=10)


async def paths_by_lead(conn: psycopg.AsyncConnection[Any]) -> dict[int, list[str]]:
    rows = await fetch(
        conn,
        "SELECT (x.entity_pk ->> 'id')::int AS lead, s.result ->> 'path' AS path"
        " FROM crmflow.execution_steps AS s JOIN crmflow.executions AS x"
        " ON x.id = s.execution_id WHERE s.step_id = 'ab' AND s.status = 'succeeded'"
        " ORDER BY x.id",
    )
    out: dict[int, list[str]] = {}
    for r in rows:
        out.setdefault(r["lead"], []).append(r["path"])
    return out


async def test_the_bucket_is_the_same_in_sql_and_python(conn: psycopg.AsyncConnection[Any]) -> None:
    paths = {"A": 50, "B": 30, "control": 20}
    keys = [split_key(7, "lead", {"id": i}, 0) for i in range(200)]
    keys += [split_key(7, "deal", {"a": 1, "b": "x"}, 0), split_key(7, None, None, 99)]
    rows = await fetch(
        conn,
        "SELECT k, crmflow.split_path(k, %s, %s) AS path FROM unnest(%s::text[]) AS k",
        list(paths),
        list(paths.values()),
        keys,
    )
    assert {r["k"]: r["path"] for r in rows} == {k: choose(paths, k) for k in keys}
    assert keys[0] == "7:lead:0" and keys[-2] == '7:deal:{"a":1,"b":"x"}'
    assert keys[-1] == "7:execution:99"


@pytest.mark.parametrize(
    "paths", [{"A": 50, "B": 50}, {"A": 70, "B": 20, "C": 10}, {"x": 1, "y": 3}]
)
async def test_distribution_over_ten_thousand_entities(
    conn: psycopg.AsyncConnection[Any], paths: dict[str, int]
) -> None:
    rows = await fetch(
        conn,
        "SELECT crmflow.split_path('42:lead:' || i, %s, %s) AS path, count(*) AS n"
        " FROM generate_series(1, 10000) AS i GROUP BY 1",
        list(paths),
        list(paths.values()),
    )
    total = sum(paths.values())
    counts = {r["path"]: r["n"] for r in rows}
    assert set(counts) == set(paths)
    for name, weight in paths.items():
        # within 2 points of the weight's share (4 standard deviations at 50 %)
        assert abs(counts[name] / 10_000 - weight / total) < 0.02, counts


BAD_SPLITS: list[tuple[Any, str]] = [
    ({"A": 100}, "at least two paths"),
    ({}, "at least two paths"),
    ({"A": 50, "B b": 50}, "path name 'B b'"),
    ({"A": 0, "B": 50}, "a weight is from 1 to 10000, not 0"),
    ({"A": -5, "B": 50}, "not -5"),
    ({"A": 1.5, "B": 50}, "whole number, not 1.5"),
    ({"A": True, "B": 50}, "whole number, not True"),
    ({"A": "50", "B": 50}, "whole number, not '50'"),
    (["A", "B"], "paths is an object"),
]


async def test_bad_splits_are_refused_naming_the_path(crm: psycopg.AsyncConnection[Any]) -> None:
    for paths, words in BAD_SPLITS:
        definition = ab_workflow({"A": 1, "B": 1})
        definition["actions"] = [
            {"id": "ab", "type": "split", "paths": paths},
            {"type": "create_task", "title": "t"},
        ]
        with pytest.raises(DefinitionError) as caught:
            await apply(crm, definition)
        found = {i.path: i.message for i in caught.value.issues}
        assert "actions[0].paths" in found, (paths, found)
        assert words in found["actions[0].paths"], (paths, found)
    with pytest.raises(DefinitionError) as caught:
        await apply(crm, ab_workflow({"A": 1, "B": 1}) | {"actions": [{"type": "split"}]})
    assert [i.path for i in caught.value.issues] == ["actions[0].paths"]
    # a branch on a path the split does not have: a typo would skip it for everyone
    typo = ab_workflow({"A": 1, "B": 1})
    typo["actions"][2]["when"]["value"] = "b"
    typo["actions"].append(
        {"type": "create_task", "title": "t", "depends_on": ["ab"],
         "when": {"field": "steps.ab.result.path", "operator": "in", "value": ["A", "C"]}}
    )  # fmt: skip
    with pytest.raises(DefinitionError) as caught:
        await apply(crm, typo)
    assert caught.value.as_list() == [
        {"path": "actions[2].when.value",
         "message": "split 'ab' has no path 'b'; its paths: ['A', 'B']"},
        {"path": "actions[3].when.value",
         "message": "split 'ab' has no path 'C'; its paths: ['A', 'B']"},
    ]  # fmt: skip
    assert await value(crm, "SELECT count(*) FROM crmflow.workflows") == 0  # nothing saved


async def test_a_few_hundred_executions_take_their_paths_end_to_end(
    crm: psycopg.AsyncConnection[Any], pool: AsyncConnectionPool, settings: Settings
) -> None:
    wf = await apply(crm, ab_workflow({"A": 50, "B": 50}))
    await crm.execute("INSERT INTO leads (name) SELECT 'l' || i FROM generate_series(1, 300) i")
    await run_all(pool, settings)
    assert (
        await value(crm, "SELECT count(*) FROM crmflow.executions WHERE status = 'completed'")
        == 300
    )
    chosen = await paths_by_lead(crm)
    assert len(chosen) == 300
    for lead, [path] in chosen.items():
        assert path == choose({"A": 50, "B": 50}, f"{wf}:lead:{lead}")
    # each lead got the task of its path, and the other path's step was skipped
    tasks = await fetch(crm, "SELECT title FROM tasks")
    assert sorted(t["title"] for t in tasks) == sorted(
        f"{path} l{lead}" for lead, [path] in chosen.items()
    )
    skipped = await value(
        crm, "SELECT count(*) FROM crmflow.execution_steps WHERE status = 'skipped'"
    )
    assert skipped == 300
    report = await fetch(
        crm,
        "SELECT workflow_id, step_id, path, executions, completed, share FROM crmflow.split_report"
        " ORDER BY path",
    )
    a = sum(1 for [p] in chosen.values() if p == "A")
    assert [(r["workflow_id"], r["step_id"], r["path"], r["executions"]) for r in report] == [
        (wf, "ab", "A", a),
        (wf, "ab", "B", 300 - a),
    ]
    assert 0.4 < float(report[0]["share"]) < 0.6
    assert [r["completed"] for r in report] == [a, 300 - a]


async def test_paths_hold_across_reenrollment_edits_and_the_inline_path(
    crm: psycopg.AsyncConnection[Any], pool: AsyncConnectionPool, settings: Settings
) -> None:
    on_update = {"type": "entity_updated", "entity_type": "lead"}
    wf = await apply(crm, ab_workflow({"A": 50, "B": 50}, trigger=on_update))
    await crm.execute("INSERT INTO leads (name) SELECT 'l' || i FROM generate_series(1, 60) i")
    await crm.execute("UPDATE leads SET score = 1")
    await run_all(pool, settings)
    # an edit (a new version) and a second enrollment of each lead, inline this time
    edited = ab_workflow({"A": 50, "B": 50}, trigger=on_update, description="edited")
    assert await apply(crm, edited) == wf
    assert await value(crm, "SELECT current_version FROM crmflow.workflows") == 2
    await crm.execute("UPDATE leads SET score = 2")
    inline = metrics.STEPS_RUN.labels("split", "succeeded", "inline")
    before = inline._value.get()
    await run_all(pool, settings.model_copy(update={"inline_steps": True}))
    assert inline._value.get() - before == 60  # the split ran in the matcher's transaction
    chosen = await paths_by_lead(crm)
    assert len(chosen) == 60
    for lead, paths in chosen.items():
        assert paths == [choose({"A": 50, "B": 50}, f"{wf}:lead:{lead}")] * 2
    versions = await fetch(
        crm, "SELECT workflow_version, count(*) AS n FROM crmflow.executions GROUP BY 1 ORDER BY 1"
    )
    assert [(v["workflow_version"], v["n"]) for v in versions] == [(1, 60), (2, 60)]


async def test_split_and_window_on_a_worker(crm: psycopg.AsyncConnection[Any], worker: Any) -> None:
    """A real worker (matcher, executor, procrastinate): each lead takes its path, the
    branch of path A in an always-open window, the branch of path B in one closed today."""
    tomorrow = datetime.now(ZoneInfo("Europe/Lisbon")).date() + timedelta(days=1)
    definition = ab_workflow({"A": 50, "B": 50})
    definition["actions"][1]["window"] = {"from": "00:00", "to": "24:00", "timezone": "UTC"}
    definition["actions"][2]["window"] = {
        "days": [DAYS[tomorrow.weekday()]], "from": "09:00", "to": "17:00",
        "timezone": "Europe/Lisbon",
    }  # fmt: skip
    wf = await apply(crm, definition)
    await crm.execute("INSERT INTO leads (name) SELECT 'l' || i FROM generate_series(1, 60) i")
    rows = await wait_executions_settled(crm, expected=60, timeout=30, allow_waiting=True)
    chosen = await paths_by_lead(crm)
    a_leads = {lead for lead, [p] in chosen.items() if p == "A"}
    assert len(chosen) == 60 and 0 < len(a_leads) < 60
    for lead, [path] in chosen.items():
        assert path == choose({"A": 50, "B": 50}, f"{wf}:lead:{lead}")
    status = {int(r["entity_pk"]["id"]): r["status"] for r in rows}
    assert {lead for lead, st in status.items() if st == "completed"} == a_leads
    assert {lead for lead, st in status.items() if st == "waiting"} == set(chosen) - a_leads
    titles = sorted(r["title"] for r in await fetch(crm, "SELECT title FROM tasks"))
    assert titles == sorted(f"A l{lead}" for lead in a_leads)


NURTURE: dict[str, Any] = {
    "name": "Lead nurture A/B",
    "trigger": {"type": "entity_created", "entity_type": "lead"},
    "goal": {"field": "status", "operator": "equals", "value": "customer"},
    "actions": [
        {"id": "ab", "type": "split", "paths": {"call": 50, "wait": 50}},
        {"id": "call", "type": "create_task", "title": "Call {{ lead.name }}",
         "depends_on": ["ab"],
         "when": {"field": "steps.ab.result.path", "operator": "equals", "value": "call"},
         "window": {"from": "00:00", "to": "24:00", "timezone": "Europe/Lisbon"}},
        {"id": "engaged", "type": "wait", "timeout": "3d", "depends_on": ["ab"],
         "when": {"field": "steps.ab.result.path", "operator": "equals", "value": "wait"},
         "wait_until": {"conditions": [{"field": "score", "operator": "greater_or_equal",
                                        "value": 50}]}},
        {"id": "hot", "type": "create_task", "title": "Hot lead {{ lead.name }}",
         "depends_on": ["engaged"],
         "when": {"field": "steps.engaged.result.outcome", "operator": "equals", "value": "met"},
         "window": {"from": "00:00", "to": "24:00", "timezone_field": "name"}},
    ],
}  # fmt: skip


async def test_goal_wait_until_window_and_split_together_on_a_worker(
    crm: psycopg.AsyncConnection[Any], worker: Any
) -> None:
    """The issue's scenario in one workflow: the split sends half the leads to a call
    (in business hours), half to a wait for engagement; engaged ones get a task; the
    goal ends those that become customers."""
    wf = await apply(crm, NURTURE)
    await crm.execute("INSERT INTO leads (name) SELECT 'l' || i FROM generate_series(1, 40) i")
    await wait_executions_settled(crm, expected=40, timeout=30, allow_waiting=True)
    path = {i: choose({"call": 50, "wait": 50}, f"{wf}:lead:{i}") for i in range(1, 41)}
    waiting = sorted(i for i, p in path.items() if p == "wait")
    engaged, customers = waiting[: len(waiting) // 2], waiting[len(waiting) // 2 :]
    await crm.execute("UPDATE leads SET score = 80 WHERE id = ANY(%s)", [engaged])
    await crm.execute("UPDATE leads SET status = 'customer' WHERE id = ANY(%s)", [customers])
    rows = await wait_executions_settled(crm, expected=40, timeout=30)
    status = {int(r["entity_pk"]["id"]): (r["status"], r["goal_met_at"] is not None) for r in rows}
    for lead, p in path.items():
        expected = ("completed", True) if lead in customers else ("completed", False)
        assert status[lead] == expected, (lead, p, status[lead])
    titles = sorted(r["title"] for r in await fetch(crm, "SELECT title FROM tasks"))
    assert titles == sorted(
        [f"Call l{i}" for i, p in path.items() if p == "call"] + [f"Hot lead l{i}" for i in engaged]
    )
    # the 'name' column holds no zone: the hot-lead task ran in the fallback zone and says so
    notes = await fetch(
        crm,
        "SELECT result -> 'window' AS w FROM crmflow.execution_steps WHERE step_id = 'hot'"
        " AND status = 'succeeded'",
    )
    assert len(notes) == len(engaged)
    assert all(
        n["w"]["timezone"] == "UTC" and "not an IANA time zone" in n["w"]["note"] for n in notes
    )
    report = {r["path"]: r for r in await fetch(crm, "SELECT * FROM crmflow.split_report")}
    assert report["wait"]["goal_conversions"] == len(customers)
    assert report["call"]["goal_conversions"] == 0


async def test_goal_conversions_per_path(
    crm: psycopg.AsyncConnection[Any], pool: AsyncConnectionPool, settings: Settings
) -> None:
    """The A/B measure: which path's entities met the goal. The paths wait (a window
    delay of an hour): the goal ends them while they wait."""
    definition = ab_workflow({"A": 50, "B": 50})
    definition["goal"] = {"field": "status", "operator": "equals", "value": "customer"}
    for step in definition["actions"][1:]:
        step["delay"] = "1h"
    wf = await apply(crm, definition)
    await crm.execute("INSERT INTO leads (name) SELECT 'l' || i FROM generate_series(1, 40) i")
    await run_all(pool, settings)
    assert (
        await value(crm, "SELECT count(*) FROM crmflow.executions WHERE status = 'waiting'") == 40
    )
    await crm.execute("UPDATE leads SET status = 'customer' WHERE id % 4 = 0")
    await run_all(pool, settings)
    chosen = await paths_by_lead(crm)
    expected = {"A": 0, "B": 0}
    for lead, [path] in chosen.items():
        assert path == choose({"A": 50, "B": 50}, f"{wf}:lead:{lead}")
        expected[path] += lead % 4 == 0
    report = await fetch(
        crm,
        "SELECT path, executions, goal_conversions, goal_conversion_rate, in_progress"
        " FROM crmflow.split_report ORDER BY path",
    )
    assert {r["path"]: r["goal_conversions"] for r in report} == expected
    assert sum(r["goal_conversions"] for r in report) == 10
    for r in report:
        assert float(r["goal_conversion_rate"]) == round(r["goal_conversions"] / r["executions"], 4)
        assert r["in_progress"] == r["executions"] - r["goal_conversions"]


# ───────── the docs' example and the dashboard ─────────


def docs_example(start: str) -> dict[str, Any]:
    text = (REPO / "docs" / "workflows.md").read_text()
    begin = text.index(start)
    block = text[text.index("```json\n", begin) + 8 :]
    parsed: dict[str, Any] = json.loads(block[: block.index("```")])
    return parsed


async def test_the_docs_example_applies_and_runs(
    crm: psycopg.AsyncConnection[Any], pool: AsyncConnectionPool, settings: Settings
) -> None:
    example = docs_example("### split")
    assert example["actions"][0]["type"] == "split"
    wf = await apply(crm, example)
    await crm.execute("INSERT INTO leads (name) SELECT 'l' || i FROM generate_series(1, 20) i")
    await run_all(pool, settings)
    tasks = await fetch(crm, "SELECT title, entity_id FROM tasks ORDER BY entity_id::int")
    assert len(tasks) == 20
    for t in tasks:
        path = choose({"short": 50, "long": 50}, f"{wf}:lead:{t['entity_id']}")
        assert t["title"].startswith(f"Send the {path} welcome")


@pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed")
def test_the_dashboard_shows_split_results(
    page: Any,  # noqa: F811 (the fixture)
    db_url: str,
    settings: Settings,
) -> None:
    from playwright.sync_api import expect

    keys: dict[str, str] = {}
    ids: dict[str, int] = {}

    async def prepare() -> None:
        async with await db.connect(db_url, autocommit=True) as conn:
            await install_test_crm(conn)
            _, keys["read"] = await apikeys.create(conn, "read key", "read")
            ids["wf"] = await apply(conn, ab_workflow({"A": 70, "B": 30}))
            await conn.execute(
                "INSERT INTO leads (name) SELECT 'l' || i FROM generate_series(1, 50) i"
            )
            pool = db.create_pool(db_url, settings, min_size=1, max_size=4)
            await pool.open(wait=True)
            try:
                await run_all(pool, settings)
            finally:
                await pool.close()

    in_a_thread(prepare)
    counts = {
        r["path"]: r["executions"]
        for r in sql_rows(db_url, "SELECT path, executions FROM crmflow.split_report")
    }
    assert sum(counts.values()) == 50
    api = start_api(settings)
    try:
        dash = Dashboard(api.url, db_url, keys, ids, None, api)  # type: ignore[arg-type]
        log_in(page, dash, "read", "/ui/workflows")
        rows = page.locator("#split-results tbody tr")
        expect(rows).to_have_count(2)
        for path, n in counts.items():
            row = page.locator(f"#split-results tr[data-path='{path}']")
            expect(row).to_contain_text("ab")
            expect(row.locator("[data-field=executions]")).to_have_text(str(n))
            expect(row.locator("[data-field=share]")).to_have_text(f"{n / 50 * 100:.1f} %")
        # the workflow's own page (its enrollments and history) shows them too
        page.goto(f"{dash.url}/ui/workflows/{ids['wf']}/enrollments")
        expect(page.locator("#split-results tbody tr")).to_have_count(2)
        for path, n in counts.items():
            row = page.locator(f"#split-results tr[data-path='{path}']")
            expect(row.locator("[data-field=executions]")).to_have_text(str(n))
            expect(row.locator("[data-field=goal]")).to_have_text("0 (0.0 %)")
    finally:
        api.stop()
