"""A Python peer's worker process for ``crmflow bench --peers`` (bench/peers.py):

    python -m bench.peer_worker procrastinate|pgqueuer DATABASE_URL HOOK_URL

One process, concurrency 10, the peer's default settings otherwise. The jobs, the same
for every peer (the graphile-worker script in bench/peers.py does the same in Node):

- ``insert_task``: insert the task row of a lead;
- ``first``: insert a task row and, in the same statement, enqueue ``second`` to run
  5 s later; ``second`` inserts the follow-up row with its due time and its start;
- ``hook``: POST to the local endpoint with an ``Idempotency-Key``, then insert a row.

Each job's row records when the job started (``started_at``), so the bench measures
from the tasks table alone.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from datetime import UTC, datetime
from typing import Any

import httpx

INSERT = "INSERT INTO tasks (lead_id, kind, started_at) VALUES (%(lead)s, %(kind)s, %(started)s)"
SECOND = (
    "INSERT INTO tasks (lead_id, kind, started_at, due_at)"
    " VALUES (%(lead)s, 'second', %(started)s, to_timestamp(%(due)s))"
)
PROCRASTINATE_FIRST = """
WITH t AS (INSERT INTO tasks (lead_id, kind, started_at) VALUES (%(lead)s, 'first', %(started)s))
SELECT procrastinate_defer_jobs_v1(ARRAY[ROW(
           'bench', 'second', 0, NULL, NULL,
           jsonb_build_object('lead_id', %(lead)s::bigint,
                              'due', extract(epoch FROM now() + interval '5 s')),
           now() + interval '5 s')::procrastinate_job_to_defer_v1])
"""
PGQUEUER_FIRST = """
WITH t AS (INSERT INTO tasks (lead_id, kind, started_at) VALUES (%(lead)s, 'first', %(started)s))
INSERT INTO pgqueuer (priority, entrypoint, payload, execute_after, status)
VALUES (0, 'second',
        convert_to(%(lead)s::bigint::text || ':'
                   || extract(epoch FROM now() + interval '5 s')::text, 'UTF8'),
        now() + interval '5 s', 'queued')
"""


def _now() -> datetime:
    return datetime.now(UTC)


async def _call(client: httpx.AsyncClient, hook: str, lead: int) -> None:
    response = await client.post(
        hook, json={"id": lead}, headers={"Idempotency-Key": f"lead-{lead}"}
    )
    response.raise_for_status()


async def run_procrastinate(url: str, hook: str) -> None:
    import procrastinate

    app = procrastinate.App(
        connector=procrastinate.PsycopgConnector(conninfo=url, min_size=2, max_size=12)
    )
    client = httpx.AsyncClient()
    execute = app.connector.execute_query_async

    @app.task(name="insert_task", queue="bench")
    async def insert_task(lead_id: int) -> None:
        await execute(INSERT, lead=lead_id, kind="task", started=_now())

    @app.task(name="first", queue="bench")
    async def first(lead_id: int) -> None:
        await execute(PROCRASTINATE_FIRST, lead=lead_id, started=_now())

    @app.task(name="second", queue="bench")
    async def second(lead_id: int, due: float) -> None:
        await execute(SECOND, lead=lead_id, due=due, started=_now())

    @app.task(name="hook", queue="bench")
    async def hook_task(lead_id: int) -> None:
        started = _now()
        await _call(client, hook, lead_id)
        await execute(INSERT, lead=lead_id, kind="http", started=started)

    async with app.open_async():
        await app.run_worker_async(queues=["bench"], concurrency=10, wait=True)
    await client.aclose()


async def _pgqueuer_driver(url: str) -> tuple[Any, Any]:
    """asyncpg's driver, the one pgqueuer's own benchmark uses (psycopg's ran the
    same jobs several times slower here); psycopg's when asyncpg is not installed."""
    try:
        import asyncpg
        from pgqueuer import AsyncpgDriver

        conn = await asyncpg.connect(dsn=url)
        return conn, AsyncpgDriver(conn)
    except ImportError:
        import psycopg
        from pgqueuer import PsycopgDriver

        conn = await psycopg.AsyncConnection.connect(url, autocommit=True)
        return conn, PsycopgDriver(conn)


async def run_pgqueuer(url: str, hook: str) -> None:
    from pgqueuer import Job, Queries, QueueManager
    from psycopg_pool import AsyncConnectionPool

    pool = AsyncConnectionPool(url, min_size=2, max_size=10, open=False)
    await pool.open()
    client = httpx.AsyncClient()
    listener, driver = await _pgqueuer_driver(url)
    qm = QueueManager(Queries(driver))

    # Concurrency 10: pgqueuer's own cap (max_concurrent_tasks) counts jobs as running
    # until their buffered completion is written, which held it to about 5 jobs/s here;
    # so it dequeues as its own benchmark does (batches of 10, no cap) and at most 10
    # jobs do their work at once.
    running = asyncio.Semaphore(10)

    async def execute(query: Any, **params: Any) -> None:
        async with pool.connection() as conn:
            await conn.execute(query, params)

    def lead_of(job: Job) -> int:
        return int((job.payload or b"0").decode().split(":")[0])

    @qm.entrypoint("insert_task")
    async def insert_task(job: Job) -> None:
        async with running:
            await execute(INSERT, lead=lead_of(job), kind="task", started=_now())

    @qm.entrypoint("first")
    async def first(job: Job) -> None:
        async with running:
            await execute(PGQUEUER_FIRST, lead=lead_of(job), started=_now())

    @qm.entrypoint("second")
    async def second(job: Job) -> None:
        lead, due = (job.payload or b"0:0").decode().split(":")
        async with running:
            await execute(SECOND, lead=int(lead), due=float(due), started=_now())

    @qm.entrypoint("hook")
    async def hook_task(job: Job) -> None:
        async with running:
            started = _now()
            await _call(client, hook, lead_of(job))
            await execute(INSERT, lead=lead_of(job), kind="http", started=started)

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, qm.shutdown.set)
    await qm.run(batch_size=10)
    await client.aclose()
    await pool.close()
    await listener.close()


def main(argv: list[str]) -> int:
    peer, url, hook = argv
    runner = {"procrastinate": run_procrastinate, "pgqueuer": run_pgqueuer}[peer]
    asyncio.run(runner(url, hook))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
