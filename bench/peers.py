"""``crmflow bench --peers``: the same jobs on other PostgreSQL job queues, in the same run.

The peers, each in a scratch database of its own, with the jobs of docs/design.md: a
row trigger on ``leads`` (``WHEN (NEW.source = 'website_form')``) enqueues one job per
matching lead, and one worker process (concurrency 10) runs them:

- procrastinate (a crmflow dependency): the trigger calls ``procrastinate_defer_jobs_v1``;
- pgqueuer (the ``peers`` extra): the trigger inserts into its ``pgqueuer`` table;
- graphile-worker, only where ``node`` and ``npm`` are on PATH: installed with npm into
  ``~/.cache/crmflow-bench/graphile-worker`` (never into the project), with a worker
  script written there; the trigger calls ``graphile_worker.add_job``.

The jobs, and crmflow's figure each is compared with (``crmflow ÷ peer``):

=========  ==========================================  ======================================
burst      a burst of leads, one task row each:         crmflow's burst of the same size (as
           tasks/s from the worker's start              P4: one create_task, same timing)
delayed    the job inserts a row and enqueues a         Q1 (its lateness measured against the
           follow-up 5 s later: the wave's rate, p99    first step's end + 5 s, as here)
           lateness (start - due)
http       a POST to a local endpoint (idempotency      Q2
           key) then a row: rate, duplicate calls
latency    commit → the task row's commit at 50         P3
           writes/s, p50 / p99
writers    pgbench single-row INSERT with the peer's    P1
           trigger ÷ without: non-matching / matching
=========  ==========================================  ======================================

A peer that cannot be installed or run is skipped with the reason; a job that fails is
reported as such. Neither fails the bench.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psycopg
from psycopg.conninfo import conninfo_to_dict

from bench.harness import (
    apply_active,
    percentile,
    pgbench_tps,
    prepare,
    scratch_database,
)

CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "crmflow-bench"
GRAPHILE_VERSION = "0.17.3"
DELAY = 5


@dataclass
class Sizes:
    burst: int
    delayed: int
    http: int
    writes: int
    warmup: int
    pgbench_seconds: int
    pgbench_rounds: int
    timeout: float  # per job, for the peer's worker to finish it


def sizes(quick: bool) -> Sizes:
    """The jobs' sizes: those of the crmflow cases they are compared with (Q1, Q2, P3,
    P1), and a 10k burst (2k with --quick)."""
    if quick:
        return Sizes(2_000, 500, 300, 300, 30, 4, 1, 180)
    return Sizes(10_000, 5_000, 3_000, 1_500, 50, 15, 3, 900)


# Figures, what they are, and whether more is better (for "ahead").
FIGURES: list[tuple[str, str, bool]] = [
    ("burst_rate", "burst, tasks/s", True),
    ("delayed_rate", "delayed wave, exec/s", True),
    ("delayed_late_p99_s", "delayed, p99 late s", False),
    ("http_rate", "HTTP + insert, exec/s", True),
    ("http_duplicates", "HTTP duplicate calls", False),
    ("latency_p50_ms", "commit→effect p50 ms", False),
    ("latency_p99_ms", "commit→effect p99 ms", False),
    ("writers_non_matching", "writers, other rows", True),
    ("writers_matching", "writers, matching", True),
]


PEER_SCHEMA = """
CREATE TABLE leads (id bigserial PRIMARY KEY, name text, source text, score int,
                    created_at timestamptz DEFAULT now());
CREATE TABLE leads_plain (LIKE leads INCLUDING ALL);
CREATE TABLE tasks (id bigserial PRIMARY KEY, lead_id bigint NOT NULL, kind text NOT NULL,
                    started_at timestamptz, due_at timestamptz,
                    created_at timestamptz NOT NULL DEFAULT clock_timestamp());
CREATE FUNCTION bench_effect() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('bench_effect', NEW.lead_id::text);
    RETURN NULL;
END $$;
"""


def as_uri(conninfo: str) -> str:
    """A ``postgresql://`` URI for ``conninfo`` (asyncpg and node's pg want one)."""
    params = conninfo_to_dict(conninfo)
    user = quote(str(params.get("user") or ""), safe="")
    password = params.get("password")
    auth = f"{user}:{quote(str(password), safe='')}@" if password else (f"{user}@" if user else "")
    host = str(params.get("host") or "localhost")
    if host.startswith("/"):  # a socket directory
        query = f"?host={quote(host, safe='')}"
        host = ""
    else:
        query = ""
    port = f":{params['port']}" if params.get("port") else ""
    return f"postgresql://{auth}{host}{port}/{quote(str(params.get('dbname') or ''))}{query}"


