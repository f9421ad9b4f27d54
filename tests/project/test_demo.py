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
    # The churn scenario: history generated, the model fitted (its quality printed), the
    # daily batch, the playbook for the live accounts at high or critical risk.
    for text in ("churn history: 3,000 accounts", "Held-out quality", "AUC fitted",
                 "saved account_churn_risk v2", "daily batch: 3,004 accounts scored",
                 "Top churn risks", "real time:", "feedback: "):  # fmt: skip
        assert text in out, text
    [risky] = rows(
        empty_db,
        "SELECT count(*) AS n FROM accounts WHERE churned_at IS NULL"
        " AND churn_risk IN ('high', 'critical')",
    )
    churn = per_workflow["Churn risk playbook"]
    assert churn["failed"] == 0 and churn["n"] == churn["completed"] >= 5, churn
    # One open alert per account (dedupe), assigned to a CSM, with the scenario's text.
    alerts = rows(
        empty_db,
        "SELECT t.entity_id, t.description, u.role FROM tasks t"
        " JOIN users u ON u.id = t.assignee_id WHERE t.title LIKE 'Churn risk:%'",
    )
    assert len(alerts) == len({a["entity_id"] for a in alerts}) >= min(5, int(risky["n"]))
    assert all(a["role"] == "csm" for a in alerts)
    for text in ("Days to probable churn: ", "Main factors: ", "Recommended action: "):
        assert all(text in str(a["description"]) for a in alerts), text
    # Critical risk escalates to the managers, for live accounts only.
    escalations = rows(
        empty_db,
        "SELECT a.churned_at FROM notifications n JOIN users u ON u.id = n.recipient_id"
        " JOIN accounts a ON a.id::text = n.entity_id"
        " WHERE n.message LIKE 'Critical churn risk%' AND u.role = 'manager'",
    )
    assert all(e["churned_at"] is None for e in escalations)
    # The false positive: a label and 30 days off the playbook.
    [label] = rows(empty_db, "SELECT label FROM crmflow.score_feedback")
    assert label["label"] == "false_positive"
    [entry] = rows(
        empty_db, "SELECT until > now() + interval '29 days' AS ok FROM crmflow.suppressions"
    )
    assert entry["ok"]
    # The report prints the same counts.
    for name, n in (("Follow up on stale deals", 2), ("Churn risk playbook", churn["n"])):
        [line] = [ln for ln in out.splitlines() if name in ln and "│" in ln]
        assert line.split("│")[2].strip() == str(n), line
