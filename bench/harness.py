"""What the benchmarks share: a scratch database, a worker process, pgbench, timing."""

from __future__ import annotations

import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from engine import capture, db, workflows
from engine.config import Settings, get_settings
from engine.embedded import start_embedded
from engine.migrations import migrate
from engine.seed import install_example_crm


def server_url() -> str:
    settings = get_settings()
    return settings.database_url or start_embedded(settings.embedded_data_dir)


def with_dbname(url: str, name: str) -> str:
    params = conninfo_to_dict(url)
    params["dbname"] = name
    return make_conninfo("", **params)


@contextmanager
def scratch_database(prefix: str = "crmflow_bench") -> Iterator[str]:
    """A fresh database, dropped afterwards."""
    server = server_url()
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield with_dbname(server, name)
    finally:
        with psycopg.connect(server, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


async def prepare(url: str, *, crm: bool = True) -> None:
    async with await db.connect(url, autocommit=True) as conn:
        await migrate(conn)
        if crm:
            await install_example_crm(conn, Settings())
            await capture.watch(conn, "public.leads")


async def apply_active(url: str, definitions: list[dict[str, Any]]) -> None:
    async with await db.connect(url, autocommit=True) as conn, conn.transaction():
        for d in definitions:
            await workflows.apply(conn, {**d, "status": "active"})


async def scalar(url: str, query: str, params: Any = None) -> Any:
    async with await db.connect(url, autocommit=True) as conn:
        row = await (await conn.execute(query, params)).fetchone()
        return None if row is None else next(iter(row.values()))


class WorkerProcess:
    """``crmflow worker`` in its own process, as in production."""

    def __init__(self, url: str, concurrency: int = 10, env: dict[str, str] | None = None) -> None:
        self.url = url
        self.concurrency = concurrency
        self.env = env or {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.peak_rss_mb = 0.0

    def start(self) -> None:
        env = {**os.environ, "CRMFLOW_DATABASE_URL": self.url, **self.env}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "engine.cli", "worker", "--concurrency", str(self.concurrency)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def rss_mb(self) -> float:
        """Peak resident memory so far (VmHWM), in MB."""
        assert self.proc is not None
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    self.peak_rss_mb = max(self.peak_rss_mb, int(line.split()[1]) / 1024)
        except OSError:
            pass
        return self.peak_rss_mb

    def stop(self) -> None:
        if self.proc is None:
            return
        self.rss_mb()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


@asynccontextmanager
async def worker_process(url: str, **kwargs: Any) -> AsyncIterator[WorkerProcess]:
    worker = WorkerProcess(url, **kwargs)
    worker.start()
    try:
        yield worker
    finally:
        worker.stop()


async def wait_for(
    url: str, query: str, target: int, timeout: float, worker: WorkerProcess | None = None
) -> float:
    """Poll ``query`` (a count) until it reaches ``target``; returns the time it took."""
    start = time.monotonic()
    async with await db.connect(url, autocommit=True) as conn:
        while True:
            row = await (await conn.execute(query)).fetchone()
            count = next(iter(row.values())) if row else 0
            if worker is not None:
                worker.rss_mb()
            if count >= target:
                return time.monotonic() - start
            if time.monotonic() - start > timeout:
                raise TimeoutError(f"{count}/{target} after {timeout:.0f}s: {query}")
            await asyncio.sleep(0.05)


def pgbench_binary() -> str:
    found = shutil.which("pgbench")
    if found:
        return found
    import pgserver

    candidate = Path(pgserver.__file__).parent / "pginstall" / "bin" / "pgbench"
    if candidate.exists():
        return str(candidate)
    raise RuntimeError("pgbench not found (install postgresql-client)")


def pgbench_tps(url: str, script: str, clients: int, seconds: int) -> float:
    """Transactions per second of ``script`` run by pgbench."""
    params = conninfo_to_dict(url)
    with tempfile.NamedTemporaryFile("w", suffix=".sql", delete=False) as f:
        f.write(script)
        path = f.name
    try:
        env = {
            **os.environ,
            "PGHOST": str(params.get("host", "")),
            "PGPORT": str(params.get("port", "5432")),
            "PGUSER": str(params.get("user", "")),
            "PGPASSWORD": str(params.get("password") or ""),
        }
        out = subprocess.run(
            [
                pgbench_binary(),
                "-n",
                "-c",
                str(clients),
                "-j",
                str(clients),
                "-T",
                str(seconds),
                "-f",
                path,
                str(params["dbname"]),
            ],
            capture_output=True,
            text=True,
            env=env,
            check=True,
        ).stdout
    finally:
        os.unlink(path)
    for line in out.splitlines():
        if line.startswith("tps ="):
            return float(line.split()[2])
    raise RuntimeError(f"no tps in pgbench output: {out}")


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * p
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def median(values: list[float]) -> float:
    return statistics.median(values)
