"""The pre-configured churn playbook on the churn scorecard, through a real worker: the
daily batch scores the accounts (new customers by their own segment), the playbook
alerts with level, days to churn, factors, score change and a recommended action, once
per account while the alert is open (dedupe), per level (CSM, discount approval,
executive sponsor, success plan); a false positive records a label and suppresses the
account from the playbook for 30 days."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg

from engine.config import Settings
from engine.scorecards import run, store
from engine.seed import seed
from engine.worker import running_worker
from tests.helpers import fetch, value, wait_until

CARD = "account_churn_risk"
PLAYBOOK = "Churn risk playbook"

# Signals that the hand-set weights (examples/scorecards/account_churn_risk.yaml) put
# at critical and at high risk: logins stopped (10 in the month before, none since),
# support tickets, late invoices, a key contact who left.
CRITICAL = {"tickets": 3, "late": 2, "key_left": 1}
HIGH = {"tickets": 1, "late": 1, "key_left": 0}


async def _account(
    conn: psycopg.AsyncConnection[Any], name: str, age_days: int, s: dict[str, int]
) -> int:
    account = await value(
        conn,
        "INSERT INTO accounts (name, arr, created_at) VALUES (%s, 50000,"
        " now() - make_interval(days => %s)) RETURNING id",
        name,
        age_days,
    )
    await conn.execute(
        "INSERT INTO logins (account_id, occurred_at)"
        " SELECT %s, now() - make_interval(days => 31 + g) FROM generate_series(1, 10) g",
        [account],
    )
    await conn.execute(
        "INSERT INTO support_tickets (account_id, priority, opened_at)"
        " SELECT %s, 'normal', now() - make_interval(days => g) FROM generate_series(1, %s) g",
        [account, s["tickets"]],
    )
    await conn.execute(
        "INSERT INTO invoices (account_id, amount, due_date, paid_at)"
        " SELECT %s, 1000, current_date - 20 * g, now() - make_interval(days => 20 * g - 15)"
        " FROM generate_series(1, %s) g",
        [account, s["late"]],
    )
    await conn.execute(
        "INSERT INTO contacts (account_id, name, key_contact, left_at) VALUES"
        " (%s, 'Champion', true, CASE WHEN %s > 0 THEN now() - interval '10 days' END)",
        [account, s["key_left"]],
    )
    return int(account)


async def test_the_playbook_alerts_per_level_dedupes_and_takes_feedback(db_url: str) -> None:
    settings = Settings(database_url=db_url, matcher_poll_interval=0.05, heartbeat_interval=0.5)
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as raw:
        raw.row_factory = psycopg.rows.dict_row
        conn = raw
        await seed(conn, settings)
        # Scored by hand here (the daily batch), not on every write: the test moves the
        # level itself.
        definition = (await store.get(conn, CARD))["definition"]
        await store.apply(conn, {**definition, "realtime": False})
        critical = await _account(conn, "Globex", 400, CRITICAL)
        high = await _account(conn, "Umbrella", 400, HIGH)
        calm = await value(conn, "INSERT INTO accounts (name) VALUES ('Quiet') RETURNING id")
        young = await _account(conn, "Newco", 20, CRITICAL)
        gone = await _account(conn, "Gone", 400, CRITICAL)
        await conn.execute("UPDATE accounts SET churned_at = now() WHERE id = %s", [gone])

        async with running_worker(db_url, settings=settings, concurrency=4):
            result = await run.score(conn, CARD)  # the daily batch, now
            assert result.scored == 5 and result.updated == 5

            async def settled() -> bool:
                n = await value(
                    conn,
                    "SELECT count(*) FILTER (WHERE x.status IN ('completed', 'failed'))"
                    " - count(*) FROM crmflow.executions x JOIN crmflow.workflows w"
                    " ON w.id = x.workflow_id WHERE w.name = %s",
                    PLAYBOOK,
                )
                started = await value(
                    conn,
                    "SELECT count(*) FROM crmflow.executions x JOIN crmflow.workflows w"
                    " ON w.id = x.workflow_id WHERE w.name = %s",
                    PLAYBOOK,
                )
                return n == 0 and started >= 3

            await wait_until(settled, 30)
            levels = {
                r["id"]: r
                for r in await fetch(
                    conn,
                    "SELECT a.id, a.churn_risk::text AS level, a.churn_score, a.churn_days,"
                    " a.csm_id, a.executive_sponsor_id, l.segment FROM accounts a"
                    " JOIN crmflow.score_latest l ON l.entity_key = jsonb_build_object('id', a.id)",
                )
            }
            assert levels[critical]["level"] == "critical", levels
            assert levels[high]["level"] == "high", levels
            assert levels[calm]["level"] == "low"
            # The new customer is scored by its own segment: same signals, another score.
            assert levels[young]["segment"] == "new_customer"
            assert levels[critical]["segment"] == "default"
            assert levels[young]["churn_score"] != levels[critical]["churn_score"]

            runs = await fetch(
                conn,
                "SELECT x.entity_pk->>'id' AS id, x.status FROM crmflow.executions x"
                " JOIN crmflow.workflows w ON w.id = x.workflow_id WHERE w.name = %s",
                PLAYBOOK,
            )
            fired = {int(r["id"]) for r in runs}
            assert all(r["status"] == "completed" for r in runs), runs
            assert critical in fired and high in fired and young in fired
            assert calm not in fired and gone not in fired  # low risk; already churned

            # Per level: a CSM for both, a sponsor for critical, a discount for high.
            users = {r["id"]: r["role"] for r in await fetch(conn, "SELECT id, role FROM users")}
            assert users[levels[critical]["csm_id"]] == "csm"
            assert users[levels[high]["csm_id"]] == "csm"
            assert users[levels[critical]["executive_sponsor_id"]] == "manager"
            assert levels[high]["executive_sponsor_id"] is None
            tasks = await fetch(
                conn,
                "SELECT t.title, t.description, t.priority, t.entity_id, u.role FROM tasks t"
                " LEFT JOIN users u ON u.id = t.assignee_id ORDER BY t.id",
            )
            mine = [t for t in tasks if t["entity_id"] == str(critical)]
            alert = next(t for t in mine if t["title"].startswith("Churn risk: Globex"))
            assert alert["priority"] == "urgent" and alert["role"] == "csm"
            for text in (
                "Level: critical",
                "Churn probability (90 days): ",
                f"Days to probable churn: {levels[critical]['churn_days']}",
                "Main factors: Login frequency down",
                "Recommended action: ",
                "executive sponsor call",
                "pts)",
            ):
                assert text in alert["description"], alert["description"]
            assert any(t["title"].startswith("Success plan for Globex") for t in mine)
            assert not any(t["title"].startswith("Approve a retention discount") for t in mine)
            theirs = [t for t in tasks if t["entity_id"] == str(high)]
            discount = next(t for t in theirs if t["title"].startswith("Approve a retention"))
            assert discount["role"] == "manager"
            assert (
                next(t for t in theirs if t["title"].startswith("Churn risk:"))["priority"]
                == "high"
            )
            notes = await fetch(
                conn,
                "SELECT n.message, u.role FROM notifications n JOIN users u"
                " ON u.id = n.recipient_id WHERE n.entity_id = %s",
                str(critical),
            )
            roles = sorted(n["role"] for n in notes if "churn risk (" in n["message"])
            assert "csm" in roles and "manager" in roles, notes  # the CSM and the sponsor

            # Dedupe: the level moves again while the alert is open: the same task is
            # updated (now high priority, a discount asked), no second alert.
            before = len(tasks)
            await conn.execute("UPDATE accounts SET churn_risk = 'high' WHERE id = %s", [critical])
            await wait_until(lambda: _count(conn, critical, "Approve a retention discount%", 1), 20)
            alerts = await fetch(
                conn,
                "SELECT priority, title FROM tasks WHERE entity_id = %s"
                " AND title LIKE 'Churn risk:%%'",
                str(critical),
            )
            assert len(alerts) == 1 and alerts[0]["priority"] == "high", alerts
            assert "(high," in alerts[0]["title"]
            assert await value(conn, "SELECT count(*) FROM tasks") == before + 1

            # Feedback: the CSM closes the alert as a false positive.
            await conn.execute(
                "UPDATE tasks SET outcome = 'false_positive', completed_at = now()"
                " WHERE entity_id = %s AND title LIKE 'Churn risk:%%'",
                [str(critical)],
            )

            async def labelled() -> bool:
                return bool(await value(conn, "SELECT count(*) FROM crmflow.score_feedback") == 1)

            await wait_until(labelled, 20)
            [label] = await fetch(conn, "SELECT * FROM crmflow.score_feedback")
            assert (label["scorecard"], label["entity_type"], label["entity_id"]) == (
                CARD,
                "account",
                str(critical),
            )
            assert label["label"] == "false_positive" and label["source"].startswith("task:")
            # with the score and level the scorecard gave it (its latest scoring)
            assert label["level"] == "critical" and label["score"] > 0.6, label
            [entry] = await fetch(
                conn, "SELECT * FROM crmflow.suppressions WHERE list = 'churn_playbook'"
            )
            assert entry["entity_key"] == {"id": critical}
            expected = datetime.now(UTC) + timedelta(days=30)
            assert abs((entry["until"] - expected).total_seconds()) < 600
            # Suppressed: another rise of its level enrolls nothing for 30 days.
            count = await _runs(conn, critical)
            await conn.execute(
                "UPDATE accounts SET churn_risk = 'critical' WHERE id = %s", [critical]
            )
            await conn.execute("UPDATE accounts SET churn_risk = 'critical' WHERE id = %s", [high])
            await wait_until(lambda: _more_runs(conn, high), 20)
            assert await _runs(conn, critical) == count


async def _count(conn: psycopg.AsyncConnection[Any], account: int, like: str, n: int) -> bool:
    found = await value(
        conn,
        "SELECT count(*) FROM tasks WHERE entity_id = %s AND title LIKE %s",
        str(account),
        like,
    )
    return bool(found == n)


async def _runs(conn: psycopg.AsyncConnection[Any], account: int) -> int:
    return int(
        await value(
            conn,
            "SELECT count(*) FROM crmflow.executions x JOIN crmflow.workflows w"
            " ON w.id = x.workflow_id WHERE w.name = %s"
            " AND x.entity_pk = jsonb_build_object('id', %s::bigint)",
            PLAYBOOK,
            account,
        )
    )


async def _more_runs(conn: psycopg.AsyncConnection[Any], account: int) -> bool:
    done = await value(
        conn,
        "SELECT count(*) FROM crmflow.executions x JOIN crmflow.workflows w"
        " ON w.id = x.workflow_id WHERE w.name = %s"
        " AND x.entity_pk = jsonb_build_object('id', %s::bigint)"
        " AND x.status IN ('completed', 'failed')",
        PLAYBOOK,
        account,
    )
    return bool(done >= 2)
