"""Business-hours windows (engine/windows.py): the openings computed (DST, overnight,
weekends), the checks when saving, and the deferral on every path a step runs: the
executor's waves, its careful path and the matcher's inline steps."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from engine import metrics, windows
from engine.config import Settings
from engine.executor import database_steps, waves
from engine.executor.batch import BatchExecutor
from engine.executor.runner import Runner
from engine.matcher import Matcher
from engine.model import DefinitionError
from engine.windows import DAYS, Window, next_opening
from tests.helpers import apply, fetch, value
from tests.paths import REPO

LISBON = ZoneInfo("Europe/Lisbon")
OFFICE = Window.model_validate(
    {"days": ["mon", "tue", "wed", "thu", "fri"], "from": "09:00", "to": "17:00",
     "timezone": "Europe/Lisbon"}
)  # fmt: skip


def lisbon(*args: int) -> datetime:
    return datetime(*args, tzinfo=LISBON)  # type: ignore[misc]


# ───────── the openings, computed ─────────


def test_friday_evening_is_deferred_to_monday_morning() -> None:
    # an ordinary week (winter time, UTC+0)
    assert next_opening(OFFICE, lisbon(2026, 1, 16, 18, 0), LISBON) == lisbon(2026, 1, 19, 9, 0)
    # inside: at once; the closing minute is closed; before opening: the same day
    inside = lisbon(2026, 1, 14, 12, 30)
    assert next_opening(OFFICE, inside, LISBON) == inside
    assert next_opening(OFFICE, lisbon(2026, 1, 14, 17, 0), LISBON) == lisbon(2026, 1, 15, 9, 0)
    assert next_opening(OFFICE, lisbon(2026, 1, 14, 6, 0), LISBON) == lisbon(2026, 1, 14, 9, 0)
    assert next_opening(OFFICE, lisbon(2026, 1, 17, 12, 0), LISBON) == lisbon(2026, 1, 19, 9, 0)


def test_daylight_saving_changes_in_lisbon() -> None:
    # Clocks go forward on Sunday 29 March 2026 (01:00 -> 02:00): Friday 18:00 is
    # 18:00 UTC, Monday 09:00 is 08:00 UTC (WEST, UTC+1): 62 hours later, not 63.
    friday = lisbon(2026, 3, 27, 18, 0)
    monday = next_opening(OFFICE, friday, LISBON)
    assert monday == datetime(2026, 3, 30, 8, 0, tzinfo=UTC)
    assert monday - friday == timedelta(hours=62)
    # Clocks go back on Sunday 25 October 2026 (02:00 -> 01:00): 64 hours.
    friday = lisbon(2026, 10, 23, 18, 0)
    monday = next_opening(OFFICE, friday, LISBON)
    assert monday == datetime(2026, 10, 26, 9, 0, tzinfo=UTC)
    assert monday - friday == timedelta(hours=64)
    # A window opening at a wall time the change skips that day (01:30 on 29 March)
    # opens after the gap, shifted by it; a repeated time opens at its first occurrence.
    night = Window.model_validate({"from": "01:30", "to": "03:00", "timezone": "Europe/Lisbon"})
    opened = next_opening(night, lisbon(2026, 3, 29, 0, 0), LISBON)
    assert opened == datetime(2026, 3, 29, 1, 30, tzinfo=UTC)  # 02:30 WEST
    opened = next_opening(night, lisbon(2026, 10, 25, 0, 0), LISBON)
    assert opened == datetime(2026, 10, 25, 0, 30, tzinfo=UTC)  # 01:30 WEST, the first one


def test_overnight_and_all_day_windows() -> None:
    nights = Window.model_validate(
        {"days": ["fri"], "from": "22:00", "to": "06:00", "timezone": "Europe/Lisbon"}
    )
    # open from Friday 22:00 to Saturday 06:00
    saturday_early = lisbon(2026, 1, 17, 3, 0)
    assert next_opening(nights, saturday_early, LISBON) == saturday_early
    assert next_opening(nights, lisbon(2026, 1, 17, 6, 0), LISBON) == lisbon(2026, 1, 23, 22, 0)
    weekend = Window.model_validate(
        {"days": ["sat", "sun"], "from": "00:00", "to": "24:00", "timezone": "Asia/Tokyo"}
    )
    tokyo = ZoneInfo("Asia/Tokyo")
    friday = datetime(2026, 1, 16, 23, 59, tzinfo=tokyo)
    assert next_opening(weekend, friday, tokyo) == datetime(2026, 1, 17, 0, 0, tzinfo=tokyo)
    sunday = datetime(2026, 1, 18, 23, 59, tzinfo=tokyo)
    assert next_opening(weekend, sunday, tokyo) == sunday


def test_per_entity_zones_fall_back_and_say_so() -> None:
    window = Window.model_validate(
        {"from": "09:00", "to": "17:00", "timezone_field": "tz", "fallback_timezone": "Asia/Tokyo"}
    )
    at = datetime(2026, 1, 14, 12, 0, tzinfo=UTC)  # 21:00 in Tokyo, 07:00 in New York
    ny, empty, bad, ok = windows.decide_many(
        window,
        [{"tz": "America/New_York"}, {"tz": None}, {"tz": "Mars/Olympus"}, {"tz": " UTC "}],
        at,
    )
    assert ny.at == datetime(2026, 1, 14, 14, 0, tzinfo=UTC) and ny.zone.note is None
    assert empty.zone.name == "Asia/Tokyo" and "tz is empty" in (empty.zone.note or "")
    assert empty.at == datetime(2026, 1, 15, 0, 0, tzinfo=UTC)  # 09:00 Tokyo
    assert bad.zone.name == "Asia/Tokyo" and "'Mars/Olympus'" in (bad.zone.note or "")
    assert ok.open and ok.at == at
    assert bad.note()["window"]["note"].startswith("tz holds 'Mars/Olympus'")


# ───────── checks when saving ─────────


def on_new_lead(actions: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {
        "name": extra.pop("name", "wf"),
        "trigger": {"type": "entity_created", "entity_type": "lead"},
        "actions": actions,
        **extra,
    }


BAD_WINDOWS: list[tuple[dict[str, Any], str, str]] = [
    ({"days": ["monday"], "from": "09:00", "to": "17:00", "timezone": "UTC"}, "days",
     "'monday' is not a day"),
    ({"from": "9:00", "to": "17:00", "timezone": "UTC"}, "from", "not a time 'HH:MM'"),
    ({"from": "09:00", "to": "25:00", "timezone": "UTC"}, "to", "not a time 'HH:MM'"),
    ({"from": "09:00", "to": "09:00", "timezone": "UTC"}, "", "empty window"),
    ({"from": "09:00", "to": "17:00", "timezone": "Europe/Lisbonne"}, "timezone",
     "unknown time zone 'Europe/Lisbonne'"),
    ({"from": "09:00", "to": "17:00"}, "", "exactly one of 'timezone' and 'timezone_field'"),
    ({"from": "09:00", "to": "17:00", "timezone": "UTC", "timezone_field": "tz"}, "",
     "exactly one"),
    ({"from": "09:00", "to": "17:00", "timezone_field": "nope"}, "timezone_field",
     "lead has no column 'nope'"),
    ({"from": "09:00", "to": "17:00", "timezone_field": "score"}, "timezone_field",
     "a time zone is read from a text column"),
    ({"from": "09:00", "to": "17:00", "timezone": "UTC", "hours": 3}, "hours",
     "unknown field"),
]  # fmt: skip


async def test_bad_windows_are_refused_naming_the_path(crm: psycopg.AsyncConnection[Any]) -> None:
    for window, path, words in BAD_WINDOWS:
        step = {"type": "create_task", "title": "t", "window": window}
        with pytest.raises(DefinitionError) as caught:
            await apply(crm, on_new_lead([step]))
        expected = "actions[0].window" + (f".{path}" if path else "")
        found = {i.path: i.message for i in caught.value.issues}
        assert expected in found, (window, found)
        assert words in found[expected], (window, found)
    waiting = {
        "type": "create_task", "title": "t",
        "wait_until": {"conditions": {"field": "status", "operator": "equals", "value": "x"},
                       "timeout": "3d"},
        "window": {"from": "09:00", "to": "17:00", "timezone": "UTC"},
    }  # fmt: skip
    with pytest.raises(DefinitionError) as caught:
        await apply(crm, on_new_lead([waiting]))
    assert [(i.path, i.message) for i in caught.value.issues] == [
        ("actions[0].window",
         "a step with wait_until cannot have a window too: put the window on the step after it")
    ]  # fmt: skip
    assert await value(crm, "SELECT count(*) FROM crmflow.workflows") == 0  # nothing saved


# ───────── the engine ─────────


def executor(pool: AsyncConnectionPool, settings: Settings, name: str = "w") -> BatchExecutor:
    return BatchExecutor(pool, Runner(pool, settings), settings, name)


async def run_all(pool: AsyncConnectionPool, settings: Settings) -> None:
    await Matcher(pool, settings).drain()
    await executor(pool, settings).drain(seconds=10)


def closed_today() -> tuple[list[str], datetime]:
    """A window of tomorrow only (09:00-17:00 Lisbon), and its opening."""
    tomorrow = datetime.now(LISBON).date() + timedelta(days=1)
    return [DAYS[tomorrow.weekday()]], lisbon(tomorrow.year, tomorrow.month, tomorrow.day, 9, 0)


async def test_waves_defer_to_the_next_opening_and_run_inside_it(
    crm: psycopg.AsyncConnection[Any],
    pool: AsyncConnectionPool,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    days, opening = closed_today()
    window = {"days": days, "from": "09:00", "to": "17:00", "timezone": "Europe/Lisbon"}
    await apply(
        crm,
        on_new_lead(
            [
                {"id": "first", "type": "create_task", "title": "now {{ entity.name }}"},
                {"id": "office", "type": "create_task", "title": "office", "window": window},
            ]
        ),
    )
    await apply(  # always open: runs at once
        crm,
        on_new_lead(
            [
                {
                    "type": "create_task",
                    "title": "any time",
                    "window": {"from": "00:00", "to": "24:00", "timezone": "Asia/Tokyo"},
                }
            ],
            name="open",
        ),
    )
    await crm.execute("INSERT INTO leads (name) SELECT 'l' || i FROM generate_series(1, 40) i")
    await run_all(pool, settings)
    office = await fetch(
        crm,
        "SELECT s.status, s.scheduled_at, s.result, x.status AS x_status"
        " FROM crmflow.execution_steps AS s JOIN crmflow.executions AS x ON x.id = s.execution_id"
        " WHERE s.step_id = 'office'",
    )
    assert len(office) == 40
    for s in office:
        assert (s["status"], s["x_status"]) == ("scheduled", "waiting")
        assert s["scheduled_at"] == opening
        assert s["result"] == {
            "window": {"deferred_until": opening.astimezone(UTC).isoformat(),
                       "timezone": "Europe/Lisbon"}
        }  # fmt: skip
    titles = await fetch(crm, "SELECT title, count(*) AS n FROM tasks GROUP BY 1")
    counts = {r["title"]: r["n"] for r in titles}
    assert counts.get("any time") == 40 and "office" not in counts
    assert sum(n for t, n in counts.items() if t.startswith("now ")) == 40
    queue = await fetch(crm, "SELECT min(run_at) AS at, count(*) AS n FROM crmflow.execution_queue")
    assert queue[0] == {"at": opening, "n": 40}  # woken at the opening, not polled

    # at the opening (the clock moved, not the database): they run, in one wave
    monkeypatch.setattr(waves, "now", lambda: opening + timedelta(seconds=1))
    monkeypatch.setattr(database_steps, "now", lambda: opening + timedelta(seconds=1))
    await crm.execute("UPDATE crmflow.execution_queue SET run_at = now()")
    await executor(pool, settings).drain(seconds=10)
    done = await fetch(
        crm,
        "SELECT s.status, x.status AS x_status FROM crmflow.execution_steps AS s"
        " JOIN crmflow.executions AS x ON x.id = s.execution_id WHERE s.step_id = 'office'",
    )
    assert {(r["status"], r["x_status"]) for r in done} == {("succeeded", "completed")}
    kept = await fetch(crm, "SELECT result FROM crmflow.execution_steps WHERE step_id = 'office'")
    for r in kept:  # the action's result, and the window's note of when it waited until
        assert r["result"]["window"]["deferred_until"] == opening.astimezone(UTC).isoformat()
        assert "task_id" in r["result"]
    assert len(await fetch(crm, "SELECT 1 FROM tasks WHERE title = 'office'")) == 40


async def test_external_steps_wait_for_their_window_too(
    crm: psycopg.AsyncConnection[Any],
    pool: AsyncConnectionPool,
    settings: Settings,
    web: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    days, opening = closed_today()
    window = {"days": days, "from": "09:00", "to": "17:00", "timezone": "Europe/Lisbon"}
    await apply(
        crm,
        on_new_lead([{"id": "hook", "type": "http_request", "url": web.url(), "window": window}]),
    )
    await crm.execute("INSERT INTO leads (name) SELECT 'l' || i FROM generate_series(1, 5) i")
    await run_all(pool, settings)
    assert web.requests == []  # no call outside the window
    steps = await fetch(crm, "SELECT status, scheduled_at FROM crmflow.execution_steps")
    assert steps == [{"status": "scheduled", "scheduled_at": opening}] * 5
    monkeypatch.setattr(waves, "now", lambda: opening + timedelta(seconds=1))
    monkeypatch.setattr(database_steps, "now", lambda: opening + timedelta(seconds=1))
    await crm.execute("UPDATE crmflow.execution_queue SET run_at = now()")
    await executor(pool, settings).drain(seconds=10)
    assert len(web.requests) == 5  # at the opening: each called once
    statuses = await fetch(crm, "SELECT DISTINCT status FROM crmflow.execution_steps")
    assert statuses == [{"status": "succeeded"}]


async def test_per_entity_time_zones(
    crm: psycopg.AsyncConnection[Any], pool: AsyncConnectionPool, settings: Settings
) -> None:
    await crm.execute("ALTER TABLE leads ADD COLUMN tz text")
    hour = datetime.now(UTC).hour
    # open from UTC+2h to UTC+6h on a UTC+4 clock: open now in UTC+4, closed in UTC
    window = {
        "from": f"{(hour + 2) % 24:02d}:00",
        "to": f"{(hour + 6) % 24:02d}:00",
        "timezone_field": "tz",
    }
    await apply(
        crm, on_new_lead([{"id": "call", "type": "create_task", "title": "t", "window": window}])
    )
    await crm.execute(
        "INSERT INTO leads (name, tz) VALUES ('plus4', 'Etc/GMT-4'), ('utc', 'UTC'),"
        " ('none', NULL), ('bad', 'Mars/Olympus'), ('ny', 'America/New_York')"
    )
    before = datetime.now(UTC)
    await run_all(pool, settings)
    rows = await fetch(
        crm,
        "SELECT l.name, s.status, s.scheduled_at, s.result FROM crmflow.execution_steps AS s"
        " JOIN crmflow.executions AS x ON x.id = s.execution_id"
        " JOIN leads AS l ON l.id = (x.entity_pk ->> 'id')::int",
    )
    by_name = {r["name"]: r for r in rows}
    assert by_name["plus4"]["status"] == "succeeded"
    parsed = Window.model_validate(window)
    for name, zone_name in (("utc", "UTC"), ("none", "UTC"), ("bad", "UTC")):
        row = by_name[name]
        assert row["status"] == "scheduled", row
        assert row["scheduled_at"] == next_opening(parsed, before, ZoneInfo(zone_name))
        assert row["result"]["window"]["timezone"] == "UTC"
    assert "tz is empty" in by_name["none"]["result"]["window"]["note"]
    assert "'Mars/Olympus'" in by_name["bad"]["result"]["window"]["note"]
    assert "note" not in by_name["utc"]["result"]["window"]
    ny = by_name["ny"]
    expected = next_opening(parsed, before, ZoneInfo("America/New_York"))
    assert (ny["status"] == "succeeded") == (expected <= before)


async def test_a_fallback_zone_is_said_when_the_step_runs_at_once(
    crm: psycopg.AsyncConnection[Any], pool: AsyncConnectionPool, settings: Settings
) -> None:
    """Open in its fallback zone, the step runs at once, on each path, and its result
    says which zone was used and why (a deferred one keeps its note too, test above)."""
    await crm.execute("ALTER TABLE leads ADD COLUMN tz text")
    window = {"from": "00:00", "to": "24:00", "timezone_field": "tz",
              "fallback_timezone": "Asia/Tokyo"}  # fmt: skip
    step = {"type": "create_task", "title": "t", "window": window}
    await apply(crm, on_new_lead([step], name="waves"))
    await apply(crm, on_new_lead([step], name="careful", limits={"max_per_minute": 1000}))
    await crm.execute(
        "INSERT INTO leads (name, tz) VALUES ('none', NULL), ('lisbon', 'Europe/Lisbon')"
    )
    await run_all(pool, settings)
    await apply(crm, on_new_lead([step], name="inline"))
    await crm.execute(
        "INSERT INTO leads (name, tz) VALUES ('none', ''), ('lisbon', 'Europe/Lisbon')"
    )
    await run_all(pool, settings.model_copy(update={"inline_steps": True}))
    rows = await fetch(
        crm,
        "SELECT w.name AS workflow, l.name, s.status, s.result FROM crmflow.execution_steps AS s"
        " JOIN crmflow.executions AS x ON x.id = s.execution_id"
        " JOIN crmflow.workflows AS w ON w.id = x.workflow_id"
        " JOIN leads AS l ON l.id = (x.entity_pk ->> 'id')::int",
    )
    seen = set()
    for r in rows:
        assert r["status"] == "succeeded" and "task_id" in r["result"], r
        if r["name"] == "lisbon":
            assert "window" not in r["result"], r
        else:
            assert r["result"]["window"] == {
                "timezone": "Asia/Tokyo",
                "note": "tz is empty; the window is read in Asia/Tokyo (fallback_timezone)",
            }, r
            seen.add(r["workflow"])
    assert seen == {"waves", "careful", "inline"}


async def test_a_delay_then_a_window(
    crm: psycopg.AsyncConnection[Any], pool: AsyncConnectionPool, settings: Settings
) -> None:
    """The delay counts first; when it is over, the window is checked (and defers)."""
    days, opening = closed_today()
    window = {"days": days, "from": "09:00", "to": "17:00", "timezone": "Europe/Lisbon"}
    await apply(
        crm,
        on_new_lead(
            [{"id": "s", "type": "create_task", "title": "t", "delay": "1s", "window": window}]
        ),
    )
    await crm.execute("INSERT INTO leads (name) VALUES ('a')")
    await Matcher(pool, settings).drain()
    await executor(pool, settings).drain(seconds=1)
    [step] = await fetch(crm, "SELECT status, scheduled_at, result FROM crmflow.execution_steps")
    assert step["status"] == "scheduled" and step["scheduled_at"] < opening  # the delay
    await wait_until_due(step["scheduled_at"])
    await executor(pool, settings).drain(seconds=5)
    [step] = await fetch(crm, "SELECT status, scheduled_at, result FROM crmflow.execution_steps")
    assert (step["status"], step["scheduled_at"]) == ("scheduled", opening)
    assert step["result"]["window"]["timezone"] == "Europe/Lisbon"


async def wait_until_due(at: datetime) -> None:
    import asyncio

    await asyncio.sleep(max(0.0, (at - datetime.now(UTC)).total_seconds()) + 0.05)


async def test_the_careful_path_defers_too(
    crm: psycopg.AsyncConnection[Any], pool: AsyncConnectionPool, settings: Settings
) -> None:
    days, opening = closed_today()
    window = {"days": days, "from": "09:00", "to": "17:00", "timezone": "Europe/Lisbon"}
    await apply(
        crm,
        on_new_lead(
            [
                {"id": "office", "type": "create_task", "title": "office", "window": window},
                {"id": "never", "type": "create_task", "title": "never", "window": window,
                 "when": {"field": "name", "operator": "equals", "value": "nobody"},
                 "depends_on": []},
            ],
            limits={"max_per_minute": 1000},  # start-time limits: the careful path
        ),
    )  # fmt: skip
    await crm.execute("INSERT INTO leads (name) VALUES ('a'), ('b')")
    await run_all(pool, settings)
    rows = await fetch(
        crm,
        "SELECT s.status, s.scheduled_at, x.status AS x_status FROM crmflow.execution_steps AS s"
        " JOIN crmflow.executions AS x ON x.id = s.execution_id WHERE s.step_id = 'office'",
    )
    assert rows == [{"status": "scheduled", "scheduled_at": opening, "x_status": "waiting"}] * 2
    # a false 'when' skips at once: the step does not wait for its window to be skipped
    never = await fetch(
        crm, "SELECT status, result FROM crmflow.execution_steps WHERE step_id = 'never'"
    )
    assert never == [{"status": "skipped", "result": {"reason": "'when' was false"}}] * 2
    assert await fetch(crm, "SELECT min(run_at) AS at FROM crmflow.execution_queue") == [
        {"at": opening}
    ]


def _inline_count() -> float:
    return float(metrics.STEPS_RUN.labels("create_task", "succeeded", "inline")._value.get())


async def test_inline_steps_run_in_the_matcher_only_inside_their_window(
    crm: psycopg.AsyncConnection[Any], pool: AsyncConnectionPool, settings: Settings
) -> None:
    inline = settings.model_copy(update={"inline_steps": True})
    days, opening = closed_today()
    closed = {"days": days, "from": "09:00", "to": "17:00", "timezone": "Europe/Lisbon"}
    always = {"from": "00:00", "to": "24:00", "timezone": "Europe/Lisbon"}
    await apply(crm, on_new_lead([{"type": "create_task", "title": "in", "window": always}]))
    await apply(
        crm,
        on_new_lead([{"type": "create_task", "title": "out", "window": closed}], name="closed"),
    )
    before = _inline_count()
    await crm.execute("INSERT INTO leads (name) SELECT 'l' || i FROM generate_series(1, 10) i")
    await Matcher(pool, inline).drain()
    assert _inline_count() - before == 10  # the open one ran in the matcher's transaction
    titles = [r["title"] for r in await fetch(crm, "SELECT title FROM tasks")]
    assert titles == ["in"] * 10
    await executor(pool, inline).drain(seconds=10)
    assert [r["title"] for r in await fetch(crm, "SELECT title FROM tasks")] == ["in"] * 10
    deferred = await fetch(
        crm, "SELECT DISTINCT scheduled_at FROM crmflow.execution_steps WHERE status = 'scheduled'"
    )
    assert deferred == [{"scheduled_at": opening}]


async def test_the_docs_example_applies(crm: psycopg.AsyncConnection[Any]) -> None:
    text = (REPO / "docs" / "workflows.md").read_text()
    begin = text.index("### window")
    block = text[text.index("```json\n", begin) + 8 :]
    example = json.loads(block[: block.index("```")])
    assert [bool(a.get("window")) for a in example["actions"]] == [True, True]
    with pytest.raises(DefinitionError) as caught:  # the example CRM has no zone column
        await apply(crm, example)
    assert [i.path for i in caught.value.issues] == ["actions[1].window.timezone_field"]
    await crm.execute("ALTER TABLE leads ADD COLUMN timezone text")
    assert await apply(crm, example) > 0