def _enqueue_function(statement: str) -> str:
    return f"""
CREATE OR REPLACE FUNCTION bench_enqueue() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    {statement};
    RETURN NULL;
END $$;
"""


@dataclass
class Peer:
    """A peer queue: how to install it, enqueue from a trigger, reset, run a worker."""

    name: str
    # A PL/pgSQL statement enqueueing the job named TG_ARGV[0] for NEW.id.
    enqueue: str
    reset: str
    missing: Callable[[], str | None]
    version: Callable[[], str]
    install: Callable[[str], Any]  # async (url) -> None
    command: Callable[[str, str], tuple[list[str], str | None]]  # (url, hook) -> argv, cwd


def _python_version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def _procrastinate_missing() -> str | None:
    try:
        import procrastinate  # noqa: F401
    except ImportError as exc:  # pragma: no cover - a crmflow dependency
        return f"procrastinate cannot be imported: {exc}"
    return None


async def _procrastinate_install(url: str) -> None:
    import procrastinate

    app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=url))
    async with app.open_async():
        await app.schema_manager.apply_schema_async()


def _pgqueuer_missing() -> str | None:
    try:
        import pgqueuer  # noqa: F401
    except ImportError:
        return "pgqueuer is not installed (pip install 'crmflow[peers]')"
    return None


async def _pgqueuer_install(url: str) -> None:
    from pgqueuer import PsycopgDriver, Queries

    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await Queries(PsycopgDriver(conn)).install()


def _python_command(peer: str) -> Callable[[str, str], tuple[list[str], str | None]]:
    def command(url: str, hook: str) -> tuple[list[str], str | None]:
        return [sys.executable, "-m", "bench.peer_worker", peer, url, hook], None

    return command


# ───────── graphile-worker (Node) ─────────

GRAPHILE_DIR = CACHE / "graphile-worker"

GRAPHILE_SCRIPT = """// From crmflow bench --peers (bench/peers.py): bench/peer_worker.py in Node.
const { run } = require("graphile-worker");
const hook = process.env.HOOK_URL;
const now = () => new Date().toISOString();
const INSERT = "INSERT INTO tasks (lead_id, kind, started_at) VALUES ($1, $2, $3)";
const FIRST = `WITH t AS (INSERT INTO tasks (lead_id, kind, started_at)
                          VALUES ($1::bigint, 'first', $2))
               SELECT graphile_worker.add_job('second',
                   json_build_object('lead_id', $1::bigint,
                                     'due', extract(epoch FROM now() + interval '5 s')),
                   run_at => now() + interval '5 s')`;
const SECOND = `INSERT INTO tasks (lead_id, kind, started_at, due_at)
                VALUES ($1, 'second', $2, to_timestamp($3))`;
async function main() {
  const runner = await run({
    connectionString: process.env.DATABASE_URL,
    concurrency: 10,
    maxPoolSize: 12,
    taskList: {
      insert_task: async (p, h) => { await h.query(INSERT, [p.lead_id, "task", now()]); },
      first: async (p, h) => { await h.query(FIRST, [p.lead_id, now()]); },
      second: async (p, h) => { await h.query(SECOND, [p.lead_id, now(), p.due]); },
      hook: async (p, h) => {
        const started = now();
        const r = await fetch(hook, {
          method: "POST",
          headers: { "Content-Type": "application/json", "Idempotency-Key": `lead-${p.lead_id}` },
          body: JSON.stringify({ id: p.lead_id }),
        });
        await r.arrayBuffer();
        if (!r.ok) throw new Error(`HTTP ${r.status}`);
        await h.query(INSERT, [p.lead_id, "http", started]);
      },
    },
  });
  await runner.promise;
}
main().catch((e) => { console.error(e); process.exit(1); });
"""


