"""`crmflow workflow export` writes files that `crmflow workflow apply` turns back into the
same workflows, status included: applied to a fresh database they give the same
definitions and statuses; applied to the same database they change nothing (no new
version, no audit row)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

from engine import db, workflows
from tests.conftest import RUN_ID, janitor, with_dbname
from tests.helpers import fetch, install_test_crm

DEFINITIONS: list[dict[str, Any]] = [
    {
        "name": "Web leads",
        "trigger": {"type": "entity_created", "entity_type": "lead"},
        "conditions": {
            "any": [
                {"field": "source", "operator": "in", "value": ["web", "ads"]},
                {"not": {"field": "score", "operator": "less_than", "value": 10}},
            ]
        },
        "actions": [
            {"type": "qualify_lead"},
            {
                "id": "notify",
                "type": "send_notification",
                "recipient": 1,
                "message": "Ünïcode {{ entity.name }}",
                "delay": "5m",
            },
        ],
        "limits": {"max_per_minute": 30, "reenrollment": "never"},
        "priority": 4,
        "status": "active",
    },
    {
        "name": "Big deals",
        "trigger": {"type": "field_updated", "entity_type": "deal", "field": "amount"},
        "conditions": [{"field": "amount", "operator": "greater_than", "value": 10000.5}],
        "actions": [{"type": "create_task", "title": "Review {{ entity.name }}", "assignee": 3}],
        "status": "paused",
    },
    {
        "name": "Nightly",
        "trigger": {"type": "scheduled", "entity_type": "deal", "schedule": "0 3 * * *"},
        "actions": [{"type": "update_field", "field": "status", "value": "open"}],
        "status": "active",
    },
]


@pytest.fixture
def fresh_db(server_url: str, postgresql_server: Any, template_db: str) -> Iterator[str]:
    """A second database cloned from the template (the migrated example CRM)."""
    name = f"crmflow_t_{RUN_ID}_{uuid.uuid4().hex[:10]}"
    with janitor(postgresql_server, name, template=template_db):
        yield with_dbname(server_url, name)


def cli(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "engine.cli", "workflow", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "CRMFLOW_DATABASE_URL": url},
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result


async def state(conn: psycopg.AsyncConnection[Any]) -> dict[str, tuple[str, Any]]:
    rows = await fetch(
        conn,
        "SELECT w.name, w.status, v.definition FROM crmflow.workflows AS w"
        " JOIN crmflow.workflow_versions AS v"
        "   ON v.workflow_id = w.id AND v.version = w.current_version"
        " WHERE w.status <> 'archived'",
    )
    return {r["name"]: (r["status"], r["definition"]) for r in rows}


async def counts(conn: psycopg.AsyncConnection[Any]) -> tuple[int, int]:
    rows = await fetch(
        conn,
        "SELECT (SELECT count(*) FROM crmflow.workflow_versions) AS versions,"
        " (SELECT count(*) FROM crmflow.workflow_changes) AS changes",
    )
    return rows[0]["versions"], rows[0]["changes"]


async def test_export_round_trips_through_apply(
    crm: psycopg.AsyncConnection[Any], db_url: str, fresh_db: str, tmp_path: Path
) -> None:
    for definition in DEFINITIONS:
        await workflows.apply(crm, definition)
    # A second version, and an archived workflow (history: not exported).
    await workflows.apply(crm, {**DEFINITIONS[1], "priority": 2})
    gone = await workflows.apply(crm, {**DEFINITIONS[2], "name": "Gone"})
    await workflows.set_status(crm, gone.id, "archived")
    before = await state(crm)
    assert set(before) == {"Web leads", "Big deals", "Nightly"}

    out = tmp_path / "json"
    listing = cli(db_url, "export", "--out", str(out)).stdout
    files = sorted(out.iterdir())
    assert [f.suffix for f in files] == [".json"] * 3 and "Gone" not in listing
    first = json.loads(files[0].read_text())
    assert next(iter(first)) == "name" and first["status"] == "active"
    yaml_out = tmp_path / "yaml"
    cli(db_url, "export", "Big deals", "--out", str(yaml_out), "--format", "yaml")
    [big] = list(yaml_out.iterdir())
    assert yaml.safe_load(big.read_text())["status"] == "paused"
    listed = json.loads(cli(db_url, "export").stdout)  # no --out: one list on stdout
    assert sorted(d["name"] for d in listed) == sorted(before)

    # The same database: nothing changes, nothing is recorded.
    versions = await counts(crm)
    applied = cli(db_url, "apply", *map(str, files), str(big)).stdout
    assert applied.count("unchanged") == 4, applied
    assert await counts(crm) == versions
    assert await state(crm) == before

    # A fresh database: the same workflows, definitions and statuses.
    async with await db.connect(fresh_db, autocommit=True) as fresh:
        await install_test_crm(fresh)
        cli(fresh_db, "apply", *map(str, files))
        assert await state(fresh) == before
        again = cli(fresh_db, "apply", *map(str, files)).stdout
        assert again.count("unchanged") == 3
        assert await counts(fresh) == (3, 3)  # one version and one "create" each
