"""Scenario: schema drift under load. Writers keep inserting and updating a watched
table while its schema changes under them (columns named like the capture code's own
names added and dropped, the primary key renamed, a column retyped, partitions created,
attached and detached), with a worker running and workflows active on that table and
on another. Every write commits, every committed write is captured exactly once, and the
other table's workflow goes on enrolling every event."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from engine import capture
from tests.chaos.helpers import Figures, Process, report, start_worker
from tests.helpers import apply, value, wait_until

pytestmark = pytest.mark.chaos

WRITERS = 4
SECONDS = 12.0

DDL = [
    "ALTER TABLE gadgets ADD COLUMN o integer",
    "ALTER TABLE gadgets ADD COLUMN n text DEFAULT 'x'",
    "ALTER TABLE gadgets RENAME COLUMN id TO gadget_id",
    "ALTER TABLE gadgets ALTER COLUMN label TYPE varchar(200)",
    "CREATE TABLE gadgets_b PARTITION OF gadgets FOR VALUES IN ('b')",
    "ALTER TABLE gadgets DROP COLUMN o",
    "CREATE TABLE gadgets_c (LIKE gadgets INCLUDING ALL)",
    "ALTER TABLE gadgets ATTACH PARTITION gadgets_c FOR VALUES IN ('c')",
    "ALTER TABLE gadgets RENAME COLUMN gadget_id TO gid",
    "ALTER TABLE gadgets ALTER COLUMN v TYPE bigint",
]


def _writer(
    url: str, n: int, stop: threading.Event, counts: dict[str, Any], done: list[str]
) -> None:
    """Inserts (into the parent and straight into a partition) and updates, each its own
    transaction; the key column is never named, so the renames do not concern it. Rows
    for regions b and c only once their partitions exist (the default partition must not
    hold them, or creating those partitions would fail)."""
    i = 0
    with psycopg.connect(url, autocommit=True) as conn:
        while not stop.is_set():
            i += 1
            regions = "az" + ("b" if any("gadgets_b" in d for d in done) else "")
            regions += "c" if any("ATTACH" in d for d in done) else ""
            region = regions[i % len(regions)]
            try:
                # One table per transaction, parent or partition: a transaction that
                # wrote a partition and then its parent would deadlock with an ALTER
                # of the parent by itself, crmflow or not.
                table = "gadgets_a" if region == "a" and i % 2 else "gadgets"
                with conn.transaction():
                    conn.execute(
                        f"INSERT INTO {table} (region, v, label) VALUES (%s, %s, 'w')",
                        [region, n * 1_000_000 + i],
                    )
                    cur = conn.execute(
                        f"UPDATE {table} SET label = 'hot' WHERE v = %s AND label = 'w'",
                        [n * 1_000_000 + i],
                    )
                    conn.execute("INSERT INTO leads (name, source) VALUES ('drift', 'drift')")
                counts["inserts"] += 1
                counts["updates"] += cur.rowcount
                counts["leads"] += 1
            except psycopg.Error as exc:
                counts["errors"].append(f"{type(exc).__name__}: {exc}")


def _ddl(url: str, done: list[str], took: list[float]) -> None:
    """Every statement of DDL, spread over SECONDS, while the writers write (they stop
    once this has run them all): how long the DDL takes is reported, not raced against
    the clock (a statement cut off because the others took long proved nothing)."""
    with psycopg.connect(url, autocommit=True) as conn:
        for statement in DDL:
            time.sleep(SECONDS / (len(DDL) + 1))
            t0 = time.monotonic()
            conn.execute(statement)
            took.append(time.monotonic() - t0)
            done.append(statement)


@pytest.mark.parametrize("event_trigger", [True, False], ids=["ddl-trigger", "worker-heal"])
async def test_schema_drift_under_load(
    crm: psycopg.AsyncConnection[Any],
    db_url: str,
    procs: list[Process],
    log_dir: Path,
    event_trigger: bool,
) -> None:
    if not event_trigger:  # as installed by a non-superuser: the worker heals, every 1 s here
        await crm.execute("DROP EVENT TRIGGER crmflow_heal_capture")
    await crm.execute(
        "CREATE TABLE gadgets (id serial, region text, v int, label text,"
        " PRIMARY KEY (id, region)) PARTITION BY LIST (region);"
        "CREATE TABLE gadgets_a PARTITION OF gadgets FOR VALUES IN ('a');"
        "CREATE TABLE gadgets_default PARTITION OF gadgets DEFAULT"
    )

    await capture.watch(crm, "gadgets")
    other = await apply(
        crm,
        {
            "name": "Every drift lead gets a task",
            "trigger": {"type": "entity_created", "entity_type": "lead"},
            "conditions": [{"field": "source", "operator": "equals", "value": "drift"}],
            "actions": [{"type": "create_task", "title": "lead {{ lead.id }}"}],
        },
    )
    hot = await apply(
        crm,
        {
            "name": "Hot gadgets",
            "trigger": {"type": "field_updated", "entity_type": "gadget", "field": "label"},
            "conditions": [{"field": "label", "operator": "equals", "value": "hot"}],
            "actions": [{"type": "create_task", "title": "gadget", "assignee": None}],
        },
    )
    # Capture keeps only what active workflows could match (docs/design.md): one on the
    # inserts (all labelled 'w'), so that every insert is captured through the filter too.
    await apply(
        crm,
        {
            "name": "New gadgets",
            "trigger": {"type": "entity_created", "entity_type": "gadget"},
            "conditions": [{"field": "label", "operator": "equals", "value": "w"}],
            "actions": [{"type": "create_task", "title": "new gadget", "assignee": None}],
        },
    )
    worker = start_worker(db_url, log_dir, concurrency=4, CRMFLOW_CAPTURE_HEAL_INTERVAL="1")
    procs.append(worker)

    async def registered() -> bool:
        return await value(crm, "SELECT count(*) FROM crmflow.workers") == 1

    await wait_until(registered, timeout=60)

    stop = threading.Event()
    counts: dict[str, Any] = {"inserts": 0, "updates": 0, "leads": 0, "errors": []}
    per_writer = [dict(counts, errors=[]) for _ in range(WRITERS)]
    done: list[str] = []
    took: list[float] = []
    ddl = threading.Thread(target=_ddl, args=(db_url, done, took))
    threads = [
        threading.Thread(target=_writer, args=(db_url, n, stop, per_writer[n], done))
        for n in range(WRITERS)
    ] + [ddl]
    started = time.monotonic()
    for t in threads:
        t.start()
    time.sleep(SECONDS)
    ddl.join(timeout=60)  # a DDL crmflow held up for a minute fails the len(done) check
    stop.set()
    for t in threads:
        t.join(timeout=30)
    for w in per_writer:
        for key in ("inserts", "updates", "leads"):
            counts[key] += w[key]
        counts["errors"] += w["errors"]

    async def all_matched() -> bool:
        return (
            await value(crm, "SELECT count(*) FROM crmflow.outbox WHERE processed_at IS NULL") == 0
        )

    await wait_until(all_matched, timeout=60, interval=0.2)
    captured = {
        r["op"]: r["n"]
        for r in await (
            await crm.execute(
                "SELECT op, count(*) AS n FROM crmflow.outbox WHERE entity_type = 'gadget'"
                " GROUP BY op"
            )
        ).fetchall()
    }
    leads_enrolled = await value(
        crm, "SELECT count(*) FROM crmflow.executions WHERE workflow_id = %s", other
    )
    hot_enrolled = await value(
        crm, "SELECT count(*) FROM crmflow.executions WHERE workflow_id = %s", hot
    )
    match_errors = await value(
        crm, "SELECT count(*) FROM crmflow.outbox WHERE match_error IS NOT NULL"
    )
    figures = Figures(
        f"schema drift under load ({'DDL trigger' if event_trigger else 'worker heal'})",
        events_captured=sum(captured.values()),
        executions_completed=leads_enrolled + hot_enrolled,
        lost_events=(counts["inserts"] - captured.get("insert", 0))
        + (counts["updates"] - captured.get("update", 0)),
        time_to_recover_s=time.monotonic() - started,
        extra={
            "writer_commits": counts["inserts"],
            "writer_errors": len(counts["errors"]),
            "ddl_done": len(done),
            "ddl_max_s": round(max(took, default=0.0), 3),
            "ddl_total_s": round(sum(took), 3),
            "match_errors": match_errors,
            "hot_enrolled": hot_enrolled,
        },
    )
    report(figures, [worker])
    assert counts["errors"] == [], counts["errors"][:5]
    assert len(done) == len(DDL)
    assert captured.get("insert", 0) == counts["inserts"]
    assert captured.get("update", 0) == counts["updates"]
    assert captured.get("delete", 0) == 0  # no update lost its pairing
    assert leads_enrolled == counts["leads"]
    assert hot_enrolled == counts["updates"]
    assert match_errors == 0
