"""`crmflow api`, `worker`, `prune`: the long-running processes and retention."""

from __future__ import annotations

import argparse
import asyncio
import signal
from typing import Any

import psycopg

from engine.commands.common import (
    CliError,
    console,
    database_url,
    dump_json,
    duration_arg,
    err,
    human_duration,
    with_conn,
)


def cmd_api(args: argparse.Namespace) -> int:
    from api.main import create_app, serve

    serve(
        create_app(),
        host=args.host,
        port=args.port,
        log_level="debug" if args.verbose else "info",
        proxy_headers=True,
    ).run()
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    from rich.progress import Progress, TaskID

    from engine import retention

    async def run(conn: psycopg.AsyncConnection[Any]) -> int:
        if args.dry_run:
            counts = await retention.count_prunable(
                conn, outbox_older_than=args.older_than, history_older_than=args.older_than
            )
            verb = "would delete"
        else:
            # A live display only for a person watching (stderr a terminal), not in logs.
            with Progress(console=err, transient=True, disable=not err.is_terminal) as bar:
                tasks: dict[str, TaskID] = {}

                def progress(what: str, rows: int) -> None:
                    if what not in tasks:
                        tasks[what] = bar.add_task(f"deleting {what}", total=None)
                    bar.update(tasks[what], completed=rows, description=f"deleting {what}: {rows}")

                counts = await retention.prune(
                    conn,
                    outbox_older_than=args.older_than,
                    history_older_than=args.older_than,
                    batch_size=args.batch_size,
                    progress=progress,
                )
            verb = "deleted"
        if args.json:
            dump_json(
                {
                    "dry_run": args.dry_run,
                    "cutoff": counts.cutoffs.get("outbox"),
                    "outbox_events": counts.outbox,
                    "executions": counts.executions,
                    "steps": counts.steps,
                    "jobs": counts.jobs,
                }
            )
        else:
            console.print(
                f"{verb} {counts.outbox} outbox events, {counts.executions} executions "
                f"({counts.steps} steps) and {counts.jobs} finished jobs older than "
                f"{human_duration(args.older_than)}",
                highlight=False,
            )
        return 0

    if args.batch_size < 1:
        raise CliError("--batch-size is at least 1")
    return asyncio.run(with_conn(run))


def cmd_worker(args: argparse.Namespace) -> int:
    from engine.worker import Worker

    url = database_url()
    if args.metrics_port:
        from engine.metrics import serve

        serve(url, args.metrics_port)

    async def run() -> int:
        worker = Worker(url, concurrency=args.concurrency)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, worker.stop_event.set)
        await worker.start()
        console.print(
            f"crmflow worker {worker.worker_id} running (concurrency "
            f"{args.concurrency}); Ctrl+C stops it"
        )
        await worker.wait()
        await worker.stop()
        return 0

    return asyncio.run(run())


def register(sub: Any) -> None:
    """Add these commands to the top-level subparsers."""
    p = sub.add_parser("api", help="serve the management API (FastAPI, uvicorn)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.set_defaults(func=cmd_api)

    p = sub.add_parser(
        "prune",
        help="delete processed events, finished executions and jobs older than a duration",
    )
    p.add_argument(
        "--older-than",
        required=True,
        type=duration_arg,
        metavar="DURATION",
        help="age of what is deleted: 30d, 12h, 90m, or seconds",
    )
    p.add_argument("--dry-run", action="store_true", help="count what would be deleted")
    p.add_argument("--batch-size", type=int, default=1000, help="rows per transaction")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("worker", help="run matcher, scheduler and job worker in one process")
    p.add_argument("--concurrency", type=int, default=10)
    p.add_argument(
        "--metrics-port",
        type=int,
        help="serve Prometheus metrics on this port (this process's and the database's)",
    )
    p.set_defaults(func=cmd_worker)
