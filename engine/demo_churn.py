"""The churn-risk scenario of ``crmflow demo`` (docs/churn.md): two years of customer
history generated (``engine.churn_history``), the churn scorecard fitted on it (its
quality printed; hand-set weights without the 'fit' extra), the daily batch scoring
every account, the churn playbook firing for the top risks; then a real-time signal
(an account loses its key contact) and a false-positive feedback label."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import psycopg
from rich.table import Table

from engine.demo_crm import console, settled

CHURN_CARD = "account_churn_risk"
CHURN_ACCOUNTS = 3000

TOP_RISKS = """
SELECT a.id, a.name, a.churn_risk::text AS level, a.churn_score, a.churn_days, a.churn_factors,
       a.churn_score - h.previous_score AS change, u.name AS csm
  FROM accounts AS a
  LEFT JOIN users AS u ON u.id = a.csm_id
  LEFT JOIN LATERAL (SELECT previous_score FROM crmflow.score_history AS h
                      WHERE h.entity_type = 'account'
                        AND h.entity_key = jsonb_build_object('id', a.id)
                      ORDER BY h.scored_at DESC, h.id DESC LIMIT 1) AS h ON true
 WHERE a.churned_at IS NULL AND a.churn_score IS NOT NULL
 ORDER BY a.churn_score DESC LIMIT %(n)s
