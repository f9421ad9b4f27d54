"""The dashboard's enrollments page (/ui/workflows/{id}/enrollments) in headless Chromium:
a workflow's enrollments filtered by state, and its goal conversions."""

from __future__ import annotations

from typing import Any

from engine import db
from tests.api.test_dashboard import (  # noqa: F401 (fixtures)
    Dashboard,
    browser,
    dashboard,
    in_a_thread,
    log_in,
    page,
    pytestmark,  # skipped where Debian's chromium is missing, as test_dashboard
    sql_value,
    wait_for,
)
from tests.helpers import apply
from tests.lifecycle.test_lifecycle import nurture


def test_enrollments_filter_and_goal_conversions(page: Any, dashboard: Dashboard) -> None:  # noqa: F811
    ids: dict[str, int] = {}

    async def prepare() -> None:
        async with await db.connect(dashboard.db_url, autocommit=True) as conn:
            ids["nurture"] = await apply(
                conn, nurture(goal={"field": "status", "operator": "equals", "value": "customer"})
            )
            await conn.execute("INSERT INTO leads (name) VALUES ('Ada'), ('Bob')")

    in_a_thread(prepare)
    url = dashboard.db_url
    waiting = "SELECT count(*) FROM crmflow.executions WHERE status = 'waiting'"
    wait_for(lambda: sql_value(url, waiting) == 2, what="two waiting enrollments")
    sql_value(url, "UPDATE leads SET status = 'customer' WHERE name = 'Ada' RETURNING id")
    goal_met = "SELECT count(*) FROM crmflow.executions WHERE goal_met_at IS NOT NULL"
    wait_for(lambda: sql_value(url, goal_met) == 1, what="Ada's goal met")
    ada = sql_value(url, "SELECT id FROM crmflow.executions WHERE goal_met_at IS NOT NULL")

    log_in(page, dashboard, "read", "/ui/workflows")
    page.click(f"#workflows a[href='/ui/workflows/{ids['nurture']}/enrollments']")
    page.wait_for_url(f"{dashboard.url}/ui/workflows/{ids['nurture']}/enrollments")
    assert page.text_content("[data-field=goal-conversions]") == "1"
    assert page.text_content("[data-field=goal-rate]") == "50.0 %"
    assert page.locator("#enrollments tbody tr").count() == 2
    assert page.text_content("#enrollment-filter [data-state=goal_met]").strip() == "goal met (1)"

    page.click("#enrollment-filter [data-state=goal_met]")
    page.wait_for_url("**/enrollments?state=goal_met")
    rows = page.locator("#enrollments tbody tr")
    assert rows.count() == 1
    assert rows.first.get_attribute("data-execution-id") == str(ada)
    assert rows.first.get_attribute("data-state") == "goal_met"

    page.click("#enrollment-filter [data-state=waiting]")
    page.wait_for_url("**/enrollments?state=waiting")
    rows = page.locator("#enrollments tbody tr")
    assert rows.count() == 1 and rows.first.get_attribute("data-state") == "waiting"
    assert "follow_up" in (rows.first.text_content() or "")
