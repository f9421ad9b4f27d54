"""The audit trail of workflows (engine/audit.py, crmflow.workflow_changes): every create,
new version, activation, pause and archive is a row naming who (the API key's name, the
OS user through the CLI, an explicit actor), when, what, and the diff; re-applying the
same definition records nothing."""

from __future__ import annotations

import getpass
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from engine import audit, workflows
from tests.api.test_dashboard import (  # the dashboard's fixtures, for the browser test
    CHROMIUM,
    Dashboard,
    browser,
    dashboard,
    log_in,
    page,
)
from tests.helpers import fetch

__all__ = ["browser", "dashboard", "page"]  # fixtures used by name

LEADS = {
    "name": "Audit me",
    "trigger": {"type": "entity_created", "entity_type": "lead"},
    "conditions": [{"field": "source", "operator": "equals", "value": "web"}],
    "actions": [{"type": "qualify_lead"}],
    "status": "paused",
}


async def changes(conn: psycopg.AsyncConnection[Any], workflow_id: int) -> list[dict[str, Any]]:
    return await fetch(
        conn,
        "SELECT version, actor, action, diff, at FROM crmflow.workflow_changes"
        " WHERE workflow_id = %s ORDER BY id",
        workflow_id,
    )


def test_the_diff_names_changed_paths_with_before_and_after() -> None:
    before = {"a": 1, "c": [{"x": 1}, {"x": 2}], "d": {"e": "f"}, "g": 1}
    after = {"a": 1, "b": True, "c": [{"x": 1}, {"x": 3}, {"x": 4}], "g": 1.0}
    assert audit.diff(before, after) == [
        {"path": "b", "after": True},
        {"path": "c[1].x", "before": 2, "after": 3},
        {"path": "c[2]", "after": {"x": 4}},
        {"path": "d", "before": {"e": "f"}},
        {"path": "g", "before": 1, "after": 1.0},
    ]
    assert audit.diff(before, before) == []
    assert audit.diff(None, {"a": 1}) == [{"path": "a", "after": 1}]


async def test_each_action_is_a_row_in_the_transaction_of_the_change(
    crm: psycopg.AsyncConnection[Any],
) -> None:
    created = await workflows.apply(crm, LEADS, actor="alice")
    wf = created.id
    # The same definition again: nothing changed, nothing recorded.
    again = await workflows.apply(crm, LEADS, actor="alice")
    assert not again.new_version
    edited = {**LEADS, "conditions": [{"field": "source", "operator": "equals", "value": "ads"}]}
    await workflows.apply(crm, edited)  # no actor: the OS user
    await workflows.set_status(crm, wf, "active", actor="bob")
    await workflows.set_status(crm, wf, "active", actor="bob")  # no change: no row
    with audit.acting_as("carol"):
        await workflows.set_status(crm, wf, "paused")
    await workflows.apply(crm, {**edited, "status": "active"}, actor="dan")  # status only
    await workflows.update(crm, wf, {**edited, "priority": 3, "status": "paused"}, actor="eve")
    await workflows.set_status(crm, wf, "archived", actor="fay")
    rows = await changes(crm, wf)
    assert [(r["version"], r["actor"], r["action"]) for r in rows] == [
        (1, "alice", "create"),
        (2, getpass.getuser(), "update"),
        (2, "bob", "activate"),
        (2, "carol", "pause"),
        (2, "dan", "activate"),
        (3, "eve", "update"),
        (3, "fay", "archive"),
    ]
    assert {"path": "status", "after": "paused"} in rows[0]["diff"]
    assert {"path": "name", "after": "Audit me"} in rows[0]["diff"]
    assert rows[1]["diff"] == [{"path": "conditions[0].value", "before": "web", "after": "ads"}]
    assert rows[2]["diff"] == [{"path": "status", "before": "paused", "after": "active"}]
    assert rows[5]["diff"] == [
        {"path": "priority", "after": 3},
        {"path": "status", "before": "active", "after": "paused"},
    ]
    assert rows[6]["diff"] == [{"path": "status", "before": "paused", "after": "archived"}]
    assert [r["id"] for r in await audit.history(crm, wf)] == sorted(
        r["id"] for r in await audit.history(crm, wf)
    )

    # A change rolled back leaves no row (the same transaction).
    other = await workflows.apply(crm, {**LEADS, "name": "Rolled back"}, actor="x")
    try:
        async with crm.transaction():
            await workflows.set_status(crm, other.id, "active", actor="x")
            raise RuntimeError("roll back")
    except RuntimeError:
        pass
    assert [r["action"] for r in await changes(crm, other.id)] == ["create"]