"""


async def _playbook_settled(conn: psycopg.AsyncConnection[Any]) -> bool:
    return await settled(conn, wait_delayed=False)


async def churn_scenario(
    conn: psycopg.AsyncConnection[Any], accounts: int = CHURN_ACCOUNTS
) -> dict[str, Any]:
    """The churn-risk scenario (docs/churn.md): two years of customer history, the
    scorecard fitted on it (quality printed), the daily batch, the playbook for the top
    risks. Returns what it did, for the report."""
    from engine import churn_history
    from engine.scorecards import run

    out: dict[str, Any] = {}
    with console.status(f"generating two years of history for {accounts:,} accounts"):
        generated = await churn_history.generate(conn, accounts)
    console.print(
        f"churn history: {generated.counts['accounts']:,} accounts,"
        f" {generated.counts['logins']:,} logins, {generated.counts['feature_usage']:,} feature"
        f" uses, {generated.counts['support_tickets']:,} tickets,"
        f" {generated.counts['nps_responses']:,} NPS answers,"
        f" {generated.counts['invoices']:,} invoices in {generated.seconds:.1f} s",
        highlight=False,
    )
    out["generated"] = generated
    out["fit"] = await _fitted(conn)
    with console.status("the daily batch: scoring every account"):
        batch = await run.score(conn, CHURN_CARD)
    console.print(
        f"daily batch: {batch.scored:,} accounts scored, {batch.updated:,} updated,"
        f" {batch.level_changes:,} level changes in {batch.seconds:.2f} s",
        highlight=False,
    )
    out["batch"] = batch
    with console.status("the churn playbook at work"):
        deadline = time.monotonic() + 90
        while not await _playbook_settled(conn) and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
    levels = await (
        await conn.execute(
            "SELECT churn_risk::text AS level, count(*) AS n FROM accounts"
            " WHERE churned_at IS NULL GROUP BY 1 ORDER BY 1"
        )
    ).fetchall()
    out["levels"] = {r["level"]: r["n"] for r in levels}
    top = await (await conn.execute(TOP_RISKS, {"n": 5})).fetchall()
    out["top"] = top
    console.print(_top_risks_table(top))
    console.print(
        "accounts by level: "
        + ", ".join(f"{k} {v:,}" for k, v in out["levels"].items())
        + " (live accounts); the risk page: /ui/risk",
        highlight=False,
    )
    out["realtime"] = await _realtime_signal(conn)
    out["feedback"] = await _false_positive(conn)
    return out


async def _fitted(conn: psycopg.AsyncConnection[Any]) -> Any:
    """The churn scorecard fitted on the history and saved as a new version (its quality
    printed); None without the 'fit' extra (the hand-set weights score)."""
    try:
        from engine.scorecards import fit as fitting

        fitting._require_extras()
    except Exception as exc:  # the 'fit' extra is not installed
        console.print(f"[yellow]not fitting:[/] {exc}; scoring with the hand-set weights")
        return None
    from engine.commands.score_fit import print_fit

    with console.status("fitting the churn model (logistic + survival)"):
        result = await fitting.fit(conn, CHURN_CARD, "churned_at", 90)
    print_fit(result)
    saved = await fitting.save(conn, result)
    console.print(f"saved {saved.name} v{saved.version} with the fitted weights")
    return result


def _top_risks_table(top: list[Any]) -> Table:
    table = Table(title="Top churn risks (live accounts)", title_justify="left")
    for column in ("account", "level", "churn in 90 d", "days to churn", "main factors",
                   "change", "CSM"):  # fmt: skip
        table.add_column(
            column, justify="right" if column in ("churn in 90 d", "change") else "left"
        )
    for r in top:
        factors = ", ".join(f["label"] for f in (r["churn_factors"] or []))
        change = "new" if r["change"] is None else f"{r['change'] * 100:+.1f} pts"
        table.add_row(
            r["name"], r["level"], f"{r['churn_score'] * 100:.1f}%",
            "-" if r["churn_days"] is None else str(r["churn_days"]), factors, change,
            r["csm"] or "-",
        )  # fmt: skip
    return table


async def _realtime_signal(conn: psycopg.AsyncConnection[Any]) -> dict[str, Any] | None:
    """Real time: the medium-risk account closest to high loses its key contact and opens
    two urgent tickets; the scorecard rescores it from the captured writes."""
    row = await (
        await conn.execute(
            "SELECT id, name, churn_score FROM accounts WHERE churned_at IS NULL"
            " AND churn_risk = 'medium' ORDER BY churn_score DESC, id LIMIT 1"
        )
    ).fetchone()
    if row is None:
        return None
    started = time.monotonic()
    await conn.execute(
        "UPDATE contacts SET left_at = now() WHERE id = (SELECT id FROM contacts"
        " WHERE account_id = %(id)s AND key_contact AND left_at IS NULL ORDER BY id LIMIT 1)",
        {"id": row["id"]},
    )
    await conn.execute(
        "INSERT INTO support_tickets (account_id, subject, priority)"
        " VALUES (%(id)s, 'Export broken', 'urgent'), (%(id)s, 'Considering options', 'high')",
        {"id": row["id"]},
    )
    after = row
    with console.status(f"real time: {row['name']} loses its key contact"):
        while time.monotonic() - started < 20:
            after = (
                await (
                    await conn.execute(
                        "SELECT churn_score, churn_risk::text AS level FROM accounts WHERE id = %s",
                        [row["id"]],
                    )
                ).fetchone()
                or row
            )
            if after["churn_score"] != row["churn_score"]:
                break
            await asyncio.sleep(0.1)
    seconds = time.monotonic() - started
    console.print(
        f"real time: {row['name']} lost its key contact and opened two urgent tickets:"
        f" churn risk {row['churn_score'] * 100:.1f}% -> {after['churn_score'] * 100:.1f}%"
        f" ({after.get('level', 'medium')}) {seconds:.1f} s after the writes",
        highlight=False,
    )
    return {"id": row["id"], "before": row["churn_score"], **after, "seconds": seconds}


async def _false_positive(conn: psycopg.AsyncConnection[Any]) -> dict[str, Any] | None:
    """Feedback: the CSM of the top alert closes it as a false positive."""
    task = await (
        await conn.execute(
            "SELECT t.id, t.entity_id, t.title FROM tasks t JOIN accounts a"
            " ON a.id::text = t.entity_id WHERE t.title LIKE 'Churn risk:%%'"
            " AND t.completed_at IS NULL ORDER BY a.churn_score DESC NULLS LAST LIMIT 1"
        )
    ).fetchone()
    if task is None:
        return None
    await conn.execute(
        "UPDATE tasks SET outcome = 'false_positive', completed_at = now() WHERE id = %s",
        [task["id"]],
    )
    deadline = time.monotonic() + 20
    entry = None
    while time.monotonic() < deadline and entry is None:
        entry = await (
            await conn.execute(
                "SELECT s.until FROM crmflow.suppressions s WHERE s.list = 'churn_playbook'"
                " AND s.entity_key = jsonb_build_object('id', %s::bigint)",
                [task["entity_id"]],
            )
        ).fetchone()
        if entry is None:
            await asyncio.sleep(0.1)
    if entry is None:
        console.print("[yellow]feedback: the false positive was not recorded in time[/]")
        return None
    console.print(
        f"feedback: '{task['title']}' closed as a false positive: label recorded for the"
        f" next fit, the account is left out of the playbook until {entry['until']:%Y-%m-%d}",
        highlight=False,
    )
    return {"task": task["id"], "until": entry["until"]}
