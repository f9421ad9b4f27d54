"""Workflow definitions: the seed's JSON as written, versions, validation with paths."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pty
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import psycopg
import pytest

from engine import workflows
from engine.model import DefinitionError, parse_definition, parse_duration
from tests.helpers import SEED_QUALIFY, fetch, value
from tests.paths import REPO

SEED_FILES = sorted((REPO / "examples" / "workflows").glob("*.json"))


async def test_seed_json_works_exactly_as_written(crm: psycopg.AsyncConnection[Any]) -> None:
    result = await workflows.apply(crm, json.loads(json.dumps(SEED_QUALIFY)))
    assert (result.created, result.version, result.status) == (True, 1, "active")
    wf = await workflows.get_workflow(crm, result.id)
    assert wf["definition"] == {k: v for k, v in SEED_QUALIFY.items() if k != "status"}
    assert wf["trigger_type"] == "entity_created" and wf["entity_type"] == "lead"
    assert "ev.op = 'insert'" in wf["predicate"]
    listed = await workflows.list_workflows(crm)
    assert {"id", "name", "status", "execution_count"} <= set(listed[0])


@pytest.mark.parametrize("path", SEED_FILES, ids=lambda p: p.stem)
async def test_every_seed_workflow_applies(crm: psycopg.AsyncConnection[Any], path: Path) -> None:
    result = await workflows.apply(crm, json.loads(path.read_text()))
    assert result.status == "active"


async def test_a_changed_definition_is_a_new_version(crm: psycopg.AsyncConnection[Any]) -> None:
    first = await workflows.apply(crm, SEED_QUALIFY)
    same = await workflows.apply(crm, {**SEED_QUALIFY, "status": "paused"})
    assert (same.id, same.version, same.new_version, same.status) == (first.id, 1, False, "paused")
    changed = {
        **bad({}, drop=("status",)),
        "conditions": [
            {"field": "source", "operator": "in", "value": ["website_form", "referral"]}
        ],
    }
    second = await workflows.apply(crm, changed)
    assert (second.id, second.version, second.new_version) == (first.id, 2, True)
    versions = await workflows.list_versions(crm, first.id)
    assert [(v["version"], v["current"]) for v in versions] == [(1, False), (2, True)]
    # status is not part of a version; omitting it keeps the current one
    kept = await workflows.apply(crm, {k: v for k, v in changed.items() if k != "status"})
    assert kept.status == "paused" and kept.version == 2


async def test_names_are_unique_among_live_workflows(crm: psycopg.AsyncConnection[Any]) -> None:
    first = await workflows.create(crm, SEED_QUALIFY)
    with pytest.raises(workflows.NameTaken):
        await workflows.create(crm, SEED_QUALIFY)
    await workflows.set_status(crm, first.id, "archived")
    again = await workflows.create(crm, SEED_QUALIFY)
    assert again.id != first.id
    with pytest.raises(workflows.WorkflowNotFound):
        await workflows.update(crm, first.id, SEED_QUALIFY)


def bad(change: dict[str, Any], drop: tuple[str, ...] = ()) -> dict[str, Any]:
    d = {**SEED_QUALIFY, **change}
    for key in drop:
        d.pop(key)
    return d


REFUSALS = [
    (
        bad({"trigger": {"type": "entity_created", "entity_type": "prospect"}}),
        "trigger.entity_type",
        "not a watched entity",
    ),
    (
        bad({"trigger": {"type": "entity_born", "entity_type": "lead"}}),
        "trigger.type",
        "unknown trigger type",
    ),
    (bad({"trigger": {"type": "entity_created"}}), "trigger.entity_type", "Field required"),
    (
        bad({"conditions": [{"field": "score", "operator": "greater_than", "value": "high"}]}),
        "conditions[0].value",
        "not a valid pg_catalog.int4",
    ),
    (
        bad({"conditions": [{"field": "name", "operator": "matches", "value": "(unclosed"}]}),
        "conditions[0].value",
        "regular expression",
    ),
    (
        bad({"conditions": [{"field": "sorce", "operator": "equals", "value": "x"}]}),
        "conditions[0].field",
        "did you mean 'source'",
    ),
    (
        bad({"conditions": [{"field": "source", "operator": "changed"}]}),
        "conditions[0].operator",
        "needs an update trigger",
    ),
    (
        bad({"actions": [{"type": "qualify_lead"}, {"type": "teleport"}]}),
        "actions[1].type",
        "unknown action",
    ),
    (bad({"actions": [{"type": "create_task"}]}), "actions[0].title", "Field required"),
    (
        bad({"actions": [{"type": "create_task", "title": "x", "colour": "red"}]}),
        "actions[0].colour",
        "unknown field",
    ),
    (
        bad({"actions": [{"type": "update_field", "field": "score", "value": "lots"}]}),
        "actions[0].value",
        "not a valid",
    ),
    (
        bad({"actions": [{"type": "update_field", "field": "nope", "value": 1}]}),
        "actions[0].field",
        "no column",
    ),
    (
        bad({"actions": [{"type": "qualify_lead", "delay": "soon"}]}),
        "actions[0].delay",
        "'soon' is not a duration",
    ),
    (
        bad(
            {
                "trigger": {
                    "type": "field_updated",
                    "entity_type": "lead",
                    "field": "score",
                    "to": "many",
                }
            }
        ),
        "trigger.to",
        "not a valid",
    ),
    (
        bad(
            {
                "actions": [
                    {"id": "a", "type": "qualify_lead", "depends_on": ["b"]},
                    {"id": "b", "type": "qualify_lead", "depends_on": ["a"]},
                ]
            }
        ),
        "actions",
        "cycle",
    ),
    (
        bad({"actions": [{"type": "qualify_lead", "depends_on": ["ghost"]}]}),
        "actions[0].depends_on",
        "no step",
    ),
    (
        bad(
            {
                "actions": [
                    {
                        "type": "qualify_lead",
                        "when": {
                            "field": "steps.later.status",
                            "operator": "equals",
                            "value": "succeeded",
                        },
                    },
                    {"id": "later", "type": "qualify_lead"},
                ]
            }
        ),
        "actions[0].when.field",
        "earlier steps",
    ),
    (bad({"actions": []}), "actions", "at least 1"),
    (
        bad({"actions": [{"type": "create_task", "title": "{{ entity.name "}]}),
        "actions[0].title",
        "template syntax",
    ),
    (bad({"status": "running"}), "status", "'active' or 'paused'"),
    (bad({"priority": "high"}), "priority", "valid integer"),
    (bad({"nmae": "typo"}), "nmae", "unknown field"),
    (
        bad({"trigger": {"type": "scheduled", "schedule": "every day", "entity_type": "deal"}}),
        "trigger.schedule",
        "not a cron expression",
    ),
    (
        bad(
            {
                "trigger": {"type": "scheduled", "schedule": "* * * * * *", "entity_type": "deal"},
                "conditions": [],
                "actions": [{"type": "create_task", "title": "t"}],
            }
        ),
        "trigger.schedule",
        "minimum interval",
    ),
    (
        bad(
            {
                "trigger": {
                    "type": "scheduled",
                    "schedule": "0 9 * * *",
                    "timezone": "Mars/Olympus",
                    "entity_type": "deal",
                }
            }
        ),
        "trigger.timezone",
        "unknown time zone",
    ),
    (
        bad({"trigger": {"type": "field_updated", "entity_type": "lead"}}),
        "trigger",
        "either 'field'",
    ),
    (
        bad({"trigger": {"type": "field_updated", "entity_type": "lead", "field": "scroe"}}),
        "trigger.field",
        "no field",
    ),
    (
        bad(
            {
                "trigger": {
                    "type": "date_relative",
                    "entity_type": "lead",
                    "field": "name",
                    "before": "3d",
                }
            }
        ),
        "trigger.field",
        "not a date",
    ),
    (bad({"limits": {"reenrollment": "after"}}), "limits", "reenroll_after"),
    (
        bad({"edge_triggered": True, "trigger": {"type": "entity_deleted", "entity_type": "lead"}}),
        "edge_triggered",
        "applies to",
    ),
    (
        bad({"conditions": [{"sql": "source = 'x'; DROP TABLE leads"}]}),
        "conditions[0].sql",
        "not a valid SQL expression",
    ),
    (
        bad({"conditions": [{"sql": "score / 0 > 1 OR (SELECT true)"}]}),
        "conditions[0].sql",
        "SubLink",
    ),
]


@pytest.mark.parametrize(
    ("definition", "path", "message"), REFUSALS, ids=[r[1] + ":" + r[2][:20] for r in REFUSALS]
)
async def test_refusals_name_the_path_and_change_nothing(
    crm: psycopg.AsyncConnection[Any], definition: Any, path: str, message: str
) -> None:
    with pytest.raises(DefinitionError) as caught:
        await workflows.apply(crm, definition)
    issues = [(i.path, i.message) for i in caught.value.issues]
    assert any(p == path and message in m for p, m in issues), issues
    assert await value(crm, "SELECT count(*) FROM crmflow.workflows") == 0
    assert await value(crm, "SELECT to_regclass('public.leads') IS NOT NULL") is True


def test_definitions_must_be_objects_of_reasonable_size() -> None:
    with pytest.raises(DefinitionError, match="JSON object"):
        parse_definition([1, 2])
    huge = {**SEED_QUALIFY, "description": "x" * 300_000}
    with pytest.raises(DefinitionError, match="larger than"):
        parse_definition(huge)


def test_durations() -> None:
    assert parse_duration(60) == 60
    assert parse_duration("5m") == 300
    assert parse_duration("2 hours") == 7200
    assert parse_duration("1d") == 86400
    assert parse_duration(3, default_unit="d") == 3 * 86400
    assert parse_duration("-3d", allow_negative=True) == -3 * 86400
    for wrong in ("soon", "5 fortnights", True, [1], "-1m"):
        with pytest.raises(ValueError):
            parse_duration(wrong)


def crmflow(db_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CRMFLOW_DATABASE_URL": db_url}
    return subprocess.run(
        [sys.executable, "-m", "engine.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


async def test_cli_apply_is_all_or_nothing(
    crm: psycopg.AsyncConnection[Any], db_url: str, tmp_path: Path
) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(
        "- name: Won deals\n"
        "  trigger: {type: field_updated, entity_type: deal, field: status, to: won}\n"
        "  actions: [{type: send_notification, message: 'won {{ deal.name }}'}]\n"
        "- name: Lost deals\n"
        "  trigger: {type: field_updated, entity_type: deal, field: status, to: lost}\n"
        "  actions: [{type: send_notification, message: 'lost'}]\n"
    )
    broken = tmp_path / "broken.json"
    broken.write_text('{"name": "x", "trigger": ')
    invalid = tmp_path / "invalid.json"
    invalid.write_text(
        json.dumps(bad({"conditions": [{"field": "source", "operator": "equalz", "value": "x"}]}))
    )

    result = crmflow(db_url, "workflow", "apply", str(good), str(broken))
    assert result.returncode == 1 and "not valid JSON (line 1" in result.stderr
    result = crmflow(db_url, "workflow", "apply", str(good), str(invalid))
    assert result.returncode == 1
    assert "conditions[0].operator: unknown operator 'equalz'" in result.stderr
    assert "nothing was applied" in result.stderr
    assert await value(crm, "SELECT count(*) FROM crmflow.workflows") == 0

    result = crmflow(db_url, "workflow", "apply", str(good))
    assert result.returncode == 0, result.stderr
    listed = json.loads(crmflow(db_url, "workflow", "list", "--json").stdout)
    assert [w["name"] for w in listed] == ["Won deals", "Lost deals"]
    assert crmflow(db_url, "workflow", "activate", "Won deals").returncode == 0
    shown = json.loads(crmflow(db_url, "workflow", "show", "Won deals", "--json").stdout)
    assert shown["status"] == "active"
    rows = await fetch(crm, "SELECT name, status FROM crmflow.workflows ORDER BY id")
    assert rows == [
        {"name": "Won deals", "status": "active"},
        {"name": "Lost deals", "status": "paused"},
    ]


async def test_date_fields_that_are_read_as_columns_must_be_columns(
    crm: psycopg.AsyncConnection[Any],
) -> None:
    """date_relative's field and a step's delay.until are read as columns at run time, so a
    derived field is refused when saving instead of failing every tick or execution later."""
    from engine import capture

    await capture.declare_derived(crm, "deal", "close_ts", "CAST(close_date AS timestamptz)")
    for definition, path in (
        (
            {
                "name": "derived date_relative",
                "trigger": {
                    "type": "date_relative",
                    "entity_type": "deal",
                    "field": "close_ts",
                    "before": "1d",
                },
                "actions": [{"type": "create_task", "title": "t"}],
            },
            "trigger.field",
        ),
        (
            {
                "name": "derived delay",
                "trigger": {"type": "entity_created", "entity_type": "deal"},
                "actions": [{"type": "create_task", "title": "t", "delay": {"until": "close_ts"}}],
            },
            "actions[0].delay.until",
        ),
    ):
        with pytest.raises(DefinitionError) as caught:
            await workflows.apply(crm, definition)
        assert [i.path for i in caught.value.issues] == [path]


async def test_cli_apply_of_many_files_shows_progress_on_a_terminal_only(
    crm: psycopg.AsyncConnection[Any], db_url: str, tmp_path: Path
) -> None:
    files = []
    for i in range(6):
        path = tmp_path / f"won_{i}.json"
        path.write_text(
            json.dumps(
                {
                    "name": f"Won deals {i}",
                    "trigger": {"type": "field_updated", "entity_type": "deal", "field": "status"},
                    "actions": [{"type": "send_notification", "message": "won"}],
                }
            )
        )
        files.append(str(path))

    # stderr on a pseudo-terminal: rich draws its bar there; stdout keeps one line per file.
    primary, secondary = pty.openpty()
    env = {**os.environ, "CRMFLOW_DATABASE_URL": db_url, "COLUMNS": "100"}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "engine.cli", "workflow", "apply", *files,
        stdout=asyncio.subprocess.PIPE, stderr=secondary, env=env,
    )  # fmt: skip
    os.close(secondary)
    chunks: list[bytes] = []

    def drain() -> None:  # read as it comes, so a full terminal buffer never blocks the child
        with contextlib.suppress(OSError):  # EIO once the child's side is closed
            while chunk := os.read(primary, 65536):
                chunks.append(chunk)

    reader = threading.Thread(target=drain)
    reader.start()
    stdout, _ = await process.communicate()
    reader.join(10)
    os.close(primary)
    terminal = b"".join(chunks)
    assert process.returncode == 0
    assert "applying workflows" in terminal.decode()
    assert [line.split(":")[0] for line in stdout.decode().splitlines()] == [
        f"{path}[0]" for path in files
    ]
    assert all("created" in line for line in stdout.decode().splitlines())

    # stderr piped: no bar, nothing but what went wrong (nothing here).
    result = crmflow(db_url, "workflow", "apply", *files)
    assert result.returncode == 0 and result.stderr == ""
    assert all("unchanged" in line for line in result.stdout.splitlines())
