"""`crmflow demo` from a fresh database: the pre-configured workflows do what the seed
says, end to end through a real worker, and the printed report says so."""

from __future__ import annotations

import os
import subprocess
import sys

import psycopg
from psycopg.rows import dict_row


def rows(url: str, query: str) -> list[dict[str, object]]:
    with psycopg.connect(url, row_factory=dict_row) as conn:
        return conn.execute(query).fetchall()


def test_demo_on_a_fresh_database(empty_db: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "engine.cli", "demo"],
        env={**os.environ, "CRMFLOW_DATABASE_URL": empty_db, "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "What fired" in out and "Done in" in out, out

    per_workflow = {
        r["name"]: r
        for r in rows(
            empty_db,
            "SELECT w.name, count(x.id) AS n,"
            " count(*) FILTER (WHERE x.status = 'completed') AS completed,"
            " count(*) FILTER (WHERE x.status = 'waiting') AS waiting,"
            " count(*) FILTER (WHERE x.status = 'failed') AS failed"
            " FROM crmflow.workflows w LEFT JOIN crmflow.executions x ON x.workflow_id = w.id"
            " GROUP BY w.name",
        )
    }
    # Six of the ten leads come from the website form: qualified now, enriched in 60 s.
    qualify = per_workflow["Auto-qualify new leads from website"]
    assert (qualify["n"], qualify["waiting"], qualify["failed"]) == (6, 6, 0)
    leads = rows(empty_db, "SELECT name, source, status, score FROM leads ORDER BY id")
    for lead in leads:
        if lead["source"] == "website_form":
            assert lead["status"] != "new" and lead["score"] is not None, lead
        else:
            assert (lead["status"], lead["score"]) == ("new", None), lead
    # The daily stale-deal check, run now: the two open deals idle for more than 7 days.
    stale = per_workflow["Follow up on stale deals"]
    assert (stale["n"], stale["completed"]) == (2, 2)
    follow_ups = rows(
        empty_db,
        "SELECT title, priority FROM tasks WHERE title LIKE 'Follow up on %' ORDER BY title",
    )
    assert follow_ups == [
        {"title": "Follow up on Globex expansion", "priority": "high"},
        {"title": "Follow up on Umbrella pilot", "priority": "high"},
    ]
    # Two deals won: the owner and the manager are told, each once per deal.
    won = per_workflow["Notify team when deal is won"]
    assert (won["n"], won["completed"]) == (2, 2)
    told = rows(
        empty_db,
        "SELECT u.name AS who, n.message FROM notifications n JOIN users u"
        " ON u.id = n.recipient_id WHERE n.message LIKE '%won%' ORDER BY n.message, u.name",
    )
    assert [(t["who"], str(t["message"]).split(" (")[0]) for t in told] == [
        ("Ben Okafor", "Deal won: Hooli platform"),
        ("Ben Okafor", "Deal won: Initech renewal"),
        ("Mia Chen", "Hooli platform was won"),
        ("Mia Chen", "Initech renewal was won"),
    ]
    # Churn risk: high and critical get the playbook, medium does not; only critical
    # escalates to the manager.
    churn = per_workflow["Churn risk playbook"]
    assert (churn["n"], churn["completed"]) == (2, 2)
    accounts = {
        r["name"]: r
        for r in rows(
            empty_db,
            "SELECT a.name, a.churn_risk::text AS risk, u.role AS csm_role"
            " FROM accounts a LEFT JOIN users u ON u.id = a.csm_id",
        )
    }
    assert accounts["Umbrella"]["csm_role"] == "csm" and accounts["Globex"]["csm_role"] == "csm"
    assert accounts["Initech"]["csm_role"] is None
    plans = rows(
        empty_db,
        "SELECT t.title, t.priority, u.role FROM tasks t JOIN users u ON u.id = t.assignee_id"
        " WHERE t.title LIKE 'Success plan%' ORDER BY t.title",
    )
    assert plans == [
        {
            "title": "Success plan for Globex (churn risk critical)",
            "priority": "urgent",
            "role": "csm",
        },
        {
            "title": "Success plan for Umbrella (churn risk high)",
            "priority": "urgent",
            "role": "csm",
        },
    ]
    escalations = rows(
        empty_db,
        "SELECT u.role, n.message FROM notifications n JOIN users u ON u.id = n.recipient_id"
        " WHERE n.message LIKE 'Critical churn risk%'",
    )
    assert [(e["role"], str(e["message"]).split(" (")[0]) for e in escalations] == [
        ("manager", "Critical churn risk on Globex")
    ]
    escalate = per_workflow["Escalate critical churn risk"]  # Globex: low → critical
    assert (escalate["n"], escalate["completed"]) == (1, 1)
    # The report prints the same counts.
    for name, n in (("Follow up on stale deals", 2), ("Churn risk playbook", 2)):
        [line] = [ln for ln in out.splitlines() if name in ln and "│" in ln]
        assert line.split("│")[2].strip() == str(n), line
