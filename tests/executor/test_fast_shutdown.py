"""``crmflow worker`` stops within seconds of SIGTERM while its database is away
(orchestrators kill at 10-30 s). The outage is real and confined to the test's own
database: it refuses connections and every session on it is terminated."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import psycopg

from tests.chaos.helpers import start_worker, wait_for
from tests.executor.test_worker_supervision import set_allow_connections

SHUTDOWN_LIMIT = 10.0


def registered(db_url: str) -> bool:
    with psycopg.connect(db_url) as conn:
        row = conn.execute("SELECT count(*) FROM crmflow.workers").fetchone()
    return bool(row and row[0])


def test_sigterm_with_the_database_away_stops_the_worker_fast(
    crm: psycopg.AsyncConnection[Any], db_url: str, server_url: str, tmp_path: Path
) -> None:
    dbname = str(psycopg.conninfo.conninfo_to_dict(db_url)["dbname"])
    worker = start_worker(db_url, tmp_path, concurrency=4)
    try:
        wait_for(lambda: registered(db_url), timeout=60)
        time.sleep(1.0)  # every loop at work
        set_allow_connections(server_url, dbname, False)
        try:
            time.sleep(3.0)  # the loops notice, retry, reconnect and fail
            started = time.monotonic()
            worker.popen.send_signal(signal.SIGTERM)
            try:
                code = worker.popen.wait(timeout=60)
            finally:
                took = time.monotonic() - started
                print(f"\nSIGTERM -> exit with the database away: {took:.1f} s")
        finally:
            set_allow_connections(server_url, dbname, True)
    finally:
        if worker.alive():
            worker.kill()
    assert took <= SHUTDOWN_LIMIT, worker.log()[-3000:]
    assert code == 0, worker.log()[-3000:]
