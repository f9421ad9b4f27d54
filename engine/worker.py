"""``crmflow worker``: matcher, scheduler and procrastinate worker in one process.

Besides running jobs, the worker keeps a heartbeat in ``crmflow.workers`` and, every
few seconds, gives back to the queue the jobs of workers that died (procrastinate
leaves them ``doing`` forever on its own). Replaying such a job is safe: steps that
committed are not run again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import psycopg

from engine import db, http
from engine.config import Settings, get_settings
from engine.executor.batch import BatchExecutor, keep_leases
from engine.executor.runner import Runner
from engine.matcher import Matcher
from engine.queue import JobTracker, create_app
from engine.scheduler import Scheduler

log = logging.getLogger(__name__)


# Back-off between restarts of a loop that stopped on its own (seconds): short for a
# blip, growing to a few seconds while the database stays away, never a tight loop.
RESTART_BACKOFF_MIN = 0.5
RESTART_BACKOFF_MAX = 10.0
RESTART_BACKOFF_RESET = 60.0


# Shutdown bounds (seconds): the loops' grace, the wait for cancelled ones, the "worker
# stopped" write's wait for a connection, the pool's close. At most ~7.5 s in all.
STOP_GRACE = 2.0
STOP_CANCEL_WAIT = 2.0
STOP_WRITE_TIMEOUT = 1.5
STOP_POOL_CLOSE = 2.0

# How often the worker clears the execution queue's dead rows (seconds).
QUEUE_VACUUM_INTERVAL = 30.0


_q = db.Queries("runtime.sql")


class Worker:
    def __init__(
        self,
        url: str,
        *,
        concurrency: int = 10,
        settings: Settings | None = None,
        run_matcher: bool = True,
        run_scheduler: bool = True,
    ) -> None:
        self.url = url
        self.settings = settings or get_settings()
        self.concurrency = concurrency
        self.run_matcher = run_matcher
        self.run_scheduler = run_scheduler
        self.stop_event = asyncio.Event()
        self.pool = db.create_pool(url, self.settings, min_size=2, max_size=concurrency + 8)
        self.app = create_app()
        self.runner = Runner(self.pool, self.settings)
        self.executor: BatchExecutor | None = None
        self.matcher = Matcher(self.pool, self.settings)
        self.scheduler = Scheduler(self.pool, self.settings)
        self.worker_id: int | None = None
        self.recovered_jobs = 0
        self.procrastinate_restarts = 0
        self.orphaned_jobs = 0
        self.jobs = JobTracker()
        self._tasks: list[asyncio.Task[Any]] = []

    async def start(self) -> None:
        await self.pool.open(wait=True, timeout=30)
        await self.app.open_async(self.pool)
        async with self.pool.connection() as conn:
            row = await (
                await conn.execute(
                    _q("register_worker"), {"hostname": socket.gethostname(), "pid": os.getpid()}
                )
            ).fetchone()
            assert row is not None
            self.worker_id = row["id"]
        self.executor = BatchExecutor(
            self.pool,
            self.runner,
            self.settings,
            f"{socket.gethostname()}:{os.getpid()}:{self.worker_id}",
        )
        stop = self.stop_event
        self._tasks = [
            asyncio.create_task(self._procrastinate(), name="procrastinate worker"),
            asyncio.create_task(self._heartbeat(), name="heartbeat"),
            asyncio.create_task(self._recover_stalled(), name="stalled job recovery"),
            asyncio.create_task(self._check_alerts(), name="alerts"),
            asyncio.create_task(self._apply_retention(), name="retention"),
            asyncio.create_task(self._heal_capture(), name="capture heal"),
            asyncio.create_task(keep_leases(self.executor, self._every), name="leases"),
            asyncio.create_task(self._wake_due(), name="queue sweep"),
            asyncio.create_task(self._vacuum_queue(), name="queue vacuum"),
        ]
        if self.run_matcher:
            self._tasks.append(
                asyncio.create_task(self.matcher.run(stop, self.url), name="matcher")
            )
        if self.run_scheduler:
            self._tasks.append(asyncio.create_task(self.scheduler.run(stop), name="scheduler"))
            # Scorecards: real-time rescoring from the matcher's queue, daily batches.
            from engine.scorecards.run import run_loop as run_scorecards

            self._tasks.append(
                asyncio.create_task(run_scorecards(self.pool, stop), name="scorecards")
            )
        log.info(
            "worker %s started (concurrency %d, environment %s)",
            self.worker_id,
            self.concurrency,
            self.settings.environment,
        )

    async def _procrastinate(self) -> None:
        """procrastinate's worker, restarted with a back-off whenever it stops on its own.

        procrastinate stops its worker when a side task fails: its heartbeat, or its
        LISTEN connection when it cannot reconnect (a PostgreSQL restart does both). Left
        alone, the process would go on matching and scheduling while running no job.
        """
        backoff = RESTART_BACKOFF_MIN
        while not self.stop_event.is_set():
            started = asyncio.get_running_loop().time()
            try:
                await self._run_procrastinate_once()
                reason = "stopped"
            except Exception as exc:  # CancelledError (our stop) is not caught
                reason = f"failed ({type(exc).__name__}: {exc})"
            if self.stop_event.is_set():
                return
            self.procrastinate_restarts += 1
            # A loop that ran a while before failing starts over at the short back-off.
            if asyncio.get_running_loop().time() - started > RESTART_BACKOFF_RESET:
                backoff = RESTART_BACKOFF_MIN
            log.error(
                "procrastinate worker %s; restarting it in %.1fs (restart %d)",
                reason,
                backoff,
                self.procrastinate_restarts,
            )
            await self._every(backoff)
            backoff = min(backoff * 2, RESTART_BACKOFF_MAX)

    async def _run_procrastinate_once(self) -> None:
        await self.app.run_worker_async(
            queues=[self.settings.queue_name],
            name=f"crmflow-{self.worker_id}",
            concurrency=self.concurrency,
            additional_context={
                "runner": self.runner,
                "executor": self.executor,
                "jobs": self.jobs,
            },
            install_signal_handlers=False,
            update_heartbeat_interval=self.settings.heartbeat_interval,
            stalled_worker_timeout=self.settings.stalled_worker_timeout,
            # Scheduled wake-ups (delayed steps) are found by polling: a fifth of a second.
            fetch_job_polling_interval=0.2,
            delete_jobs="successful",
        )

    async def _every(self, seconds: float) -> bool:
        """Sleep, unless asked to stop; True while running."""
        try:
            await asyncio.wait_for(self.stop_event.wait(), seconds)
        except TimeoutError:
            return True
        return False

    async def _wake_due(self) -> None:
        """Backs up the executor's wake-ups: due work nobody is running (a wake-up lost
        to a race, a lease that ran out with its worker, a lifecycle hit kept and left
        behind) gets one within a second."""
        while await self._every(1.0):
            try:
                async with self.pool.connection() as conn:
                    await conn.execute(db.query("wake_kept_hits", "executor.sql"), {})
                    await conn.execute(
                        db.query("wake_due", "executor.sql"), {"queue": self.settings.queue_name}
                    )
            except psycopg.Error as exc:
                log.debug("queue sweep failed: %s", exc)

    async def _vacuum_queue(self) -> None:
        """Dead rows of the execution queue cleared every half minute (see executor.sql)."""
        while await self._every(QUEUE_VACUUM_INTERVAL):
            try:
                async with db.autocommit(self.pool) as conn:  # VACUUM: no transaction
                    await conn.execute(db.query("vacuum_queue", "executor.sql"))
            except psycopg.Error as exc:
                log.debug("queue vacuum failed: %s", exc)

    async def _heartbeat(self) -> None:
        while await self._every(self.settings.heartbeat_interval):
            try:
                async with self.pool.connection() as conn:
                    await conn.execute(_q("heartbeat"), {"id": self.worker_id})
            except psycopg.Error as exc:
                log.warning("heartbeat failed: %s", exc)

    async def recover_stalled(self) -> int:
        """Put back in the queue the running jobs of workers whose heartbeat stopped."""
        stalled = await self.app.job_manager.get_stalled_jobs(
            seconds_since_heartbeat=self.settings.stalled_worker_timeout
        )
        count = 0
        for job in stalled:
            assert job.id is not None
            try:
                await self.app.job_manager.retry_job_by_id_async(job.id, retry_at=datetime.now(UTC))
            except Exception as exc:  # another worker recovered it first
                log.debug("could not recover job %s: %s", job.id, exc)
                continue
            log.warning(
                "recovered job %s of a dead worker (execution %s)",
                job.id,
                job.task_kwargs.get("execution_id"),
            )
            count += 1
        self.recovered_jobs += count
        return count

    async def recover_orphaned(self) -> int:
        """Put back in the queue the jobs this process's procrastinate worker holds as
        ``doing`` but is not running: their end could not be recorded (see
        :class:`engine.queue.JobTracker`).

        A job is given back only when found so on two sweeps in a row, so a job between
        the end of its task and the record of that end (milliseconds) is left alone.
        """
        if not self.jobs.worker_ids:
            return 0
        async with self.pool.connection() as conn:
            rows = await (
                await conn.execute(
                    _q("doing_jobs_of_workers"), {"worker_ids": sorted(self.jobs.worker_ids)}
                )
            ).fetchall()
        orphans = {r["id"] for r in rows} - self.jobs.running
        confirmed = orphans & self.jobs.suspects
        self.jobs.suspects = orphans - confirmed
        count = 0
        for job_id in sorted(confirmed):
            try:
                await self.app.job_manager.retry_job_by_id_async(job_id, retry_at=datetime.now(UTC))
            except Exception as exc:  # finished or recovered meanwhile
                log.debug("could not recover job %s: %s", job_id, exc)
                continue
            log.warning(
                "recovered job %s: this worker held it as running but was not running it"
                " (its end could not be recorded)",
                job_id,
            )
            count += 1
        self.orphaned_jobs += count
        return count

    async def _recover_stalled(self) -> None:
        interval = max(1.0, self.settings.stalled_worker_timeout / 3)
        while await self._every(interval):
            try:
                await self.recover_stalled()
                await self.recover_orphaned()
            except Exception as exc:
                log.warning("stalled job recovery failed: %s", exc)

    async def _check_alerts(self) -> None:
        from engine.alerts import check

        while await self._every(self.settings.alert_interval):
            try:
                async with self.pool.connection() as conn:
                    await check(conn, self.settings)
            except Exception as exc:
                log.warning("alert check failed: %s", exc)

    async def _heal_capture(self) -> None:
        """Keep capture in line with the CRM's schema (renames, key changes, partitions);
        a finding is logged when it first appears, not every round."""
        from engine.capture import heal

        seen: set[tuple[str, str]] = set()
        while await self._every(self.settings.capture_heal_interval):
            try:
                async with self.pool.connection() as conn:
                    found = {(c["entity_type"], c["change"]) for c in await heal(conn)}
            except Exception as exc:
                log.warning("capture heal failed: %s", exc)
                continue
            for entity_type, change in sorted(found - seen):
                log.warning("capture of %s: %s", entity_type, change)
            seen = found

    async def _apply_retention(self) -> None:
        from engine.retention import apply_retention

        if self.settings.retention_outbox is None and self.settings.retention_history is None:
            return
        while await self._every(self.settings.retention_interval):
            try:
                async with self.pool.connection() as conn:
                    await apply_retention(conn, self.settings, stop=self.stop_event)
            except Exception as exc:
                log.warning("retention failed: %s", exc)

    async def stop(self) -> None:
        """Stop within seconds, the database reachable or not (orchestrators kill at
        10-30 s): the loops get STOP_GRACE to finish what they are doing (a matcher
        batch commits), then are cancelled; the last writes wait briefly for a
        connection. With the database away, every loop would otherwise wait out the
        pool's 30 s connection timeout, and then the "stopped" write another 30 s."""
        self.stop_event.set()
        # From now on a wait for a pooled connection is short (procrastinate's shutdown
        # writes, the "stopped" write): with the database away it would last 30 s.
        self.pool.timeout = STOP_WRITE_TIMEOUT
        procrastinate_task = self._tasks[0] if self._tasks else None
        if procrastinate_task is not None:
            procrastinate_task.cancel()
        if self._tasks:
            _, pending = await asyncio.wait(self._tasks, timeout=STOP_GRACE)
            for task in pending:
                log.info("stopping %s: cancelled after %.0f s", task.get_name(), STOP_GRACE)
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=STOP_CANCEL_WAIT)
            for task in self._tasks:
                if task.done() and not task.cancelled():
                    task.exception()  # retrieved: a loop's failure is not logged at exit
        try:
            if self.executor is not None:  # what it held is claimable at once
                await self.executor.release_all()
            async with self.pool.connection(timeout=STOP_WRITE_TIMEOUT) as conn:
                await conn.execute(_q("worker_stopped"), {"id": self.worker_id})
        except psycopg.Error as exc:  # PoolTimeout included
            log.warning("could not record this worker's stop: %s", exc)
        await self.app.close_async()
        with contextlib.suppress(Exception):  # the external actions' kept-open connections
            await http.close_clients()
        await self.pool.close(timeout=STOP_POOL_CLOSE)

    async def wait(self) -> None:
        await self.stop_event.wait()


@contextlib.asynccontextmanager
async def running_worker(url: str, **kwargs: Any) -> AsyncIterator[Worker]:
    worker = Worker(url, **kwargs)
    await worker.start()
    try:
        yield worker
    finally:
        await worker.stop()