def _graphile_missing() -> str | None:
    for tool in ("node", "npm"):
        if shutil.which(tool) is None:
            return f"{tool} is not on PATH"
    package = GRAPHILE_DIR / "node_modules" / "graphile-worker" / "package.json"
    if not package.exists() or json.loads(package.read_text()).get("version") != GRAPHILE_VERSION:
        GRAPHILE_DIR.mkdir(parents=True, exist_ok=True)
        manifest = GRAPHILE_DIR / "package.json"
        if not manifest.exists():
            manifest.write_text('{"name": "crmflow-bench-graphile-worker", "private": true}\n')
        try:
            subprocess.run(
                [
                    "npm",
                    "install",
                    "--no-audit",
                    "--no-fund",
                    f"graphile-worker@{GRAPHILE_VERSION}",
                ],
                cwd=GRAPHILE_DIR,
                capture_output=True,
                text=True,
                check=True,
                timeout=300,
            )
        except (subprocess.SubprocessError, OSError) as exc:
            err = getattr(exc, "stderr", "") or str(exc)
            return f"npm install graphile-worker@{GRAPHILE_VERSION} failed: {err.strip()[-300:]}"
    (GRAPHILE_DIR / "worker.js").write_text(GRAPHILE_SCRIPT)
    return None


def _graphile_version() -> str:
    package = GRAPHILE_DIR / "node_modules" / "graphile-worker" / "package.json"
    try:
        return str(json.loads(package.read_text())["version"])
    except (OSError, ValueError, KeyError):
        return "?"


async def _graphile_install(url: str) -> None:
    cli = GRAPHILE_DIR / "node_modules" / "graphile-worker" / "dist" / "cli.js"
    proc = await asyncio.create_subprocess_exec(
        "node",
        str(cli),
        "-c",
        as_uri(url),
        "--schema-only",
        cwd=GRAPHILE_DIR,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 120)
    if proc.returncode != 0:
        raise RuntimeError(f"graphile-worker --schema-only: {out.decode().strip()[-300:]}")


def _graphile_command(url: str, hook: str) -> tuple[list[str], str | None]:
    return ["node", str(GRAPHILE_DIR / "worker.js")], str(GRAPHILE_DIR)


PEERS: list[Peer] = [
    Peer(
        "graphile-worker",
        "PERFORM graphile_worker.add_job(TG_ARGV[0], json_build_object('lead_id', NEW.id))",
        "DELETE FROM graphile_worker._private_jobs",
        _graphile_missing,
        _graphile_version,
        _graphile_install,
        _graphile_command,
    ),
    Peer(
        "pgqueuer",
        "INSERT INTO pgqueuer (priority, entrypoint, payload, execute_after, status)"
        " VALUES (0, TG_ARGV[0], convert_to(NEW.id::text, 'UTF8'), now(), 'queued')",
        "TRUNCATE pgqueuer, pgqueuer_log",
        _pgqueuer_missing,
        lambda: _python_version("pgqueuer"),
        _pgqueuer_install,
        _python_command("pgqueuer"),
    ),
    Peer(
        "procrastinate",
        "PERFORM procrastinate_defer_jobs_v1(ARRAY[ROW('bench', TG_ARGV[0], 0, NULL, NULL,"
        " jsonb_build_object('lead_id', NEW.id), NULL)::procrastinate_job_to_defer_v1])",
        "TRUNCATE procrastinate_jobs CASCADE",
        _procrastinate_missing,
        lambda: _python_version("procrastinate"),
        _procrastinate_install,
        _python_command("procrastinate"),
    ),
]


# ───────── running a peer's jobs ─────────