async def test_through_the_api_the_key_name_and_the_history_endpoint(
    crm: psycopg.AsyncConnection[Any], client: Any
) -> None:
    response = await client.post("/workflows", json=LEADS)
    assert response.status_code == 201, response.text
    wf = response.json()["id"]
    assert (await client.put(f"/workflows/{wf}/activate")).status_code == 200
    assert (await client.patch(f"/workflows/{wf}", json={"priority": 7})).status_code == 200
    assert (await client.put(f"/workflows/{wf}/pause")).status_code == 200
    assert (await client.delete(f"/workflows/{wf}")).status_code == 200
    history = await client.get(f"/workflows/{wf}/history")
    assert history.status_code == 200, history.text
    body = history.json()
    assert [(c["version"], c["actor"], c["action"]) for c in body] == [
        (1, "test write", "create"),
        (1, "test write", "activate"),
        (2, "test write", "update"),
        (2, "test write", "pause"),
        (2, "test write", "archive"),
    ]
    assert body[2]["diff"] == [{"path": "priority", "after": 7}]
    assert set(body[0]) >= {"id", "workflow_id", "version", "actor", "at", "action", "diff"}
    missing = await client.get("/workflows/999999/history")
    assert missing.status_code == 404
    assert missing.headers["content-type"].startswith("application/problem+json")


async def test_through_the_cli_the_os_user_and_the_history_command(
    crm: psycopg.AsyncConnection[Any], db_url: str, tmp_path: Path
) -> None:
    env = {**os.environ, "CRMFLOW_DATABASE_URL": db_url, "COLUMNS": "200"}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [sys.executable, "-m", "engine.cli", *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        return result

    path = tmp_path / "wf.json"
    path.write_text(json.dumps(LEADS))
    cli("workflow", "apply", str(path))
    cli("workflow", "activate", "Audit me")
    cli("workflow", "pause", "Audit me", "--actor", "ci-deploy")
    [wf] = [r["id"] for r in await fetch(crm, "SELECT id FROM crmflow.workflows")]
    rows = await changes(crm, wf)
    assert [(r["actor"], r["action"]) for r in rows] == [
        (getpass.getuser(), "create"),
        (getpass.getuser(), "activate"),
        ("ci-deploy", "pause"),
    ]
    table = cli("workflow", "history", str(wf)).stdout
    assert "create" in table and "activate" in table and getpass.getuser() in table
    assert "status: paused → active" in table
    listed = json.loads(cli("workflow", "history", "Audit me", "--json").stdout)
    assert [c["action"] for c in listed] == ["create", "activate", "pause"]


@pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed")
def test_the_workflow_page_shows_its_change_history(page: Any, dashboard: Dashboard) -> None:
    """In a browser: a pause from the dashboard and a change through the API appear on
    the workflow's page, newest first, with who made them and the diff."""
    from playwright.sync_api import expect

    dash = dashboard
    wf = dash.workflows["qualify"]
    log_in(page, dash, "write", "/ui/workflows")
    row = page.locator(f"tr[data-workflow-id='{wf}']")
    row.get_by_role("button", name="Pause").click()
    expect(row.locator("[data-field=status]")).to_have_text("paused")
    changed = httpx.patch(
        f"{dash.url}/workflows/{wf}",
        json={"priority": 9},
        headers={"Authorization": f"Bearer {dash.keys['admin']}"},
        timeout=15,
    )
    assert changed.status_code == 200, changed.text

    page.goto(f"{dash.url}/ui/workflows/{wf}/enrollments")
    rows = page.locator("#history tbody tr")
    expect(rows).to_have_count(3)
    expect(rows.nth(0).locator("[data-field=action]")).to_have_text("update")
    expect(rows.nth(0).locator("[data-field=actor]")).to_have_text("admin key")
    expect(rows.nth(0).locator("[data-field=diff]")).to_contain_text("priority: 5 → 9")
    expect(rows.nth(1).locator("[data-field=action]")).to_have_text("pause")
    expect(rows.nth(1).locator("[data-field=actor]")).to_have_text("write key")
    expect(rows.nth(1).locator("[data-field=diff]")).to_contain_text('status: "active" → "paused"')
    expect(rows.nth(2).locator("[data-field=action]")).to_have_text("create")
    expect(rows.nth(2).locator("[data-field=actor]")).to_have_text(getpass.getuser())
