"""The dashboard's risk page (/ui/risk) in headless Chromium: the churn scorecard's live
accounts by level with their factors, change and trend, the per-level chart, and links
to the playbook's executions (api/routes/ui_risk.py)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pytest

from engine import apikeys, db
from engine.config import Settings
from tests.api.test_dashboard import (
    CHROMIUM,
    in_a_thread,
    log_in,
    sql_rows,
    sql_value,
    start_api,
    wait_for,
)
from tests.api.test_dashboard import browser as browser
from tests.api.test_dashboard import page as page
from tests.scorecards.test_churn_playbook import CRITICAL, _account

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="Debian's chromium is not installed (./dev test installs it)"
)
CARD = "account_churn_risk"


@dataclass
class Risk:
    url: str
    db_url: str
    keys: dict[str, str]
    globex: int


@pytest.fixture
def risk(db_url: str, settings: Settings) -> Iterator[Risk]:
    """The example CRM seeded, 300 accounts of history scored twice (a change to show),
    one account made critical, a worker running the playbook, the API."""
    keys: dict[str, str] = {}
    ids: dict[str, int] = {}

    async def prepare() -> None:
        from engine import churn_history
        from engine.scorecards import run
        from engine.seed import seed

        async with await db.connect(db_url, autocommit=True) as conn:
            await seed(conn, settings)
            _, keys["read"] = await apikeys.create(conn, "read key", "read")
            await churn_history.generate(conn, 300, seed=4, end=datetime.now(UTC).date())
            ids["globex"] = await _account(conn, "Globex", 400, {**CRITICAL, "tickets": 0})
            await run.score(conn, CARD)  # yesterday's batch, as it were
            await conn.execute(
                "INSERT INTO support_tickets (account_id, priority, opened_at)"
                " SELECT %s, 'normal', now() - interval '1 hour' FROM generate_series(1, 3)",
                [ids["globex"]],
            )
            await run.score(conn, CARD)  # today's: Globex's tickets raise its score

    in_a_thread(prepare)
    worker = subprocess.Popen(
        [sys.executable, "-m", "engine.cli", "worker", "--concurrency", "2"],
        env={**os.environ, "CRMFLOW_DATABASE_URL": db_url, "CRMFLOW_MATCHER_POLL_INTERVAL": "0.1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    api = start_api(settings)
    try:
        wait_for(
            lambda: sql_value(
                db_url,
                "SELECT count(*) FROM crmflow.executions x JOIN crmflow.workflows w"
                " ON w.id = x.workflow_id WHERE w.name = 'Churn risk playbook'"
                " AND x.entity_pk = jsonb_build_object('id', %s::bigint)"
                " AND x.status = 'completed'",
                ids["globex"],
            ),
            timeout=30,
            what="the playbook for Globex",
        )
        yield Risk(api.url, db_url, keys, ids["globex"])
    finally:
        api.stop()
        worker.terminate()
        try:
            worker.wait(15)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()


def test_the_risk_page_in_a_browser(page: Any, risk: Risk) -> None:
    from playwright.sync_api import expect

    log_in(page, risk, "read", "/ui/risk")  # type: ignore[arg-type]
    expect(page.locator("h1")).to_contain_text(f"{CARD} v1 on account")
    # Accounts by level: the counts are the live accounts' (churned ones left out).
    counts = {
        r["level"]: r["n"]
        for r in sql_rows(
            risk.db_url,
            "SELECT churn_risk::text AS level, count(*) AS n FROM accounts"
            " WHERE churned_at IS NULL GROUP BY 1",
        )
    }
    for level in ("low", "medium", "high", "critical"):
        badge = page.locator(f"#risk-levels [data-level={level}] [data-field=count]")
        expect(badge).to_have_text(str(counts.get(level, 0)))
    # Globex, critical: its factors, its change since yesterday's batch, its trend.
    row = page.locator(f"#level-critical tr[data-entity-id='{risk.globex}']")
    expect(row).to_contain_text("Globex")
    expect(row.locator("[data-field=factors]")).to_contain_text("Login frequency down")
    expect(row.locator("[data-field=factors]")).to_contain_text("Key contact left")
    expect(row.locator("[data-field=change]")).to_contain_text("pts")
    assert row.locator("[data-field=change]").inner_text().startswith("+")
    points = row.locator("svg.spark polyline").get_attribute("points") or ""
    assert len(points.split()) == 2  # two scorings
    days = sql_value(risk.db_url, "SELECT churn_days FROM accounts WHERE id = %s", risk.globex)
    expect(row.locator("[data-field=days]")).to_have_text(str(days))
    # Levels shown most severe first; the trend chart has a line per level.
    sections = page.locator("section.risk-level")
    expect(sections.first).to_have_attribute("data-level", "critical")
    expect(page.locator("#risk-trend polyline[data-level]")).to_have_count(4)
    # Churned accounts only when asked.
    page.get_by_role("link", name="include churned").click()
    page.wait_for_url("**/ui/risk?scorecard=account_churn_risk&include=churned")
    churned = sql_value(risk.db_url, "SELECT count(*) FROM accounts WHERE churned_at IS NOT NULL")
    assert churned > 0
    shown = sum(
        int(page.locator(f"#risk-levels [data-level={lv}] [data-field=count]").inner_text())
        for lv in ("low", "medium", "high", "critical")
    )
    assert shown == sum(counts.values()) + churned
    # To the playbook's execution for Globex.
    page.goto(risk.url + "/ui/risk")
    link = page.locator(f"tr[data-entity-id='{risk.globex}'] [data-field=executions] a")
    link.click()
    page.wait_for_url("**/ui/executions/*")
    expect(page.locator("#execution-status")).to_have_text("completed")
    # (the latest of its executions: the playbook's, or the managers' escalation)
    expect(page.locator("main")).to_contain_text(re.compile("churn risk", re.IGNORECASE))