class PeerProcess:
    """A peer's worker process; its output goes to a log file, shown when it fails."""

    def __init__(self, argv: list[str], cwd: str | None, env: dict[str, str]) -> None:
        self.log = tempfile.NamedTemporaryFile(  # noqa: SIM115 - closed in stop()
            "w+", prefix="crmflow-bench-peer-", suffix=".log", delete=False
        )
        self.proc = subprocess.Popen(
            argv, cwd=cwd, env={**os.environ, **env}, stdout=self.log, stderr=subprocess.STDOUT
        )

    def check(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"the worker exited ({self.proc.returncode}): {self.tail()}")

    def tail(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace").strip()[-400:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        os.unlink(self.log.name)


async def _sql(url: str, query: str, params: Any = None) -> list[dict[str, Any]]:
    async with await psycopg.AsyncConnection.connect(
        url, autocommit=True, row_factory=psycopg.rows.dict_row
    ) as conn:
        cur = await conn.execute(query, params)
        return await cur.fetchall() if cur.description else []


class PeerRun:
    """One peer in its own database: the jobs one after the other."""

    def __init__(self, peer: Peer, url: str, hook: str, calls: Any, timeout: float) -> None:
        self.peer, self.url, self.hook, self.calls = peer, url, hook, calls
        self.timeout = timeout

    async def setup(self) -> None:
        await _sql(self.url, PEER_SCHEMA)
        await self.peer.install(self.url)
        await _sql(self.url, _enqueue_function(self.peer.enqueue))

    async def job(self, task: str, effect: bool = False) -> None:
        """Empty the tables and the queue; the trigger enqueues ``task``."""
        await _sql(self.url, "TRUNCATE leads, leads_plain, tasks")
        await _sql(self.url, self.peer.reset)
        await _sql(
            self.url,
            "DROP TRIGGER IF EXISTS bench_enqueue ON leads;"
            " DROP TRIGGER IF EXISTS bench_effect ON tasks;"
            " CREATE TRIGGER bench_enqueue AFTER INSERT ON leads FOR EACH ROW"
            " WHEN (NEW.source = 'website_form')"
            f" EXECUTE FUNCTION bench_enqueue('{task}');"
            + (
                " CREATE TRIGGER bench_effect AFTER INSERT ON tasks FOR EACH ROW"
                " EXECUTE FUNCTION bench_effect();"
                if effect
                else ""
            ),
        )

    def worker(self) -> PeerProcess:
        uri = as_uri(self.url)
        argv, cwd = self.peer.command(uri, self.hook)
        return PeerProcess(argv, cwd, {"DATABASE_URL": uri, "HOOK_URL": self.hook})

    async def insert_leads(self, n: int) -> None:
        await _sql(
            self.url,
            "INSERT INTO leads (name, source) SELECT 'lead ' || i, 'website_form'"
            " FROM generate_series(1, %s) i",
            [n],
        )

    async def wait_rows(self, kind: str, n: int, worker: PeerProcess, timeout: float) -> float:
        start = time.monotonic()
        while True:
            rows = await _sql(self.url, "SELECT count(*) AS n FROM tasks WHERE kind = %s", [kind])
            if rows[0]["n"] >= n:
                return time.monotonic() - start
            worker.check()
            if time.monotonic() - start > timeout:
                raise TimeoutError(f"{rows[0]['n']}/{n} {kind} rows after {timeout:.0f} s")
            await asyncio.sleep(0.05)

    async def burst(self, n: int) -> dict[str, float]:
        await self.job("insert_task")
        await self.insert_leads(n)
        worker = self.worker()
        try:
            seconds = await self.wait_rows("task", n, worker, self.timeout)
        finally:
            worker.stop()
        return {"burst_rate": n / seconds}

    async def delayed(self, n: int) -> dict[str, float]:
        await self.job("first")
        await self.insert_leads(n)
        worker = self.worker()
        try:
            await self.wait_rows("second", n, worker, self.timeout)
        finally:
            worker.stop()
        rows = await _sql(
            self.url,
            "SELECT extract(epoch FROM started_at - due_at) AS late,"
            " extract(epoch FROM due_at) AS due, extract(epoch FROM created_at) AS done"
            " FROM tasks WHERE kind = 'second'",
        )
        late = [float(r["late"]) for r in rows]
        window = max(float(r["done"]) for r in rows) - min(float(r["due"]) for r in rows)
        return {
            "delayed_rate": n / window,
            "delayed_late_p50_s": percentile(late, 0.5),
            "delayed_late_p99_s": percentile(late, 0.99),
        }

    async def http(self, n: int) -> dict[str, float]:
        await self.job("hook")
        self.calls.clear()
        await self.insert_leads(n)
        worker = self.worker()
        try:
            await self.wait_rows("http", n, worker, self.timeout)
        finally:
            worker.stop()
        rows = await _sql(
            self.url,
            "SELECT extract(epoch FROM max(created_at) - min(started_at)) AS s"
            " FROM tasks WHERE kind = 'http'",
        )
        return {
            "http_rate": n / float(rows[0]["s"]),
            "http_duplicates": sum(self.calls.values()) - len(self.calls),
            "http_calls": float(sum(self.calls.values())),
        }

    async def latency(self, writes: int, warmup: int, rate: int = 50) -> dict[str, float]:
        await self.job("insert_task", effect=True)
        worker = self.worker()
        committed: dict[str, float] = {}
        seen: dict[str, float] = {}
        try:
            async with (
                await psycopg.AsyncConnection.connect(self.url, autocommit=True) as listener,
                await psycopg.AsyncConnection.connect(self.url, autocommit=True) as writer,
            ):
                await listener.execute("LISTEN bench_effect")

                async def listen() -> None:
                    async for note in listener.notifies():
                        seen[note.payload] = time.perf_counter()
                        if len(seen) >= writes:
                            return

                listening = asyncio.create_task(listen())
                try:
                    await asyncio.sleep(2.0)  # worker start-up
                    worker.check()
                    next_at = time.perf_counter()
                    for i in range(writes):
                        cur = await writer.execute(
                            "INSERT INTO leads (name, source) VALUES (%s, 'website_form')"
                            " RETURNING id",
                            [f"w{i}"],
                        )
                        row = await cur.fetchone()
                        assert row is not None
                        committed[str(row[0])] = time.perf_counter()
                        next_at += 1.0 / rate
                        await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
                    await asyncio.wait_for(asyncio.shield(listening), 30)
                except TimeoutError:
                    pass
                finally:
                    # The listener's connection closes only once nothing waits on it.
                    listening.cancel()
                    await asyncio.gather(listening, return_exceptions=True)
        finally:
            worker.stop()
        keys = list(committed)[warmup:]
        latencies = [(seen[k] - committed[k]) * 1000 for k in keys if k in seen]
        if not latencies:
            raise RuntimeError("no effect seen")
        return {
            "latency_p50_ms": percentile(latencies, 0.5),
            "latency_p99_ms": percentile(latencies, 0.99),
            "latency_missing": float(writes - len(seen)),
        }

    async def writers(self, seconds: int, rounds: int) -> dict[str, float]:
        """pgbench, 4 clients: with the peer's trigger ÷ the same table without."""
        await self.job("insert_task")
        script = "INSERT INTO {table} (name, source, score) VALUES ('lead', '{source}', 42);\n"
        tps: dict[tuple[str, str], list[float]] = {}
        for _ in range(rounds):
            for source in ("import", "website_form"):
                for table in ("leads_plain", "leads"):
                    tps.setdefault((table, source), []).append(
                        pgbench_tps(self.url, script.format(table=table, source=source), 4, seconds)
                    )
        med = {k: sorted(v)[len(v) // 2] for k, v in tps.items()}
        return {
            "writers_non_matching": med[("leads", "import")] / med[("leads_plain", "import")],
            "writers_matching": med[("leads", "website_form")]
            / med[("leads_plain", "website_form")],
        }


@dataclass
class PeerReport:
    name: str
    version: str = ""
    skipped: str | None = None
    figures: dict[str, float] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)

    def as_json(self, crmflow: dict[str, float]) -> dict[str, Any]:
        return {
            "version": self.version,
            "skipped": self.skipped,
            "errors": self.errors,
            "figures": {k: round(v, 3) for k, v in self.figures.items()},
            "crmflow_ratio": {
                k: round(r, 3) for k in self.figures if (r := ratio(crmflow, self, k)) is not None
            },
        }


def ratio(crmflow: dict[str, float], peer: PeerReport, key: str) -> float | None:
    """crmflow ÷ peer for a figure both have (not for counts of duplicates)."""
    if key == "http_duplicates" or key not in crmflow or key not in peer.figures:
        return None
    if peer.figures[key] == 0:
        return None
    return crmflow[key] / peer.figures[key]


def ahead(key: str, value: float) -> bool:
    """Whether crmflow ÷ peer = ``value`` puts crmflow ahead on figure ``key``."""
    higher = next(h for k, _, h in FIGURES if k == key)
    return value >= 1.0 if higher else value <= 1.0


async def _run_jobs(
    peer: Peer, quick: bool, hook: str, calls: Any, report: PeerReport, progress: Any
) -> None:
    size = sizes(quick)
    with scratch_database(f"crmflow_bench_peer_{peer.name.replace('-', '_')}") as url:
        run = PeerRun(peer, url, hook, calls, size.timeout)
        try:
            await run.setup()
        except Exception as exc:
            report.skipped = f"cannot be installed: {type(exc).__name__}: {exc}"[:500]
            return
        jobs: list[tuple[str, Callable[[], Any]]] = [
            ("burst", lambda: run.burst(size.burst)),
            ("delayed", lambda: run.delayed(size.delayed)),
            ("http", lambda: run.http(size.http)),
            ("latency", lambda: run.latency(size.writes, size.warmup)),
            ("writers", lambda: run.writers(size.pgbench_seconds, size.pgbench_rounds)),
        ]
        for job, fn in jobs:
            if progress:
                progress(f"{peer.name}: {job}")
            try:
                report.figures.update(await fn())
            except Exception as exc:
                report.errors[job] = f"{type(exc).__name__}: {exc}"[:500]


async def run_peer(
    peer: Peer, quick: bool, hook: str, calls: Any, progress: Any = None
) -> PeerReport:
    report = PeerReport(peer.name)
    try:
        reason = await asyncio.to_thread(peer.missing)
    except Exception as exc:
        reason = f"{type(exc).__name__}: {exc}"
    if reason:
        report.skipped = reason
        return report
    report.version = peer.version()
    try:
        await _run_jobs(peer, quick, hook, calls, report, progress)
    except Exception as exc:  # the scratch database itself: never fail the bench
        report.skipped = f"{type(exc).__name__}: {exc}"[:500]
    return report


# ───────── crmflow's side ─────────


async def crmflow_burst(events: int) -> float:
    """crmflow on the burst job, timed as P4 (from the worker's start)."""
    from bench.targets import TASK_ON_NEW_LEAD, _drain

    with scratch_database() as url:
        await prepare(url)
        await apply_active(url, [TASK_ON_NEW_LEAD])
        run = await _drain(url, events, timeout=600)
    return float(run["rate"])


async def crmflow_figures(
    quick: bool, results: dict[str, Any], progress: Any = None
) -> dict[str, float]:
    """crmflow's figures for the peers' jobs: from this run's results (P1, P3, Q1, Q2),
    running those that were left out; the burst is run here at the peers' size."""
    from bench import targets

    for key, fn in (("P1", targets.p1), ("P3", targets.p3), ("Q1", targets.q1), ("Q2", targets.q2)):
        if key not in results:
            if progress:
                progress(f"crmflow {key} for the peers")
            results[key] = await fn(quick)
    if progress:
        progress("crmflow: burst")
    figures: dict[str, float] = {"burst_rate": await crmflow_burst(sizes(quick).burst)}
    q1, q2, p3, p1 = results["Q1"], results["Q2"], results["P3"], results["P1"]
    figures["delayed_rate"] = q1.value
    if q1.detail.get("late_vs_ready_p99_s") is not None:
        figures["delayed_late_p99_s"] = q1.detail["late_vs_ready_p99_s"]
    figures["http_rate"] = q2.value
    figures["http_duplicates"] = q2.detail["duplicate_calls"]
    figures["latency_p50_ms"] = p3.value
    figures["latency_p99_ms"] = p3.detail["p99_ms"]
    figures["writers_non_matching"] = p1.value
    figures["writers_matching"] = p1.detail["matching_ratio"]
    return figures


async def run_peers(
    quick: bool,
    results: dict[str, Any],
    progress: Any = None,
    peers: list[Peer] | None = None,
) -> dict[str, Any]:
    """Every peer's figures and crmflow's; crmflow's are measured only when at least
    one peer could run."""
    from bench.targets import _CountingReceiver, local_endpoint

    reports: list[PeerReport] = []
    with local_endpoint() as hook:
        for peer in PEERS if peers is None else peers:
            reports.append(await run_peer(peer, quick, hook, _CountingReceiver.calls, progress))
            _CountingReceiver.calls.clear()
    crmflow: dict[str, float] = {}
    if any(r.skipped is None for r in reports):
        crmflow = await crmflow_figures(quick, results, progress)
    return {"crmflow": crmflow, "peers": reports}


def as_json(out: dict[str, Any]) -> dict[str, Any]:
    crmflow = out["crmflow"]
    return {
        "crmflow": {k: round(v, 3) for k, v in crmflow.items()},
        **{r.name: r.as_json(crmflow) for r in out["peers"]},
    }
